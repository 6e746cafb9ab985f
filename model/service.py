"""The completion service every front end talks to: messages + settings in; reply parts, then a finish out.

`LocalService` runs the conversation on this machine's engine; `model.remote.RemoteService` sends it to an
OpenAI-compatible server. Both give the same `Completion`: iterate it (or `async for` it, locally) for `ReplyPart`s
(content deltas and ChatGLM3 tool calls) and one last `Finish`; `cancel()` stops it at any time.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from .engine import Engine, EngineBusy, EngineClosed, Event, GenerationRequest, RequestHandle
from .formats import ChatFormat, ConversationError, Message
from .generation import SamplingParams, reply_budget
from .reply import ReplyParser, ReplyPart

__all__ = ["Capabilities", "Completion", "CompletionSettings", "ConversationError", "Finish", "LocalService",
           "Message", "ReplyPart", "ServiceBusy", "ServiceError", "ServiceUnavailable"]


class ServiceError(RuntimeError):
    """The service could not take the request (the message says why)."""


class ServiceBusy(ServiceError):
    """Too many requests are waiting: try again shortly."""


class ServiceUnavailable(ServiceError):
    """The service is shut down or cannot be reached."""


@dataclass
class CompletionSettings:
    """How to reply. None: the family's default (sampling) or the rest of the context (lengths)."""

    temperature: float | None = None  # 0: always the most likely token
    top_p: float | None = None  # 0: always the most likely token
    top_k: int | None = None  # 0: off
    max_tokens: int | None = None  # tokens in the reply
    max_length: int | None = None  # tokens in the prompt and the reply together (the original demos' limit)
    seed: int | None = None  # choice i of a call samples with seed + i
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)  # strings that end the reply (not included)
    tools: list[dict] | None = None  # functions offered ({"name", "description", "parameters"})
    forced_tool: str | None = None  # the reply must call this tool


@dataclass
class Finish:
    """The last item of a completion."""

    reason: str  # "stop", "length", "tool_calls", "cancelled" or "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None  # reason "error": what went wrong


@dataclass(frozen=True)
class Capabilities:
    """What a front end may offer for this model (it never asks a family's name)."""

    display_name: str = "ChatGLM"
    has_system_role: bool = True
    supports_tools: bool = False
    temperature: float = 0.8  # what the reply samples with when the settings leave it None (for sliders)
    top_p: float = 0.8

    def system_messages(self, system: str) -> list[Message]:
        """A system prompt as the opening messages (none when the model has no system turn)."""
        return [Message("system", system)] if system.strip() and self.has_system_role else []


def capabilities_of(fmt: ChatFormat) -> Capabilities:
    return Capabilities(fmt.display_name, fmt.has_system_role, fmt.supports_tools, fmt.defaults.temperature,
                        fmt.defaults.top_p)


class Completion:
    """One reply being generated: iterate for ReplyParts and a final Finish; cancel() to stop it."""

    prompt_tokens = 0

    def cancel(self) -> None:
        raise NotImplementedError

    def __iter__(self):
        raise NotImplementedError

    def text(self) -> tuple[str, Finish]:
        """Run to the end: (the content, the finish)."""
        content, finish = "", None
        for item in self:
            if isinstance(item, Finish):
                finish = item
            else:
                content += item.content
        return content, finish


class LocalCompletion(Completion):
    """A completion on the local engine: engine events through the reply parser."""

    def __init__(self, handle: RequestHandle, parser: ReplyParser):
        self.handle, self.parser = handle, parser
        self.prompt_tokens = handle.prompt_tokens

    def cancel(self) -> None:
        self.handle.cancel()

    @property
    def cancelled(self) -> bool:
        return self.handle.cancelled

    def _items(self, event: Event) -> list:
        parser = self.parser
        parts = parser.feed(event.text)
        if parser.stopped:
            self.handle.cancel()  # a stop string matched: no need to generate further
        if event.finish is not None:
            parts += parser.finish()
        items: list = [p for p in parts if p.tool_call is not None or p.content]
        if event.finish is None:
            return items
        if event.finish == "cancelled" and not parser.stopped:
            reason = "cancelled"
        elif event.finish == "error":
            reason = "error"
        else:
            reason = "tool_calls" if parser.tool_calls else ("stop" if parser.stopped else event.finish)
        return items + [Finish(reason, self.prompt_tokens, event.completion_tokens, event.error)]

    def __iter__(self):
        try:
            for event in self.handle:
                yield from self._items(event)
        finally:
            self.handle.cancel()  # no-op when finished; frees the slot when the consumer stopped early

    async def __aiter__(self):
        try:
            async for event in self.handle:
                for item in self._items(event):
                    yield item
        finally:
            self.handle.cancel()


class LocalService:
    """Completions from a model on this machine, through its engine (continuous batching, cancellation)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.format: ChatFormat = engine.format
        self.capabilities = capabilities_of(self.format)
        self.model_name = engine.model_name
        self.context_length = engine.context_length
        self.max_queue = engine.max_queue

    def prompt_ids(self, messages: list[Message], settings: CompletionSettings) -> list[int]:
        """The prompt, checked against the context; ConversationError (with the parameter to blame) if it
        cannot be answered."""
        tools = settings.tools or None
        ids = self.format.prompt_ids(self.engine.tokenizer, messages, tools, settings.forced_tool)
        limit, prompt = self.context_length, len(ids)
        if settings.max_length is not None and settings.max_length < limit:
            limit = settings.max_length
            if prompt >= limit:
                raise ConversationError(f"the conversation is {prompt} tokens, which leaves no room for a reply "
                                        f"within max_length {limit}: clear the history or raise max_length",
                                        "max_length")
        if prompt >= limit:
            raise ConversationError(f"This model's maximum context length is {limit} tokens; the messages take "
                                    f"{prompt} tokens. Shorten the conversation.", "messages")
        if settings.max_tokens is not None and prompt + settings.max_tokens > limit:
            raise ConversationError(f"This model's maximum context length is {limit} tokens; you asked for "
                                    f"{prompt + settings.max_tokens} ({prompt} in the messages, {settings.max_tokens}"
                                    f" in the completion). Lower max_tokens or shorten the conversation.",
                                    "max_tokens")
        return ids

    def requests(self, ids: list[int], settings: CompletionSettings, n: int = 1) -> list[GenerationRequest]:
        limit = min(settings.max_length or self.context_length, self.context_length)
        budget = reply_budget(limit, len(ids), settings.max_tokens)
        stop_ids = tuple(self.format.stop_ids(self.engine.tokenizer))
        out = []
        for i in range(n):
            seed = None if settings.seed is None else (settings.seed + i) % 2**64
            params = SamplingParams.resolve(self.format.defaults, settings.temperature, settings.top_p,
                                            settings.top_k, repetition_penalty=settings.repetition_penalty,
                                            presence_penalty=settings.presence_penalty,
                                            frequency_penalty=settings.frequency_penalty, seed=seed)
            params.validate()
            out.append(GenerationRequest(list(ids), params, budget, stop_ids))
        return out

    def start(self, messages: list[Message], settings: CompletionSettings | None = None, *, n: int = 1,
              loop: asyncio.AbstractEventLoop | None = None, prompt_ids: list[int] | None = None) -> list[Completion]:
        """Queue n choices of a reply to messages (all or none). loop: the event loop that will `async for`
        them. prompt_ids: the prompt when the caller already built it (with prompt_ids(messages, settings)).
        Raises ConversationError / ValueError (bad input), ServiceBusy, ServiceUnavailable."""
        settings = settings or CompletionSettings()
        ids = self.prompt_ids(messages, settings) if prompt_ids is None else prompt_ids
        try:
            handles = self.engine.submit_all(self.requests(ids, settings, n), loop=loop)
        except EngineBusy as e:
            raise ServiceBusy(f"the model is busy: {e}") from e
        except EngineClosed as e:
            raise ServiceUnavailable(str(e)) from e
        tool_names = [t["name"] for t in settings.tools or []]
        return [LocalCompletion(h, self.format.parser(settings.stop, tool_names, settings.forced_tool))
                for h in handles]

    def complete(self, messages: list[Message], settings: CompletionSettings | None = None) -> Completion:
        """One reply (for a synchronous consumer)."""
        return self.start(messages, settings)[0]

    def close(self) -> None:
        self.engine.close()
