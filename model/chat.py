"""chat / stream_chat / generate with the original signatures, over the decode core and the family's format."""

from __future__ import annotations

from typing import Iterator

import torch

from .cache import KVCache
from .formats import format_for
from .generation import DECODE_ROOM, SamplingParams, generate_tokens, prefix_length, reply_budget, seed_prefix
from .reply import process_response_v1, process_response_v2, process_response_v3  # noqa: F401  (the original names)
from .tokenizer import ChatGLMTokenizer, StreamDecoder


class ChatMixin:
    """chat(), stream_chat() and generate() for the ChatGLM models."""

    # ---- the shared streaming core --------------------------------------------------------------
    def stream_ids(self, tokenizer: ChatGLMTokenizer, input_ids: list[int], *, params: SamplingParams,
                   max_new_tokens: int, stop_ids, cache: KVCache | None = None,
                   logits_processor=None) -> Iterator[tuple[str, str | None]]:
        """Generate after input_ids (one sequence) and yield (text delta, finish reason or None).

        The last event has finish reason "stop" (a stop id, which is not part of the text) or "length".
        """
        device = self.device
        ids = torch.tensor([input_ids], dtype=torch.long, device=device)
        decoder = StreamDecoder(tokenizer)
        hooks = list(logits_processor or [])
        stop_ids = set(stop_ids)
        last = None
        for token in generate_tokens(self, ids, max_new_tokens=max_new_tokens, params=params,
                                     stop_ids=sorted(stop_ids), cache=cache, logits_hooks=hooks):
            last = int(token[0])
            if last in stop_ids:
                break
            delta = decoder.put(last)
            if delta:
                yield delta, None
        yield decoder.flush(), ("stop" if last in stop_ids else "length")

    def _chat_params(self, do_sample, top_p, temperature, num_beams, kwargs) -> tuple[SamplingParams, int | None]:
        if num_beams != 1:
            raise NotImplementedError("beam search is not supported; use num_beams=1")
        defaults = format_for(self.config.family).defaults  # the original chat()'s, per family
        params = SamplingParams(
            do_sample=do_sample, temperature=defaults.temperature if temperature is None else temperature,
            top_p=defaults.top_p if top_p is None else top_p, top_k=kwargs.pop("top_k", defaults.top_k),
            repetition_penalty=kwargs.pop("repetition_penalty", 1.0),
            presence_penalty=kwargs.pop("presence_penalty", 0.0), frequency_penalty=kwargs.pop("frequency_penalty", 0.0),
            seed=kwargs.pop("seed", None))
        max_new_tokens = kwargs.pop("max_new_tokens", None)
        kwargs.pop("eos_token_id", None)
        if kwargs:
            raise TypeError(f"unexpected generation arguments: {', '.join(sorted(kwargs))}")
        return params, max_new_tokens

    def _chat_stream(self, tokenizer, query, history, role, past_key_values, max_length, params, max_new_tokens,
                     logits_processor):
        """Yield (parser, finished, cache) as the reply of one turn grows; the parser holds the reply so far."""
        fmt = format_for(tokenizer.family)
        cache = past_key_values
        input_ids = fmt.turn_ids(tokenizer, query, list(history or []), role, cached=cache is not None)
        if cache is None:
            cache = seed_prefix(self, KVCache.for_model(self.config, 1, self.dtype, self.device,
                                                        capacity=prefix_length(self) + len(input_ids) + DECODE_ROOM))
        context = cache.length + len(input_ids)
        limit = self.config.seq_length if max_length is None else min(max_length, self.config.seq_length)
        budget = reply_budget(limit, context, max_new_tokens)
        if budget <= 0 or context > self.config.seq_length:
            raise ValueError(f"the conversation is {context} tokens long, which leaves no room to reply "
                             f"(max_length {limit}, model context {self.config.seq_length}); "
                             f"clear the history or raise max_length")
        parser, seen = fmt.parser(), False
        for delta, finish in self.stream_ids(tokenizer, input_ids, params=params, max_new_tokens=budget,
                                             stop_ids=fmt.stop_ids(tokenizer), cache=cache,
                                             logits_processor=logits_processor):
            parser.feed(delta)
            seen = seen or bool(delta)
            if finish is not None:
                parser.finish()
            if seen or finish is not None:
                yield parser, finish is not None, cache

    # ---- the original API -----------------------------------------------------------------------
    @torch.inference_mode()
    def stream_chat(self, tokenizer, query: str, history=None, role: str = "user", past_key_values=None,
                    max_length: int | None = None, do_sample: bool = True, top_p: float | None = None,
                    temperature: float | None = None, logits_processor=None, return_past_key_values: bool = False,
                    num_beams: int = 1, **kwargs):
        """Yield (response, history) — plus the KV cache when return_past_key_values — as the reply grows.

        Reusing `past_key_values` from the previous turn continues the conversation without re-reading it;
        the cache object is extended in place.
        """
        params, max_new = self._chat_params(do_sample, top_p, temperature, num_beams, kwargs)
        fmt, history, last = format_for(tokenizer.family), list(history or []), None
        for parser, _, cache in self._chat_stream(tokenizer, query, history, role, past_key_values, max_length,
                                                     params, max_new, logits_processor):
            response, new_history = fmt.chat_result(parser, query, history, role)
            if response == last:
                continue  # only text the post-processing holds back or strips arrived
            last = response
            yield (response, new_history, cache) if return_past_key_values else (response, new_history)

    @torch.inference_mode()
    def chat(self, tokenizer, query: str, history=None, role: str = "user", max_length: int | None = None,
             num_beams: int = 1, do_sample: bool = True, top_p: float | None = None,
             temperature: float | None = None, logits_processor=None, **kwargs):
        """Return (response, history) for query after history (ChatGLM2: (query, response) pairs;
        ChatGLM3: role dicts, response a dict for tool calls)."""
        params, max_new = self._chat_params(do_sample, top_p, temperature, num_beams, kwargs)
        fmt, history = format_for(tokenizer.family), list(history or [])
        for parser, _, _ in self._chat_stream(tokenizer, query, history, role, None, max_length, params, max_new,
                                              logits_processor):
            pass
        return fmt.chat_result(parser, query, history, role)

    def process_response(self, output, history=None):
        """The original post-processing: ChatGLM2 / ChatGLM-6B take only the text, ChatGLM3 also the history."""
        return format_for(self.config.family).process_response(output, history)

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None, max_new_tokens: int | None = None,
                 max_length: int | None = None, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int = 50, top_p: float = 1.0, repetition_penalty: float = 1.0, eos_token_id=None,
                 pad_token_id: int | None = None, seed: int | None = None, streamer=None, logits_processor=None,
                 **kwargs) -> torch.Tensor:
        """Hugging Face style generate: returns (B, T + new) ids; finished rows are padded with pad_token_id."""
        kwargs.pop("use_cache", None)
        kwargs.pop("generation_config", None)
        if kwargs.pop("num_beams", 1) != 1:
            raise NotImplementedError("beam search is not supported; use num_beams=1")
        if kwargs:
            raise TypeError(f"unexpected generate arguments: {', '.join(sorted(kwargs))}")
        input_ids = input_ids.to(self.device)
        if attention_mask is not None and attention_mask.dim() == 4:  # ChatGLM-6B's (B, 1, T, T), 1 = blocked
            attention_mask = (~attention_mask[:, 0, -1, :].bool()).long()  # -> the keys each row may see
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
            if bool(attention_mask.all()):
                attention_mask = None
        if position_ids is not None:
            position_ids = position_ids.to(self.device)
        T = input_ids.shape[1]
        if max_new_tokens is None:
            max_new_tokens = (max_length if max_length is not None else 20 + T) - T
        eos = self.config.eos_token_id if eos_token_id is None else eos_token_id
        eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]
        pad = self.config.pad_token_id if pad_token_id is None else pad_token_id
        params = SamplingParams(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                                repetition_penalty=repetition_penalty, seed=seed)
        if streamer is not None:
            streamer.put(input_ids.cpu())
        out = [input_ids]
        for token in generate_tokens(self, input_ids, max_new_tokens=max_new_tokens, params=params, stop_ids=eos,
                                     position_ids=position_ids, attention_mask=attention_mask,
                                     logits_hooks=list(logits_processor or []), pad_id=pad):
            out.append(token[:, None])
            if streamer is not None:
                streamer.put(token.cpu())
        if streamer is not None:
            streamer.end()
        return torch.cat(out, dim=1)
