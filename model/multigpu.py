"""Splitting the layers of one model over several GPUs (accelerate hooks move activations between them): the
entry points for users (utils.load_model_on_gpus); the device maps themselves are in model/placement.py."""

from __future__ import annotations

import torch

from .chatglm import load_model
from .config import ChatGLMConfig
from .hub import resolve_model_dir
from .placement import auto_device_map


def device_map_for(checkpoint_path: str, num_gpus: int, revision: str | None = None,
                   family: str | None = None) -> dict[str, int]:
    """auto_device_map for a checkpoint, after checking that the GPUs are there."""
    visible = torch.cuda.device_count()
    if visible < num_gpus:
        raise RuntimeError(f"{num_gpus} GPUs were asked for but {visible} are visible")
    config = ChatGLMConfig.from_checkpoint_dir(resolve_model_dir(checkpoint_path, revision=revision), family=family)
    return auto_device_map(config, num_gpus)


def load_model_on_gpus(checkpoint_path: str, num_gpus: int = 2, device_map: dict | None = None, **kwargs):
    """The model with its layers spread over num_gpus GPUs (or as device_map says); num_gpus < 2 without a
    device_map loads on one device. kwargs go to load_model (dtype, quantize, family, revision)."""
    if device_map is None and num_gpus >= 2:
        device_map = device_map_for(checkpoint_path, num_gpus, kwargs.get("revision"), kwargs.get("family"))
    model, _ = load_model(checkpoint_path, device_map=device_map, **kwargs)
    return model
