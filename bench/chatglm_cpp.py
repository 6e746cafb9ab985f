"""chatglm.cpp on the same random checkpoint as bench/speed.py, measured the same way, for the README's table.

    python bench/chatglm_cpp.py --source ~/src/chatglm.cpp --dir /tmp/b6 --types f16,q8_0,q4_0

chatglm.cpp is not a dependency of this project; this script only measures it. Build its `main` program first
(a source release from PyPI works offline):

    pip download --no-deps --no-build-isolation --no-binary :all: chatglm-cpp==0.4.2
    tar xzf chatglm_cpp-0.4.2.tar.gz && cd chatglm_cpp-0.4.2
    mkdir -p tests && touch tests/perplexity.cpp                          # that release lacks this file
    cmake -B build -DCMAKE_BUILD_TYPE=Release -DCMAKE_C_FLAGS=-march=native -DCMAKE_CXX_FLAGS=-march=native
    cmake --build build -j --target main
    pip install tabulate tqdm                                               # its converter's imports

--no-build-isolation: without it pip prepares the release's build requirements from source too (CMake
included: over 10 minutes). -march=native: on Linux its ggml's CMake passes -mavx2 and nothing above, so
without it an AVX-512 / AMX CPU runs chatglm.cpp's AVX2 code; the numbers in the README say which build ran.

--dir is the directory bench/speed.py --dir writes (its bf16/ checkpoint is written here if missing). For
each type, chatglm.cpp's own converter (chatglm_cpp/convert.py of --source) turns that checkpoint into
<dir>/ggml-<type>.bin once; the converter is given the checkpoint's config, tensors (memory-mapped) and
SentencePiece model directly, since it would otherwise load the model through remote code.

Then `build/bin/main -v` runs in a fresh process per measurement, greedy (--temp 0), on the machine's cores:

- load: chatglm.cpp's own "loaded ... within" time; peak RSS: the program's VmHWM, read while it runs;
- prefill P: chatglm.cpp's "prompt time" of a P-token prompt (the forward pass over the prompt and the first
  token), median (min-max) of --runs runs. The prompt is text whose token count, as chatglm.cpp reports it,
  is within a few tokens of P (the exact count is printed);
- decode: tokens/s after a 16-token prompt from chatglm.cpp's "output time" of --decode-tokens tokens, counted
  as bench/speed.py does: (tokens - 1) / (time from the first to the last token).

It ends with one table in bench/speed.py's columns; --json writes every number.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import re
import statistics
import sys
import time
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.anchor import add_arguments, finish, prepare, run_watched, stats  # noqa: E402

TYPES = ("f16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "f32")
PERF = re.compile(r"prompt time: ([\d.]+) ms / (\d+) tokens.*?output time: ([\d.]+) ms / (\d+) tokens", re.S)
LOADED = re.compile(r"within: ([\d.]+) ms")


def load_converter(source: str):
    path = os.path.join(source, "chatglm_cpp", "convert.py")
    if not os.path.isfile(path):
        raise SystemExit(f"{path} not found: --source must be a chatglm.cpp source tree")
    spec = importlib.util.spec_from_file_location("chatglm_cpp_convert", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as exc:
        raise SystemExit(f"chatglm.cpp's converter needs a package that is missing: {exc}. "
                         f"pip install tabulate tqdm") from exc
    return module


def convert(source: str, checkpoint: str, sp, ggml_type: str, out: str) -> float:
    """Write `out` with chatglm.cpp's converter from our safetensors checkpoint and its SentencePiece model `sp`;
    returns seconds taken."""
    from model.loading import iter_checkpoint

    conv = load_converter(source)
    with open(os.path.join(checkpoint, "config.json"), encoding="utf-8") as f:
        config = SimpleNamespace(**{"pre_seq_len": None, "quantization_bit": None, **json.load(f)})
    if config.family != "chatglm2":
        raise SystemExit(f"{checkpoint}: expected a chatglm2 checkpoint, found {config.family}")
    tensors = dict(iter_checkpoint(checkpoint, zero_copy=lambda name, dtype: True))
    model = SimpleNamespace(config=config, state_dict=lambda: tensors)
    tokenizer = SimpleNamespace(tokenizer=SimpleNamespace(sp_model=sp))
    t, chatter = time.perf_counter(), io.StringIO()  # its progress bar and tensor table
    with open(out + ".tmp", "wb") as f, contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
        conv.ChatGLM2Converter.convert(f, model, tokenizer, conv.GGMLType[ggml_type.upper()])
    os.replace(out + ".tmp", out)
    return time.perf_counter() - t


def prompt_of(sp, tokens: int) -> str:
    """Text of about `tokens` tokens in chatglm.cpp's chat format (2 prefix tokens + the round template)."""
    words = "the quick brown fox jumps over a lazy dog while seven people watch from the hill".split()

    def text(n):
        return " ".join(words[i % len(words)] for i in range(n))

    def count(n):
        return len(sp.encode(f"[Round 1]\n\n问：{text(n)}\n\n答：")) + 2

    lo, hi = 1, tokens
    while lo < hi:  # the most words whose prompt stays within `tokens`
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if count(mid) <= tokens else (lo, mid - 1)
    return text(lo)


def run_main(binary: str, model_file: str, prompt: str, prompt_tokens: int, new_tokens: int) -> dict:
    length = prompt_tokens + new_tokens + 64  # the KV cache chatglm.cpp allocates
    cmd = [binary, "-m", model_file, "-p", prompt, "--temp", "0", "--max_new_tokens", str(new_tokens),
           "-l", str(length), "-c", str(length), "-v"]
    output, code, peak = run_watched(cmd)
    perf, loaded = PERF.search(output), LOADED.search(output)
    if code or not perf or not loaded:
        raise SystemExit(f"{' '.join(cmd[:3])} ... failed ({code}):\n{output[-3000:]}")
    return {"load_s": float(loaded.group(1)) / 1000, "prompt_s": float(perf.group(1)) / 1000,
            "prompt_tokens": int(perf.group(2)), "output_s": float(perf.group(3)) / 1000,
            "output_tokens": int(perf.group(4)), "peak_rss": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap, "chatglm.cpp", TYPES, "f16,q8_0,q4_0")
    args = ap.parse_args()
    types, binary, checkpoint, prefill = prepare(ap, args, TYPES, "main", "chatglm.cpp")
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(checkpoint, "tokenizer.model"))
    results = {"source": os.path.abspath(args.source), "types": {}}
    for t in types:
        model_file = os.path.join(args.dir, f"ggml-{t}.bin")
        r = {}
        if not os.path.isfile(model_file):
            r["convert_s"] = convert(args.source, checkpoint, sp, t, model_file)
        r["file_bytes"] = os.path.getsize(model_file)
        runs = []
        for p in prefill:
            text, times = prompt_of(sp, p), []
            for _ in range(args.runs):
                runs.append(run_main(binary, model_file, text, p, 2))
                times.append(runs[-1]["prompt_s"])
            r.setdefault("prefill_s", {})[str(p)] = {**stats(times), "tokens": runs[-1]["prompt_tokens"]}
        rates, text = [], prompt_of(sp, 16)
        for _ in range(args.runs):
            runs.append(run_main(binary, model_file, text, 16, args.decode_tokens))
            rates.append((runs[-1]["output_tokens"] - 1) / runs[-1]["output_s"])
        r["decode_tok_s"] = {"1": {**stats(rates), "tokens": runs[-1]["output_tokens"]}}
        r["load_s"] = statistics.median(x["load_s"] for x in runs)
        r["peak_rss"] = max(x["peak_rss"] for x in runs)
        results["types"][t] = r
        made = f"  [converted in {r['convert_s']:.0f} s]" if "convert_s" in r else ""
        print(f"{t:5s} file {r['file_bytes'] / 1e9:.2f} GB  load {r['load_s']:.1f} s  peak {r['peak_rss'] / 1e9:.2f} GB"
              + made, flush=True)
        for p, s in r.get("prefill_s", {}).items():
            print(f"      prefill {p:>5s} ({s['tokens']} tokens): {s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f}) s",
                  flush=True)
        s = r["decode_tok_s"]["1"]
        print(f"      decode batch 1: {s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f}) tokens/s", flush=True)
    finish(results, "chatglm.cpp", prefill, args.json)

if __name__ == "__main__":
    main()
