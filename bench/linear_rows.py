"""Per-linear CPU times against the number of rows (the batch size when decoding), at ChatGLM2-6B's shapes.

    python bench/linear_rows.py --modes int4,int8,bf16 --rows 1,2,4,5,8,16 [--shapes qkv,dense,h_to_4h,4h_to_h]

Each layer has random weights in the given format; the input is in --dtype (the model dtype, default bf16). Prints the median of
--runs calls (and the fastest) in ms per layer and row count. Consecutive calls go to different copies of the layer, --mb MB in
all (more than the last-level cache): a decoding step streams its weights from memory, not from cache. CHATGLM_NATIVE_KERNELS=avx2 times the AVX2 build on an AVX-512 CPU.
"""

import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import kernels  # noqa: E402
from model.modeling import Linear  # noqa: E402
from model.quantization import QuantizedLinear  # noqa: E402

SHAPES = {"qkv": (4096, 4608), "dense": (4096, 4096), "h_to_4h": (4096, 27392), "4h_to_h": (13696, 4096)}


def layer(mode, k, n, dtype):
    linear = Linear(k, n, bias=True, dtype=dtype)
    with torch.no_grad():
        linear.weight.normal_(0, 0.02), linear.bias.normal_()
    return linear if mode == "bf16" else QuantizedLinear.from_linear(linear, {"int8": 8, "int4": 4}[mode])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="int4,int8,bf16")
    ap.add_argument("--rows", default="1,2,4,5,8,16")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--mb", type=int, default=512, help="megabytes of layer copies to cycle through")
    ap.add_argument("--dtype", default="bfloat16", help="the model (activation) dtype: bfloat16 or float32")
    args = ap.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    dtype = getattr(torch, args.dtype)
    print(f"native kernels: {kernels.available()} ({'avx2' if kernels.f32_library() else 'avx512'} build), "
          f"decode_rows={kernels.decode_rows()}, torch threads={torch.get_num_threads()}")
    print(f"{'mode':5} {'layer':8} " + " ".join(f"{f'{r} rows':>15}" for r in rows) + "   (ms: median (min))")
    for mode in args.modes.split(","):
        for name in args.shapes.split(","):
            k, n = SHAPES[name]
            first = layer(mode, k, n, dtype)
            size = sum(p.numel() * p.element_size() for p in first.parameters())
            copies = [first] + [copy.deepcopy(first) for _ in range(max(0, -(-args.mb * 2**20 // size) - 1))]
            cells, calls = [], 0
            with torch.inference_mode():
                for lin in copies:  # warm-up: faults the weights in, builds caches
                    lin(torch.randn(1, k).to(dtype))
                for r in rows:
                    x = torch.randn(r, k).to(dtype)
                    times = []
                    for _ in range(args.runs):
                        lin, calls = copies[calls % len(copies)], calls + 1
                        t = time.perf_counter()
                        lin(x)
                        times.append(time.perf_counter() - t)
                    cells.append(f"{statistics.median(times) * 1e3:6.1f} ({min(times) * 1e3:.1f})".rjust(15))
            print(f"{mode:5} {name:8} " + " ".join(cells), flush=True)
            del copies, first, lin


if __name__ == "__main__":
    main()
