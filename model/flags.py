"""The scripts' flags and defaults, defined once: build_parser, the default model, and from parsed flags the
completion service (service_from_args) and the settings (settings_from_args). A bad value ends the program with
`error: argument --flag: ...` (exit status 2) that gives the allowed range, before any model is loaded."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from typing import Callable

DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
DTYPES = ("auto", "bfloat16", "float16", "float32")


def int_range(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer from low to high (no upper limit when high is None)."""
    allowed = f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer; use {allowed}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is out of range; use {allowed}")
        return value

    return parse


def float_range(low: float, high: float | None = None, *, low_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number from low (excluded when low_open) to high (no upper limit when None)."""
    allowed = f"a number {'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}" if high is not None else "")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number; use {allowed}") from None
        # written so that NaN, which compares false to everything, fails too
        inside = (value > low if low_open else value >= low) and (high is None or value <= high)
        if not inside or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is out of range; use {allowed}")
        return value

    return parse


def dtype_name(text: str) -> str:
    """An argparse type: auto or a dtype name load_model knows (bfloat16, float16, float32 and their aliases)."""
    from .loading import DTYPE_NAMES

    if text != "auto" and text.removeprefix("torch.") not in DTYPE_NAMES:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; use one of {', '.join(DTYPES)}")
    return text


def device_name(text: str) -> str:
    """An argparse type: a device this machine's torch can use (one line saying what to do when it cannot)."""
    if text in ("auto", "cpu"):  # always there; and the default needs no torch import
        return text
    from .loading import DeviceUnavailableError, pick_device

    try:
        device = pick_device(text)
    except DeviceUnavailableError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"unsupported device {text!r}; use one of {', '.join(DEVICES)}")
    return text


# ---- the scripts' flags, defined once ------------------------------------------------------------------------------
# The original ChatGLM2-6B scripts (cli_demo.py, web_demo.py, web_demo2.py, api.py, openai_api.py) all loaded this.
DEFAULT_MODEL = "THUDM/chatglm2-6b"


def _env_int(name: str) -> int | None:
    """An integer environment variable (None when unset); a bad value is reported as the flag's would be."""
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise SystemExit(f"error: {name}={value!r}: expected a positive integer")
    return int(value)


def build_parser(description: str, *, server: bool = False, web: bool = False, engine: bool = False,
                 sampling: bool = False, port: int = 8000, prog: str | None = None,
                 max_new_tokens: int | None = None) -> argparse.ArgumentParser:
    """The flags every script takes, and the groups some add.

    server: an API server (--host / --port, --api-key = the key clients must send, limits).
    web: a web demo (--host / --port, --auth). Every script that is not a server is a client of the completion
    service and takes --api-base / --api-key (the key it sends) to use a remote OpenAI-compatible server instead
    of loading a model. Scripts serving several users (server, web, or engine=True) also take --max-batch and
    --prefill-chunk. sampling: --temperature, --top-p, ... for scripts without sliders (None: the family's default;
    max_new_tokens: the default reply length, None: what the context leaves).
    """
    positive = int_range(1)
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("--model", default=os.environ.get("MODEL_PATH") or DEFAULT_MODEL,
                    help=f"checkpoint directory or Hub id (env MODEL_PATH; default {DEFAULT_MODEL})")
    ap.add_argument("--model-name", default=None,
                    help="the model's name: the id API clients see (default: the last part of --model); with "
                         "--api-base, the model asked for (default: the server's)")
    ap.add_argument("--quantize", type=int, choices=(4, 8), default=None,
                    help="quantize the weights to int4 / int8 while loading")
    # (no choices=: device_name checks the value, and choices would refuse cuda:1)
    ap.add_argument("--device", default="auto", type=device_name, metavar="{auto,cuda,cuda:N,mps,cpu}",
                    help="where to run (auto: CUDA, then MPS, then CPU)")
    ap.add_argument("--dtype", default="auto", type=dtype_name, help="auto, bfloat16, float16 or float32")
    ap.add_argument("--num-gpus", type=positive, default=1, help="split the layers over this many GPUs (>= 1)")
    ap.add_argument("--ptuning-checkpoint", default=os.environ.get("CHECKPOINT_PATH") or None, metavar="DIR",
                    help="a P-Tuning v2 checkpoint folder whose prefix every prompt gets (env CHECKPOINT_PATH)")
    ap.add_argument("--pre-seq-len", type=positive, default=_env_int("PRE_SEQ_LEN"), metavar="N",
                    help="the prefix length, when the checkpoint folder does not say (env PRE_SEQ_LEN)")
    ap.add_argument("--adapter", default=None, metavar="DIR",
                    help="a LoRA adapter folder saved by PEFT (adapter_config.json + adapter_model.safetensors), "
                         "merged into the weights while they load (kept beside them on a quantized model)")
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
        ap.add_argument("--prefill-batch-tokens", type=int_range(0), default=256, metavar="TOKENS",
                        help="read short prompts that arrive together in one pass of up to this many tokens "
                             "(padding included); 0: one pass per prompt")
        ap.add_argument("--prefix-cache-tokens", type=int_range(0), default=8192, metavar="TOKENS",
                        help="keep finished replies' keys and values, up to this many tokens in all, so that the "
                             "next turn of a conversation reads only its new part; 0: keep none")
        ap.add_argument("--cache-capacity", type=int_range(2), default=None, metavar="TOKENS",
                        help="preallocate the batch KV cache for this many tokens per row, fixed in shape (for "
                             "CUDA graphs / torch.compile); prompt + reply must fit it (default: grow as needed)")
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
    else:  # a client of the completion service: this machine's model, or a server's
        ap.add_argument("--api-base", default=os.environ.get("OPENAI_API_BASE") or None, metavar="URL",
                        help="use the OpenAI-compatible server at URL (e.g. http://host:8000/v1) instead of "
                             "loading --model here (env OPENAI_API_BASE)")
        ap.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY") or None,
                        help="with --api-base: the key sent as 'Authorization: Bearer KEY' (env OPENAI_API_KEY)")
    if sampling:
        ap.add_argument("--temperature", type=float_range(0), default=None,
                        help=">= 0; 0: always the most likely token (default: the model family's)")
        ap.add_argument("--top-p", type=float_range(0, 1, low_open=True), default=None,
                        help="> 0 and <= 1 (default: the model family's)")
        ap.add_argument("--top-k", type=int_range(0), default=None, help=">= 0; 0: off (default: the family's)")
        ap.add_argument("--max-length", type=positive, default=None,
                        help="tokens in the conversation and the reply together (default: the model's context)")
        ap.add_argument("--max-new-tokens", type=positive, default=max_new_tokens,
                        help=f"tokens in a reply (>= 1; default: {max_new_tokens or 'what the context leaves'})")
        ap.add_argument("--seed", type=int, default=None, help="sample reproducibly")
        ap.add_argument("--system", default=None, help="system prompt (models with a system role: ChatGLM3)")
    return ap


def settings_from_args(args):
    """The CompletionSettings of the sampling flags."""
    from .service import CompletionSettings

    return CompletionSettings(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                              max_tokens=args.max_new_tokens, max_length=args.max_length, seed=args.seed)


def model_id(name_or_path: str) -> str:
    """A stable id for a checkpoint: THUDM/chatglm3-6b -> chatglm3-6b, ./models/my-glm/ -> my-glm."""
    return os.path.basename(os.path.normpath(str(name_or_path))) or str(name_or_path)


class ModelLoadError(RuntimeError):
    """The model could not be loaded (or the server at --api-base not used); the message says what to do."""


def load_from_args(args):
    """(model, tokenizer) for the parsed flags; ModelLoadError with what to do when that fails."""
    from .hub import CheckpointError, ModelNotFoundError
    from .loading import DeviceUnavailableError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        from .chatglm import load_model
        from .multigpu import device_map_for

        device_map = device_map_for(args.model, args.num_gpus) if args.num_gpus > 1 else None
        # (a script with a parser of its own, such as finetune.py, may lack the fine-tuning flags)
        return load_model(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize,
                          device_map=device_map, ptuning=getattr(args, "ptuning_checkpoint", None),
                          pre_seq_len=getattr(args, "pre_seq_len", None), adapter=getattr(args, "adapter", None))
    except (ModelNotFoundError, CheckpointError, DeviceUnavailableError, FileNotFoundError, RuntimeError,
            ValueError) as e:  # ValueError: flags that do not fit together (e.g. --pre-seq-len alone)
        raise ModelLoadError(" ".join(str(e).split())) from e  # one line, whatever the message holds


def service_from_args(args):
    """The completion service the flags ask for: RemoteService with --api-base, else a LocalService over an
    engine on the loaded model (one batch row for a single-user script: the KV cache is allocated per row).
    ModelLoadError when neither can be had."""
    if getattr(args, "api_base", None):
        from .service import ServiceError

        try:
            from .remote import RemoteService  # only here: a local model needs none of it
        except ImportError as e:
            raise ModelLoadError(f"--api-base needs the remote client (model/remote.py): {e}") from e
        try:
            return RemoteService(args.api_base, args.api_key, args.model_name)
        except (ServiceError, ValueError) as e:
            raise ModelLoadError(f"--api-base {args.api_base}: {' '.join(str(e).split())}") from e
    from .engine import Engine
    from .service import LocalService

    model, tokenizer = load_from_args(args)
    return LocalService(Engine(model, tokenizer, model_name=args.model_name or model_id(args.model),
                               max_batch=getattr(args, "max_batch", 1),
                               prefill_chunk=getattr(args, "prefill_chunk", 128),
                               prefill_batch_tokens=getattr(args, "prefill_batch_tokens", 256) or None,
                               prefix_cache_tokens=getattr(args, "prefix_cache_tokens", 8192),
                               max_queue=getattr(args, "max_queue", 32),
                               cache_capacity=getattr(args, "cache_capacity", None)))


def exit_on_load_error(load, args):
    """load(args), ending the program with the explanation (one line, exit status 2) on ModelLoadError."""
    try:
        return load(args)
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def load_or_exit(args):
    """load_from_args, ending the program with the explanation on failure."""
    return exit_on_load_error(load_from_args, args)


def service_or_exit(args):
    """service_from_args, ending the program with the explanation on failure."""
    return exit_on_load_error(service_from_args, args)


def logins(auth: list[str] | None) -> list[tuple[str, str]]:
    """The (user, password) pairs of --auth values (USER:PASS or @FILE of such lines), else of env WEB_AUTH."""
    entries = []
    for value in auth if auth else [os.environ.get("WEB_AUTH", "")]:
        if value.startswith("@"):
            with open(value[1:], encoding="utf-8") as f:
                entries += [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
        elif value:
            entries.append(value)
    pairs = []
    for entry in entries:
        user, sep, password = entry.partition(":")
        if not (user and sep and password):
            raise ValueError("a login must be USER:PASS, neither empty")
        pairs.append((user, password))
    return pairs
