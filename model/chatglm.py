"""The public model classes and load_model: each family's network (modeling.py, modeling_v1.py) with chat
(chat.ChatMixin) and the checkpoint methods (from_pretrained, quantize, save_pretrained).

The top of the model layers: this module imports the networks, loading, quantization and the chat layer, and none
of them imports it back (loading builds the classes named here by model_class_for, passed in by the caller).
"""

from __future__ import annotations

import torch

from . import loading, quantization
from .chat import ChatMixin
from .config import ChatGLMConfig
from .hub import UnsupportedConfigError, resolve_model_dir
from .modeling import ChatGLMPreTrainedModel
from .modeling_v1 import ChatGLM1PreTrainedModel


class CheckpointMethods:
    """from_pretrained / quantize / save_pretrained of the public classes, in place of PreTrainedModel's."""

    FAMILY: str | None = None  # the family from_pretrained loads; None: the checkpoint's own

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, dtype=None, torch_dtype=None,
                        device=None, device_map=None, family=None, revision=None, **kwargs):
        """Load a checkpoint directory or Hub id (no remote code); on the CPU unless device / device_map say
        otherwise (see model.loading.from_pretrained); see model.load_model for the other options."""
        family = cls.FAMILY or family or getattr(config, "family", None)
        return loading.from_pretrained(pretrained_model_name_or_path, model_class_for, family=family,
                                       dtype=dtype or torch_dtype, device=device, device_map=device_map,
                                       revision=revision, quantize=kwargs.get("quantize"))

    def quantize(self, bits: int, **kwargs):
        """Weight-only quantization of every block's linears to 4 or 8 bits, in place (as the original)."""
        return quantization.quantize(self, bits)

    def save_pretrained(self, save_directory: str, max_shard_size: int = 2 * 1024**3, **kwargs) -> None:
        """Write config.json and safetensors shards (+ index) in the checkpoint layout."""
        loading.save_checkpoint(self, save_directory, max_shard_size=max_shard_size)


class ChatGLMForConditionalGeneration(ChatMixin, CheckpointMethods, ChatGLMPreTrainedModel):
    """ChatGLM2/3 with chat(), stream_chat() and generate(); load it with load_model() or from_pretrained()."""


class ChatGLM1ForConditionalGeneration(ChatMixin, CheckpointMethods, ChatGLM1PreTrainedModel):
    """ChatGLM-6B with chat(), stream_chat() and generate(); load it with load_model() or from_pretrained()."""

    FAMILY = "chatglm1"


MODEL_CLASSES = {"chatglm1": ChatGLM1ForConditionalGeneration, "chatglm2": ChatGLMForConditionalGeneration,
                 "chatglm3": ChatGLMForConditionalGeneration}


def model_class_for(config) -> type:
    """The public class of a config's family."""
    if config.family not in MODEL_CLASSES:
        raise UnsupportedConfigError(f"family={config.family!r}: no model class (expected one of "
                                     f"{tuple(MODEL_CLASSES)})")
    return MODEL_CLASSES[config.family]


def load_model(name_or_path: str, device: str | torch.device | None = None, dtype=None,
               family: str | None = None, revision: str | None = None, quantize: int | None = None,
               device_map: dict | None = None, ptuning: str | None = None, pre_seq_len: int | None = None,
               prefix_projection: bool | None = None, adapter: str | None = None):
    """(model, tokenizer) for a ChatGLM checkpoint directory or Hub id.

    device: "cpu", "cuda", "cuda:1", "mps" or None/"auto"; dtype: a torch dtype, its name, or None/"auto";
    family: "chatglm2" / "chatglm3" when the checkpoint does not tell; quantize: 4 or 8 for weight-only
    quantization while loading; device_map: module name -> device, to split the layers over GPUs
    (see model.multigpu); ptuning: a P-Tuning v2 checkpoint folder (pytorch_model.bin with the prefix encoder)
    whose prefix is prepended to every input, with pre_seq_len / prefix_projection from its config.json or
    ptuning.json unless given here; adapter: a PEFT LoRA adapter folder (adapter_config.json and
    adapter_model.safetensors or .bin) merged into the weights while they load, or on a quantized model kept
    beside its quantized linears (float32).
    """
    path = resolve_model_dir(name_or_path, revision=revision)  # one Hub round trip for weights and tokenizer
    prefix = None
    if ptuning is not None:
        prefix = loading.PrefixCheckpoint(ptuning, pre_seq_len=pre_seq_len, prefix_projection=prefix_projection)
    elif pre_seq_len is not None or prefix_projection is not None:
        raise ValueError("pre_seq_len / prefix_projection need ptuning= (the P-Tuning v2 checkpoint folder)")
    lora_adapter = loading.read_adapter(adapter) if adapter is not None else None
    # config and tokenizer first: a broken one is reported in a moment, not after minutes of reading weights
    overrides = prefix.config_overrides() if prefix is not None else {}
    family = ChatGLMConfig.from_checkpoint_dir(path, family=family, **overrides).family
    tokenizer = loading.load_tokenizer(path, family=family)
    model = loading.load_weights(path, model_class_for, device=device, dtype=dtype, family=family,
                                 quantize=quantize, device_map=device_map, ptuning=prefix, adapter=lora_adapter)
    model.name_or_path = model.config._name_or_path = str(name_or_path)
    tokenizer.name_or_path = str(name_or_path)
    return model, tokenizer
