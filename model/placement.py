"""Device maps: which module of a model goes on which device, and the accelerate hooks that move activations
between them (read by loading.py; model/multigpu.py has the entry points for users)."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

FIRST_DEVICE_MODULES = ("transformer.embedding", "transformer.encoder.final_layernorm", "transformer.output_layer")
# ChatGLM-6B: the output is the word-embedding matrix (tied), so the final norm goes with it
FIRST_DEVICE_MODULES_V1 = ("transformer.word_embeddings", "transformer.final_layernorm")
ORIGINAL_ONLY_KEYS = ("transformer.rotary_pos_emb", "lm_head")  # names in the original's maps we do not have
PREFIX_ENCODER_MODULE = "transformer.prefix_encoder"  # P-Tuning v2: with the embedding unless a map places it


def _v1(config) -> bool:
    return getattr(config, "family", None) == "chatglm1"


def embedding_module(config) -> str:
    """The name of the word-embedding module: where inputs enter, the model's main device."""
    return FIRST_DEVICE_MODULES_V1[0] if _v1(config) else FIRST_DEVICE_MODULES[0]


def layer_module(config, i: int) -> str:
    return f"transformer.layers.{i}" if _v1(config) else f"transformer.encoder.layers.{i}"


def _layer_params(config) -> int:
    h = config.hidden_size
    if _v1(config):  # qkv, dense, two MLP linears with biases, two LayerNorms
        f = config.inner_hidden_size
        return h * 3 * h + 3 * h + h * h + h + 2 * h * f + f + h + 4 * h
    f = config.ffn_hidden_size
    qkv = h * (h + 2 * config.num_kv_heads * config.kv_channels)
    return qkv + h * h + h * 2 * f + f * h + 2 * h


def auto_device_map(config, num_gpus: int) -> dict[str, int]:
    """Embeddings, final norm and output layer on GPU 0; layers in order so every GPU holds about as many
    parameters (for the 6B shapes on 2 GPUs: layers 0-12 on GPU 0, 13-27 on GPU 1, as the original)."""
    if num_gpus < 1:
        raise ValueError(f"num_gpus must be at least 1, got {num_gpus}")
    layer = _layer_params(config)
    tied = _v1(config)
    first = (1 if tied else 2) * config.padded_vocab_size * config.hidden_size + config.hidden_size
    share = (first + config.num_layers * layer) / num_gpus
    device_map: dict[str, int] = {name: 0 for name in (FIRST_DEVICE_MODULES_V1 if tied else FIRST_DEVICE_MODULES)}
    for i in range(config.num_layers):
        middle = first + (i + 0.5) * layer  # a layer goes where its middle falls in the running total
        device_map[layer_module(config, i)] = min(num_gpus - 1, int(middle // share))
    return device_map


def device_for(name: str, device_map: dict) -> object | None:
    """The device of a tensor name: the entry of its longest module prefix in the map."""
    best, found = -1, None
    for key, device in device_map.items():
        if (name == key or name.startswith(key + ".")) and len(key) > best:
            best, found = len(key), device
    return found


def as_torch_device(device) -> torch.device:
    return torch.device(f"cuda:{device}") if isinstance(device, int) else torch.device(device)


def clean_device_map(device_map: dict, model) -> dict:
    """Drop keys naming modules this implementation does not have; check every parameter has a device."""
    modules = dict(model.named_modules())
    out = {}
    for key, device in device_map.items():
        if key in modules:
            out[key] = device
        elif key.startswith(ORIGINAL_ONLY_KEYS + (PREFIX_ENCODER_MODULE,)):  # (a model without a prefix)
            continue
        else:
            raise ValueError(f"device_map names {key!r}, which is not a module of this model")
    if PREFIX_ENCODER_MODULE in modules and device_for(PREFIX_ENCODER_MODULE + ".embedding.weight", out) is None:
        out[PREFIX_ENCODER_MODULE] = device_for(embedding_module(model.config) + ".weight", out)
    unplaced = [n for n, _ in model.named_parameters() if device_for(n, out) is None]
    if unplaced:
        raise ValueError(f"device_map leaves {len(unplaced)} tensors without a device, e.g. {unplaced[:3]}")
    return out


def dispatch(model, device_map: dict):
    """Install the hooks that move activations to each module's device (weights are already there)."""
    from accelerate import dispatch_model

    placed = {k: as_torch_device(v) for k, v in device_map.items()}
    main = as_torch_device(device_for(embedding_module(model.config) + ".weight", device_map))
    # force_hooks: the same code path whether the map names one device or several (and testable on a CPU)
    return dispatch_model(model, device_map=placed, main_device=main, force_hooks=True)
