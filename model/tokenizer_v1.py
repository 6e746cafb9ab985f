"""ChatGLM-6B (first generation) tokenizer: ice_text.model plus the newline / tab / blank-run mapping.

Text is pre-processed before SentencePiece: '\\n' becomes the <n> piece, '\\t' <|tab|>, and runs of 2..80 spaces
<|blank_N|> (longest runs first). Encoded text ends with '[gMASK] <sop>'. Every SentencePiece id is shifted by
tokenizer_config.json's num_image_tokens (20000 when the key is absent, as in the earliest checkpoints).
"""

from __future__ import annotations

import os
import re

from transformers import BatchEncoding

from .hub import read_json, resolve_model_dir
from .tokenizer_base import TokenizerBase, check_pair, input_id_lists

VOCAB_FILE = "ice_text.model"
MAX_BLANK = 80
SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>")
_BLANKS = re.compile(r"<\|blank_(\d+)\|>")


def _encode_whitespace(text: str) -> str:
    text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
    for n in range(MAX_BLANK, 1, -1):
        text = text.replace(" " * n, f"<|blank_{n}|>")
    return text


def _decode_whitespace(text: str) -> str:
    text = text.replace("<n>", "\n").replace("<|tab|>", "\t")
    return _BLANKS.sub(lambda m: " " * int(m.group(1)) if 2 <= int(m.group(1)) <= MAX_BLANK else m.group(0), text)


class ChatGLM1Tokenizer(TokenizerBase):
    """Text <-> ids for ChatGLM-6B; the same interface as ChatGLMTokenizer where the front ends use it."""

    family = "chatglm1"
    vocab_files_names = {"vocab_file": VOCAB_FILE}
    model_input_names = ["input_ids", "attention_mask", "position_ids"]

    def __init__(self, vocab_file: str, num_image_tokens: int = 20000, name_or_path: str = "", **kwargs):
        self.vocab_file = vocab_file
        self.name_or_path = name_or_path
        self.num_image_tokens = num_image_tokens
        self.sp = self._sentencepiece(vocab_file)
        self.n_sp = self.sp.vocab_size()
        off = num_image_tokens
        self.special_tokens = {tok: self.sp.piece_to_id(tok) + off for tok in SPECIALS}
        self.special_tokens.update({"<unk>": self.sp.unk_id() + off, "<pad>": self.sp.piece_to_id("<pad>") + off})
        self.index_special_tokens = {i: tok for tok, i in self.special_tokens.items()}
        self.mask_token_id = self.special_tokens["[MASK]"]
        self.gmask_token_id = self.special_tokens["[gMASK]"]
        self.bos_token_id = self.special_tokens["<sop>"]
        self.eos_token_id = self.special_tokens["<eop>"]
        self.pad_token_id = self.special_tokens["<pad>"]
        self.unk_token_id = self.special_tokens["<unk>"]
        self.bos_token, self.eos_token, self.pad_token = "<sop>", "<eop>", "<pad>"

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: str, *args, revision: str | None = None, **kwargs) -> "ChatGLM1Tokenizer":
        path = resolve_model_dir(name_or_path, revision=revision, weights=False)
        vocab_file = cls._vocab_path(path, VOCAB_FILE)
        config_path = os.path.join(path, "tokenizer_config.json")
        config = read_json(config_path) if os.path.isfile(config_path) else {}
        return cls(vocab_file, num_image_tokens=config.get("num_image_tokens", 20000), name_or_path=str(name_or_path))

    def save_pretrained(self, save_directory: str) -> None:
        self._save(save_directory, VOCAB_FILE, {
            "name_or_path": self.name_or_path, "bos_token": "<sop>", "eos_token": "<eop>", "end_token": "</s>",
            "gmask_token": "[gMASK]", "mask_token": "[MASK]", "pad_token": "<pad>", "unk_token": "<unk>",
            "remove_space": False, "do_lower_case": False, "tokenizer_class": "ChatGLMTokenizer",
            "num_image_tokens": self.num_image_tokens})

    # ---- vocabulary -----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.num_image_tokens + self.n_sp

    def get_command(self, token: str) -> int:
        if token not in self.special_tokens:
            raise KeyError(f"{token!r} is not a special token of chatglm1")
        return self.special_tokens[token]

    def reply_stop_ids(self) -> list[int]:
        """<eop> ends a reply (</s> does not)."""
        return [self.eos_token_id]

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            return self._id_to_token(ids)
        return [self._id_to_token(int(i)) for i in ids]

    def _id_to_token(self, i: int) -> str:
        if i < self.num_image_tokens:
            return f"<image_{i}>"
        return self.sp.id_to_piece(i - self.num_image_tokens)

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            return self.sp.piece_to_id(tokens) + self.num_image_tokens
        return [self.convert_tokens_to_ids(t) for t in tokens]

    # ---- encoding -------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[str]:
        return self.sp.encode(_encode_whitespace(text), out_type=str)

    def encode(self, text: str, text_pair: str | None = None, add_special_tokens: bool = True, **kwargs) -> list[int]:
        """Ids of text, ending in [gMASK] <sop> (a pair: 'a [gMASK] <sop> b <eop>'); typed special-token strings
        stay text."""
        check_pair(text_pair)
        ids = self._pieces(text)
        if add_special_tokens:
            ids = ids + [self.gmask_token_id, self.bos_token_id]
        if text_pair is not None:
            ids = ids + self._pieces(text_pair) + [self.eos_token_id]
        return ids

    def _pieces(self, text: str) -> list[int]:
        return [i + self.num_image_tokens for i in self.sp.encode(_encode_whitespace(text))]

    def __call__(self, text, text_pair=None, add_special_tokens: bool = True, padding=False,
                 max_length: int | None = None, truncation: bool = False, return_tensors=None, **kwargs):
        """One text or a batch; a pair is 'a [gMASK] <sop> b <eop>'. Padding (left) adds the 2-D position ids."""
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        pairs = [text_pair] if single else (list(text_pair) if text_pair is not None else [None] * len(texts))
        batch = []
        for a, b in zip(texts, pairs):
            ids = self.encode(a, b, add_special_tokens=add_special_tokens)
            if truncation and max_length is not None:
                ids = ids[:max_length]
            batch.append(ids)
        return self._batch(batch, padding, max_length, return_tensors, single)

    def pad(self, encoded_inputs, padding=True, max_length: int | None = None, return_tensors=None, **kwargs):
        """transformers' pad: lists of ids -> a left-padded batch with the 2-D positions and prefix-LM masks."""
        return self._batch(input_id_lists(encoded_inputs), padding, max_length, return_tensors, single=False)

    def _batch(self, batch: list[list[int]], padding, max_length, return_tensors, single: bool):
        if not padding:
            if return_tensors is not None and len({len(ids) for ids in batch}) > 1:
                raise ValueError("texts of different lengths need padding=True to become one tensor")
            return BatchEncoding({"input_ids": batch[0] if single and return_tensors is None else batch},
                                 tensor_type=return_tensors)
        width = max_length if padding == "max_length" and max_length else max(len(ids) for ids in batch)
        data = {"input_ids": [], "attention_mask": [], "position_ids": []}
        for ids in batch:
            pad = max(0, width - len(ids))
            positions, blocks = self.positions(ids)
            data["input_ids"].append([self.pad_token_id] * pad + ids)
            data["position_ids"].append([[0] * pad + positions, [0] * pad + blocks])
            data["attention_mask"].append([self.prefix_lm_mask(ids, pad)])
        if single and return_tensors is None:
            data = {k: v[0] for k, v in data.items()}
        return BatchEncoding(data, tensor_type=return_tensors)

    def positions(self, ids: list[int]) -> tuple[list[int], list[int]]:
        """(position ids, block position ids) of a prompt: positions stop at the mask, blocks count from <sop>."""
        context = ids.index(self.bos_token_id) if self.bos_token_id in ids else len(ids)
        mask_id = self.gmask_token_id if self.gmask_token_id in ids else self.mask_token_id
        mask_at = ids.index(mask_id) if mask_id in ids else context
        positions = [j if j < context else mask_at for j in range(len(ids))]
        blocks = [0 if j < context else j - context + 1 for j in range(len(ids))]
        return positions, blocks

    def prefix_lm_mask(self, ids: list[int], pad: int) -> list[list[int]]:
        """The reference's mask as 0/1 lists (1 = blocked): the context sees itself, the rest is causal."""
        context = ids.index(self.bos_token_id) if self.bos_token_id in ids else len(ids)
        n = pad + len(ids)
        return [[0 if (j >= pad and i >= pad and (j - pad < context or j <= i)) else 1 for j in range(n)]
                for i in range(n)]

    # ---- decoding -------------------------------------------------------------------------------
    def decode(self, ids, skip_special_tokens: bool = False, **kwargs) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        if ids and isinstance(ids[0], list):
            raise ValueError("decode takes one sequence; use batch_decode for a batch")
        ids = [int(i) for i in ids if int(i) != self.pad_token_id]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.index_special_tokens]
        text, pieces = "", []
        for i in ids + [None]:
            if i is None or i < self.num_image_tokens:
                if pieces:
                    # after an image token a piece's word-start mark is a space, as in one SentencePiece decode
                    space = " " if text and self.sp.id_to_piece(pieces[0]).startswith("\u2581") else ""
                    text += space + _decode_whitespace(self.sp.decode(pieces))
                pieces = []
                if i is not None:
                    text += f"<image_{i}>"
            else:
                pieces.append(i - self.num_image_tokens)
        return text

    # ---- chat prompt ----------------------------------------------------------------------------
    def build_prompt(self, query: str, history: list | None = None) -> str:
        """'[Round n]\\n问：...\\n答：...' from round 0; a first turn is the bare query."""
        history = history or []
        if not history:
            return query
        prompt = ""
        for i, (old_query, response) in enumerate(history):
            prompt += f"[Round {i}]\n问：{old_query}\n答：{response}\n"
        return prompt + f"[Round {len(history)}]\n问：{query}\n答："
