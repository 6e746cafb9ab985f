"""Shared fixtures: the golden tiny checkpoints and the reference outputs recorded from the original code."""

import json
import os
import sys
from functools import lru_cache

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
GOLDEN = os.path.join(ROOT, "tests", "golden")
FLOAT_MODELS = ["chatglm2-tiny", "chatglm3-tiny"]
QUANTIZED_MODELS = ["chatglm2-tiny-int4", "chatglm2-tiny-int8"]
PTUNING_MODELS = ["chatglm2-tiny-ptuning-p4"]  # a P-Tuning v2 prefix on a base model (its case's "ptuning")

torch.manual_seed(0)


def model_dir(name: str) -> str:
    return os.path.join(GOLDEN, "models", name)


@lru_cache(maxsize=None)
def golden_case(name: str) -> dict:
    with open(os.path.join(GOLDEN, "cases", f"{name}.json"), encoding="utf-8") as f:
        return json.load(f)


@lru_cache(maxsize=None)
def golden_tensors(name: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(GOLDEN, "cases", f"{name}.safetensors"))


@lru_cache(maxsize=None)
def loaded(name: str, dtype: str = "float32"):
    from model import load_model

    if name in PTUNING_MODELS:  # the base model with the prefix loaded, as the reference ran it
        case = golden_case(name)
        return load_model(model_dir(case["model_dir"]), ptuning=os.path.join(GOLDEN, case["ptuning"]["path"]),
                          pre_seq_len=case["ptuning"]["pre_seq_len"], device="cpu", dtype=dtype)
    return load_model(model_dir(name), device="cpu", dtype=dtype)


@pytest.fixture(params=FLOAT_MODELS)
def float_model(request):
    model, tokenizer = loaded(request.param)
    return request.param, model, tokenizer


def as_lists(history):
    """Tuples -> lists, as the golden JSON stores them."""
    return [list(h) if isinstance(h, tuple) else h for h in history]


def dedup(strings):
    out = []
    for s in strings:
        if not out or out[-1] != s:
            out.append(s)
    return out


# ---- servers as real processes (shared by the server test modules) ----------------------------------
KEY = "test-key-123"


@pytest.fixture(scope="session")
def v3_dir(tmp_path_factory):
    from model.tiny import write_checkpoint

    path = tmp_path_factory.mktemp("models") / "glm3-tiny"
    write_checkpoint(str(path), "chatglm3", "tiny", "float32")  # 8192-token context: long generations possible
    return str(path)


def _serve(script: str, model: str, *args: str):
    from serving import ServerProcess

    with ServerProcess(script, model, *args) as server:
        yield server


@pytest.fixture(scope="session")
def v3(v3_dir):
    yield from _serve("openai_api.py", v3_dir)


@pytest.fixture(scope="session")
def v2_keyed():
    yield from _serve("openai_api.py", model_dir("chatglm2-tiny"), "--api-key", KEY, "--max-request-bytes", "20000",
                      "--cors-origins", "http://allowed.example")


@pytest.fixture(scope="session")
def basic_v2():
    yield from _serve("api.py", model_dir("chatglm2-tiny"))


@pytest.fixture(scope="session")
def basic_v3(v3_dir):
    yield from _serve("api.py", v3_dir)


@pytest.fixture(scope="session")
def browser():
    from browser import launch_browser

    pw, chromium = launch_browser()
    yield chromium
    chromium.close()
    pw.stop()


# ---- markers: `pytest -m "not slow and not browser"` is the quick loop; CI runs everything ---------------
PROCESS_FIXTURES = {"v3", "v2_keyed", "basic_v2", "basic_v3"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & PROCESS_FIXTURES:
            item.add_marker(pytest.mark.slow)
        if "browser" in fixtures:
            item.add_marker(pytest.mark.browser)


def float_twin(model):
    """A copy of a quantized model whose QuantizedLinear layers are float32 nn.Linear layers holding the
    de-quantized weights: the same function, with autograd's own backward."""
    import copy

    from model.quantization import QuantizedLinear, dequantize_weight

    twin = copy.deepcopy(model)
    for name, module in list(twin.named_modules()):
        if isinstance(module, QuantizedLinear):
            linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            with torch.no_grad():
                linear.weight.copy_(dequantize_weight(module.stored_weight(), module.weight_scale, module.bits,
                                                      torch.float32))
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            linear.requires_grad_(False)
            if module.bias is not None:
                linear.bias.requires_grad_(module.bias.requires_grad)
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent), child, linear)
    return twin
