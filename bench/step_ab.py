"""Decoding steps of two versions of the model package on one checkpoint, timed in one process, alternating.

    python bench/step_ab.py --base HEAD~1 --dir CHECKPOINT [--batch 1,8] [--steps 12] [--prefill 512 --runs 3]
                            [--cached 8192]

Loads model/ as it is in the working tree and as it was at --base (a git revision, exported to a temporary
directory and imported under another name, its native kernels built apart), both on the same checkpoint (a
memory-mapped one is shared in the page cache), reads the same 16-token prompts into each one's KV cache, then
times single decoding steps (model.transformer on one new token per sequence), the two versions in turn and
the order alternating. On a virtual machine whose speed drifts by a third within minutes this shows what
separate bench/speed.py runs cannot: whole-step changes of a few percent, the glue between the matrix
products as well as the products. Prints per batch size the median ms per step (and tokens/s per sequence),
base -> working tree, and the largest difference between the two versions' logits at the last step; with
--prefill P, first the median time of reading a P-token prompt (one forward pass into an empty cache); with
--cached N, the steps decode on top of N more cached positions after the prompt (random keys and values, the
same in both versions' caches), as bench/speed.py --decode-at does.
"""

import argparse
import importlib.util
import io
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def import_package(name: str, directory: Path):
    """Import the package in `directory` as `name` (its relative imports resolve inside it)."""
    spec = importlib.util.spec_from_file_location(name, directory / "__init__.py",
                                                  submodule_search_locations=[str(directory)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def export(revision: str, into: Path) -> Path:
    """model/ at `revision` extracted under `into`."""
    archive = subprocess.run(["git", "archive", revision, "model"], cwd=ROOT, capture_output=True)
    if archive.returncode:
        sys.exit(f"git archive {revision} model failed: {archive.stderr.decode().strip()}")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    return into / "model"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="git revision whose model/ is the baseline")
    ap.add_argument("--dir", required=True, help="checkpoint directory (e.g. one bench/speed.py --dir wrote)")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--steps", type=int, default=12, help="timed steps per version and batch size")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prefill", type=int, default=0, help="also time reading a prompt of this many tokens")
    ap.add_argument("--runs", type=int, default=3, help="timed prompt reads per version")
    ap.add_argument("--cached", type=int, default=0, help="decode on top of this many more cached positions")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        versions = {"base": import_package("model_base", export(args.base, Path(tmp))),
                    "new": import_package("model_new", ROOT / "model")}
        models = {}
        for name, package in versions.items():
            models[name], _ = package.load_model(args.dir, device="cpu", dtype=args.dtype)
        vocab = models["new"].config.padded_vocab_size
        print(f"ms per decoding step (tokens/s per sequence), median of {args.steps}, {args.base} -> working tree; "
              f"{torch.get_num_threads()} threads", flush=True)
        gen = torch.Generator().manual_seed(0)
        if args.prefill:
            prompt = torch.randint(100, vocab - 100, (1, args.prefill), generator=gen)
            times = {"base": [], "new": []}
            with torch.inference_mode():
                for run in range(args.runs + 1):  # the first read of each is not timed
                    for name in ("base", "new") if run % 2 else ("new", "base"):
                        cache = sys.modules[f"model_{name}.cache"].KVCache.for_model(
                            models[name].config, 1, models[name].dtype, "cpu", capacity=args.prefill)
                        start = time.perf_counter()
                        models[name].transformer(prompt, torch.arange(args.prefill)[None], None, cache,
                                                 last_logits_only=True)
                        if run:
                            times[name].append(time.perf_counter() - start)
            base, new = (statistics.median(times[n]) for n in ("base", "new"))
            print(f"prefill {args.prefill}: {base:.2f} -> {new:.2f} s, {base / new:.3f}x", flush=True)
        for b in (int(x) for x in args.batch.split(",")):
            prompt = torch.randint(100, vocab - 100, (b, 16), generator=gen)
            caches, logits, times = {}, {}, {"base": [], "new": []}
            with torch.inference_mode():
                for name, model in models.items():
                    caches[name] = sys.modules[f"model_{name}.cache"].KVCache.for_model(
                        model.config, b, model.dtype, "cpu", capacity=16 + args.cached + args.steps + 4)
                    model.transformer(prompt, torch.arange(16)[None].expand(b, -1), None, caches[name],
                                      last_logits_only=True)
                if args.cached:  # random keys and values after the prompt, copied into the other cache
                    base, new = caches["base"], caches["new"]
                    for mine, theirs in zip(new.keys + new.values, base.keys + base.values):
                        mine[:, :, 16:16 + args.cached].normal_(generator=gen)
                        theirs[:, :, 16:16 + args.cached] = mine[:, :, 16:16 + args.cached]
                    base.length = new.length = 16 + args.cached
                token = torch.full((b, 1), 100)
                for step in range(args.steps + 1):  # the first step of each is not timed
                    for name in ("base", "new") if step % 2 else ("new", "base"):
                        cache = caches[name]
                        start = time.perf_counter()
                        out = models[name].transformer(token, torch.full((b, 1), cache.length), None, cache,
                                                       last_logits_only=True)
                        if step:
                            times[name].append(time.perf_counter() - start)
                        logits[name] = out.logits.float()
            base, new = (statistics.median(times[n]) for n in ("base", "new"))
            diff = (logits["base"] - logits["new"]).abs().max().item()
            at = f" at {16 + args.cached} cached" if args.cached else ""
            print(f"batch {b:2d}{at}: {base * 1e3:.1f} ({1 / base:.2f}) -> {new * 1e3:.1f} ({1 / new:.2f}) ms, "
                  f"{base / new:.3f}x; logits differ by up to {diff:.3g}", flush=True)


if __name__ == "__main__":
    main()
