"""The matrix-vector kernels of two versions of model/kernels.c, timed in one process, calls alternating.

    python bench/kernels_ab.py --base HEAD~1 [--rows 1,2,8,16] [--modes int4,int8,bf16] [--shapes h_to_4h,4h_to_h]

Builds model/kernels.c as it is in the working tree and as it was at --base (a git revision) with the flags
model/kernels.py uses, loads both, and times gemv_q4v / gemv_q8v (the integer products of bf16 models) and
gemv_bf16 at ChatGLM2-6B's layer shapes. Each round calls the two builds in turn (the order alternating) on the
same input, each call on another copy of the layer, --mb MB of copies in all (more than the last-level cache),
so both read their weights from memory under the same conditions. On a virtual machine whose speed drifts by
a third within minutes, this shows a kernel change that separate runs cannot. Prints the median ms per call,
base -> working tree, and "DIFF" where the two builds' results differ in any bit.
"""

import argparse
import ctypes
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from model import kernels  # noqa: E402
from model.quantization import quantize_weight  # noqa: E402

SHAPES = {"qkv": (4096, 4608), "dense": (4096, 4096), "h_to_4h": (4096, 27392), "4h_to_h": (13696, 4096)}


def build(files: dict[str, str], out: Path) -> ctypes.CDLL:
    """Build kernels.c (and the headers it includes, from the same revision) in out's own directory."""
    out.parent.mkdir()
    for name, text in files.items():
        (out.parent / name).write_text(text)
    src = out.parent / "kernels.c"
    cc = os.environ.get("CC", "cc")
    subprocess.run([cc, "-fopenmp", "-O3", "-march=native", "-shared", "-fPIC", "-o", str(out), str(src)], check=True)
    lib = ctypes.CDLL(str(out))
    p, i = ctypes.c_void_p, ctypes.c_int
    for name in ("gemv_q8v", "gemv_q4v"):
        getattr(lib, name).argtypes = [p, i, i, p, i, p, p, p]
    lib.gemv_bf16.argtypes = [p, i, i, p, i, p, p]
    return lib


def copies(mode: str, k: int, n: int, mb: int):
    """Weight copies of one layer filling mb megabytes (at least 2), and the float32 scale of the quantized."""
    w = torch.randn(n, k) * 0.02
    if mode == "bf16":
        weight, scale = w.bfloat16(), None
    else:
        weight, scale = quantize_weight(w, 8 if mode == "int8" else 4)
        scale = scale.float()
    count = max(2, mb * 2**20 // (weight.numel() * weight.element_size()))
    return [weight] + [weight.clone() for _ in range(count - 1)], scale


def call(lib, mode, x, weight, scale, bias, y):
    m, k = x.shape
    n = y.shape[1]
    if mode == "bf16":
        return lib.gemv_bf16(x.data_ptr(), m, k, weight.data_ptr(), n, bias.data_ptr(), y.data_ptr())
    fn = lib.gemv_q8v if mode == "int8" else lib.gemv_q4v
    return fn(x.data_ptr(), m, k, weight.data_ptr(), n, scale.data_ptr(), bias.data_ptr(), y.data_ptr())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="git revision whose model/kernels.c is the baseline")
    ap.add_argument("--rows", default="1,2,8,16")
    ap.add_argument("--modes", default="int4,int8,bf16")
    ap.add_argument("--shapes", default="qkv,h_to_4h,4h_to_h")
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--mb", type=int, default=600, help="megabytes of layer copies to cycle through")
    args = ap.parse_args()
    if not kernels.AVX512 <= kernels._cpu_flags():
        sys.exit("model/kernels.c is the AVX-512 build: this CPU has no AVX-512")
    base, new = {}, {}
    for name in ("kernels.c", "kernels_glue.h"):  # the header is absent before it was added
        shown = subprocess.run(["git", "show", f"{args.base}:model/{name}"], cwd=ROOT, capture_output=True, text=True)
        if shown.returncode == 0:
            base[name] = shown.stdout
        elif name == "kernels.c":
            sys.exit(f"git show {args.base}:model/kernels.c failed: {shown.stderr.strip()}")
        if (ROOT / "model" / name).exists():
            new[name] = (ROOT / "model" / name).read_text()
    with tempfile.TemporaryDirectory() as tmp:
        libs = {"base": build(base, Path(tmp) / "base" / "kernels.so"),
                "new": build(new, Path(tmp) / "new" / "kernels.so")}
        if not all(lib.has_vnni() for lib in libs.values()) and args.modes != "bf16":
            sys.exit("no AVX512-VNNI on this CPU: only --modes bf16 runs here")
        print(f"ms per call, median of {args.rounds} rounds, {args.base} -> working tree; "
              f"{torch.get_num_threads()} threads")
        for mode in args.modes.split(","):
            for shape in args.shapes.split(","):
                k, n = SHAPES[shape]
                weights, scale = copies(mode, k, n, args.mb)
                bias = torch.randn(n)
                cells, turn = [], 0
                for m in (int(r) for r in args.rows.split(",")):
                    x = torch.randn(m, k)
                    x = x.bfloat16() if mode == "bf16" else x
                    times, results = {"base": [], "new": []}, {}
                    for r in range(args.rounds):
                        for name in ("base", "new") if r % 2 == 0 else ("new", "base"):
                            y = torch.empty(m, n)
                            weight, turn = weights[turn % len(weights)], turn + 1
                            start = time.perf_counter()
                            if call(libs[name], mode, x, weight, scale, bias, y):
                                sys.exit(f"{name} build of {mode} failed")
                            times[name].append(time.perf_counter() - start)
                            results[name] = y
                    same = torch.equal(results["base"], results["new"])
                    cells.append(f"{m}: {statistics.median(times['base']) * 1e3:.1f} -> "
                                 f"{statistics.median(times['new']) * 1e3:.1f}{'' if same else ' DIFF'}")
                print(f"{mode:5} {shape:8} " + "   ".join(cells), flush=True)


if __name__ == "__main__":
    main()
