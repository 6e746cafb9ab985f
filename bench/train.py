"""Training speed and memory of finetune.py's methods on a random checkpoint of a real shape, on the CPU.

    python bench/train.py --shape mid                                   # lora and ptuning, bf16 (slow on 2 cores)
    python bench/train.py --shape mid --methods lora --dtypes float32,bfloat16 --seq-len 512 --json out.json
    python bench/train.py --shape tiny --steps 2                        # a smoke run of the script itself
    python bench/train.py --shape mid --quantize none,4,8   # also on an int4 / int8 base (P-Tuning, QLoRA)

Writes a random-weight chatglm2 checkpoint of the shape (python -m model.tiny; under --dir, default a temporary
directory). Each method x dtype then runs in a fresh process that loads it through load_model, prepares it as
finetune.py does (finetune.prepare: the base frozen; LoRA adapters on query_key_value, dense, dense_h_to_4h,
dense_4h_to_h (peft's, or beside the quantized linears of an int4 / int8 base), or a new P-Tuning v2 prefix
encoder) and runs full optimizer steps (forward with labels, backward, AdamW) on random batches of
--batch-size x --seq-len tokens, and measures:

- tokens/s over --steps steps after --warmup steps, median (min-max) of the steps' own rates;
- the process's peak RSS (VmHWM) after loading and at the end (weights + activations kept for the backward +
  gradients and optimizer state of the trained parameters), and the trainable parameter count.

The cost of a step does not depend on the weights' values, so random weights give real timings.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CHILD = r"""
import argparse, json, statistics, sys, time
import torch

def peak_rss():  # VmHWM of this process image
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0

args = json.loads(sys.argv[1])
import finetune
from model import load_model
torch.manual_seed(0)
model, _ = load_model(args["dir"], device="cpu", dtype=args["dtype"], quantize=args["quantize"])
out = {"load_rss": peak_rss(), "threads": torch.get_num_threads()}
prep = argparse.Namespace(method=args["method"], lora_rank=args["lora_rank"], lora_alpha=2.0 * args["lora_rank"],
                          lora_dropout=0.0, pre_seq_len=args["pre_seq_len"], prefix_projection=False,
                          gradient_checkpointing=args["gradient_checkpointing"], model=args["dir"])
model = finetune.prepare(model, prep)
params = [p for p in model.parameters() if p.requires_grad]
out["trainable"] = sum(p.numel() for p in params)
optimizer = torch.optim.AdamW(params, lr=1e-4)
vocab = model.config.padded_vocab_size
B, T = args["batch"], args["seq_len"]
rates = []
for step in range(args["warmup"] + args["steps"]):
    ids = torch.randint(100, min(vocab, 60000), (B, T))
    t = time.perf_counter()
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - t
    if step >= args["warmup"]:
        rates.append(B * T / elapsed)
    if not torch.isfinite(loss):
        raise SystemExit(f"loss is {float(loss)} at step {step}")
out["tokens_per_s"] = {"median": statistics.median(rates), "min": min(rates), "max": max(rates), "n": len(rates)}
out["peak_rss"] = peak_rss()
print(json.dumps(out))
"""


def run_child(payload: dict) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(payload)], cwd=ROOT, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise SystemExit(f"{payload['method']} {payload['dtype']} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="mid", help="a model.tiny shape: tiny, small, mid, 6b (default mid)")
    ap.add_argument("--dir", default=None, help="where the random checkpoint is (written when missing)")
    ap.add_argument("--methods", default="lora,ptuning")
    ap.add_argument("--dtypes", default="bfloat16", help="comma-separated: float32, bfloat16")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--pre-seq-len", type=int, default=128)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--quantize", default="none", help="comma-separated: none, 4, 8 (the base model quantized while "
                                                         "loading: P-Tuning through it, LoRA beside it)")
    ap.add_argument("--json", default=None, help="write every number to this file")
    args = ap.parse_args(argv)

    from model.tiny import SHAPES, write_checkpoint

    try:
        quantize = [None if q == "none" else {"4": 4, "8": 8}[q] for q in args.quantize.split(",")]
    except KeyError:
        ap.error("--quantize takes none, 4 and 8")

    if args.shape not in SHAPES:
        ap.error(f"--shape must be one of {', '.join(SHAPES)}")
    tmp = None
    directory = args.dir
    if directory is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-train-")
        directory = os.path.join(tmp.name, f"chatglm2-{args.shape}")
    if not os.path.isfile(os.path.join(directory, "config.json")):
        print(f"writing a random chatglm2 {args.shape} checkpoint to {directory} ...", file=sys.stderr, flush=True)
        write_checkpoint(directory, "chatglm2", args.shape, "bfloat16" if args.shape in ("mid", "6b") else "float32")
    results = []
    try:
        for method in args.methods.split(","):
            for dtype in args.dtypes.split(","):
                for bits in quantize:
                    payload = {"dir": directory, "method": method, "dtype": dtype, "batch": args.batch_size,
                               "seq_len": args.seq_len, "steps": args.steps, "warmup": args.warmup,
                               "lora_rank": args.lora_rank, "pre_seq_len": args.pre_seq_len,
                               "gradient_checkpointing": args.gradient_checkpointing, "quantize": bits}
                    print(f"{method} {dtype}{f' int{bits}' if bits else ''} ...", file=sys.stderr, flush=True)
                    results.append({**payload, **run_child(payload)})
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(f"\nchatglm2 {args.shape} on the CPU ({results[0]['threads']} threads), batch {args.batch_size} x "
          f"{args.seq_len} tokens{', gradient checkpointing' if args.gradient_checkpointing else ''}")
    print(f"{'method':<9} {'dtype':<9} {'weights':<8} {'trainable':>11} {'tokens/s (min-max)':>24} "
          f"{'load RSS GiB':>13} {'peak RSS GiB':>13}")
    for r in results:
        t = r["tokens_per_s"]
        rate = f"{t['median']:.1f} ({t['min']:.1f}-{t['max']:.1f})"
        weights = f"int{r['quantize']}" if r["quantize"] else r["dtype"]
        print(f"{r['method']:<9} {r['dtype']:<9} {weights:<8} {r['trainable']:>11,} {rate:>24} "
              f"{gib(r['load_rss']):>13} {gib(r['peak_rss']):>13}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
