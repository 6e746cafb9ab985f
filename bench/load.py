"""Load time and peak memory of load_model on a random checkpoint of a real shape (written on the fly).

    python bench/load.py --shape 6b --dtype bfloat16      # 12.5 GB on disk under $TMPDIR, removed afterwards

Prints the checkpoint size, load seconds and the loading process's peak RSS (measured in a fresh child
process, after importing torch, so the baseline is included and reported separately).
"""

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

CHILD = """
import json, sys, time
import torch

def peak_rss():  # VmHWM belongs to this process image (ru_maxrss would include the parent's peak)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

from model import load_model
base = peak_rss()
t = time.perf_counter()
model, tok = load_model(sys.argv[1], device="cpu", dtype=sys.argv[2])
load_s = time.perf_counter() - t
params = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"load_s": load_s, "baseline_rss": base, "peak_rss": peak_rss(), "param_bytes": params}))
"""


def gib(n):
    return f"{n / 2**30:.2f} GiB"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="6b", choices=["tiny", "small", "mid", "6b"])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--dir", help="where to write the checkpoint (default: a temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args()
    from model.loading import checkpoint_nbytes
    from model.tiny import write_checkpoint

    directory = args.dir or tempfile.mkdtemp(prefix=f"chatglm-{args.shape}-")
    try:
        if not os.path.isfile(os.path.join(directory, "config.json")):
            t = time.perf_counter()
            write_checkpoint(directory, "chatglm2", args.shape, args.dtype)
            print(f"wrote random {args.shape} checkpoint in {time.perf_counter() - t:.1f} s")
        size = checkpoint_nbytes(directory)
        results = []
        for _ in range(args.runs):
            out = subprocess.run([sys.executable, "-c", CHILD, directory, args.dtype], cwd=ROOT,
                                 capture_output=True, text=True, check=True)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        best = min(results, key=lambda r: r["load_s"])
        print(f"shape {args.shape} dtype {args.dtype}: checkpoint {gib(size)}, parameters {gib(best['param_bytes'])}")
        for r in results:
            print(f"  load {r['load_s']:.2f} s   peak RSS {gib(r['peak_rss'])}   (torch baseline "
                  f"{gib(r['baseline_rss'])})   peak / checkpoint = {r['peak_rss'] / size:.3f}")
        print(json.dumps({"shape": args.shape, "dtype": args.dtype, "checkpoint_bytes": size, "runs": results}))
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
