"""Which device's code paths run, and the torch version, for the choices made per platform (attention, sampling).

CHATGLM_FORCE_GPU_PATHS=cuda (or 1) / mps makes tensors on a CPU take the CUDA / MPS branches, so that tests
on a machine without a GPU run those branches against the golden outputs; tensors on a GPU are unaffected.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache

import torch

FORCE_ENV = "CHATGLM_FORCE_GPU_PATHS"


def parse_version(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as "2.13.0+cpu"."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


TORCH_VERSION = parse_version(torch.__version__)


def code_path(device: torch.device) -> str:
    """The device type whose branches tensors on `device` take: its own, or on a CPU (or torch's meta device,
    which tests run the model on to catch tensors made on the wrong device) the forced one."""
    if device.type not in ("cpu", "meta"):
        return device.type
    forced = os.environ.get(FORCE_ENV, "").strip().lower()
    if forced in ("", "0", "false", "no", "cpu"):
        return device.type
    if forced in ("1", "true", "yes", "cuda"):
        return "cuda"
    if forced == "mps":
        return "mps"
    raise ValueError(f"{FORCE_ENV}={forced!r}: expected cuda (or 1), mps or 0")


@lru_cache(maxsize=None)
def sm80_or_newer(index: int) -> bool:
    """Whether CUDA GPU number `index` is Ampere or newer."""
    return torch.cuda.get_device_capability(index) >= (8, 0)


def cuda_sm80(device: torch.device) -> bool:
    """Whether `device` is an Ampere or newer CUDA GPU (bf16 tensor cores); a CPU or meta tensor on a forced
    CUDA path counts as one."""
    if device.type != "cuda":
        return True
    return sm80_or_newer(device.index if device.index is not None else torch.cuda.current_device())
