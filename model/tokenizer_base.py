"""What both tokenizers (ChatGLM-6B's in tokenizer_v1.py, ChatGLM2/3's in tokenizer.py) are built on."""

from __future__ import annotations

import json
import os
import re
import shutil

import sentencepiece as spm

from .hub import CheckpointError

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def replace_lone_surrogates(text: str) -> str:
    """Lone UTF-16 surrogates (from JSON "\\ud800" escapes, or undecodable terminal bytes) -> U+FFFD.

    A Python str may hold them, but no UTF-8 text can, so SentencePiece refuses the whole string.
    """
    return _LONE_SURROGATE.sub("\ufffd", text)


class SentencePiece(spm.SentencePieceProcessor):
    """SentencePiece that encodes any Python str (lone surrogates become U+FFFD instead of an error)."""

    def encode(self, input, *args, **kwargs):
        if isinstance(input, str):
            input = replace_lone_surrogates(input)
        elif isinstance(input, list):
            input = [replace_lone_surrogates(t) if isinstance(t, str) else t for t in input]
        return super().encode(input, *args, **kwargs)


def check_pair(text_pair) -> None:
    """encode(text, text_pair, add_special_tokens): the second argument is the pair, as in transformers."""
    if isinstance(text_pair, bool):
        raise TypeError("encode(text, text_pair=None, add_special_tokens=True): the second argument is a second "
                        "text; pass add_special_tokens by keyword")


def input_id_lists(encoded_inputs) -> list[list[int]]:
    """The id lists of what transformers' pad() takes: {"input_ids": [[...]]}, [{"input_ids": [...]}] or [[...]]."""
    if isinstance(encoded_inputs, dict) or hasattr(encoded_inputs, "keys"):
        rows = encoded_inputs["input_ids"]
    else:
        rows = [row["input_ids"] if hasattr(row, "keys") else row for row in encoded_inputs]
    rows = rows.tolist() if hasattr(rows, "tolist") else rows
    if rows and isinstance(rows[0], int):
        rows = [rows]
    return [[int(i) for i in (row.tolist() if hasattr(row, "tolist") else row)] for row in rows]


class TokenizerBase:
    """What every family's tokenizer shares on top of its own encode / decode."""

    padding_side = "left"

    def __len__(self) -> int:
        return self.vocab_size

    def apply_chat_template(self, conversation: list[dict], tools: list[dict] | None = None, tokenize: bool = True,
                            add_generation_prompt: bool = True, return_tensors=None, return_dict: bool = False,
                            **kwargs):
        """transformers' chat templating in the family's own format: role messages ({"role", "content"}, and
        assistant "tool_calls") -> the prompt ids ready for the assistant's reply (or its text, tokenize=False)."""
        from .formats import Message, format_for

        if not add_generation_prompt:
            raise ValueError("ChatGLM prompts always end ready for the assistant: add_generation_prompt=False "
                             "is not supported")
        messages = [Message(m["role"], m.get("content") or "", tool_calls=[
            {"name": c["function"]["name"], "arguments": c["function"].get("arguments") or ""} if "function" in c
            else c for c in m.get("tool_calls") or []], metadata=m.get("metadata", ""), tools=m.get("tools"))
            for m in conversation]
        if not tokenize:  # the text chat_template renders
            return format_for(self.family).prompt_text(self, messages, tools)
        ids = format_for(self.family).prompt_ids(self, messages, tools)
        if return_dict or return_tensors is not None:
            encoded = self.pad([ids], return_tensors=return_tensors)
            return encoded if return_dict else encoded["input_ids"]
        return ids

    @property
    def chat_template(self) -> str:
        """Jinja source of the family's prompt format (see model.formats), saved in tokenizer_config.json so
        that transformers' chat templating renders what apply_chat_template(tokenize=False) returns."""
        from .formats import format_for

        return format_for(self.family).chat_template

    def batch_decode(self, sequences, skip_special_tokens: bool = False, **kwargs) -> list[str]:
        if hasattr(sequences, "tolist"):
            sequences = sequences.tolist()
        return [self.decode(s, skip_special_tokens) for s in sequences]

    @staticmethod
    def _vocab_path(path: str, vocab_name: str) -> str:
        """path/vocab_name; CheckpointError saying what to do when the checkpoint lacks it."""
        vocab_file = os.path.join(path, vocab_name)
        if not os.path.isfile(vocab_file):
            raise CheckpointError(f"{path} has no {vocab_name} (the tokenizer); copy it from the checkpoint's "
                                  f"original files (same Hub repository)")
        return vocab_file

    @staticmethod
    def _sentencepiece(vocab_file: str) -> SentencePiece:
        """The SentencePiece model of vocab_file; CheckpointError naming the file when it cannot be parsed."""
        try:
            return SentencePiece(model_file=vocab_file)
        except (RuntimeError, OSError) as e:  # "Internal: could not parse ModelProto ..."
            raise CheckpointError(f"{vocab_file} is not a SentencePiece model (truncated or corrupt?); "
                                  f"download it again") from e

    def _save(self, save_directory: str, vocab_name: str, tokenizer_config: dict) -> None:
        """Copy the SentencePiece file and write tokenizer_config.json (with the family's chat_template)."""
        tokenizer_config = {**tokenizer_config, "chat_template": self.chat_template}
        os.makedirs(save_directory, exist_ok=True)
        target = os.path.join(save_directory, vocab_name)
        if os.path.abspath(target) != os.path.abspath(self.vocab_file):
            shutil.copyfile(self.vocab_file, target)
        with open(os.path.join(save_directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(tokenizer_config, f, indent=2, ensure_ascii=False)
