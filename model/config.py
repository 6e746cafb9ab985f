"""ChatGLMConfig: the fields of a ChatGLM2/3 config.json, plus which family the checkpoint belongs to."""

from __future__ import annotations

import json
import logging
import os

from transformers import PretrainedConfig

from .config_v1 import V1_SHAPE_KEYS, ChatGLM1Config, is_v1_config, valid_pre_seq_len
from .hub import CheckpointError, UnsupportedConfigError, read_json

logger = logging.getLogger(__name__)

FAMILIES = ("chatglm2", "chatglm3")
# What the families' networks compute differently, read by modeling.py through the config's properties (so a new
# family is a row here, not a silent fall-through to another family's choice in the network code):
# rope_ratio_scales: what a rope_ratio other than 1 scales, the positions (interpolation: chatglm2-6b-32k) or the
# rotary base (NTK-style: chatglm3-6b-32k / -128k).
NETWORK_TRAITS = {
    "chatglm2": {"rope_ratio_scales": "positions"},
    "chatglm3": {"rope_ratio_scales": "base"},
}
# config.json keys that set tensor shapes: a checkpoint without them cannot be loaded (the 6B defaults would only
# fail later, on the first tensor, with a shape error that does not name the key)
SHAPE_KEYS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "kv_channels", "padded_vocab_size")


def check_shape_keys(config_dict: dict, keys, config_path: str) -> None:
    """CheckpointError naming the config.json keys that set tensor shapes and are absent or not positive integers."""
    missing = [k for k in keys if k not in config_dict]
    if missing:
        raise CheckpointError(f"{config_path} lacks {', '.join(missing)}, which set the tensor shapes; use the "
                              f"config.json that came with these weights")
    bad = [f"{k}={config_dict[k]!r}" for k in keys
           if isinstance(config_dict[k], bool) or not isinstance(config_dict[k], int) or config_dict[k] <= 0]
    if bad:
        raise CheckpointError(f"{config_path}: {', '.join(bad)} must be positive integers; use the config.json that "
                              f"came with these weights")


def infer_family(config_dict: dict, tokenizer_config: dict | None = None) -> tuple[str | None, str]:
    """Guess chatglm2 / chatglm3 from a checkpoint's metadata; returns (family or None, reason)."""
    tokenizer_config = tokenizer_config or {}
    # Later chatglm3 revisions list their role tokens in tokenizer_config.json.
    if "<|user|>" in json.dumps(tokenizer_config):
        return "chatglm3", "tokenizer_config.json defines the role tokens"
    for source, key, d in (
        ("config.json", "_name_or_path", config_dict),
        ("tokenizer_config.json", "name_or_path", tokenizer_config),
    ):
        name = str(d.get(key) or "").lower()
        for family in FAMILIES:
            if family in name:
                return family, f"{source} {key} is {d.get(key)!r}"
    return None, "no hint in config.json or tokenizer_config.json"


class ChatGLMConfig(PretrainedConfig):
    """Config of the ChatGLM2 / ChatGLM3 network; attribute names are the config.json keys."""

    model_type = "chatglm"

    def __init__(
        self,
        num_layers: int = 28,  # transformer blocks
        hidden_size: int = 4096,
        ffn_hidden_size: int = 13696,  # SwiGLU inner width (dense_h_to_4h outputs twice this)
        num_attention_heads: int = 32,  # query heads
        kv_channels: int = 128,  # per-head dim
        multi_query_attention: bool = True,
        multi_query_group_num: int = 2,  # K/V heads when multi_query_attention
        padded_vocab_size: int = 65024,  # rows of embedding and output_layer
        seq_length: int = 8192,  # positions the rotary table covers
        rope_ratio: float = 1.0,  # -32k: position interpolation (v2) or base scaling (v3)
        layernorm_epsilon: float = 1e-5,
        rmsnorm: bool = True,
        add_qkv_bias: bool = True,
        add_bias_linear: bool = False,
        post_layer_norm: bool = True,
        apply_residual_connection_post_layernorm: bool = False,
        fp32_residual_connection: bool = False,
        original_rope: bool = True,
        apply_query_key_layer_scaling: bool = True,  # no numerical effect (scale is exactly 1/sqrt(d))
        attention_softmax_in_fp32: bool = True,
        hidden_dropout: float = 0.0,
        attention_dropout: float = 0.0,
        quantization_bit: int = 0,  # 0 = float weights; 4 / 8 = weight-only quantized linears
        pre_seq_len: int | None = None,  # P-Tuning v2: virtual tokens whose keys/values precede every input
        prefix_projection: bool = False,  # P-Tuning v2: the prefix embedding goes through a 2-layer MLP
        family: str | None = None,  # "chatglm2" or "chatglm3"; inferred when None
        eos_token_id: int = 2,
        pad_token_id: int = 0,
        **kwargs,
    ):
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.ffn_hidden_size = ffn_hidden_size
        self.num_attention_heads = num_attention_heads
        self.kv_channels = kv_channels
        self.multi_query_attention = multi_query_attention
        self.multi_query_group_num = multi_query_group_num
        self.padded_vocab_size = padded_vocab_size
        self.vocab_size = padded_vocab_size
        self.seq_length = seq_length
        self.rope_ratio = rope_ratio
        self.layernorm_epsilon = layernorm_epsilon
        self.rmsnorm = rmsnorm
        self.add_qkv_bias = add_qkv_bias
        self.add_bias_linear = add_bias_linear
        self.post_layer_norm = post_layer_norm
        self.apply_residual_connection_post_layernorm = apply_residual_connection_post_layernorm
        self.fp32_residual_connection = fp32_residual_connection
        self.original_rope = original_rope
        self.apply_query_key_layer_scaling = apply_query_key_layer_scaling
        self.attention_softmax_in_fp32 = attention_softmax_in_fp32
        self.hidden_dropout = hidden_dropout
        self.attention_dropout = attention_dropout
        self.quantization_bit = quantization_bit or 0
        self.pre_seq_len = pre_seq_len or None  # 0 / null: no prefix
        self.prefix_projection = bool(prefix_projection)
        kwargs.pop("vocab_size", None)
        if family is None:
            family, reason = infer_family(kwargs)
            if family is not None:
                logger.info("ChatGLM family %s (%s)", family, reason)
        self.family = family
        super().__init__(eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """A ChatGLM-6B config.json gives a ChatGLM1Config (all three families share model_type "chatglm")."""
        if cls is ChatGLMConfig and is_v1_config(config_dict):
            return ChatGLM1Config.from_dict(config_dict, **kwargs)
        return super().from_dict(config_dict, **kwargs)

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def num_kv_heads(self) -> int:
        return self.multi_query_group_num if self.multi_query_attention else self.num_attention_heads

    @property
    def qkv_size(self) -> int:
        return (self.num_attention_heads + 2 * self.num_kv_heads) * self.kv_channels

    # ---- network traits of the family (NETWORK_TRAITS) --------------------------------------------
    @property
    def rope_ratio_scales(self) -> str:
        """"positions" (divided by rope_ratio) or "base" (the rotary base multiplied by it)."""
        return self._network_trait("rope_ratio_scales")

    def _network_trait(self, name: str):
        if self.family not in NETWORK_TRAITS:
            raise UnsupportedConfigError(f"family={self.family!r}: the network of this family is not known "
                                         f"(expected one of {tuple(NETWORK_TRAITS)}); pass family=")
        return NETWORK_TRAITS[self.family][name]

    def validate(self) -> None:
        """Raise UnsupportedConfigError naming any flag whose value this implementation cannot compute."""
        unsupported = []
        if self.family not in FAMILIES:
            unsupported.append(f"family={self.family!r} (expected one of {FAMILIES})")
        if not self.rmsnorm:
            unsupported.append("rmsnorm=false (LayerNorm blocks)")
        if self.fp32_residual_connection:
            unsupported.append("fp32_residual_connection=true")
        if not valid_pre_seq_len(self.pre_seq_len):
            unsupported.append(f"pre_seq_len={self.pre_seq_len!r} (P-Tuning v2 prefix: a positive number of tokens)")
        if self.quantization_bit not in (0, 4, 8):
            unsupported.append(f"quantization_bit={self.quantization_bit} (supported: 4, 8)")
        if self.num_attention_heads % self.num_kv_heads:
            unsupported.append(
                f"multi_query_group_num={self.multi_query_group_num} (must divide num_attention_heads)"
            )
        if self.kv_channels % 4:
            unsupported.append(f"kv_channels={self.kv_channels} (rotary needs a multiple of 4)")
        if self.rope_ratio <= 0:
            unsupported.append(f"rope_ratio={self.rope_ratio}")
        if unsupported:
            raise UnsupportedConfigError("unsupported ChatGLM config: " + "; ".join(unsupported))

    @classmethod
    def from_checkpoint_dir(cls, path: str, family: str | None = None, **overrides) -> "ChatGLMConfig":
        """Read config.json (and tokenizer_config.json for the family hint) from a checkpoint directory."""
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise CheckpointError(f"{path} has no config.json: not a ChatGLM checkpoint directory (it needs "
                                  f"config.json, the tokenizer files and the weights)")
        config_dict = read_json(config_path)
        tok_path = os.path.join(path, "tokenizer_config.json")
        tok_dict = read_json(tok_path) if os.path.isfile(tok_path) else {}
        if family == "chatglm1" or (family is None and is_v1_config(config_dict)):
            config_dict.update(overrides)
            check_shape_keys(config_dict, V1_SHAPE_KEYS, config_path)
            return _validated(ChatGLM1Config.from_dict(config_dict), config_path)
        if family is None:
            family, reason = infer_family(config_dict, tok_dict)
            if family is None:
                family = "chatglm2"
                logger.warning("%s: %s; assuming chatglm2 (pass family='chatglm3' for a ChatGLM3 checkpoint)",
                               path, reason)
            else:
                logger.info("%s: ChatGLM family %s (%s)", path, family, reason)
        elif family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES + ('chatglm1',)}, got {family!r}")
        config_dict.update(overrides)
        keys = SHAPE_KEYS + (("multi_query_group_num",) if config_dict.get("multi_query_attention", True) else ())
        check_shape_keys(config_dict, keys, config_path)
        config_dict["family"] = family
        return _validated(cls.from_dict(config_dict), config_path)


def _validated(config, config_path: str):
    """config after validate(), the error naming the file it came from."""
    try:
        config.validate()
    except UnsupportedConfigError as e:
        raise UnsupportedConfigError(f"{config_path}: {e}") from e
    return config
