"""Role messages -> prompt ids, and the streaming reply parser (content, stop strings, ChatGLM3 tool calls).

Servers speak in OpenAI-style messages; this module turns them into the prompt each family was trained on and
turns the generated text back into content deltas and tool calls, so that a streamed reply joined together is
exactly the non-streamed reply.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from .chat import TRAINING_TIME, parse_tool_call, widen_punctuation

ASSISTANT_MARK = "<|assistant|>"
DEFAULT_TOOL_PROMPT = "Answer the following questions as best as you can. You have access to the following tools:"
PUNCTUATION_MARKS = ",!:;?"  # rewritten by ChatGLM-6B's post-processing, depending on the next character
_NAME_CHARS = re.compile(r"[\w.\-]*", re.ASCII)  # what a metadata (tool name) line may hold


class ConversationError(ValueError):
    """The messages cannot be turned into a prompt for this model (the message says why)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class Message:
    role: str  # system, user, assistant, tool (= observation)
    content: str = ""
    tool_calls: list[dict] = field(default_factory=list)  # assistant: [{"name", "arguments" (JSON text)}]


def render_tool_call(name: str, arguments: str) -> str:
    """An assistant tool call as ChatGLM3 writes it: a python block calling tool_call(**arguments)."""
    try:
        args = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError as e:
        raise ConversationError(f"tool call arguments of {name!r} are not valid JSON: {e}") from e
    if not isinstance(args, dict):
        raise ConversationError(f"tool call arguments of {name!r} must be a JSON object")
    if not all(isinstance(k, str) and k.isidentifier() for k in args):
        raise ConversationError(f"tool call arguments of {name!r} must have identifier keys")
    call = ", ".join(f"{k}={v!r}" for k, v in args.items())
    return f"```python\ntool_call({call})\n```"


def build_prompt_ids(tokenizer, messages: list[Message], tools: list[dict] | None = None,
                     forced_tool: str | None = None) -> list[int]:
    """Prompt ids for a conversation ending in a user (or tool) message, ready for the assistant's reply.

    tools: function definitions ({"name", "description", "parameters"}) offered to a ChatGLM3 model;
    forced_tool: name of a tool the reply must call (its name is written as the reply's metadata line).
    """
    if not messages:
        raise ConversationError("messages must not be empty", "messages")
    if tokenizer.family == "chatglm3":
        return _chatglm3_ids(tokenizer, messages, tools, forced_tool)
    if tools or forced_tool or any(m.role == "tool" or m.tool_calls for m in messages):
        raise ConversationError("tool calling needs a ChatGLM3 checkpoint; this model is " + tokenizer.family,
                                "tools")
    return tokenizer.encode(tokenizer.build_prompt(*_chatglm2_turns(messages)))


def _chatglm2_turns(messages: list[Message]) -> tuple[str, list[tuple[str, str]]]:
    """ChatGLM2 has no roles beyond question/answer rounds: system text opens the first question."""
    system = "\n".join(m.content for m in messages if m.role == "system")
    history: list[tuple[str, str]] = []
    query: str | None = None
    for m in messages:
        if m.role == "user":
            query = m.content if query is None else query + "\n" + m.content
        elif m.role == "assistant":
            if query is None:
                raise ConversationError("an assistant message must follow a user message", "messages")
            history.append((query, m.content))
            query = None
    if query is None:
        raise ConversationError("the last message must be from the user", "messages")
    if system:
        if history:
            history[0] = (system + "\n" + history[0][0], history[0][1])
        else:
            query = system + "\n" + query
    return query, history


def _chatglm3_ids(tokenizer, messages, tools, forced_tool) -> list[int]:
    history: list[dict] = []
    for m in messages:
        if m.role == "system":
            history.append({"role": "system", "content": m.content})
        elif m.role == "user":
            history.append({"role": "user", "content": m.content})
        elif m.role == "tool":
            history.append({"role": "observation", "content": m.content})
        elif m.role == "assistant":
            if m.content or not m.tool_calls:
                history.append({"role": "assistant", "metadata": "", "content": m.content})
            for call in m.tool_calls:
                history.append({"role": "assistant", "metadata": call["name"],
                                "content": render_tool_call(call["name"], call.get("arguments") or "")})
        else:
            raise ConversationError(f"unknown role {m.role!r}", "messages")
    if tools:
        system = next((h for h in history if h["role"] == "system"), None)
        if system is None:
            system = {"role": "system", "content": DEFAULT_TOOL_PROMPT}
            history.insert(0, system)
        system["tools"] = tools
    last = history.pop()
    if last["role"] not in ("user", "observation"):
        raise ConversationError("the last message must be from the user or a tool", "messages")
    ids = tokenizer.build_chat_ids(last["content"], history, last["role"])
    if forced_tool:
        ids += tokenizer.sp.encode(f"{forced_tool}\n")
    return ids


# ---- the reply ---------------------------------------------------------------------------------------
@dataclass
class ReplyPart:
    content: str = ""  # text to show
    tool_call: dict | None = None  # {"name", "arguments" (JSON text)}


class ReplyParser:
    """Feed generated text deltas; get content deltas and finished tool calls back.

    - The reply is stripped of surrounding whitespace ("[[训练时间]]" becomes "2023年", as the original does).
    - Stop strings end the reply; their text is not returned (`stopped` tells the caller to stop generating).
    - ChatGLM3: every segment (the reply's start and each `<|assistant|>`) opens with a metadata line; a tool's
      name there (when tools were offered) makes the segment a tool call, which is returned once complete,
      with its `tool_call(...)` keyword arguments as JSON. A metadata line must look like a name; text that
      does not is content (the original would take any first line for a name).
    """

    def __init__(self, family: str, stop: list[str] | None = None, tool_names: list[str] | None = None,
                 forced_tool: str | None = None):
        self.v3 = family == "chatglm3"
        self.v1 = family == "chatglm1"
        self.raw = ""  # ChatGLM-6B: the content so far, before its punctuation rewrite
        self.sent = 0  # ... and how much of it has been returned
        self.stop = [s for s in (stop or []) if s]
        self.tool_names = set(tool_names or [])
        self.state = "content"
        self.meta = ""
        self.tool_name = ""
        self.tool_text = ""
        self.pending = ""  # content not yet safe to emit (maybe whitespace at the end, maybe a marker's start)
        self.started = False  # content emitted yet (leading whitespace is dropped)
        self.stopped = False
        self.tool_calls: list[dict] = []
        if forced_tool:
            self.state, self.tool_name = "tool", forced_tool
        elif self.v3:
            self.state = "meta"

    def _markers(self) -> list[str]:
        return self.stop + [TRAINING_TIME[0]] + ([ASSISTANT_MARK] if self.v3 else [])

    def feed(self, text: str) -> list[ReplyPart]:
        if self.stopped:
            return []
        out: list[ReplyPart] = []
        while text and not self.stopped:
            if self.state == "meta":
                text = self._feed_meta(text, out)
            elif self.state == "tool":
                text = self._feed_tool(text, out)
            else:
                text = self._feed_content(text, out)
        return out

    def finish(self) -> list[ReplyPart]:
        """Everything held back, at the end of generation."""
        out: list[ReplyPart] = []
        if self.stopped:
            return out
        if self.state == "meta" and self.meta:
            meta, self.meta, self.state = self.meta, "", "content"
            self._feed_content(meta, out)
        if self.state == "tool":
            self._end_tool(out)
        self._emit(self.pending.rstrip(), out)
        self.pending = ""
        self._release(out, final=True)
        return out

    # ---- states -----------------------------------------------------------------------------------
    def _feed_meta(self, text: str, out: list[ReplyPart]) -> str:
        self.meta += text
        line, newline, rest = self.meta.partition("\n")
        if not _NAME_CHARS.fullmatch(line.strip()):
            text, self.meta, self.state = self.meta, "", "content"  # not a metadata line: it is content
            return text
        if not newline:
            return ""
        name, self.meta = line.strip(), ""
        if name and name in self.tool_names:
            self.state, self.tool_name, self.tool_text = "tool", name, ""
        else:
            self.state = "content"  # empty metadata, or a name that is not an offered tool: show the content
        return rest

    def _feed_tool(self, text: str, out: list[ReplyPart]) -> str:
        self.tool_text += text
        head, mark, rest = self.tool_text.partition(ASSISTANT_MARK)
        if not mark:
            return ""
        self.tool_text = head
        self._end_tool(out)
        self.state = "meta"
        return rest

    def _end_tool(self, out: list[ReplyPart]) -> None:
        lines = self.tool_text.strip().split("\n")
        code = "\n".join(lines[1:-1]) if len(lines) > 2 and lines[0].startswith("```") else "\n".join(lines)
        arguments = parse_tool_call(code)
        if arguments is None:  # not a call we can read: show what the model wrote
            self._feed_content(f"{self.tool_name}\n{self.tool_text}", out)
        else:
            call = {"name": self.tool_name, "arguments": json.dumps(arguments, ensure_ascii=False)}
            self.tool_calls.append(call)
            out.append(ReplyPart(tool_call=call))
        self.tool_text, self.tool_name, self.state = "", "", "content"

    def _feed_content(self, text: str, out: list[ReplyPart]) -> str:
        self.pending += text
        while True:
            hits = [(self.pending.find(m), m) for m in self._markers()]
            hits = [(i, m) for i, m in hits if i >= 0]
            if not hits:
                break
            i, mark = min(hits)
            before, after = self.pending[:i], self.pending[i + len(mark):]
            if mark in self.stop:
                self._emit(before.rstrip(), out)
                self.pending, self.stopped = "", True
                return ""
            if mark == ASSISTANT_MARK:
                self.pending = before
                self.state = "meta"
                return after
            self.pending = before + TRAINING_TIME[1] + after
        hold = max((_overlap(self.pending, m) for m in self._markers()), default=0)
        safe = self.pending[:len(self.pending) - hold]
        body = safe.rstrip()
        self._emit(body, out)
        self.pending = self.pending[len(body):]
        return ""

    def _emit(self, text: str, out: list[ReplyPart]) -> None:
        if not self.started:
            text = text.lstrip()
        if not text:
            return
        self.started = True
        if self.v1:
            self.raw += text
            self._release(out)
        else:
            self._add(text, out)

    def _release(self, out: list[ReplyPart], final: bool = False) -> None:
        """ChatGLM-6B: return the rewritten content, except a last mark whose next character is still unknown."""
        if not self.v1:
            return
        end = len(self.raw) if final or self.raw[-1:] not in PUNCTUATION_MARKS else len(self.raw) - 1
        if end > self.sent:
            start = max(0, self.sent - 1)  # one character of context before: the rewrite looks one back
            self._add(widen_punctuation(self.raw[start:end + 1])[self.sent - start:end - start], out)
            self.sent = end

    @staticmethod
    def _add(text: str, out: list[ReplyPart]) -> None:
        if out and out[-1].tool_call is None:
            out[-1].content += text
        else:
            out.append(ReplyPart(content=text))


def _overlap(text: str, marker: str) -> int:
    """Length of the longest end of text that is a proper start of marker."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
