"""One-shot chat from the command line: python -m model --model DIR_OR_HUB_ID "your question"."""

import argparse
import sys

from . import CheckpointError, DeviceUnavailableError, ModelNotFoundError, load_model
from .flags import device_name, dtype_name, float_range, int_range


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m model", description=__doc__)
    ap.add_argument("query")
    ap.add_argument("--model", default="THUDM/chatglm3-6b", help="checkpoint directory or Hub id")
    ap.add_argument("--device", default="auto", type=device_name, help="auto, cpu, cuda, cuda:1, mps")
    ap.add_argument("--dtype", default="auto", type=dtype_name, help="auto, bfloat16, float16, float32")
    ap.add_argument("--max-new-tokens", type=int_range(1), default=256, help=">= 1")
    ap.add_argument("--temperature", type=float_range(0), default=0.8, help=">= 0; 0: always the most likely token")
    ap.add_argument("--top-p", type=float_range(0, 1, low_open=True), default=0.8, help="> 0 and <= 1")
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args(argv)
    try:
        model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    except (ModelNotFoundError, CheckpointError, DeviceUnavailableError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)  # one line, whatever the message holds
        return 2
    shown = ""
    for response, _ in model.stream_chat(tokenizer, args.query, max_new_tokens=args.max_new_tokens,
                                         temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                                         do_sample=args.temperature > 0):
        if isinstance(response, str) and response.startswith(shown):
            print(response[len(shown):], end="", flush=True)
            shown = response
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
