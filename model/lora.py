"""LoRA adapters in PEFT's format, merged into the float weights while they load (on a quantized model kept
beside the quantized linears instead: QuantizedLinear.add_lora).

A PEFT adapter folder (what `PeftModel.save_pretrained` writes) holds adapter_config.json and
adapter_model.safetensors (or adapter_model.bin). Its tensors are named after the trained model's modules:
`base_model.model.<module>.lora_A.weight` (r, in) and `...lora_B.weight` (out, r), and ChatGLM's modules have
the original's names here (query_key_value, dense, dense_h_to_4h, dense_4h_to_h), so `<module>` is the name of
one of our linears. Merging gives each such linear W + (lora_B @ lora_A) * scaling, with scaling = lora_alpha / r
(lora_alpha / sqrt(r) with use_rslora; both per module with rank_pattern / alpha_pattern), the sum in float32,
as PEFT's merge_and_unload computes it. An adapter trained with bias "lora_only" or "all" also holds the trained
biases (`<module>.base_layer.bias`, or `<module>.bias` outside the adapted linears), which replace the base
model's. The loader (model/loading.py) casts the result to the model's dtype; where the model is quantized it
hands (lora_A, lora_B, scaling) to the quantized linear, which adds the update to its product at run time.

This module reads the config and checks the tensors; the loader reads the files (read_weights) and hands them in,
so this module needs nothing from it."""

from __future__ import annotations

import logging
import math
import os
import re

import torch
from torch import nn

from .hub import CheckpointError, read_json

logger = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."
# lora_A / lora_B of one module; an adapter name between them and `weight` is what PEFT keeps in memory
# (`lora_A.default.weight`), not what it saves, but a state dict taken by hand has it
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$")
BIAS_KEY = re.compile(r"^(?P<module>.+?)(?:\.base_layer)?\.bias$")

# adapter_config.json entries that change nothing once the adapter is trained (or are checked on their own below);
# every other entry must be unset (null, false, empty), else the adapter is refused: it computes something this
# merge does not
INERT_SETTINGS = {
    "peft_type", "task_type", "base_model_name_or_path", "revision", "auto_mapping", "peft_version",
    "inference_mode", "init_lora_weights", "lora_dropout", "target_modules", "exclude_modules",
    "layers_to_transform", "layers_pattern", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern",
    "fan_in_fan_out", "bias", "megatron_core", "qalora_group_size", "ensure_weight_tying",
    # how the weights were initialised before training; where PEFT keeps them at run time
    "loftq_config", "eva_config", "corda_config", "lora_ga_config", "runtime_config",
}
REFUSED_WHY = {
    "use_dora": "DoRA (use_dora) rescales each merged column by a trained magnitude",
    "modules_to_save": "modules_to_save replaces whole modules with trained copies",
    "lora_bias": "lora_bias adds a trained bias to lora_B",
    "layer_replication": "layer_replication builds extra layers",
    "trainable_token_indices": "trainable_token_indices trains single token embeddings",
    "target_parameters": "target_parameters puts LoRA on parameters rather than linears",
    "megatron_config": "megatron_config is for Megatron's parallel linears",
}


class LoraAdapter:
    """A PEFT LoRA adapter: its settings and, per parameter of ours it changes, the (lora_A, lora_B, scaling) to
    add to a weight or the trained bias to put in place of one (see attach and apply).

    config: adapter_config.json as a dict; tensors: (name, tensor) of the weight file `filename`. CheckpointError
    naming the file for anything this merge cannot reproduce exactly."""

    def __init__(self, config: dict, tensors, config_file: str, filename: str):
        self.config_file, self.filename = config_file, filename
        self.path = os.path.dirname(filename)
        peft_type = config.get("peft_type")
        if str(peft_type).upper() != "LORA":
            raise CheckpointError(f"{config_file}: peft_type is {peft_type!r}; only LoRA adapters (peft_type LORA) "
                                  f"can be merged")
        for key, value in config.items():
            if key in INERT_SETTINGS or not value:
                continue
            why = REFUSED_WHY.get(key, f"{key} is a PEFT option this loader does not reproduce")
            raise CheckpointError(f"{config_file} sets {key}={value!r}: not supported ({why}); merge it with PEFT "
                                  f"(merge_and_unload) and load the merged checkpoint instead")
        trained_biases = config.get("bias", "none")
        if trained_biases not in ("none", "lora_only", "all"):
            raise CheckpointError(f"{config_file} sets bias={trained_biases!r}; PEFT knows none, lora_only and all")
        try:
            self.r, self.alpha = int(config["r"]), float(config["lora_alpha"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{config_file} lacks a valid r / lora_alpha ({e}); not a PEFT LoRA config") from e
        self.rslora = bool(config.get("use_rslora"))
        self.rank_pattern = dict(config.get("rank_pattern") or {})
        self.alpha_pattern = dict(config.get("alpha_pattern") or {})
        if config.get("fan_in_fan_out"):
            # ChatGLM's targets are nn.Linear, for which PEFT turns fan_in_fan_out off (with a warning) when it
            # builds the model, so the tensors are stored as for any nn.Linear: merged the same way here
            logger.warning("%s: fan_in_fan_out is true, but ChatGLM's linears are nn.Linear, for which PEFT "
                           "ignores it; merging as PEFT does", config_file)
        parts: dict[str, dict[str, torch.Tensor]] = {}
        self.biases: dict[str, torch.Tensor] = {}  # module -> its trained bias
        for key, tensor in tensors:
            match, bias = LORA_KEY.match(key), BIAS_KEY.match(key)
            if match is not None:
                parts.setdefault(match["module"].removeprefix(PEFT_PREFIX), {})[match["part"]] = tensor
            elif bias is not None and trained_biases != "none":
                self.biases[bias["module"].removeprefix(PEFT_PREFIX)] = tensor
            else:
                raise CheckpointError(f"{filename}: tensor {key} is not a LoRA lora_A / lora_B weight (embedding "
                                      f"LoRA and whole modules are not supported; biases only with bias "
                                      f"lora_only / all)")
        if not parts:
            raise CheckpointError(f"{filename} holds no LoRA weights (lora_A / lora_B)")
        self.modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}  # module -> (A, B, scaling)
        for module, ab in sorted(parts.items()):
            if set(ab) != {"A", "B"}:
                missing = "lora_B" if "A" in ab else "lora_A"
                raise CheckpointError(f"{filename}: {module} has no {missing}.weight; the adapter file is incomplete")
            self.modules[module] = (ab["A"], ab["B"], self._scaling(module, ab["A"], ab["B"]))
        self.merges: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}  # our weight name -> (A, B, scaling)
        self.replaces: dict[str, torch.Tensor] = {}  # our bias name -> the trained bias
        self.changes: set[str] = set()  # the names of both

    def _scaling(self, module: str, a: torch.Tensor, b: torch.Tensor) -> float:
        """lora_alpha / r of the module (rank_pattern / alpha_pattern matched as PEFT does), after checking that
        lora_A is (r, in) and lora_B (out, r)."""
        r = self.rank_pattern.get(_pattern_key(self.rank_pattern, module), self.r)
        alpha = self.alpha_pattern.get(_pattern_key(self.alpha_pattern, module), self.alpha)
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            raise CheckpointError(f"{self.filename}: {module} has lora_A {tuple(a.shape)} and lora_B "
                                  f"{tuple(b.shape)}, not (r, in) and (out, r) with r={r} of {self.config_file}")
        return alpha / math.sqrt(r) if self.rslora else alpha / r

    def attach(self, model: nn.Module) -> None:
        """Find each adapted module in `model` (built, not loaded: the meta device will do) and check the shapes;
        CheckpointError naming the file otherwise. Afterwards `changes` names the parameters apply() changes."""
        merges, replaces = {}, {}
        for module, (a, b, scaling) in self.modules.items():
            name, target = self._find(model, module)
            out_features, in_features = target.out_features, target.in_features
            if a.shape[1] != in_features or b.shape[0] != out_features:
                raise CheckpointError(
                    f"{self.filename}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, but the "
                    f"base model's {name} is {in_features} -> {out_features} (lora_A needs (r, {in_features}), "
                    f"lora_B ({out_features}, r)); the adapter was trained on another base model")
            merges[name + ".weight"] = (a, b, scaling)
        for module, bias in self.biases.items():  # of linears, or with bias "all" of any module (a LayerNorm)
            name, target = self._find(model, module, linear=False)
            if getattr(target, "bias", None) is None or tuple(target.bias.shape) != tuple(bias.shape):
                has = "no bias" if target.bias is None else f"a bias of shape {tuple(target.bias.shape)}"
                raise CheckpointError(f"{self.filename}: {module} has a trained bias of shape {tuple(bias.shape)}, "
                                      f"but the base model's {name} has {has}; the adapter belongs to another model")
            replaces[name + ".bias"] = bias
        self.merges, self.replaces = merges, replaces
        self.changes = set(merges) | set(replaces)

    def _find(self, model: nn.Module, module: str, linear: bool = True) -> tuple[str, nn.Module]:
        """(name, module) of the module the adapter's name means in `model`: the name as saved from the whole
        model (transformer....), or from its transformer alone; a linear unless linear=False."""
        for name in (module, f"{model.base_model_prefix}.{module}"):
            try:
                target = model.get_submodule(name)
            except AttributeError:
                continue
            if not linear or (hasattr(target, "in_features") and hasattr(target, "out_features")):
                return name, target  # nn.Linear or QuantizedLinear
        raise CheckpointError(f"{self.filename}: {module} matches no {'linear' if linear else 'module'} of this "
                              f"{model.config.family} model (expected names like {_example(model)}); the adapter "
                              f"belongs to another model")

    def apply(self, name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Parameter `name` (one of `changes`) as the adapter makes it, on tensor's device, in dtype: a weight
        with its update added, W + (lora_B @ lora_A) * scaling in float32; a bias replaced by the trained one."""
        if name in self.replaces:
            return self.replaces[name].to(device=tensor.device, dtype=dtype)
        a, b, scaling = self.merges[name]
        merged = tensor.to(torch.float32)
        delta = (b.to(merged.device, torch.float32) @ a.to(merged.device, torch.float32)) * scaling
        return (merged + delta).to(dtype)


def _pattern_key(patterns: dict, module: str) -> str:
    """PEFT's get_pattern_key: the first pattern that the module name ends with (as a regex, after a dot)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return module


def _example(model: nn.Module) -> str:
    block = next(n for n, m in model.named_modules() if m is model.blocks[0])
    return f"{block}.{model.BLOCK_LINEARS[0]}"


def adapter_files(path) -> tuple[str, str]:
    """(adapter_config.json, weight file) of a PEFT adapter folder; CheckpointError naming what is missing."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"LoRA adapter {path} is not a directory; pass the folder PEFT's save_pretrained "
                              f"wrote (adapter_config.json and adapter_model.safetensors)")
    config_file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_file):
        raise CheckpointError(f"LoRA adapter {path} has no {CONFIG_FILE}; pass the folder PEFT's save_pretrained "
                              f"wrote")
    for name in WEIGHT_FILES:
        if os.path.isfile(os.path.join(path, name)):
            return config_file, os.path.join(path, name)
    raise CheckpointError(f"LoRA adapter {path} has no {' or '.join(WEIGHT_FILES)} (the adapter's weights); "
                          f"copy it with {CONFIG_FILE}")


def read_adapter(path, read_weights) -> LoraAdapter:
    """The LoraAdapter of a PEFT adapter folder; read_weights(filename) yields its (name, tensor) (the loader's
    reader: safetensors, or a .bin through torch.load(weights_only=True))."""
    config_file, filename = adapter_files(path)
    return LoraAdapter(read_json(config_file), read_weights(filename), config_file, filename)
