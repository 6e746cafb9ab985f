"""ChatGLM2 / ChatGLM3 tokenizer: SentencePiece plus the ChatGLM special tokens and chat prompt builders."""

from __future__ import annotations

import json
import os

from transformers import BatchEncoding

from .config import FAMILIES, infer_family
from .hub import read_json, resolve_model_dir
from .tokenizer_base import TokenizerBase, check_pair, input_id_lists, replace_lone_surrogates  # noqa: F401 (the front ends import it from here)
from .tokenizer_v1 import VOCAB_FILE as V1_VOCAB_FILE, ChatGLM1Tokenizer

SPECIAL_TOKENS = {
    "chatglm2": ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"],
    "chatglm3": ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop",
                 "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"],
}
ROLES = ("system", "user", "assistant", "observation")
VOCAB_FILE = "tokenizer.model"


class ChatGLMTokenizer(TokenizerBase):
    """Text <-> ids for ChatGLM2/3 (left padding, [gMASK] sop prefix, per-family special tokens)."""

    vocab_files_names = {"vocab_file": VOCAB_FILE}
    model_input_names = ["input_ids", "attention_mask", "position_ids"]

    def __init__(self, vocab_file: str, family: str = "chatglm2", name_or_path: str = "", **kwargs):
        if family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
        self.vocab_file = vocab_file
        self.family = family
        self.name_or_path = name_or_path
        self.sp = self._sentencepiece(vocab_file)
        self.n_sp = self.sp.vocab_size()
        self.special_tokens = {tok: self.n_sp + i for i, tok in enumerate(SPECIAL_TOKENS[family])}
        self.index_special_tokens = {i: tok for tok, i in self.special_tokens.items()}
        self.eos_token_id = self.sp.eos_id()
        self.pad_token_id = self.sp.unk_id()
        self.bos_token_id = self.sp.bos_id()
        self.eos_token = "</s>"
        self.pad_token = "<unk>"

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: str, *args, family: str | None = None, revision: str | None = None,
                        **kwargs) -> "ChatGLMTokenizer":
        """Load from a checkpoint directory or Hub id (tokenizer.model + tokenizer_config.json)."""
        path = resolve_model_dir(name_or_path, revision=revision, weights=False)
        if family == "chatglm1" or (family is None and os.path.isfile(os.path.join(path, V1_VOCAB_FILE))):
            return ChatGLM1Tokenizer.from_pretrained(path)  # ChatGLM-6B (e.g. reached through AutoTokenizer)
        vocab_file = cls._vocab_path(path, VOCAB_FILE)
        if family is None:
            family = cls._family_of(path)
        return cls(vocab_file, family=family, name_or_path=str(name_or_path))

    @staticmethod
    def _family_of(path: str) -> str:
        dicts = []
        for name in ("config.json", "tokenizer_config.json"):
            p = os.path.join(path, name)
            dicts.append(read_json(p) if os.path.isfile(p) else {})
        family, _ = infer_family(*dicts)
        return family or "chatglm2"

    def save_pretrained(self, save_directory: str) -> None:
        self._save(save_directory, VOCAB_FILE, {"name_or_path": self.name_or_path, "remove_space": False,
                                                "do_lower_case": False, "tokenizer_class": "ChatGLMTokenizer",
                                                "padding_side": "left"})

    # ---- vocabulary -----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.n_sp + len(self.special_tokens)

    def get_command(self, token: str) -> int:
        """Id of a special token such as '[gMASK]', 'sop' or '<|user|>'."""
        if token not in self.special_tokens:
            raise KeyError(f"{token!r} is not a special token of {self.family}")
        return self.special_tokens[token]

    def get_prefix_tokens(self) -> list[int]:
        return [self.get_command("[gMASK]"), self.get_command("sop")]

    def reply_stop_ids(self) -> list[int]:
        """Ids that end an assistant reply: eos, and for ChatGLM3 the next turn's <|user|> / <|observation|>."""
        if self.family == "chatglm3":
            return [self.eos_token_id, self.get_command("<|user|>"), self.get_command("<|observation|>")]
        return [self.eos_token_id]

    def _is_control(self, i: int) -> bool:
        return i in (self.pad_token_id, self.bos_token_id, self.eos_token_id)

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            return self._id_to_token(ids)
        return [self._id_to_token(int(i)) for i in ids]

    def _id_to_token(self, i: int) -> str:
        if self._is_control(i) or i < 0:
            return ""
        if i in self.index_special_tokens:
            return self.index_special_tokens[i] if self.family == "chatglm3" else ""
        if i >= self.n_sp:
            return ""
        return self.sp.id_to_piece(i)

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            return self.special_tokens.get(tokens, self.sp.piece_to_id(tokens))
        return [self.convert_tokens_to_ids(t) for t in tokens]

    # ---- encoding -------------------------------------------------------------------------------
    def _split_roles(self, text: str) -> list[str | int]:
        """Split text at the four role strings (ChatGLM3 with encode_special_tokens): text and ids."""
        parts: list[str | int] = []
        rest = text
        roles = SPECIAL_TOKENS["chatglm3"][5:]
        while rest:
            hits = [(rest.find(r), r) for r in roles if r in rest]
            if not hits:
                parts.append(rest)
                break
            pos, role = min(hits)
            if pos:
                parts.append(rest[:pos])
            parts.append(self.special_tokens[role])
            rest = rest[pos + len(role):]
        return parts

    def tokenize(self, text: str, encode_special_tokens: bool = False) -> list[str]:
        if encode_special_tokens and self.family == "chatglm3":
            out: list[str] = []
            for part in self._split_roles(text):
                out += [self.index_special_tokens[part]] if isinstance(part, int) else self.sp.encode(part, out_type=str)
            return out
        return self.sp.encode(text, out_type=str)

    def encode(self, text: str, text_pair: str | None = None, add_special_tokens: bool = True,
               encode_special_tokens: bool = False, **kwargs) -> list[int]:
        """Ids of text (a pair: text + text_pair + eos, as the original); typed special-token strings stay text
        unless encode_special_tokens (ChatGLM3 roles)."""
        check_pair(text_pair)
        ids = self._pieces(text, encode_special_tokens)
        if text_pair is not None:
            ids = ids + self._pieces(text_pair, encode_special_tokens) + [self.eos_token_id]
        return (self.get_prefix_tokens() + ids) if add_special_tokens else ids

    def _pieces(self, text: str, encode_special_tokens: bool) -> list[int]:
        if encode_special_tokens and self.family == "chatglm3":
            ids: list[int] = []
            for part in self._split_roles(text):
                ids += [part] if isinstance(part, int) else self.sp.encode(part)
            return ids
        return self.sp.encode(text)

    def __call__(self, text, text_pair=None, add_special_tokens: bool = True, padding=False,
                 max_length: int | None = None, truncation: bool = False, return_tensors=None,
                 encode_special_tokens: bool = False, **kwargs) -> BatchEncoding:
        """Encode one text or a batch; pads on the left with position ids that start at 0 on real tokens."""
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        pairs = [text_pair] if single else (list(text_pair) if text_pair is not None else [None] * len(texts))
        batch = []
        for a, b in zip(texts, pairs):
            ids = self.encode(a, b, add_special_tokens=add_special_tokens, encode_special_tokens=encode_special_tokens)
            if truncation and max_length is not None:
                ids = ids[:max_length]
            batch.append(ids)
        return self.pad_ids(batch, padding=padding, max_length=max_length, return_tensors=return_tensors,
                            unbatch=single and return_tensors is None)

    def pad(self, encoded_inputs, padding=True, max_length: int | None = None, return_tensors=None,
            **kwargs) -> BatchEncoding:
        """transformers' pad: {"input_ids": [[...], ...]} (or a list of {"input_ids": [...]}) -> a left-padded
        batch with attention_mask and position_ids."""
        return self.pad_ids(input_id_lists(encoded_inputs), padding=padding, max_length=max_length,
                            return_tensors=return_tensors)

    def pad_ids(self, batch: list[list[int]], padding=True, max_length: int | None = None, return_tensors=None,
                unbatch: bool = False) -> BatchEncoding:
        """Left-pad lists of ids into input_ids / attention_mask / position_ids."""
        if padding == "max_length" and max_length is not None:
            width = max_length
        elif padding:
            width = max(len(ids) for ids in batch)
        else:
            width = None
            if return_tensors is not None and len({len(ids) for ids in batch}) > 1:
                raise ValueError("texts of different lengths need padding=True to become one tensor")
        data = {"input_ids": [], "attention_mask": [], "position_ids": []}
        for ids in batch:
            pad = max(0, width - len(ids)) if width is not None else 0
            data["input_ids"].append([self.pad_token_id] * pad + ids)
            data["attention_mask"].append([0] * pad + [1] * len(ids))
            data["position_ids"].append([0] * pad + list(range(len(ids))))
        if unbatch:
            data = {k: v[0] for k, v in data.items()}
        return BatchEncoding(data, tensor_type=return_tensors)

    # ---- decoding -------------------------------------------------------------------------------
    def decode(self, ids, skip_special_tokens: bool = False, **kwargs) -> str:
        """Text of ids. ChatGLM2 drops special tokens; ChatGLM3 writes them out literally."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if ids and isinstance(ids[0], list):
            raise ValueError("decode takes one sequence; use batch_decode for a batch")
        ids = [int(i) for i in ids]
        if self.family == "chatglm2":
            return self.sp.decode([i for i in ids if i < self.n_sp and not self._is_control(i)])
        text, buffer, after_special = "", [], False
        for i in ids + [None]:
            if i is None or i in self.index_special_tokens:
                if buffer:
                    segment = self.sp.decode(buffer)
                    # Text that follows a special token keeps the space of its leading '▁'.
                    if after_special and self.sp.id_to_piece(buffer[0]).startswith("▁"):
                        segment = " " + segment
                    text += segment
                    buffer = []
                if i is not None:
                    text += self.index_special_tokens[i]
                    after_special = True
            elif i < self.n_sp and not self._is_control(i):
                buffer.append(i)
        return text

    # ---- chat prompts ---------------------------------------------------------------------------
    def build_prompt(self, query: str, history: list | None = None) -> str:
        """ChatGLM2 prompt text: '[Round n]\\n\\n问：...\\n\\n答：...' for each turn."""
        history = history or []
        prompt = ""
        for i, (old_query, response) in enumerate(history):
            prompt += f"[Round {i + 1}]\n\n问：{old_query}\n\n答：{response}\n\n"
        prompt += f"[Round {len(history) + 1}]\n\n问：{query}\n\n答："
        return prompt

    def build_continuation_ids(self, query: str, history: list) -> list[int]:
        """ChatGLM2 ids that continue a conversation whose earlier turns sit in the KV cache."""
        prompt = f"\n\n[Round {len(history) + 1}]\n\n问：{query}\n\n答："
        return self.encode(prompt, add_special_tokens=False)[1:]  # drop the dummy '▁'

    def build_single_message(self, role: str, metadata: str, message: str) -> list[int]:
        """ChatGLM3 ids of one turn: <|role|> metadata\\n message."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        return [self.get_command(f"<|{role}|>")] + self.sp.encode(f"{metadata}\n") + self.sp.encode(message)

    def build_chat_ids(self, query: str, history: list | None = None, role: str = "user",
                       prefix: bool = True) -> list[int]:
        """ChatGLM3 ids of a conversation ending with '<|assistant|>'."""
        if self.family != "chatglm3":
            raise ValueError("build_chat_input is for ChatGLM3 tokenizers; ChatGLM2 uses build_prompt")
        ids = self.get_prefix_tokens() if prefix else []
        for item in history or []:
            content = item["content"]
            if item["role"] == "system" and item.get("tools"):
                content = content + "\n" + json.dumps(item["tools"], indent=4, ensure_ascii=False)
            ids += self.build_single_message(item["role"], item.get("metadata", ""), content)
        ids += self.build_single_message(role, "", query)
        ids.append(self.get_command("<|assistant|>"))
        return ids

    def build_chat_input(self, query: str, history: list | None = None, role: str = "user") -> BatchEncoding:
        return self.pad_ids([self.build_chat_ids(query, history, role)], return_tensors="pt")

    def build_inputs(self, query: str, history: list | None = None) -> BatchEncoding:
        """ChatGLM2: tensors of the full prompt for query after history."""
        return self([self.build_prompt(query, history)], return_tensors="pt")


class StreamDecoder:
    """Turns ids arriving one at a time into text deltas; never emits half a UTF-8 character."""

    def __init__(self, tokenizer: ChatGLMTokenizer, context: int = 6):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start: decoding from here gives stable text
        self.read_offset = 0  # ids before this have been emitted
        self.context = context
        self.text = ""

    def put(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix_offset:self.read_offset])
        after = decode(self.ids[self.prefix_offset:])
        if len(after) <= len(before) or after.endswith("\ufffd") or not after.startswith(before):
            return ""
        delta = after[len(before):]
        self.read_offset = len(self.ids)
        self.prefix_offset = max(0, self.read_offset - self.context)
        self.text += delta
        return delta

    def flush(self) -> str:
        """Emit whatever is held back (e.g. a byte sequence that never completed)."""
        full = self.tokenizer.decode(self.ids)
        delta = full[len(self.text):] if full.startswith(self.text) else ""
        self.text += delta
        self.read_offset = self.prefix_offset = len(self.ids)
        return delta
