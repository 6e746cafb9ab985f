"""Time to first token turn after turn of one conversation, with and without the engine's prefix store.

    python bench/turns.py --model /path/to/checkpoint --turns 6 --reply 48
    python bench/turns.py --shape mid --turns 6                # a random checkpoint of that shape (model/tiny.py)

Every front end sends the whole conversation again each turn (as the OpenAI API does); the engine keeps the
finished reply's keys and values (model/engine.py, --prefix-cache-tokens) and reads only the new question.
This runs the same conversation through two engines on one model, turn by turn, alternating which goes first:
each turn's question is a ~60-token sentence, each reply --reply tokens (greedy; a random model's text is
whatever it is). Printed per turn: prompt tokens, tokens taken from the store, TTFT with the store and without
it, and whether the two replies agree: in float32 they do; in bf16 a prompt read in other pieces (the stored
part, then the rest, against chunks of --prefill-chunk from the start) rounds differently, and a random model's
near-equal logits can then pick another token.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

QUESTION = ("Turn {i}: please go on with the story of the lighthouse keeper, the storm that came in from the "
            "west, the ship that lost its way near the rocks, and what the keeper did when the lamp went out.")


def first_token(engine, ids, reply_tokens, stop_ids):
    from model.engine import GenerationRequest
    from model.generation import SamplingParams

    t = time.perf_counter()
    handle = engine.submit(GenerationRequest(ids, SamplingParams(), reply_tokens, stop_ids))
    ttft, text = None, []
    for event in handle:
        if ttft is None:
            ttft = time.perf_counter() - t
        text.append(event.text)
    return ttft, "".join(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a checkpoint folder (default: write a random one of --shape)")
    ap.add_argument("--shape", default="mid", help="tiny, small, mid or 6b (with no --model)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--reply", type=int, default=48, help="tokens per reply")
    args = ap.parse_args(argv)

    import torch

    from model import load_model
    from model.engine import Engine
    from model.formats import Message, format_for

    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="chatglm-turns-") as tmp:
        path = args.model
        if path is None:
            from model.tiny import write_checkpoint

            path = os.path.join(tmp, args.shape)
            write_checkpoint(path, "chatglm3", args.shape, "bfloat16")
        model, tok = load_model(path, device="cpu", dtype=args.dtype)
        fmt = format_for(tok.family)
        stops = tuple(tok.reply_stop_ids())
        engines = {"store": Engine(model, tok), "none": Engine(model, tok, prefix_cache_tokens=0)}
        print(f"{os.path.basename(path)} ({model.dtype}), {os.cpu_count()} CPUs, {args.reply}-token replies")
        print(f"{'turn':>4} {'prompt':>7} {'reused':>7} {'ttft store':>11} {'ttft none':>10} {'same':>5}")
        messages, totals = [], {"store": 0.0, "none": 0.0}
        try:
            for i in range(1, args.turns + 1):
                messages.append(Message("user", QUESTION.format(i=i)))
                ids = fmt.prompt_ids(tok, messages)
                before = engines["store"].stats.prefix_tokens_reused
                order = ["store", "none"] if i % 2 else ["none", "store"]
                result = {name: first_token(engines[name], ids, args.reply, stops) for name in order}
                reused = engines["store"].stats.prefix_tokens_reused - before
                for name in totals:
                    totals[name] += result[name][0]
                same = result["store"][1] == result["none"][1]
                print(f"{i:>4} {len(ids):>7} {reused:>7} {result['store'][0]:>10.2f}s {result['none'][0]:>9.2f}s "
                      f"{'yes' if same else 'NO':>5}", flush=True)
                messages.append(Message("assistant", result["none"][1]))
        finally:
            for engine in engines.values():
                engine.close()
        print(f"total time to first tokens: {totals['store']:.2f} s with the store, {totals['none']:.2f} s without")
    return 0


if __name__ == "__main__":
    sys.exit(main())
