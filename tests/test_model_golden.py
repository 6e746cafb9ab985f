"""Network outputs against the original implementation's (golden) float32 logits and greedy ids."""

import pytest
import torch

from conftest import FLOAT_MODELS, PTUNING_MODELS, QUANTIZED_MODELS, golden_case, golden_tensors, loaded

# quantized ones on the reference path: q * scale in float32; P-Tuning ones: the prefix counts in the cache shape
MODELS = FLOAT_MODELS + QUANTIZED_MODELS + PTUNING_MODELS

ATOL = 1e-4
# CHATGLM_FORCE_GPU_PATHS: every model also through the branches of CUDA (K/V expanded for the memory-efficient
# kernel; float32 int4 / int8 de-quantized per call) and MPS (K/V expanded, explicit causal mask; the fused int4 /
# int8 products, here their CPU stand-ins), at the same tolerance
PATHS = {name: ["cpu", "cuda", "mps"] for name in MODELS}


def cases(name):
    return golden_case(name)["runs"]["float32"]["cases"]


PARAMS = [(name, i, path) for name in MODELS for i in range(len(cases(name))) for path in PATHS[name]]


@pytest.mark.parametrize("name,index,path", PARAMS)
@pytest.mark.slow
def test_prefill_decode_and_greedy(name, index, path, monkeypatch):
    monkeypatch.setenv("CHATGLM_FORCE_GPU_PATHS", path)
    model, tokenizer = loaded(name)
    case, ref = cases(name)[index], golden_tensors(name)
    if "text" in case:
        enc = tokenizer([case["text"]], return_tensors="pt")
    else:
        enc = tokenizer.build_chat_input(**case["build_chat_input"])
    assert enc["input_ids"][0].tolist() == case["input_ids"]
    assert enc["position_ids"][0].tolist() == case["position_ids"]
    ids, pos = enc["input_ids"], enc["position_ids"]
    with torch.inference_mode():
        out = model(ids, position_ids=pos, attention_mask=enc["attention_mask"])
        torch.testing.assert_close(out.logits[0, case["prefill_rows"]], ref[case["prefill_logits"]],
                                   atol=ATOL, rtol=0)
        assert int(out.logits[0, -1].argmax()) == case["prefill_last_argmax"]
        cache = out.past_key_values
        assert list(cache[0][0].shape) == case["kv_cache_layer0_key_shape"]
        for step in case["decode_steps"]:
            step_out = model(torch.tensor([[step["input_id"]]]), position_ids=torch.tensor([[step["position_id"]]]),
                             past_key_values=cache)
            torch.testing.assert_close(step_out.logits[0, -1], ref[step["logits"]], atol=ATOL, rtol=0)
    greedy = model.generate(**enc, do_sample=False, max_new_tokens=20)
    assert greedy[0, ids.shape[1]:].tolist() == case["greedy_20"]


@pytest.mark.parametrize("name,path", [(name, path) for name in MODELS for path in PATHS[name]])
def test_left_padded_batch(name, path, monkeypatch):
    monkeypatch.setenv("CHATGLM_FORCE_GPU_PATHS", path)
    model, tokenizer = loaded(name)
    batch, ref = golden_case(name)["runs"]["float32"]["batch"], golden_tensors(name)
    enc = tokenizer(batch["texts"], padding=True, return_tensors="pt")
    assert enc["input_ids"].tolist() == batch["input_ids"]
    assert enc["position_ids"].tolist() == batch["position_ids"]
    with torch.inference_mode():
        logits = model(**enc).logits
    real = enc["attention_mask"].bool()  # padded rows are reference artefacts (spec section 9)
    torch.testing.assert_close(logits[real], ref[batch["logits"]][real], atol=ATOL, rtol=0)
    out = model.generate(**enc, max_new_tokens=8)
    assert out[:, enc["input_ids"].shape[1]:].tolist() == batch["greedy_8"]
