"""What the scripts share: one set of command-line flags, model loading with a clear error, load_model_on_gpus."""

from __future__ import annotations

import argparse
import logging
import os
import sys

DEFAULT_MODEL = "THUDM/chatglm2-6b"


def build_parser(description: str, *, server: bool = False, web: bool = False, engine: bool = False,
                 port: int = 8000):
    """The flags every script takes; servers and web demos add --host / --port (and the API ones).

    Scripts serving several users (server, web, or engine=True) also take --max-batch.
    """
    from model.flags import device_name, dtype_name, int_range

    positive = int_range(1)
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", default=os.environ.get("MODEL_PATH") or DEFAULT_MODEL,
                    help=f"checkpoint directory or Hub id (env MODEL_PATH; default {DEFAULT_MODEL})")
    ap.add_argument("--quantize", type=int, choices=(4, 8), default=None,
                    help="quantize the weights to int4 / int8 while loading")
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "mps", "cpu"), type=device_name,
                    help="where to run (auto: CUDA, then MPS, then CPU)")
    ap.add_argument("--dtype", default="auto", type=dtype_name, help="auto, bfloat16, float16 or float32")
    ap.add_argument("--num-gpus", type=positive, default=1, help="split the layers over this many GPUs (>= 1)")
    if server or web:
        ap.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: everyone)")
        ap.add_argument("--port", type=int_range(1, 65535), default=port, help=f"1-65535 (default {port})")
    if web:
        ap.add_argument("--auth", action="append", default=None, metavar="USER:PASS",
                        help="ask for this login (repeat for more; @FILE: one USER:PASS a line; env WEB_AUTH)")
    if server or web or engine:
        ap.add_argument("--max-batch", type=positive, default=8,
                        help="requests decoded together (continuous batching); more wait in the queue")
        ap.add_argument("--prefill-chunk", type=positive, default=128,
                        help="read longer prompts this many tokens per step, so running replies keep flowing")
    if server:
        ap.add_argument("--api-key", default=os.environ.get("API_KEY"),
                        help="require 'Authorization: Bearer KEY' (env API_KEY)")
        ap.add_argument("--cors-origins", default="",
                        help="comma-separated origins browsers may call from (default: none)")
        ap.add_argument("--max-request-bytes", type=positive, default=4 * 1024 * 1024)
        ap.add_argument("--max-queue", type=positive, default=32,
                        help="requests that may wait; more are answered 503 (try again)")
        ap.add_argument("--allowed-hosts", default="",
                        help="comma-separated Host names to answer besides localhost and --host ('*': any; "
                             "default: any when --host is 0.0.0.0)")
        ap.add_argument("--model-name", default=None, help="the model id clients see (default: from --model)")
    return ap


def model_id(name_or_path: str) -> str:
    """A stable id for a checkpoint: THUDM/chatglm3-6b -> chatglm3-6b, ./models/my-glm/ -> my-glm."""
    return os.path.basename(os.path.normpath(str(name_or_path))) or str(name_or_path)


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says what to do."""


def load_from_args(args):
    """(model, tokenizer) for the parsed flags; ModelLoadError with what to do when that fails."""
    from model import CheckpointError, DeviceUnavailableError, ModelNotFoundError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        from model import load_model
        from model.multigpu import device_map_for

        device_map = device_map_for(args.model, args.num_gpus) if args.num_gpus > 1 else None
        return load_model(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize,
                          device_map=device_map)
    except (ModelNotFoundError, CheckpointError, DeviceUnavailableError, FileNotFoundError, RuntimeError) as e:
        raise ModelLoadError(" ".join(str(e).split())) from e  # one line, whatever the message holds


def load_or_exit(args):
    """load_from_args, ending the program with the explanation on failure."""
    try:
        return load_from_args(args)
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

def load_model_on_gpus(checkpoint_path: str, num_gpus: int = 2, device_map: dict | None = None, **kwargs):
    """The original helper: the model with its 28 layers spread over num_gpus GPUs (word embeddings, final norm
    and output layer on GPU 0); a given device_map overrides the split; num_gpus < 2 loads on one device."""
    from model.multigpu import load_model_on_gpus as load

    return load(checkpoint_path, num_gpus=num_gpus, device_map=device_map, **kwargs)
