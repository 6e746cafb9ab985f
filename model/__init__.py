"""Our ChatGLM-6B / ChatGLM2 / ChatGLM3 implementation: `from model import load_model`.

Importing the package also registers the classes with transformers' Auto* factories, so
AutoConfig / AutoTokenizer / AutoModel.from_pretrained load ChatGLM checkpoints without remote code.
"""

from .chatglm import ChatGLMForConditionalGeneration, load_model
from .config import ChatGLMConfig
from .hub import CheckpointError, ModelNotFoundError, UnsupportedConfigError
from .loading import DeviceUnavailableError
from .tokenizer import ChatGLMTokenizer, StreamDecoder

__all__ = ["ChatGLMConfig", "ChatGLMTokenizer", "ChatGLMForConditionalGeneration", "load_model", "CheckpointError",
           "DeviceUnavailableError", "ModelNotFoundError", "StreamDecoder", "UnsupportedConfigError"]


def _register_with_transformers() -> None:
    from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM,
                              AutoTokenizer)

    from .chatglm import ChatGLM1ForConditionalGeneration
    from .config_v1 import ChatGLM1Config
    from .tokenizer_v1 import ChatGLM1Tokenizer

    AutoConfig.register("chatglm", ChatGLMConfig, exist_ok=True)  # from_dict hands v1 configs to ChatGLM1Config
    AutoTokenizer.register(ChatGLMConfig, tokenizer_class=ChatGLMTokenizer, exist_ok=True)
    AutoTokenizer.register(ChatGLM1Config, tokenizer_class=ChatGLM1Tokenizer, exist_ok=True)
    for auto in (AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM):
        auto.register(ChatGLMConfig, ChatGLMForConditionalGeneration, exist_ok=True)
        auto.register(ChatGLM1Config, ChatGLM1ForConditionalGeneration, exist_ok=True)


_register_with_transformers()
