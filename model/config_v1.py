"""ChatGLM1Config: the fields of a ChatGLM-6B (first generation) config.json."""

from __future__ import annotations

from transformers import PretrainedConfig

from .hub import UnsupportedConfigError

V1_KEYS = ("position_encoding_2d", "inner_hidden_size", "max_sequence_length", "gmask_token_id")
V1_SHAPE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "inner_hidden_size", "vocab_size")  # required


def is_v1_config(config_dict: dict) -> bool:
    """ChatGLM-6B configs carry these keys and lack ChatGLM2/3's padded_vocab_size / multi_query_group_num."""
    return (any(k in config_dict for k in V1_KEYS)
            and "padded_vocab_size" not in config_dict and "multi_query_group_num" not in config_dict)


def valid_pre_seq_len(value) -> bool:
    """None (no P-Tuning prefix) or a positive int, as both families' configs accept."""
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0)


class ChatGLM1Config(PretrainedConfig):
    """Config of the ChatGLM-6B network; attribute names are the config.json keys (6B values as defaults,
    but the ids must come from the file: the oldest revisions use other ones)."""

    model_type = "chatglm"

    def __init__(self, num_layers: int = 28, hidden_size: int = 4096, num_attention_heads: int = 32,
                 inner_hidden_size: int = 16384, vocab_size: int = 130528, layernorm_epsilon: float = 1e-5,
                 max_sequence_length: int = 2048, position_encoding_2d: bool = True, bos_token_id: int = 130004,
                 eos_token_id: int = 130005, mask_token_id: int = 130000, gmask_token_id: int = 130001,
                 pad_token_id: int = 3, quantization_bit: int = 0, quantization_embeddings: bool = False,
                 pre_seq_len: int | None = None, prefix_projection: bool = False, **kwargs):
        kwargs.pop("family", None)
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.inner_hidden_size = inner_hidden_size
        self.vocab_size = vocab_size
        self.layernorm_epsilon = layernorm_epsilon
        self.max_sequence_length = max_sequence_length
        self.position_encoding_2d = position_encoding_2d
        self.mask_token_id = mask_token_id
        self.gmask_token_id = gmask_token_id
        self.quantization_bit = quantization_bit or 0
        self.quantization_embeddings = quantization_embeddings
        self.pre_seq_len = pre_seq_len or None  # 0 / null: no prefix
        self.prefix_projection = bool(prefix_projection)
        self.family = "chatglm1"
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)

    # what the shared code (cache, engine, loading) reads, under ChatGLM2/3's names
    @property
    def kv_channels(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return self.num_attention_heads

    @property
    def seq_length(self) -> int:
        return self.max_sequence_length

    @property
    def padded_vocab_size(self) -> int:
        return self.vocab_size

    def validate(self) -> None:
        unsupported = []
        if not self.position_encoding_2d:
            unsupported.append("position_encoding_2d=false (never released)")
        if not valid_pre_seq_len(self.pre_seq_len):
            unsupported.append(f"pre_seq_len={self.pre_seq_len!r} (P-Tuning v2 prefix: a positive number of tokens)")
        if self.quantization_bit not in (0, 4, 8):
            unsupported.append(f"quantization_bit={self.quantization_bit} (supported: 4, 8)")
        if self.quantization_embeddings:
            unsupported.append("quantization_embeddings=true (the -int4-qe layout)")
        if self.hidden_size % self.num_attention_heads or (self.hidden_size // self.num_attention_heads) % 4:
            unsupported.append("hidden_size / num_attention_heads must be a multiple of 4")
        if unsupported:
            raise UnsupportedConfigError("unsupported ChatGLM-6B config: " + "; ".join(unsupported))
