r"""llama.cpp on the same random checkpoint as bench/speed.py, for the README's table next to chatglm.cpp.

    python bench/llama_cpp.py --source ~/src/llama.cpp --dir /tmp/b6 --types bf16,q8_0,q4_0

llama.cpp is not a dependency of this project; this script only measures it. llama-cpp-python's source release
carries llama.cpp and installs offline; build its benchmark and quantizer with -DGGML_NATIVE=ON (the build for
this CPU, AVX-512 / AMX included where the CPU has them):

    pip download --no-deps --no-binary llama-cpp-python llama-cpp-python==0.3.36
    tar xzf llama_cpp_python-0.3.36.tar.gz && cd llama_cpp_python-0.3.36/vendor/llama.cpp
    cmake -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF
    cmake --build build -j --target llama-bench llama-quantize

On a KVM Xeon with AMX that build's llama-bench died of SIGILL in ggml's AMX code (`tileloadd`); the numbers in
the README come from a build for the CPU's other extensions, AMX off:
    cmake -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON \
        -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON \
        -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF

--dir is the directory bench/speed.py --dir writes (its bf16/ checkpoint is written here if missing).

Conversion. llama.cpp's converter (convert_hf_to_gguf.py of --source) knows the ChatGLM network ("ChatGLMModel")
but reads a SentencePiece vocabulary only for a config whose _name_or_path names THUDM/chatglm3-6b (any other
ChatGLM goes to GLM-4's byte-level BPE reader, which a ChatGLM2 tokenizer fails), and it loads the tokenizer with
AutoTokenizer(trust_remote_code=True), i.e. the tokenizer code the original checkpoints ship. ChatGLM2 and
ChatGLM3 have the same network, so this script gives the converter a folder named like ChatGLM3's Hub id
that links our checkpoint's tensors and tokenizer.model under a config naming ChatGLM3, and runs it in a child process where
AutoTokenizer.from_pretrained returns our tokenizer (model/tokenizer.py, family chatglm3) with the three things
the converter reads of the original: get_vocab(), _convert_id_to_token() and tokenizer.sp_model. f16, bf16
and q8_0 come from the converter (--outtype), q4_0 from llama-quantize on the bf16 file; each
<dir>/llama-<type>.gguf is made once.

Measurement: `llama-bench` (greedy is irrelevant there: it times forward passes) in one process per type, on the
machine's cores (-t), --runs repetitions:
- prefill P: P / llama-bench's prompt-processing rate (pp P, one forward pass over P tokens from an empty
  cache), as bench/speed.py times one forward over a P-token prompt;
- decode: llama-bench's generation rate (tg N: N tokens one by one from an empty cache; bench/speed.py starts
  after a 16-token prompt, which changes attention's cost by too little to show);
- peak RSS: llama-bench's VmHWM, read while it runs (the file is memory-mapped, as our checkpoints are).
It ends with one table in bench/speed.py's columns; --json writes every number.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.anchor import add_arguments, finish, prepare, run_watched, stats  # noqa: E402

TYPES = ("f16", "bf16", "q8_0", "q4_0")
CONVERTER_TYPES = ("f16", "bf16", "q8_0")  # what convert_hf_to_gguf.py writes itself; others via llama-quantize
CHATGLM3_NAME = "THUDM/chatglm3-6b"  # the name that sends the converter to its SentencePiece reader

CONVERT = r"""
import json, os, runpy, sys
from types import SimpleNamespace
args = json.loads(sys.argv[1])
sys.path[:0] = [args["root"], os.path.join(args["source"], "gguf-py"), args["source"]]
import transformers
from model.tokenizer import ChatGLMTokenizer


class ConverterTokenizer:
    # what the converter's ChatGLM3 vocabulary reader asks of the original tokenizer
    def __init__(self, path):
        self.ours = ChatGLMTokenizer.from_pretrained(path, family="chatglm3")
        self.tokenizer = SimpleNamespace(sp_model=self.ours.sp)

    def get_vocab(self):
        vocab = {self.ours.sp.id_to_piece(i): i for i in range(self.ours.n_sp)}
        vocab.update(self.ours.special_tokens)
        return vocab

    def _convert_id_to_token(self, i):
        piece = self.ours.convert_ids_to_tokens(i)
        if i < self.ours.n_sp and piece in self.ours.special_tokens:
            # the random checkpoints' small SentencePiece model has a word spelled like a special token ('eop');
            # llama.cpp refuses two tokens of one spelling, and the spelling does not change any timing
            piece += "(piece)"
        return piece


transformers.AutoTokenizer.from_pretrained = lambda path, *a, **kw: ConverterTokenizer(str(path))
sys.argv = ["convert_hf_to_gguf.py", args["stage"], "--outfile", args["out"], "--outtype", args["outtype"]]
runpy.run_path(os.path.join(args["source"], "convert_hf_to_gguf.py"), run_name="__main__")
"""


def stage(checkpoint: str, work: str) -> str:
    """A folder the converter reads as ChatGLM3: links to the checkpoint's tensors and tokenizer, our config
    with the ChatGLM3 name; the folder's own path ends in that name too, since the converter's config reader
    (transformers' AutoConfig) replaces _name_or_path with the path it read. Returns its path."""
    folder = os.path.join(work, *CHATGLM3_NAME.split("/"))
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(checkpoint):
        if name.endswith((".safetensors", ".safetensors.index.json")) or name == "tokenizer.model":
            link = os.path.join(folder, name)
            if not os.path.lexists(link):
                os.symlink(os.path.abspath(os.path.join(checkpoint, name)), link)
    with open(os.path.join(checkpoint, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    if config.get("family") not in ("chatglm2", "chatglm3"):
        raise SystemExit(f"{checkpoint}: expected a chatglm2 / chatglm3 checkpoint, found {config.get('family')}")
    config.update(_name_or_path=CHATGLM3_NAME, family="chatglm3")
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=1)
    return folder


def make_gguf(source: str, checkpoint: str, ggml_type: str, out: str, work: str) -> None:
    if ggml_type in CONVERTER_TYPES:
        payload = {"root": ROOT, "source": os.path.abspath(source), "stage": stage(checkpoint, work),
                   "out": out + ".tmp", "outtype": ggml_type}
        done = subprocess.run([sys.executable, "-c", CONVERT, json.dumps(payload)], capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"llama.cpp's converter failed ({done.returncode}):\n{done.stderr[-3000:]}")
    else:
        base = os.path.join(os.path.dirname(out), "llama-bf16.gguf")  # our checkpoint's own dtype
        if not os.path.isfile(base):
            make_gguf(source, checkpoint, "bf16", base, work)
        quantizer = os.path.join(source, "build", "bin", "llama-quantize")
        done = subprocess.run([quantizer, base, out + ".tmp", ggml_type.upper()], capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"llama-quantize failed ({done.returncode}):\n{done.stderr[-3000:]}")
    os.replace(out + ".tmp", out)


def bench(binary: str, model_file: str, prefill: list[int], decode_tokens: int, runs: int, threads: int) -> dict:
    cmd = [binary, "-m", model_file, "-t", str(threads), "-r", str(runs), "-o", "json",
           "-p", ",".join(map(str, prefill)) if prefill else "0", "-n", str(decode_tokens)]
    output, code, peak = run_watched(cmd, merge_stderr=False)
    try:
        tests = json.loads(output)
    except json.JSONDecodeError:
        tests = None
    if code or not tests:
        raise SystemExit(f"{' '.join(cmd)} failed ({code}):\n{output[-3000:]}")
    r = {"peak_rss": peak, "prefill_s": {}, "build": {k: tests[0].get(k) for k in ("build_commit", "cpu_info", "backends")}}
    for test in tests:
        rates = list(test.get("samples_ts", [])) or [test["avg_ts"]]
        if test["n_gen"] == 0 and test["n_prompt"]:
            r["prefill_s"][str(test["n_prompt"])] = stats([test["n_prompt"] / x for x in rates])
        elif test["n_gen"]:
            r["decode_tok_s"] = {"1": {**stats(rates), "tokens": test["n_gen"]}}
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap, "llama.cpp", TYPES, "bf16,q8_0,q4_0")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    types, binary, checkpoint, prefill = prepare(ap, args, TYPES, "llama-bench", "llama.cpp")
    results = {"source": os.path.abspath(args.source), "types": {}}
    for t in types:
        model_file = os.path.join(args.dir, f"llama-{t}.gguf")
        if not os.path.isfile(model_file):
            make_gguf(args.source, checkpoint, t, model_file, os.path.join(args.dir, "llama-stage"))
        r = bench(binary, model_file, prefill, args.decode_tokens, args.runs, args.threads)
        r["file_bytes"] = os.path.getsize(model_file)
        results["types"][t] = r
        print(f"{t:5s} file {r['file_bytes'] / 1e9:.2f} GB  peak {r['peak_rss'] / 1e9:.2f} GB", flush=True)
        for p, s in r["prefill_s"].items():
            print(f"      prefill {p:>5s}: {s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f}) s", flush=True)
        s = r["decode_tok_s"]["1"]
        print(f"      decode batch 1: {s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f}) tokens/s", flush=True)
    finish(results, "llama.cpp", prefill, args.json)

if __name__ == "__main__":
    main()
