"""Logits -> next token, and the prefill / decode loop that yields tokens one step at a time."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from .cache import KVCache
from .devices import code_path

DECODE_ROOM = 256  # positions reserved ahead for the reply; the cache grows (doubling) past them on demand


@dataclass
class SamplingParams:
    do_sample: bool = False  # False or temperature <= 0: greedy
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off; over the prompt and the reply (as transformers')
    presence_penalty: float = 0.0  # OpenAI-style: subtracted once from every id generated so far
    frequency_penalty: float = 0.0  # ... and this times how often it was generated
    seed: int | None = None

    def validate(self) -> None:
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature <= 0

    @classmethod
    def resolve(cls, defaults, temperature: float | None = None, top_p: float | None = None,
                top_k: int | None = None, **rest) -> "SamplingParams":
        """Parameters from a front end's settings, the family's defaults filling what it leaves None.
        A temperature or top_p of 0 means greedy: always the most likely token."""
        temperature = defaults.temperature if temperature is None else temperature
        top_p = defaults.top_p if top_p is None else top_p
        top_k = defaults.top_k if top_k is None else top_k
        if temperature <= 0 or top_p <= 0:
            return cls(do_sample=False, **rest)
        return cls(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k, **rest)


def reply_budget(context_length: int, prompt_end: int, requested: int | None) -> int:
    """The one context rule: prompt and reply together fit the context. prompt_end: tokens in the cache and the
    prompt; requested: the caller's limit on new tokens (None: the rest of the context)."""
    room = context_length - prompt_end
    return room if requested is None else min(requested, room)


def apply_repetition_penalty(logits: torch.Tensor, seen_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make every already-seen id less likely: positive logits divided, negative ones multiplied."""
    score = logits.gather(1, seen_ids)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter(1, seen_ids, score)


def guard_non_finite(logits: torch.Tensor, fallback_id: int = 5) -> torch.Tensor:
    """Rows holding NaN/inf (a numerical blow-up) become a one-hot on fallback_id, as the original does."""
    bad = ~torch.isfinite(logits).all(dim=-1, keepdim=True)
    guard = torch.zeros_like(logits)
    guard[:, fallback_id] = 5e4
    return torch.where(bad, guard, logits)


def warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p (the order of the original's warpers); returns filtered logits."""
    if params.temperature != 1.0:
        logits = logits / params.temperature
    if params.top_k > 0:
        k = min(params.top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= (1 - params.top_p)
        remove[..., -1:] = False  # always keep the most likely token
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """(B, vocab) processed logits -> (B,) ids."""
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = warp(logits.float(), params).softmax(dim=-1)
    if code_path(probs.device) == "mps":
        return draw_by_cdf(probs, generator)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def draw_by_cdf(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) probabilities -> (B,) ids, one uniform draw per row against the cumulative sum; never an id of
    probability 0. For MPS, where torch.multinomial can draw zero-probability tokens."""
    cdf = probs.cumsum(dim=-1)  # (B, V), non-decreasing; flat across zero-probability ids
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=cdf.dtype)
    # the first id whose cdf exceeds u * total has cdf[id] > cdf[id - 1], i.e. probability > 0 ...
    ids = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)  # (B, 1)
    # ... unless u * total rounds up to total: then the last id of probability > 0
    last = probs.shape[-1] - 1 - (probs > 0).flip(-1).to(probs.dtype).argmax(dim=-1, keepdim=True)
    return torch.minimum(ids, last).squeeze(1)


def is_in(ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """torch.isin(ids, table) for (B,) ids and a short (n,) table, by comparison: torch.isin on int64 fails on
    MPS under macOS 13."""
    return (ids[:, None] == table[None, :]).any(dim=-1)


def make_generator(seed: int | None, device) -> torch.Generator | None:
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def prompt_position_ids(model, input_ids: torch.Tensor, past: int = 0) -> torch.Tensor:
    """Position ids of a prompt after `past` cached tokens: (B, T), or (B, 2, T) for ChatGLM-6B's 2-D ones."""
    own = getattr(model, "prompt_position_ids", None)
    if own is not None:
        return own(input_ids, past)
    B, T = input_ids.shape
    return torch.arange(past, past + T, device=input_ids.device).expand(B, T)


def prefix_length(model) -> int:
    """Cache positions a P-Tuning v2 prefix takes before the tokens (0 for a model without one)."""
    return getattr(model, "prefix_length", 0)


def seed_prefix(model, cache):
    """A new cache for `model`, with its P-Tuning v2 prefix in it (model.seed_prefix) when it has one."""
    return model.seed_prefix(cache) if prefix_length(model) else cache


def next_position_ids(model, positions: torch.Tensor) -> torch.Tensor:
    """Position ids of the token that follows `positions` (only the last one is read)."""
    own = getattr(model, "next_position_ids", None)
    return own(positions) if own is not None else positions[..., -1:] + 1


class SequenceSampler:
    """The sampling state of one sequence (or of rows sharing its parameters, as in `generate`): its generator,
    the ids its penalties and hooks look at, and the choice of the next id. No host synchronisation."""

    def __init__(self, params: SamplingParams, prompt_ids: torch.Tensor, hooks: Sequence["LogitsHook"] = ()):
        params.validate()
        self.params = params
        self.hooks = list(hooks)
        self.device = prompt_ids.device  # of the ids, the generator and the sampling; logits are moved here
        self.generator = make_generator(params.seed, self.device)
        self.prompt_length = prompt_ids.shape[1]
        self.occurrence = bool(params.presence_penalty or params.frequency_penalty)
        self.need_ids = bool(self.hooks) or params.repetition_penalty != 1.0 or self.occurrence
        self.ids = prompt_ids  # (B, L): the prompt and what was generated, when something reads them
        self.counts: torch.Tensor | None = None  # (B, vocab): how often each id was generated

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, vocab) logits of the last position -> (B,) next ids."""
        return next_token(self.process(logits), self.params, self.generator)

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, vocab) logits -> float logits after the hooks, penalties and the non-finite guard."""
        logits = logits.float().to(self.device)  # from an output layer on another GPU than the embedding
        for hook in self.hooks:
            logits = hook(self.ids, logits)
        if self.params.repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, self.ids, self.params.repetition_penalty)
        if self.occurrence and self.counts is not None:
            logits = (logits - self.params.frequency_penalty * self.counts
                      - self.params.presence_penalty * (self.counts > 0).to(logits.dtype))
        return guard_non_finite(logits)

    def record(self, token: torch.Tensor, vocab: int) -> None:
        """Note the (B,) ids chosen, for the penalties and hooks of the next step."""
        if not self.need_ids:
            return
        self.ids = torch.cat([self.ids, token[:, None]], dim=-1)
        if self.occurrence:
            if self.counts is None:
                self.counts = torch.zeros(token.shape[0], vocab, device=self.device)
            self.counts.scatter_add_(1, token[:, None], torch.ones(token.shape[0], 1, device=self.device))


def choose_rows(samplers: Sequence[SequenceSampler], logits: torch.Tensor) -> list[int]:
    """(B, vocab) logits, one row per sampler (each of batch 1) -> the B chosen ids, with one host
    synchronisation for the whole batch."""
    chosen = torch.cat([s.choose(logits[i:i + 1]).to(samplers[0].device) for i, s in enumerate(samplers)])
    ids = chosen.tolist()
    vocab = logits.shape[-1]
    for sampler, token in zip(samplers, chosen.split(1)):
        sampler.record(token, vocab)
    return ids


LogitsHook = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (ids so far (B, L), logits (B, V)) -> logits


@torch.inference_mode()
def generate_tokens(model, input_ids: torch.Tensor, *, max_new_tokens: int, params: SamplingParams,
                    stop_ids: Sequence[int] = (), position_ids: torch.Tensor | None = None,
                    attention_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                    logits_hooks: Sequence[LogitsHook] = (), pad_id: int = 0) -> Iterator[torch.Tensor]:
    """Prefill input_ids (B, T) on top of `cache`, then decode; yields the (B,) next ids, one step at a time.

    Rows that emitted a stop id keep receiving pad_id; the loop ends when every row has stopped or after
    max_new_tokens. The cache ends up holding every token fed to the model (the last yielded one is not fed).
    """
    device = input_ids.device
    B, T = input_ids.shape
    if cache is None:
        room = prefix_length(model) + T + min(max_new_tokens, DECODE_ROOM)
        cache = seed_prefix(model, KVCache.for_model(model.config, B, model.dtype, device, capacity=room))
    past = cache.length  # a P-Tuning prefix included: it fills the context as tokens do
    limit = model.config.seq_length
    if past + T > limit:
        raise ValueError(f"the input is {past + T} tokens long; this model's context is {limit} tokens")
    max_new_tokens = reply_budget(limit, past + T, max_new_tokens)
    if position_ids is None:
        position_ids = prompt_position_ids(model, input_ids, past - prefix_length(model))
    if attention_mask is not None and attention_mask.shape[-1] == T and past:
        attention_mask = torch.cat([attention_mask.new_ones(B, past), attention_mask], dim=-1)
    sampler = SequenceSampler(params, input_ids, logits_hooks)
    stop = torch.tensor(list(stop_ids), device=device, dtype=torch.long)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    if max_new_tokens > 0:
        # Not the whole budget: a chat's budget is the rest of the context (0.87 GiB of cache for ChatGLM2-6B,
        # 3.5 GiB at 128K), mostly never used; each forward grows the cache as it needs.
        cache.reserve(T + min(max_new_tokens - 1, DECODE_ROOM))
    ids, positions = input_ids, position_ids
    for step in range(max_new_tokens):
        out = model.transformer(ids, positions, attention_mask, cache, last_logits_only=True)
        token = sampler.choose(out.logits[:, -1])
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        yield token
        if step == max_new_tokens - 1:
            return
        if stop.numel():  # without stop ids no row finishes: no need to wait for the device to tell
            finished |= is_in(token, stop)
            if bool(finished.all()):
                return
        sampler.record(token, out.logits.shape[-1])
        ids = token[:, None]
        positions = next_position_ids(model, positions)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, (~finished).long()[:, None]], dim=-1)
