"""Speed and memory of the normal loading and generation path on a random checkpoint of a real shape.

    python bench/speed.py --shape 6b --modes bf16,int8,int4                 # the whole table (slow on 2 cores)
    python bench/speed.py --shape mid --modes bf16,int4 --prefill 128 --json out.json    # a quicker look
    python bench/speed.py --shape 6b --modes int4 --prefill 0 --batch 1 --context 8192   # long-context memory

Writes a random-weight chatglm2 checkpoint of the shape (bf16 safetensors) under --dir (default: a
temporary directory), and for int8 / int4 a pre-quantized checkpoint made from it through
`load_model(..., quantize=bits)` + `save_pretrained` (the chatglm2-6b-int4 layout). Each mode then runs in a
fresh process that loads its checkpoint through `load_model` and measures:

- load seconds and the process's peak RSS after loading (VmHWM; the torch import baseline is shown apart).
  Weights used as stored stay in the checkpoint's memory map (model/loading.py), so loading reads little and
  the first forward pass faults the weights in: its time ("first token") is shown next to the load time;
- prefill: one forward over a P-token prompt with an empty KV cache, median (min-max) of --runs runs;
- decode: tokens/s of greedy generation after a 16-token prompt, per batch size, from the time between the
  first and the last token of --decode-tokens tokens, median (min-max) of --runs runs;
- with --decode-at N: tokens/s of one sequence decoding on top of N cached tokens (the cache filled with
  random keys and values, which cost what real ones do): how attention over a long conversation adds up.
  Each run alternates with one on top of 16 cached tokens, and the long rate is also given as a share of
  that short one (the median of the runs' ratios), which a machine whose speed drifts between runs leaves
  standing where it moves the rates;
- with --context N: one sequence's prompt grown to N tokens, read 1024 tokens per forward pass (as the
  engine's chunked prefill does), then 8 tokens decoded; the RSS after each chunk gives the memory per 1K
  tokens of context (least-squares slope), and the decode speed at that length is shown;
- the peak RSS at the end (weights + KV cache + activations).

It ends with one table of every mode; --json writes all numbers (compare them between commits).

The cost of a forward pass does not depend on the weights' values, so random weights give real timings.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CHILD = r"""
import json, statistics, sys, time
import torch

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0

def peak_rss():  # VmHWM of this process image (ru_maxrss would include the parent's peak)
    return status("VmHWM")

args = json.loads(sys.argv[1])
from model import load_model
from model.cache import KVCache
from model.generation import SamplingParams, generate_tokens
from model import kernels
base = peak_rss()
t = time.perf_counter()
model, _ = load_model(args["dir"], device="cpu", dtype=args["dtype"])
out = {"load_s": time.perf_counter() - t, "baseline_rss": base, "load_rss": peak_rss(),
       "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
       "native_kernels": kernels.available(), "threads": torch.get_num_threads()}
vocab = model.config.padded_vocab_size
gen = torch.Generator().manual_seed(0)
with torch.inference_mode():
    t = time.perf_counter()
    model.transformer(torch.tensor([[100]]), torch.tensor([[0]]), None, None, last_logits_only=True)
    out["first_token_s"] = time.perf_counter() - t

def stats(xs):
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}

with torch.inference_mode():
    prefill = {}
    for p in args["prefill"]:
        ids = torch.randint(100, vocab - 100, (1, p), generator=gen)
        times = []
        for _ in range(args["runs"]):
            cache = KVCache.for_model(model.config, 1, model.dtype, "cpu", capacity=p + 1)
            t = time.perf_counter()
            model.transformer(ids, torch.arange(p)[None], None, cache, last_logits_only=True)
            times.append(time.perf_counter() - t)
        prefill[str(p)] = stats(times)
    out["prefill_s"] = prefill
    decode = {}
    greedy = SamplingParams(do_sample=False)
    for b in args["batch"]:
        ids = torch.randint(100, vocab - 100, (b, 16), generator=gen)
        rates = []
        for _ in range(args["runs"]):
            stamps = []
            for _tok in generate_tokens(model, ids, max_new_tokens=args["decode_tokens"], params=greedy):
                stamps.append(time.perf_counter())
            rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
        decode[str(b)] = stats(rates)
    out["decode_tok_s"] = decode
    def rate_at(cache, n):  # one sequence decoding on top of n cached tokens (random keys and values)
        cache.length, nxt, stamps = n, torch.tensor([[100]]), []
        for _tok in range(args["decode_tokens"]):
            logits = model.transformer(nxt, torch.tensor([[cache.length]]), None, cache, last_logits_only=True).logits
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            stamps.append(time.perf_counter())
        return (len(stamps) - 1) / (stamps[-1] - stamps[0])

    decode_at, shares = {}, {}
    for n in args["decode_at"]:
        caches = {}
        for m in (16, n):
            caches[m] = KVCache.for_model(model.config, 1, model.dtype, "cpu", capacity=m + args["decode_tokens"] + 1)
            for t in caches[m].keys + caches[m].values:
                t.normal_(generator=gen)
        rates, ratios = [], []
        for run in range(args["runs"]):  # long and short in turn, the order alternating
            if run % 2 == 0:
                short, long_ = rate_at(caches[16], 16), rate_at(caches[n], n)
            else:
                long_, short = rate_at(caches[n], n), rate_at(caches[16], 16)
            rates.append(long_)
            ratios.append(long_ / short)
        decode_at[str(n)] = stats(rates)
        shares[str(n)] = stats(ratios)
    out["decode_at_tok_s"] = decode_at
    out["decode_at_share"] = shares
    if args["context"]:
        n, chunk = args["context"], 1024
        cache = KVCache.for_model(model.config, 1, model.dtype, "cpu")
        base_rss, points, t = status("VmRSS"), [], time.perf_counter()
        for start in range(0, n, chunk):
            ids = torch.randint(100, vocab - 100, (1, min(chunk, n - start)), generator=gen)
            pos = torch.arange(start, start + ids.shape[1])[None]
            logits = model.transformer(ids, pos, None, cache, last_logits_only=True).logits
            points.append((cache.length, status("VmRSS")))
        prefill_s = time.perf_counter() - t
        stamps = []
        for step in range(8):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            logits = model.transformer(nxt, torch.tensor([[cache.length]]), None, cache, last_logits_only=True).logits
            stamps.append(time.perf_counter())
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        var = sum((x - mx) ** 2 for x in xs)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0
        out["context"] = {"tokens": cache.length, "prefill_s": prefill_s, "rss_before": base_rss,
                          "rss_after": ys[-1], "bytes_per_1k_tokens": slope * 1000,
                          "kv_cache_bytes": sum(k.numel() * k.element_size() * 2 for k in cache.keys),
                          "decode_tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]), "points": points}
out["peak_rss"] = peak_rss()
print(json.dumps(out))
"""

MODES = {"bf16": ("bfloat16", None), "fp32": ("float32", None), "int8": ("bfloat16", 8), "int4": ("bfloat16", 4)}


def gb(n):
    return f"{n / 1e9:.2f}"


def run_child(code: str, payload: dict) -> dict:
    done = subprocess.run([sys.executable, "-c", code, json.dumps(payload)], cwd=ROOT, capture_output=True,
                          text=True)
    if done.returncode:
        raise SystemExit(f"benchmark child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


QUANTIZE = r"""
import json, sys, time
args = json.loads(sys.argv[1])
from model import load_model
t = time.perf_counter()
model, tok = load_model(args["src"], device="cpu", dtype="bfloat16", quantize=args["bits"])
model.save_pretrained(args["dst"]); tok.save_pretrained(args["dst"])
peak = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
print(json.dumps({"quantize_load_s": time.perf_counter() - t, "quantize_peak_rss": peak}))
"""


BANDWIDTH = r"""
import json, time, torch
a = torch.ones(1 << 29)  # 2 GiB of float32, far larger than any cache
a.sum()
best = min((lambda t: (a.sum(), time.perf_counter() - t)[1])(time.perf_counter()) for _ in range(5))
print(json.dumps({"read_gb_s": a.numel() * 4 / best / 1e9}))
"""


def fmt(s: dict, scale: float = 1.0, digits: int = 2) -> str:
    return f"{s['median'] * scale:.{digits}f} ({s['min'] * scale:.{digits}f}-{s['max'] * scale:.{digits}f})"


def table(results: dict) -> list[str]:
    """One markdown table of every mode: medians (spread in the JSON)."""
    modes = results["modes"]
    prefills = sorted({int(p) for r in modes.values() for p in r["prefill_s"]})
    batches = sorted({int(b) for r in modes.values() for b in r["decode_tok_s"]})
    contexts = sorted({int(n) for r in modes.values() for n in r.get("decode_at_tok_s", {})})
    head = (["mode", "load s", "first token s", "peak RSS GB"] + [f"prefill {p} s" for p in prefills]
            + [f"decode b={b} tok/s" for b in batches] + [f"decode at {n} tok/s (of 16 cached)" for n in contexts])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for mode, r in modes.items():
        cells = [mode, f"{r['load_s']:.1f}", f"{r['first_token_s']:.1f}", gb(r["peak_rss"])]
        cells += [f"{r['prefill_s'][str(p)]['median']:.1f}" if str(p) in r["prefill_s"] else "-" for p in prefills]
        cells += [f"{r['decode_tok_s'][str(b)]['median']:.2f}" if str(b) in r["decode_tok_s"] else "-"
                  for b in batches]
        at, share = r.get("decode_at_tok_s", {}), r.get("decode_at_share", {})
        cells += [f"{at[str(n)]['median']:.2f} ({share[str(n)]['median']:.0%})" if str(n) in at else "-"
                  for n in contexts]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="6b", choices=["tiny", "small", "mid", "6b"])
    ap.add_argument("--modes", default="bf16,int8,int4", help="comma list of " + ", ".join(MODES))
    ap.add_argument("--prefill", default="128,512,2048", help="prompt lengths, comma separated (0: none)")
    ap.add_argument("--batch", default="1,8", help="decode batch sizes, comma separated")
    ap.add_argument("--decode-at", default="", help="also decode one sequence on top of this many cached tokens "
                                                    "(random keys and values), comma separated")
    ap.add_argument("--context", type=int, default=0, help="also grow one prompt to this many tokens and "
                                                          "report memory per 1K tokens of context")
    ap.add_argument("--decode-tokens", type=int, default=24)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", help="keep checkpoints here and reuse them (default: a temporary directory)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            ap.error(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    from model.loading import checkpoint_nbytes
    from model.tiny import write_checkpoint

    root = args.dir or tempfile.mkdtemp(prefix=f"chatglm-bench-{args.shape}-")
    results = {"shape": args.shape, "modes": {}}
    results.update(run_child(BANDWIDTH, {}))
    print(f"memory read bandwidth (torch sum over 2 GiB, best of 5): {results['read_gb_s']:.1f} GB/s", flush=True)
    try:
        float_dir = os.path.join(root, "bf16")
        if not os.path.isfile(os.path.join(float_dir, "config.json")):
            t = time.perf_counter()
            write_checkpoint(float_dir, "chatglm2", args.shape, "bfloat16")
            print(f"wrote a random {args.shape} checkpoint in {time.perf_counter() - t:.0f} s", flush=True)
        for mode in modes:
            dtype, bits = MODES[mode]
            directory, extra = float_dir, {}
            if bits:
                directory = os.path.join(root, mode)
                if not os.path.isfile(os.path.join(directory, "config.json")):
                    extra = run_child(QUANTIZE, {"src": float_dir, "dst": directory, "bits": bits})
            payload = {"dir": directory, "dtype": dtype, "runs": args.runs, "decode_tokens": args.decode_tokens,
                       "context": args.context, "prefill": [int(p) for p in args.prefill.split(",") if int(p or 0)],
                       "batch": [int(b) for b in args.batch.split(",") if b],
                       "decode_at": [int(n) for n in args.decode_at.split(",") if n]}
            r = run_child(CHILD, payload)
            r.update(extra, checkpoint_bytes=checkpoint_nbytes(directory))
            results["modes"][mode] = r
            line = (f"{mode:5s} checkpoint {gb(r['checkpoint_bytes'])} GB  load {r['load_s']:.1f} s  "
                    f"first token {r['first_token_s']:.1f} s  "
                    f"RSS after load {gb(r['load_rss'])} GB (torch alone {gb(r['baseline_rss'])})  "
                    f"peak {gb(r['peak_rss'])} GB")
            if "quantize_load_s" in r:
                line += f"  [quantize while loading: {r['quantize_load_s']:.0f} s, peak {gb(r['quantize_peak_rss'])} GB]"
            print(line, flush=True)
            for p, s in r["prefill_s"].items():
                print(f"      prefill {p:>5s} tokens: {fmt(s)} s", flush=True)
            for b, s in r["decode_tok_s"].items():
                print(f"      decode batch {b}: {fmt(s)} tokens/s per sequence", flush=True)
            for n, s in r["decode_at_tok_s"].items():
                print(f"      decode at {n:>5s} cached tokens: {fmt(s)} tokens/s, "
                      f"{fmt(r['decode_at_share'][n], 100, 0)}% of 16 cached tokens in the same runs", flush=True)
            if "context" in r:
                c = r["context"]
                print(f"      context {c['tokens']} tokens: read in {c['prefill_s']:.0f} s, RSS {gb(c['rss_before'])} -> "
                      f"{gb(c['rss_after'])} GB, {c['bytes_per_1k_tokens'] / 1e6:.1f} MB per 1K tokens (KV cache "
                      f"{gb(c['kv_cache_bytes'])} GB), then decode {c['decode_tok_s']:.2f} tokens/s", flush=True)
        print(f"native kernels: {next(iter(results['modes'].values()))['native_kernels']}, "
              f"threads: {next(iter(results['modes'].values()))['threads']}\n")
        print("\n".join(table(results)))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
