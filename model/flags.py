"""argparse types for the scripts' flags: a bad value ends the program with `error: argument --flag: ...`
(exit status 2) that gives the allowed range, before any model is loaded."""

from __future__ import annotations

import argparse
import math
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
