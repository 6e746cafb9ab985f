"""Device bugs caught without a GPU: mocked device properties, torch's meta device (which, like CUDA, refuses
tensors of another device) and a stand-in "other device" for tensors that must not mix."""

import pytest
import torch

from conftest import loaded, model_dir
from model.loading import pick_dtype


# ---- dtype="auto" on CUDA -----------------------------------------------------------------------------------
@pytest.mark.parametrize("capability, expected", [((7, 5), torch.float16), ((7, 0), torch.float16),
                                                  ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_auto_dtype_is_fp16_on_pre_ampere_gpus(monkeypatch, capability, expected):
    # torch.cuda.is_bf16_supported() counts emulation: True on a T4 / V100 / RTX 20xx
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.version, "hip", None)
    assert pick_dtype("auto", torch.device("cuda")) == expected
    assert pick_dtype(None, torch.device("cuda:1")) == expected


def test_auto_dtype_asks_about_the_gpu_it_loads_on(monkeypatch):
    capabilities = {0: (7, 5), 1: (8, 6)}
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capabilities[device])
    monkeypatch.setattr(torch.version, "hip", None)
    assert pick_dtype("auto", torch.device("cuda:0")) == torch.float16
    assert pick_dtype("auto", torch.device("cuda:1")) == torch.bfloat16
