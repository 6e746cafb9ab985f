"""The generation engine the servers share: one worker thread owns the model, requests queue, text streams back.

Front ends submit a `GenerationRequest` (prompt ids, sampling parameters, limits) and read `Event`s (text deltas,
then one event with a finish reason) from the returned `RequestHandle`, synchronously or with `async for`.
A handle can be cancelled at any time (client gone, Stop button); its generation ends at the next step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from .cache import KVCache
from .generation import SamplingParams, generate_tokens
from .tokenizer import StreamDecoder

logger = logging.getLogger(__name__)


class EngineBusy(RuntimeError):
    """The queue is full: the caller should answer 'try again later' rather than pile up work."""


class EngineClosed(RuntimeError):
    """The engine has been shut down."""


@dataclass
class GenerationRequest:
    input_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    stop_ids: tuple[int, ...] = ()
    presence_penalty: float = 0.0  # OpenAI-style: subtracted once from every id generated so far
    frequency_penalty: float = 0.0  # ... and this times how often it was generated


def occurrence_penalty(prompt_length: int, presence: float, frequency: float):
    """A logits hook lowering the logits of ids already generated (the prompt does not count)."""

    def hook(ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        generated = ids[:, prompt_length:]
        if generated.numel() == 0:
            return logits
        counts = torch.zeros_like(logits).scatter_add_(1, generated, torch.ones_like(generated, dtype=logits.dtype))
        return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)

    return hook


@dataclass
class Event:
    text: str = ""  # newly decoded text (never half a UTF-8 character)
    finish: str | None = None  # last event only: "stop" (stop id), "length", "cancelled" or "error"
    completion_tokens: int = 0  # tokens generated so far (the stop id included)
    error: str | None = None


@dataclass
class EngineStats:
    queued: int = 0
    running: int = 0
    requests_total: int = 0
    tokens_generated: int = 0
    prompt_tokens: int = 0
    ttft_seconds: list[float] = field(default_factory=list)  # recent times to first token


class RequestHandle:
    """The consumer's side of one request: iterate events; cancel() to stop its generation."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None):
        self.request = request
        self.prompt_tokens = len(request.input_ids)
        self._loop = loop
        self._events: asyncio.Queue | queue.Queue = asyncio.Queue() if loop else queue.Queue()
        self._cancelled = threading.Event()
        self.submitted = time.monotonic()
        self.first_token_at: float | None = None
        self.done = False

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def _put(self, event: Event) -> None:  # called from the worker thread
        if self._loop is None:
            self._events.put(event)
            return
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
            self.cancel()

    def __iter__(self):
        if self._loop is not None:
            raise TypeError("this handle was submitted with an event loop; use `async for`")
        while True:
            event = self._events.get()
            yield event
            if event.finish is not None:
                return

    async def __aiter__(self):
        if self._loop is None:
            raise TypeError("this handle was submitted without an event loop; iterate it synchronously")
        while True:
            event = await self._events.get()
            yield event
            if event.finish is not None:
                return


class Engine:
    """Serialises generation on one worker thread; requests wait in a bounded FIFO queue."""

    def __init__(self, model, tokenizer, *, model_name: str | None = None, max_queue: int = 32):
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name or getattr(model, "name_or_path", None) or "chatglm"
        self.family = tokenizer.family
        self.context_length = model.config.seq_length
        self.max_queue = max_queue
        self.stats = EngineStats()
        self._queue: queue.Queue[RequestHandle | None] = queue.Queue()
        self._lock = threading.Lock()
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="chatglm-engine", daemon=True)
        self._worker.start()

    # ---- submitting ---------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None = None) -> RequestHandle:
        """Queue a request; raises EngineBusy when max_queue requests are already waiting."""
        request.params.validate()
        if not request.input_ids:
            raise ValueError("the prompt is empty")
        if len(request.input_ids) >= self.context_length:
            raise ValueError(f"the prompt is {len(request.input_ids)} tokens; this model's context is "
                             f"{self.context_length} tokens")
        if request.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        handle = RequestHandle(request, loop)
        with self._lock:
            if self._closed:
                raise EngineClosed("the engine has been shut down")
            if self.stats.queued >= self.max_queue:
                raise EngineBusy(f"{self.stats.queued} requests are already waiting; try again shortly")
            self.stats.queued += 1
            self.stats.requests_total += 1
        self._queue.put(handle)
        return handle

    def close(self, timeout: float | None = 10.0) -> None:
        with self._lock:
            self._closed = True
        self._queue.put(None)
        self._worker.join(timeout)

    # ---- the worker ---------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            handle = self._queue.get()
            if handle is None:
                self._drain()
                return
            with self._lock:
                self.stats.queued -= 1
                self.stats.running += 1
            try:
                if handle.cancelled:
                    handle._put(Event(finish="cancelled"))
                else:
                    self._generate(handle)
            except Exception as e:  # a bug or an out-of-memory: fail this request, keep serving
                logger.exception("generation failed")
                handle._put(Event(finish="error", error=f"{type(e).__name__}: {e}"))
            finally:
                handle.done = True
                with self._lock:
                    self.stats.running -= 1

    def _drain(self) -> None:
        while True:
            try:
                handle = self._queue.get_nowait()
            except queue.Empty:
                return
            if handle is not None:
                handle._put(Event(finish="cancelled", error="the engine was shut down"))

    @torch.inference_mode()
    def _generate(self, handle: RequestHandle) -> None:
        request, model = handle.request, self.model
        with self._lock:
            self.stats.prompt_tokens += len(request.input_ids)
        budget = min(request.max_new_tokens, self.context_length - len(request.input_ids))
        ids = torch.tensor([request.input_ids], dtype=torch.long, device=model.device)
        cache = KVCache.for_model(model.config, 1, model.dtype, model.device, capacity=ids.shape[1] + budget)
        decoder = StreamDecoder(self.tokenizer)
        stop_ids = set(request.stop_ids)
        count, finish = 0, "length"
        hooks = []
        if request.presence_penalty or request.frequency_penalty:
            hooks.append(occurrence_penalty(ids.shape[1], request.presence_penalty, request.frequency_penalty))
        tokens = generate_tokens(model, ids, max_new_tokens=budget, params=request.params,
                                 stop_ids=sorted(stop_ids), cache=cache, logits_hooks=hooks)
        try:
            for token in tokens:
                token_id = int(token[0])
                count += 1
                if handle.first_token_at is None:
                    handle.first_token_at = time.monotonic()
                    self._record_ttft(handle.first_token_at - handle.submitted)
                with self._lock:
                    self.stats.tokens_generated += 1
                if token_id in stop_ids:
                    finish = "stop"
                    break
                if handle.cancelled:
                    finish = "cancelled"
                    break
                delta = decoder.put(token_id)
                if delta:
                    handle._put(Event(text=delta, completion_tokens=count))
        finally:
            tokens.close()
        handle._put(Event(text="" if finish == "cancelled" else decoder.flush(), finish=finish,
                          completion_tokens=count))

    def _record_ttft(self, seconds: float) -> None:
        with self._lock:
            recent = self.stats.ttft_seconds
            recent.append(seconds)
            del recent[:-1000]
