"""load_model_on_gpus: the layer split for 1, 2, 4 and 8 GPUs, and a real accelerate dispatch on the CPU."""

import pytest
import torch

from conftest import loaded, model_dir
from model.config import ChatGLMConfig
from model.placement import auto_device_map, clean_device_map

SIX_B = dict(num_layers=28, hidden_size=4096, ffn_hidden_size=13696, num_attention_heads=32, kv_channels=128,
             multi_query_attention=True, multi_query_group_num=2, padded_vocab_size=65024)


def layers_per_gpu(device_map, num_layers=28):
    counts = {}
    for i in range(num_layers):
        gpu = device_map[f"transformer.encoder.layers.{i}"]
        counts[gpu] = counts.get(gpu, 0) + 1
    return [counts.get(g, 0) for g in range(max(counts) + 1)]


def test_two_gpus_split_like_the_original():
    device_map = auto_device_map(ChatGLMConfig(**SIX_B), 2)
    assert [i for i in range(28) if device_map[f"transformer.encoder.layers.{i}"] == 0] == list(range(13))
    assert all(device_map[m] == 0 for m in ("transformer.embedding", "transformer.output_layer",
                                            "transformer.encoder.final_layernorm"))


@pytest.mark.parametrize("gpus", [1, 2, 4, 8])
def test_every_gpu_carries_about_the_same_share(gpus):
    config = ChatGLMConfig(**SIX_B)
    device_map = auto_device_map(config, gpus)
    per_gpu = layers_per_gpu(device_map)
    assert len(per_gpu) == gpus and sum(per_gpu) == 28
    layer = 0.204e9
    loads = [n * layer for n in per_gpu]
    loads[0] += 2 * 65024 * 4096  # embedding + output layer
    assert max(loads) - min(loads) <= 1.6 * layer  # within about a layer of each other (the ends round)
    order = [device_map[f"transformer.encoder.layers.{i}"] for i in range(28)]
    assert order == sorted(order)  # consecutive layers stay together: one hop per boundary


def test_device_map_from_the_original_is_accepted_and_checked():
    model, _ = loaded("chatglm2-tiny")
    original_style = {"transformer.embedding.word_embeddings": 0, "transformer.encoder.final_layernorm": 0,
                      "transformer.output_layer": 0, "transformer.rotary_pos_emb": 0, "lm_head": 0,
                      "transformer.encoder.layers.0": 0, "transformer.encoder.layers.1": 1}
    cleaned = clean_device_map(original_style, model)
    assert "lm_head" not in cleaned and "transformer.rotary_pos_emb" not in cleaned
    with pytest.raises(ValueError, match="without a device"):
        clean_device_map({"transformer.embedding": 0}, model)
    with pytest.raises(ValueError, match="not a module"):
        clean_device_map({**cleaned, "transformer.bogus": 0}, model)


def test_dispatch_on_cpu_gives_the_same_logits_and_chat():
    from utils import load_model_on_gpus

    reference, tokenizer = loaded("chatglm2-tiny")
    device_map = {"transformer.embedding": "cpu", "transformer.encoder.layers.0": "cpu",
                  "transformer.encoder.layers.1": "cpu", "transformer.encoder.final_layernorm": "cpu",
                  "transformer.output_layer": "cpu"}
    model = load_model_on_gpus(model_dir("chatglm2-tiny"), num_gpus=2, device_map=device_map, dtype="float32")
    assert hasattr(model.transformer.encoder.layers[1], "_hf_hook")  # accelerate's hooks are in place
    ids = torch.tensor([tokenizer.encode("你好，世界")])
    torch.testing.assert_close(model(ids).logits, reference(ids).logits)
    assert model.chat(tokenizer, "你好", do_sample=False, max_new_tokens=12) == \
        reference.chat(tokenizer, "你好", do_sample=False, max_new_tokens=12)


def test_one_gpu_or_fewer_loads_on_one_device():
    from utils import load_model_on_gpus

    model = load_model_on_gpus(model_dir("chatglm2-tiny"), num_gpus=1, device="cpu", dtype="float32")
    assert not hasattr(model.transformer.encoder.layers[0], "_hf_hook")
    assert {p.device.type for p in model.parameters()} == {"cpu"}


SIX_B_V1 = dict(num_layers=28, hidden_size=4096, num_attention_heads=32, inner_hidden_size=16384, vocab_size=130528)


def test_chatglm1_two_gpus_split_like_the_original():
    from model.config_v1 import ChatGLM1Config

    device_map = auto_device_map(ChatGLM1Config(**SIX_B_V1), 2)
    # the original's ChatGLM-6B helper: embeddings and final norm on GPU 0 (the output is the embedding), 13 + 15
    assert device_map["transformer.word_embeddings"] == 0 and device_map["transformer.final_layernorm"] == 0
    assert [device_map[f"transformer.layers.{i}"] for i in range(28)] == [0] * 13 + [1] * 15
    assert len(device_map) == 30


@pytest.mark.slow
def test_chatglm1_split_over_gpus_loads_and_chats(monkeypatch):
    from model.multigpu import device_map_for
    from utils import load_model_on_gpus

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    gpu_map = device_map_for(model_dir("chatglm1-tiny"), 2)  # --num-gpus 2
    assert set(gpu_map.values()) == {0, 1} and gpu_map["transformer.final_layernorm"] == 0
    reference, tokenizer = loaded("chatglm1-tiny")
    cpu_map = {name: "cpu" for name in gpu_map}  # the same split, every "GPU" the CPU
    model = load_model_on_gpus(model_dir("chatglm1-tiny"), device_map=cpu_map, dtype="float32")
    assert hasattr(model.transformer.layers[1], "_hf_hook")
    ids = torch.tensor([tokenizer.encode("你好")])
    torch.testing.assert_close(model(ids).logits, reference(ids).logits)
    assert model.chat(tokenizer, "你好", do_sample=False, max_new_tokens=8) == \
        reference.chat(tokenizer, "你好", do_sample=False, max_new_tokens=8)
