"""The generation engine the servers share: continuous batching on one worker thread that owns the model.

Front ends submit a `GenerationRequest` (prompt ids, sampling parameters, limits) and read `Event`s (text deltas,
then one event with a finish reason) from the returned `RequestHandle`, synchronously or with `async for`.
Running requests are decoded together, one batched forward pass per step; a new request is prefilled into a
free row of the batch KV cache and joins at the next step (short prompts that wait together are read together,
in one left-padded forward pass). A handle can be cancelled at any time (client gone,
Stop button); its row is freed at the next step and the others go on unchanged.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .cache import BatchCache, KVCache, PrefixStore
from .formats import format_for
from .generation import (SamplingParams, SequenceSampler, choose_rows, next_position_ids, prefix_length,
                         prompt_position_ids, reply_budget, seed_prefix)
from .tokenizer import StreamDecoder

logger = logging.getLogger(__name__)


PREFIX_MIN_REUSE = 32  # stored tokens worth taking a prompt out of a batched prefill pass for


class EngineBusy(RuntimeError):
    """The queue is full: the caller should answer 'try again later' rather than pile up work."""


class EngineClosed(RuntimeError):
    """The engine has been shut down."""


@dataclass
class GenerationRequest:
    input_ids: list[int]
    params: SamplingParams  # presence / frequency penalties included
    max_new_tokens: int
    stop_ids: tuple[int, ...] = ()


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
    prefix_hits: int = 0  # prompts that started where a finished sequence had been (see PrefixStore)
    prefix_tokens_reused: int = 0  # prompt tokens those did not read again
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


class _Sequence:
    """A request being decoded: its row in the batch, sampling state and text decoder."""

    def __init__(self, handle: RequestHandle, engine: "Engine", device):
        request = handle.request
        self.handle = handle
        self.stop_ids = set(request.stop_ids)
        self.prompt = list(request.input_ids)
        self.budget = reply_budget(engine.context_length, len(self.prompt), request.max_new_tokens)
        self.ids = torch.tensor([self.prompt], dtype=torch.long, device=device)  # (1, T): prefill and penalties read it
        self.sampler = SequenceSampler(request.params, self.ids)
        self.decoder = StreamDecoder(engine.tokenizer)
        self.count = 0
        self.generated: list[int] = []  # sampled ids, in order
        self.next_id: int | None = None  # the sampled id to feed at the next step
        self.position: torch.Tensor | None = None  # position ids of the last token fed
        self.stage: KVCache | None = None  # its own cache while a long prompt is read chunk by chunk


class Engine:
    """Continuous batching on one worker thread.

    Requests wait in a bounded FIFO queue. Up to max_batch sequences are decoded together, one batched forward
    pass per step; a new request is prefilled into a free row of the batch cache and joins at the next step,
    and a finished or cancelled one leaves without disturbing the others. A prompt longer than prefill_chunk
    tokens is read one chunk per step, so the running streams pause for a chunk, not for the whole prompt. Each keeps its own sampling
    parameters, seed, stop ids, penalties and token budget, so its text is the text it would get alone.

    Short prompts admitted in the same step are read together (left-padded, masked, each row at its own
    positions), at most prefill_batch_tokens tokens (padding included) per pass; None: every prompt in a pass of
    its own. A pass reads the weights once, so while it is bound by that read N prompts cost about what one
    does; past that point (~70 tokens for the mid shape on a 2-core CPU) a bigger pass mostly holds back the
    first rows' first tokens. 256 keeps 8 chat turns of ~30 tokens in one pass (there, in bf16 and int4, the
    slowest client's first token came sooner than with passes of 128, the mean about the same) and pairs up
    100-token prompts; a device with more compute per byte read may gain from a larger value.

    A finished sequence's keys and values (prompt and reply) are kept, up to prefix_cache_tokens positions in
    all (least recently used out; 0 or None: none kept): a prompt that starts with at least PREFIX_MIN_REUSE of
    the same ids (the next turn of a conversation, which front ends re-send whole; Regenerate; a system prompt
    shared by clients) is read from where they differ on, as a staged prompt. Not for ChatGLM-6B, whose prompt
    attends to itself both ways (its format does not chunk prompts).
    """

    def __init__(self, model, tokenizer, *, model_name: str | None = None, max_queue: int = 32,
                 max_batch: int = 8, prefill_chunk: int | None = 128, cache_capacity: int | None = None,
                 prefill_batch_tokens: int | None = 256, prefix_cache_tokens: int | None = 8192):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError("prefill_chunk must be at least 1 (or None: read prompts whole)")
        if prefill_batch_tokens is not None and prefill_batch_tokens < 1:
            raise ValueError("prefill_batch_tokens must be at least 1 (or None: read each prompt alone)")
        if prefix_cache_tokens is not None and prefix_cache_tokens < 0:
            raise ValueError("prefix_cache_tokens must be 0 or more (0 or None: keep no finished sequences)")
        self.prefill_batch_tokens = prefill_batch_tokens
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name or getattr(model, "name_or_path", None) or "chatglm"
        self.format = format_for(tokenizer.family)
        self.prefix = prefix_length(model)  # a P-Tuning v2 prefix: the first cache positions of every row
        self.context_length = model.config.seq_length
        if cache_capacity is not None:  # a preallocated cache of fixed shape (for CUDA graphs / torch.compile)
            if cache_capacity < 2 + self.prefix:
                raise ValueError(f"cache_capacity must be at least {2 + self.prefix} tokens"
                                 + (f" (2 + the P-Tuning prefix of {self.prefix})" if self.prefix else ""))
            self.context_length = min(self.context_length, cache_capacity)
        self.context_length -= self.prefix  # tokens a row holds besides the prefix
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.stats = EngineStats()
        self.cache = BatchCache(model.config, max_batch, model.dtype, model.device,
                                **({"capacity": cache_capacity, "fixed": True} if cache_capacity else {}))
        self._running: list[_Sequence] = []  # index = row in self.cache
        # Prompts longer than prefill_chunk are read a chunk per step between decode steps, one such prompt at a
        # time, in a cache of their own that joins the batch when complete; the others wait in _pending.
        # (A prompt that attends to itself both ways, as ChatGLM-6B's, is always read whole; None: never chunk.)
        self.prefill_chunk = prefill_chunk if self.format.chunked_prefill else None
        self.prefixes = (PrefixStore(prefix_cache_tokens, self.prefix)
                         if prefix_cache_tokens and self.format.chunked_prefill else None)
        self._staged: _Sequence | None = None
        self._pending: collections.deque[RequestHandle] = collections.deque()
        self._queue: queue.Queue[RequestHandle | None] = queue.Queue()
        self._lock = threading.Lock()
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="chatglm-engine", daemon=True)
        self._worker.start()

    # ---- submitting ---------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None = None) -> RequestHandle:
        """Queue a request; raises EngineBusy when max_queue requests are already waiting."""
        return self.submit_all([request], loop)[0]

    def submit_all(self, requests: list[GenerationRequest],
                   loop: asyncio.AbstractEventLoop | None = None) -> list[RequestHandle]:
        """Queue several requests (the choices of one call) together: all of them, or none (EngineBusy)."""
        for request in requests:
            self._check(request)
        if len(requests) > self.max_queue:
            raise ValueError(f"{len(requests)} requests at once is more than this engine's queue of "
                             f"{self.max_queue} can ever hold")
        handles = [RequestHandle(request, loop) for request in requests]
        with self._lock:
            if self._closed:
                raise EngineClosed("the engine has been shut down")
            if self.stats.queued + len(handles) > self.max_queue:
                raise EngineBusy(f"{self.stats.queued} requests are already waiting; try again shortly")
            self.stats.queued += len(handles)
            self.stats.requests_total += len(handles)
        for handle in handles:
            self._queue.put(handle)
        return handles

    def _check(self, request: GenerationRequest) -> None:
        request.params.validate()
        if not request.input_ids:
            raise ValueError("the prompt is empty")
        if len(request.input_ids) >= self.context_length:
            raise ValueError(f"the prompt is {len(request.input_ids)} tokens; this model's context is "
                             f"{self.context_length} tokens")
        if request.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop the worker: running and waiting requests end with finish "cancelled" after the current step."""
        with self._lock:
            self._closed = True
        self._queue.put(None)  # wakes a worker that waits for work
        self._worker.join(timeout)

    # ---- the worker ---------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._closed:  # checked every step: close() need not wait for a slot to free
                if not self._admit():
                    break
                if self._staged is not None:
                    self._prefill_chunk()
                if self._running:
                    self._decode_step()
        finally:
            for seq in list(reversed(self._running)):
                self._finish(seq, Event(finish="cancelled", error="the engine was shut down"))
            if self._staged is not None:
                self._end_staged(Event(finish="cancelled", error="the engine was shut down"))
            while self._pending:
                self._pending.popleft()._put(Event(finish="cancelled", error="the engine was shut down"))
            self._drain()

    def _in_progress(self) -> int:
        """Sequences holding a slot: decoding, plus the long prompt being read."""
        return len(self._running) + (self._staged is not None)

    def _slots_free(self) -> bool:
        return self._in_progress() < self.max_batch

    def _long(self, handle: RequestHandle) -> bool:
        return self.prefill_chunk is not None and len(handle.request.input_ids) > self.prefill_chunk

    def _reuse(self, handle: RequestHandle) -> tuple[int | None, int]:
        """(stored entry, tokens) of the prompt that can be taken from the prefix store, or (None, 0)."""
        if self.prefixes is None:
            return None, 0
        key, n = self.prefixes.match(handle.request.input_ids)
        return (key, n) if n >= PREFIX_MIN_REUSE else (None, 0)

    def _staged_prompt(self, handle: RequestHandle) -> bool:
        """Read in chunks into a cache of its own: a long prompt, or one continuing a stored sequence."""
        return self._long(handle) or self._reuse(handle)[0] is not None

    def _admit(self) -> bool:
        """Start waiting requests in free rows (blocking while nothing runs); False once closed. The short
        prompts taken in this step are read together (see _read_prompts)."""
        ready: list[RequestHandle] = []  # short prompts to read in this step, each holding a slot
        if self._staged is None and self._pending and self._slots_free():
            self._start(self._pending.popleft(), ready)  # staged, or short by now (its stored entry evicted)
        while self._in_progress() + len(ready) < self.max_batch:
            idle = not self._running and self._staged is None and not self._pending and not ready
            try:
                handle = self._queue.get() if idle else self._queue.get_nowait()
            except queue.Empty:
                break
            if handle is None:
                for waiting in ready:
                    waiting.done = True
                    waiting._put(Event(finish="cancelled", error="the engine was shut down"))
                return False
            if self._staged is not None and self._staged_prompt(handle):
                self._pending.append(handle)  # still counted as queued
                continue
            self._start(handle, ready)
        self._read_prompts(ready)
        return True

    def _start(self, handle: RequestHandle, ready: list[RequestHandle]) -> None:
        """Take a request off the queue: a short prompt goes to `ready`; a long one, or one continuing a stored
        sequence, is staged for chunks."""
        with self._lock:
            self.stats.queued -= 1
        key, reused = (None, 0) if handle.cancelled else self._reuse(handle)
        if handle.cancelled:
            handle.done = True
            handle._put(Event(finish="cancelled"))
        elif key is not None or self._long(handle):
            seq = _Sequence(handle, self, self.model.device)
            seq.stage = seed_prefix(self.model, KVCache.for_model(self.model.config, 1, self.model.dtype,
                                                                  self.model.device,
                                                                  capacity=self.prefix + len(seq.prompt)))
            if key is not None:
                self.prefixes.restore(key, reused, seq.stage)
            self._staged = seq
            with self._lock:
                self.stats.running += 1
                self.stats.prompt_tokens += len(seq.prompt)
                if key is not None:
                    self.stats.prefix_hits += 1
                    self.stats.prefix_tokens_reused += reused
        else:
            ready.append(handle)

    def _read_prompts(self, handles: list[RequestHandle]) -> None:
        """Prefill the short prompts taken in one step: shortest first, as many per forward pass as fit in
        prefill_batch_tokens tokens (each row padded to the longest of its pass); a pass of one is unpadded."""
        cap = self.prefill_batch_tokens
        group: list[RequestHandle] = []
        for handle in sorted(handles, key=lambda h: len(h.request.input_ids)):
            if group and (cap is None or (len(group) + 1) * len(handle.request.input_ids) > cap):
                self._prefill_group(group)
                group = []
            group.append(handle)
        if group:
            self._prefill_group(group)

    def _prefill_group(self, handles: list[RequestHandle]) -> None:
        if len(handles) == 1:
            self._prefill(handles[0])
        else:
            self._prefill_batch(handles)

    def _drain(self) -> None:
        while True:
            try:
                handle = self._queue.get_nowait()
            except queue.Empty:
                return
            if handle is not None:
                handle._put(Event(finish="cancelled", error="the engine was shut down"))

    @torch.inference_mode()
    def _prefill(self, handle: RequestHandle) -> None:
        model = self.model
        seq = _Sequence(handle, self, model.device)
        row = self.cache.add_row()
        self._running.append(seq)
        with self._lock:
            self.stats.running = self._in_progress()
            self.stats.prompt_tokens += len(seq.prompt)
        try:
            seed_prefix(model, row)
            ids = seq.ids
            positions = prompt_position_ids(model, ids)
            seq.position = positions[..., -1:]
            out = model.transformer(ids, positions, None, row, last_logits_only=True)
            self._take(seq, choose_rows([seq.sampler], out.logits[:, -1])[0])
        except Exception as e:  # a bug or an out-of-memory: fail this request, keep serving the others
            logger.exception("prefill failed")
            self._fail(seq, e)

    @torch.inference_mode()
    def _prefill_batch(self, handles: list[RequestHandle]) -> None:
        """Read several prompts in one forward pass: left-padded to the longest, a key-padding mask and each row's
        own position ids (those it gets alone), into a cache of their own; each row's prefix and real positions
        (not its padding) then go to a row of the batch cache, and each row's first token is chosen by its own
        sampler (one host sync). An error fails these requests only."""
        model, device = self.model, self.model.device
        seqs = [_Sequence(handle, self, device) for handle in handles]
        with self._lock:
            self.stats.running = self._in_progress() + len(seqs)
            self.stats.prompt_tokens += sum(len(seq.prompt) for seq in seqs)
        width = max(len(seq.prompt) for seq in seqs)
        try:
            ids = torch.full((len(seqs), width), getattr(model.config, "pad_token_id", None) or 0,
                             dtype=torch.long, device=device)
            real = torch.zeros(len(seqs), width, dtype=torch.long, device=device)  # 0 at the padding
            positions = []
            for i, seq in enumerate(seqs):
                pad = width - len(seq.prompt)
                ids[i, pad:] = seq.ids[0]
                real[i, pad:] = 1
                own = prompt_position_ids(model, seq.ids)  # (1, T) or (1, 2, T), as alone
                seq.position = own[..., -1:]
                positions.append(F.pad(own, (pad, 0)))
            cache = seed_prefix(model, KVCache.for_model(model.config, len(seqs), model.dtype, device,
                                                         capacity=self.prefix + width))
            out = model.transformer(ids, torch.cat(positions), real, cache, last_logits_only=True)
            chosen = choose_rows([seq.sampler for seq in seqs], out.logits[:, -1])
            for i, seq in enumerate(seqs):
                self.cache.adopt(cache, i, gap=(self.prefix, width - len(seq.prompt)))
                self._running.append(seq)
        except Exception as e:  # a bug or an out-of-memory: fail these requests, keep serving the others
            logger.exception("batched prefill failed")
            while self.cache.rows > len(self._running):  # the row a failed copy claimed (the last) goes first:
                self.cache.remove_row(self.cache.rows - 1)  # row i is again _running[i]'s when _fail frees rows
            for seq in reversed(seqs):
                if seq in self._running:
                    self._fail(seq, e)
                else:
                    seq.handle.done = True
                    seq.handle._put(Event(finish="error", error=f"{type(e).__name__}: {e}"))
            with self._lock:
                self.stats.running = self._in_progress()
            return
        with self._lock:
            self.stats.running = self._in_progress()
        for seq, token_id in zip(seqs, chosen):
            self._take(seq, token_id)

    @torch.inference_mode()
    def _prefill_chunk(self) -> None:
        """Read the next chunk of the staged long prompt; when it is complete, the sequence joins the batch."""
        seq, model = self._staged, self.model
        if seq.handle.cancelled:
            self._end_staged(Event(finish="cancelled"))
            return
        start = seq.stage.length - self.prefix  # prompt tokens read so far (or taken from the prefix store)
        end = min(start + (self.prefill_chunk or len(seq.prompt)), len(seq.prompt))
        try:
            ids = seq.ids[:, start:end]
            positions = prompt_position_ids(model, ids, start)
            out = model.transformer(ids, positions, None, seq.stage, last_logits_only=True)
            if end < len(seq.prompt):
                return
            self.cache.adopt(seq.stage)
            seq.stage, seq.position, self._staged = None, positions[..., -1:], None
            self._running.append(seq)
            self._take(seq, choose_rows([seq.sampler], out.logits[:, -1])[0])
        except Exception as e:
            logger.exception("prefill failed")
            if self._staged is seq:
                self._end_staged(Event(finish="error", error=f"{type(e).__name__}: {e}"))
            elif seq in self._running:
                self._fail(seq, e)

    def _end_staged(self, event: Event) -> None:
        seq, self._staged = self._staged, None
        seq.handle.done = True
        with self._lock:
            self.stats.running -= 1
        seq.handle._put(event)

    @torch.inference_mode()
    def _decode_step(self) -> None:
        for seq in [s for s in self._running if s.handle.cancelled]:
            self._finish(seq, Event(finish="cancelled", completion_tokens=seq.count))
        if not self._running:
            return
        device = self.model.device
        running = list(self._running)
        try:
            ids = torch.tensor([[s.next_id] for s in running], dtype=torch.long, device=device)
            steps = [next_position_ids(self.model, s.position) for s in running]
            positions = torch.cat(steps)
            mask = self.cache.step_mask()
            logits = self.model.transformer(ids, positions, mask, self.cache, last_logits_only=True).logits
            chosen = choose_rows([s.sampler for s in running], logits[:, -1])  # the step's one host sync
        except Exception as e:
            logger.exception("decode step failed")
            for seq in reversed(running):
                self._fail(seq, e)
            return
        for seq, step, token_id in zip(running, steps, chosen):
            seq.position = step
            self._take(seq, token_id)

    def _take(self, seq: _Sequence, token_id: int) -> None:
        """Handle one generated id: stream its text, or end the sequence (stop id, budget, cancel)."""
        handle = seq.handle
        seq.count += 1
        seq.generated.append(token_id)
        if handle.first_token_at is None:
            handle.first_token_at = time.monotonic()
            self._record_ttft(handle.first_token_at - handle.submitted)
        with self._lock:
            self.stats.tokens_generated += 1
        if token_id in seq.stop_ids:
            self._finish(seq, Event(text=seq.decoder.flush(), finish="stop", completion_tokens=seq.count))
            return
        if handle.cancelled:
            self._finish(seq, Event(finish="cancelled", completion_tokens=seq.count))
            return
        delta = seq.decoder.put(token_id)
        if seq.count >= seq.budget:
            self._finish(seq, Event(text=delta + seq.decoder.flush(), finish="length", completion_tokens=seq.count))
            return
        if delta:
            handle._put(Event(text=delta, completion_tokens=seq.count))
        seq.next_id = token_id

    def _fail(self, seq: _Sequence, error: Exception) -> None:
        self._finish(seq, Event(finish="error", error=f"{type(error).__name__}: {error}",
                                completion_tokens=seq.count))

    def _finish(self, seq: _Sequence, event: Event) -> None:
        """Send the last event and free the sequence's row (the last row moves into it), keeping its keys and
        values in the prefix store unless it failed."""
        row = self._running.index(seq)
        if self.prefixes is not None and event.finish != "error":
            fed = self.cache.lengths[row] - self.prefix  # the prompt and every sampled id but the last
            self.prefixes.remember((seq.prompt + seq.generated)[:fed], self.cache, row)
        self.cache.remove_row(row)
        last = self._running.pop()
        if last is not seq:
            self._running[row] = last
        if not self._running:
            self.cache.release()
        seq.handle.done = True
        with self._lock:
            self.stats.running = self._in_progress()
        seq.handle._put(event)

    def _record_ttft(self, seconds: float) -> None:
        with self._lock:
            recent = self.stats.ttft_seconds
            recent.append(seconds)
            del recent[:-1000]
