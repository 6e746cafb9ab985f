"""One decode-attention call (one new token per sequence over a bf16 KV cache) at ChatGLM2-6B's head shape:
the native kernel (kernels.decode_attention) against the torch path it replaced (keys and values widened to
float32, two float32 matmuls), interleaved in one process.

    python bench/decode_attention.py --cached 512,2048,8192 --batch 1,4 [--rounds 9] [--mb 512]

Each round times both paths on the same inputs, in alternating order; the table gives the median (and the
fastest) ms per call. Consecutive calls go to different layers' caches, --mb MB in all (more than the
last-level cache): a decoding step streams each layer's cache from memory. The caches are views into a
preallocated cache with room for more tokens (as model/cache.py returns them), with a bool mask as the
batched engine passes.

    python bench/decode_attention.py --model mid --cached 16,8192 [--tokens 8]

--model SHAPE (a model/tiny.py shape with random bf16 weights, e.g. mid = 8 layers of the 6B width): decode
tokens/s of one sequence on top of each --cached count of cached tokens (random keys and values), the torch
path and the native kernel in alternating rounds, and each path's rate at the longest context over the
shortest.
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import kernels  # noqa: E402
from model.modeling import _float32_decode_attention  # noqa: E402
from model.cache import KVCache  # noqa: E402

HEADS, GROUPS, HEAD_DIM = 32, 2, 128  # ChatGLM2-6B / ChatGLM3-6B


def layers(batch: int, cached: int, mb: int):
    """(q, k, v, mask) for as many layers as fit in mb megabytes of keys and values (at least 2)."""
    capacity = cached + cached // 4  # the cache holds more than is used: k and v are strided views
    per_layer = 2 * batch * GROUPS * capacity * HEAD_DIM * 2
    out = []
    for _ in range(max(2, (mb << 20) // per_layer)):
        store = torch.randn(2, batch, GROUPS, capacity, HEAD_DIM).bfloat16()
        q = torch.randn(batch, HEADS, 1, HEAD_DIM).bfloat16()
        mask = torch.ones(batch, 1, 1, cached, dtype=torch.bool)
        out.append((q, store[0, :, :, :cached], store[1, :, :, :cached], mask))
    return out


def per_call(fn, inputs, calls: int) -> float:
    start = time.perf_counter()
    for i in range(calls):
        fn(*inputs[i % len(inputs)])
    return (time.perf_counter() - start) / calls * 1e3


def decode_rate(model, cache, cached: int, tokens: int) -> float:
    """tokens/s of greedy decoding on top of `cached` tokens (the cache rewound to them first)."""
    cache.length, nxt, stamps = cached, torch.tensor([[100]]), []
    for _ in range(tokens + 1):
        logits = model(nxt, torch.tensor([[cache.length]]), None, cache, last_logits_only=True).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        stamps.append(time.perf_counter())
    return tokens / (stamps[-1] - stamps[0])


def model_rates(shape: str, contexts: list[int], tokens: int, rounds: int) -> None:
    from model.modeling import ChatGLMModel
    from model.tiny import make_config

    config = make_config("chatglm2", shape, 65024)  # chatglm2: 32K positions
    model = ChatGLMModel(config, dtype=torch.bfloat16).eval()
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.normal_(0, 0.02, generator=gen)
    native = kernels.decode_attention
    paths = {"torch": lambda *args: None, "native": native}  # None: decode_attention takes the torch path
    caches = {}
    for n in contexts:
        caches[n] = KVCache.for_model(config, 1, torch.bfloat16, "cpu", capacity=n + tokens + 2)
        for t in caches[n].keys + caches[n].values:
            t.normal_(generator=gen)
    rates = {(name, n): [] for name in paths for n in contexts}
    try:
        for r in range(rounds + 1):  # round 0 warms up
            for n in contexts:
                for name in (("torch", "native") if r % 2 == 0 else ("native", "torch")):
                    kernels.decode_attention = paths[name]
                    rate = decode_rate(model, caches[n], n, tokens)
                    if r:
                        rates[name, n].append(rate)
    finally:
        kernels.decode_attention = native
    print(f"{shape} bf16, tokens/s after N cached tokens, median (max) of {rounds} interleaved rounds of "
          f"{tokens} tokens")
    print(f"{'cached':>7} {'torch float32':>16} {'native bf16':>16}")
    for n in contexts:
        old, new = (statistics.median(rates[name, n]) for name in paths)
        print(f"{n:>7} {old:>8.2f} ({max(rates['torch', n]):6.2f}) {new:>8.2f} ({max(rates['native', n]):6.2f})")
    lo, hi = min(contexts), max(contexts)
    for name in paths:
        print(f"{name}: {hi} cached / {lo} cached = "
              f"{statistics.median(rates[name, hi]) / statistics.median(rates[name, lo]):.1%}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cached", default="512,2048,8192", help="cached tokens, comma separated")
    ap.add_argument("--batch", default="1", help="sequences, comma separated")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--mb", type=int, default=512, help="megabytes of layer caches to cycle through")
    ap.add_argument("--model", help="a model/tiny.py shape (e.g. mid): decode tokens/s instead of single calls")
    ap.add_argument("--tokens", type=int, default=8, help="with --model: tokens decoded per round")
    args = ap.parse_args()
    if kernels.decode_attention(*layers(1, 16, 0)[0]) is None:
        sys.exit(f"no native decode attention here: {kernels.why_unavailable() or 'the AVX2 build has none'}")
    torch.set_grad_enabled(False)
    if args.model:
        model_rates(args.model, [int(n) for n in args.cached.split(",")], args.tokens, args.rounds)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms per call, median (fastest) of "
          f"{args.rounds} interleaved rounds")
    print(f"{'batch':>5} {'cached':>7} {'torch float32':>16} {'native bf16':>16} {'speed-up':>8}")
    for batch in map(int, args.batch.split(",")):
        for cached in map(int, args.cached.split(",")):
            inputs = layers(batch, cached, args.mb)
            calls = max(len(inputs), 8)
            paths = {"torch": _float32_decode_attention, "native": kernels.decode_attention}
            times = {name: [] for name in paths}
            for fn in paths.values():  # warm-up: buffers, threads, page faults
                per_call(fn, inputs, len(inputs))
            for r in range(args.rounds):
                for name in (("torch", "native") if r % 2 == 0 else ("native", "torch")):
                    times[name].append(per_call(paths[name], inputs, calls))
            old, new = (statistics.median(times[n]) for n in ("torch", "native"))
            print(f"{batch:>5} {cached:>7} {old:>8.3f} ({min(times['torch']):6.3f}) "
                  f"{new:>8.3f} ({min(times['native']):6.3f}) {old / new:>7.2f}x", flush=True)


if __name__ == "__main__":
    main()
