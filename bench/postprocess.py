"""The cost of post-processing a streamed ChatGLM3 reply, per token, as stream_chat yields it.

    python bench/postprocess.py [--tokens 2000] [--turns 50] [--runs 3]

"whole text": what stream_chat did before the format layer: the original process_response (split the whole
reply, deep-copy the history) after every token. "incremental": what it does now: one reply parser fed each
delta, the response and history read from its segments. Prints the total seconds for one reply of --tokens
pieces after a history of --turns user/assistant turns, and the time per token at the end of the reply.
"""

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model.formats import format_for  # noqa: E402
from model.reply import process_response_v3  # noqa: E402


def history_of(turns: int) -> list[dict]:
    history = [{"role": "system", "content": "You are a helpful assistant. " * 20}]
    for i in range(turns):
        history += [{"role": "user", "content": f"question {i} " * 30},
                    {"role": "assistant", "metadata": "", "content": f"answer {i} " * 120}]
    return history


def whole_text(pieces: list[str], history: list[dict]) -> None:
    text = ""
    for piece in pieces:
        text += piece
        process_response_v3(text, history + [{"role": "user", "content": "q"}])


def incremental(pieces: list[str], history: list[dict]) -> None:
    fmt = format_for("chatglm3")
    parser = fmt.parser()
    for piece in pieces:
        parser.feed(piece)
        fmt.chat_result(parser, "q", history)
    parser.finish()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--turns", type=int, default=50)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    pieces = ["\n"] + [f"word{i} " if i % 17 else "，\n" for i in range(args.tokens - 1)]
    history = history_of(args.turns)
    print(f"{platform.processor() or platform.machine()}; {args.tokens} tokens after {args.turns} turns")
    for name, fn in (("whole text", whole_text), ("incremental", incremental)):
        best = min(_timed(fn, pieces, history) for _ in range(args.runs))
        print(f"{name:12s} {best:8.3f} s per reply  ({1e3 * best / args.tokens:.3f} ms per token on average)")


def _timed(fn, pieces, history) -> float:
    start = time.perf_counter()
    fn(pieces, history)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
