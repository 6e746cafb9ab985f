"""One int4 (or int8) linear at ChatGLM2-6B's shapes through each CPU path, in one process, per row count.

    python bench/int4_fallback.py [--bits 4] [--rows 1,8] [--dtype bfloat16] [--runs 5]

Paths: "dequant" (de-quantize the whole matrix with torch, then F.linear: the fallback before torch's packed
products were used), "packed" (the fallback now: torch's _weight_int4pack_mm_for_cpu / _weight_int8pack_mm, as
QuantizedLinear runs without the native kernels) and "native" (model/kernels, when they build on this CPU).
Prints the median (min) ms per product. The same layer object serves all paths; its input changes per run.
"""

import argparse
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import kernels  # noqa: E402
from model.quantization import QuantizedLinear, dequantize_weight  # noqa: E402

SHAPES = {"h_to_4h 4096x27392": (4096, 27392), "4h_to_h 13696x4096": (13696, 4096)}


def timed(fn, runs):
    fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), min(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--rows", default="1,8")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    native = kernels.available()
    flags = kernels._cpu_flags() if hasattr(kernels, "_cpu_flags") else set()
    print(f"torch {torch.__version__}, {platform.machine()}, threads {torch.get_num_threads()}, "
          f"avx512f {'avx512f' in flags}, native kernels {native or kernels.why_unavailable()}, {args.dtype}")
    print(f"{'shape (in x out)':22} {'rows':>4} {'dequant ms':>16} {'packed ms':>16} {'native ms':>16}")
    orig_available = kernels.available
    for name, (k, n) in SHAPES.items():
        with torch.no_grad():
            layer = QuantizedLinear.from_linear(torch.nn.Linear(k, n, dtype=dtype), args.bits)
        for r in map(int, args.rows.split(",")):
            x = torch.randn(r, k).to(dtype)

            def dequant():
                w = dequantize_weight(layer.weight, layer.weight_scale, layer.bits, dtype)
                return F.linear(x, w, layer.bias.to(dtype))

            def fallback():
                kernels.available = lambda: False
                try:
                    return layer(x)
                finally:
                    kernels.available = orig_available

            cells = [timed(dequant, max(1, args.runs // 2)), timed(fallback, args.runs)]
            cells.append(timed(lambda: layer(x), args.runs) if native else None)
            fmt = lambda c: "-" if c is None else f"{c[0]:8.1f} ({c[1]:.1f})"  # noqa: E731
            print(f"{name:22} {r:4d} " + " ".join(f"{fmt(c):>16}" for c in cells), flush=True)


if __name__ == "__main__":
    with torch.inference_mode():
        main()
