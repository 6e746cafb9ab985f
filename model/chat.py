"""chat / stream_chat with the original signatures, prompt formats per family, ChatGLM3 tool-call parsing."""

from __future__ import annotations

import ast
import copy
import re
from typing import Iterator

import torch

from .cache import KVCache
from .generation import DECODE_ROOM, SamplingParams, generate_tokens
from .tokenizer import ChatGLMTokenizer, StreamDecoder

TRAINING_TIME = ("[[训练时间]]", "2023年")


def process_response_v2(text: str) -> str:
    return text.strip().replace(*TRAINING_TIME)


_CJK = "\u4e00-\u9fff"
_PUNCTUATION = ((",", "，"), ("!", "！"), (":", "："), (";", "；"), ("?", "？"))


def process_response_v1(text: str) -> str:
    """ChatGLM-6B: strip, then ASCII , ! : ; ? next to a CJK character become their full-width forms."""
    return widen_punctuation(text.strip().replace(*TRAINING_TIME))


def widen_punctuation(text: str) -> str:
    """The original's rewrite, mark by mark: after a CJK character, then before one. Each character's result
    depends only on its two neighbours and the length never changes, which lets a stream rewrite as it goes."""
    for ascii_mark, wide in _PUNCTUATION:
        mark = re.escape(ascii_mark)
        text = re.sub(f"([{_CJK}]){mark}", lambda m: m.group(1) + wide, text)
        text = re.sub(f"{mark}([{_CJK}])", lambda m: wide + m.group(1), text)
    return text


def parse_tool_call(code: str) -> dict | None:
    """Keyword arguments of a `tool_call(a=1, b='x')` expression, read as literals (never executed)."""
    try:
        node = ast.parse(code.strip(), mode="eval").body
    except SyntaxError:
        return None
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "tool_call"
            and not node.args and all(kw.arg for kw in node.keywords)):
        return None
    try:
        return {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
    except (ValueError, TypeError, SyntaxError, RecursionError):
        return None


def process_response_v3(output: str, history: list[dict]) -> tuple[str | dict, list[dict]]:
    """Split a ChatGLM3 reply into assistant turns; a turn with metadata is a tool call (or tool content)."""
    content: str | dict = ""
    history = copy.deepcopy(history)
    for segment in output.split("<|assistant|>"):
        metadata, content = segment.split("\n", maxsplit=1) if "\n" in segment else ("", segment)
        if not metadata.strip():
            content = content.strip()
            history.append({"role": "assistant", "metadata": metadata, "content": content})
            content = content.replace(*TRAINING_TIME)
        else:
            history.append({"role": "assistant", "metadata": metadata, "content": content})
            if history[0]["role"] == "system" and "tools" in history[0]:
                parameters = parse_tool_call("\n".join(content.split("\n")[1:-1]))
                if parameters is not None:
                    content = {"name": metadata.strip(), "parameters": parameters}
                    continue
            content = {"name": metadata.strip(), "content": content}
    return content, history


class ChatMixin:
    """chat(), stream_chat() and generate() for the ChatGLM models."""

    CHAT_DEFAULTS = {"top_p": 0.8, "temperature": 0.8}  # ChatGLM2/3; ChatGLM-6B: 0.7 / 0.95

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
        top_p = self.CHAT_DEFAULTS["top_p"] if top_p is None else top_p  # the original's defaults per family
        temperature = self.CHAT_DEFAULTS["temperature"] if temperature is None else temperature
        params = SamplingParams(do_sample=do_sample, temperature=temperature, top_p=top_p,
                                top_k=kwargs.pop("top_k", 50), repetition_penalty=kwargs.pop("repetition_penalty", 1.0),
                                seed=kwargs.pop("seed", None))
        max_new_tokens = kwargs.pop("max_new_tokens", None)
        kwargs.pop("eos_token_id", None)
        if kwargs:
            raise TypeError(f"unexpected generation arguments: {', '.join(sorted(kwargs))}")
        return params, max_new_tokens

    def _chat_stream(self, tokenizer, query, history, role, past_key_values, max_length, params, max_new_tokens,
                     logits_processor):
        """Yield (raw reply so far, finished, cache) for one turn."""
        history = list(history or [])
        v3 = tokenizer.family == "chatglm3"
        cache = past_key_values
        if tokenizer.family == "chatglm1":
            if cache is not None:
                raise ValueError("ChatGLM-6B re-reads the whole conversation each turn: pass past_key_values=None")
            input_ids = tokenizer.encode(tokenizer.build_prompt(query, history))
        elif v3:
            # On a reused cache only the new turn is sent (the original re-sends [gMASK] sop).
            input_ids = tokenizer.build_chat_ids(query, [] if cache is not None else history, role,
                                                 prefix=cache is None)
        else:
            if cache is not None and history:
                input_ids = tokenizer.build_continuation_ids(query, history)
            else:
                input_ids = tokenizer.encode(tokenizer.build_prompt(query, history))
        stop_ids = tokenizer.reply_stop_ids()
        if cache is None:
            cache = KVCache.for_model(self.config, 1, self.dtype, self.device,
                                      capacity=len(input_ids) + DECODE_ROOM)
        context = cache.length + len(input_ids)
        max_length = self.config.seq_length if max_length is None else max_length
        budget = max_length - context
        if max_new_tokens is not None:
            budget = max_new_tokens
        if budget <= 0 or context > self.config.seq_length:
            raise ValueError(f"the conversation is {context} tokens long, which leaves no room to reply "
                             f"(max_length {max_length}, model context {self.config.seq_length}); "
                             f"clear the history or raise max_length")
        text = ""
        for delta, finish in self.stream_ids(tokenizer, input_ids, params=params, max_new_tokens=budget,
                                             stop_ids=stop_ids, cache=cache, logits_processor=logits_processor):
            text += delta
            yield text, finish is not None, cache

    def _postprocess(self, tokenizer, query, history, role, text):
        history = list(history or [])
        if tokenizer.family == "chatglm3":
            return process_response_v3(text, history + [{"role": role, "content": query}])
        response = process_response_v1(text) if tokenizer.family == "chatglm1" else process_response_v2(text)
        return response, history + [(query, response)]

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
        last_text, last_response = None, None
        for text, done, cache in self._chat_stream(tokenizer, query, history, role, past_key_values, max_length,
                                                   params, max_new, logits_processor):
            if text == last_text or (not text and not done):
                continue
            last_text = text
            response, new_history = self._postprocess(tokenizer, query, history, role, text)
            if response == last_response:
                continue  # only whitespace that post-processing strips arrived
            last_response = response
            yield (response, new_history, cache) if return_past_key_values else (response, new_history)

    @torch.inference_mode()
    def chat(self, tokenizer, query: str, history=None, role: str = "user", max_length: int | None = None,
             num_beams: int = 1, do_sample: bool = True, top_p: float | None = None,
             temperature: float | None = None, logits_processor=None, **kwargs):
        """Return (response, history) for query after history (ChatGLM2: (query, response) pairs;
        ChatGLM3: role dicts, response a dict for tool calls)."""
        params, max_new = self._chat_params(do_sample, top_p, temperature, num_beams, kwargs)
        text = ""
        for text, _, _ in self._chat_stream(tokenizer, query, history, role, None, max_length, params, max_new,
                                            logits_processor):
            pass
        return self._postprocess(tokenizer, query, history, role, text)

    def process_response(self, output, history=None):
        """The original post-processing: ChatGLM2 takes only the text, ChatGLM3 also the history."""
        if self.config.family == "chatglm3":
            return process_response_v3(output, history or [])
        if self.config.family == "chatglm1":
            return process_response_v1(output)
        return process_response_v2(output)

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
