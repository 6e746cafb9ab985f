"""Write a random-weight ChatGLM checkpoint in the real on-disk layout, with a small tokenizer it trains itself.

    python -m model.tiny ./chatglm-tiny --family chatglm3          # a few MB, for trying the demos
    python -m model.tiny ./chatglm1-tiny --family chatglm1         # ChatGLM-6B's layout (ice_text.model)
    python -m model.tiny /tmp/glm-6b --shape 6b --dtype bfloat16     # real 6B shapes, for benchmarks

The weights are random: the model talks gibberish. Shapes, tensor names, config keys and files are those of
the official checkpoints, so everything that loads or serves a model can be exercised without downloading it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random

import torch

from .chatglm import model_class_for
from .config import FAMILIES, ChatGLMConfig
from .config_v1 import ChatGLM1Config
from .loading import DTYPE_NAMES, build_empty_model, config_to_json

SHAPES = {
    # name: (num_layers, hidden, ffn, heads, kv_channels, kv_groups)
    "tiny": (2, 64, 128, 4, 16, 2),
    "small": (4, 256, 512, 8, 32, 2),
    "mid": (8, 4096, 13696, 32, 128, 2),  # 8 layers of the 6B width
    "6b": (28, 4096, 13696, 32, 128, 2),
}
TOKENIZER_PIECES = 1000
ALL_FAMILIES = FAMILIES + ("chatglm1",)
V1_VOCAB_SIZE = 130528  # ChatGLM-6B's (latest revision) output rows, for the 6B shapes

_WORDS = ("the model answer question hello world python code function return value data token chat "
          "history user assistant system tool weather city number random string list print import class "
          "good morning thank you please story time people learn write read sleep night today tomorrow").split()
_HANZI = "你好世界我是人工智能助手很高兴见到欢迎问任何题晚上睡不着应该怎么办今天天气明北京中国学习写代码讲一个故事"
_SNIPPETS = ["def f(x):\n    return x + 1\n", "for i in range(10):\n\tprint(i)\n", "{\"key\": [1, 2, 3]}",
             "1 + 1 = 2", "3.14159", "Hello, world!", "问：你好\n\n答：", "emoji 👋🙂 ok"]


def _corpus(seed: int, lines: int = 3000):
    rng = random.Random(seed)
    for _ in range(lines):
        kind = rng.random()
        if kind < 0.4:
            yield " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12))).capitalize() + rng.choice(".?!")
        elif kind < 0.8:
            yield "".join(rng.choice(_HANZI) for _ in range(rng.randint(4, 20))) + rng.choice("。？！，")
        else:
            yield rng.choice(_SNIPPETS) + "  " * rng.randint(0, 3)


def train_tokenizer(path: str, seed: int = 0, vocab_size: int = TOKENIZER_PIECES) -> None:
    """A SentencePiece BPE model with ChatGLM's id layout (<unk> <s> </s>, then 256 byte pieces)."""
    _train(path, seed, model_type="bpe", vocab_size=vocab_size, byte_fallback=True,
           normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
           split_digits=True, pad_id=-1)


def train_tokenizer_v1(path: str, seed: int = 0, vocab_size: int = TOKENIZER_PIECES) -> None:
    """A SentencePiece unigram model with ice_text.model's pieces: <pad>, <n>, the ChatGLM-6B specials (control
    pieces, never matched in text), <|tab|> and <|blank_2|>..<|blank_80|>, on an NFKC normalizer."""
    from .tokenizer_v1 import MAX_BLANK, SPECIALS

    blanks = [f"<|blank_{n}|>" for n in range(2, MAX_BLANK + 1)]
    _train(path, seed, model_type="unigram", vocab_size=vocab_size, normalization_rule_name="nfkc",
           pad_id=3, pad_piece="<pad>", control_symbols=list(SPECIALS),
           user_defined_symbols=["<n>", "<|tab|>", *blanks])


def _train(path: str, seed: int, **options) -> None:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=_corpus(seed), model_writer=buf, add_dummy_prefix=True,
                                   character_coverage=0.9995, unk_id=0, bos_id=1, eos_id=2, minloglevel=2,
                                   num_threads=1, max_sentence_length=8192, **options)
    with open(path, "wb") as f:
        f.write(buf.getvalue())


def make_config(family: str, shape: str, vocab: int) -> ChatGLMConfig:
    layers, hidden, ffn, heads, kv, groups = SHAPES[shape]
    padded = 65024 if shape in ("mid", "6b") else (vocab + 63) // 64 * 64
    return ChatGLMConfig(num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn, num_attention_heads=heads,
                         kv_channels=kv, multi_query_group_num=groups, padded_vocab_size=padded,
                         seq_length=8192 if family == "chatglm3" else 32768, family=family,
                         _name_or_path=f"random/{family}-{shape}")


def make_config_v1(shape: str, vocab: int, tokenizer) -> ChatGLM1Config:
    """ChatGLM-6B's config for a SHAPES entry (its MLP is 4 x hidden wide; K/V heads are the query heads)."""
    layers, hidden, _, heads, kv, _ = SHAPES[shape]
    assert hidden == heads * kv  # ChatGLM-6B derives the head size from them
    return ChatGLM1Config(num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                          inner_hidden_size=4 * hidden,
                          vocab_size=V1_VOCAB_SIZE if shape in ("mid", "6b") else (vocab + 63) // 64 * 64,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          mask_token_id=tokenizer.mask_token_id, gmask_token_id=tokenizer.gmask_token_id,
                          pad_token_id=tokenizer.pad_token_id, _name_or_path=f"random/chatglm1-{shape}")


def write_random_weights(config: ChatGLMConfig, directory: str, dtype: torch.dtype, seed: int,
                         max_shard_size: int = 2 * 1024**3, vocab: int | None = None, never: tuple = ()) -> int:
    """Stream random tensors shard by shard (never the whole model in memory); returns bytes written.

    With vocab, output rows of ids the tokenizer cannot produce are zero (as in the golden models), so the
    model generates real text even when padded_vocab_size is far larger than the tokenizer. ChatGLM-6B's output
    layer is its word embedding; its checkpoints store a copy as lm_head.weight, and so does this. The output rows
    of the ids in `never` are zero too.
    """
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    names = [(n, tuple(p.shape)) for n, p in build_empty_model(config, model_class_for(config)).named_parameters()]
    shards: list[dict[str, str]] = []
    current: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush():
        nonlocal current, size
        fname = f"model-{len(shards) + 1:05d}.safetensors"
        save_file(current, os.path.join(directory, fname), metadata={"format": "pt"})
        shards.append({k: fname for k in current})
        current, size = {}, 0

    v1 = config.family == "chatglm1"
    output = "transformer.word_embeddings.weight" if v1 else "transformer.output_layer.weight"
    for name, shape in names:
        if name.endswith("layernorm.weight"):
            t = torch.ones(shape, dtype=dtype)
        elif name.endswith("layernorm.bias"):
            t = torch.zeros(shape, dtype=dtype)
        else:
            t = torch.empty(shape, dtype=torch.float32).normal_(0.0, 0.02, generator=gen).to(dtype)
            if name == output:
                t[list(never)] = 0
                if vocab is not None:
                    t[vocab:] = 0
        for name, t in [(name, t)] + ([("lm_head.weight", t.clone())] if v1 and name == output else []):
            nbytes = t.numel() * t.element_size()
            if current and size + nbytes > max_shard_size:
                flush()
            current[name] = t
            size += nbytes
            total += nbytes
    flush()
    n = len(shards)
    if n == 1:
        os.replace(os.path.join(directory, "model-00001.safetensors"), os.path.join(directory, "model.safetensors"))
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(os.path.join(directory, f"model-{i:05d}.safetensors"), os.path.join(directory, final))
            weight_map.update({k: final for k in shard})
        with open(os.path.join(directory, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return total


def write_checkpoint(directory: str, family: str = "chatglm3", shape: str = "tiny", dtype: str = "float32",
                     seed: int = 0) -> ChatGLMConfig:
    """Create `directory` with config.json, tokenizer files and random weights."""
    from .tokenizer import ChatGLMTokenizer
    from .tokenizer_v1 import VOCAB_FILE as V1_VOCAB_FILE, ChatGLM1Tokenizer

    if family not in ALL_FAMILIES:
        raise ValueError(f"family must be one of {ALL_FAMILIES}")
    os.makedirs(directory, exist_ok=True)
    name = f"random/{family}-{shape}"
    if family == "chatglm1":
        vocab_file = os.path.join(directory, V1_VOCAB_FILE)
        train_tokenizer_v1(vocab_file, seed=seed)
        tokenizer = ChatGLM1Tokenizer(vocab_file, num_image_tokens=0, name_or_path=name)  # ids start at 0
        config = make_config_v1(shape, tokenizer.vocab_size, tokenizer)
    else:
        vocab_file = os.path.join(directory, "tokenizer.model")
        train_tokenizer(vocab_file, seed=seed)
        tokenizer = ChatGLMTokenizer(vocab_file, family=family, name_or_path=name)
        config = make_config(family, shape, tokenizer.vocab_size)
    tokenizer.save_pretrained(directory)
    torch_dtype = DTYPE_NAMES[dtype]
    # ChatGLM-6B's output layer is its embedding: a random one answers <sop> after <sop> (the last input) for ever
    never = tuple(tokenizer.special_tokens.values()) if family == "chatglm1" else ()
    write_random_weights(config, directory, torch_dtype, seed, vocab=tokenizer.vocab_size, never=never)
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config_to_json(config, torch_dtype), f, indent=2)
    return config


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory")
    parser.add_argument("--family", choices=ALL_FAMILIES, default="chatglm3",
                        help="chatglm1 is ChatGLM-6B (first generation)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="weight dtype (default: float32 for tiny/small, bfloat16 for mid/6b)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    dtype = args.dtype or ("bfloat16" if args.shape in ("mid", "6b") else "float32")
    config = write_checkpoint(args.directory, args.family, args.shape, dtype, args.seed)
    print(f"Wrote a RANDOM-weight {args.family} checkpoint ({args.shape}: {config.num_layers} layers, hidden "
          f"{config.hidden_size}, {dtype}) to {args.directory}.\nIts replies are gibberish: it is for trying the "
          f"code, not for chatting. Use it with --model {args.directory}")


if __name__ == "__main__":
    main()
