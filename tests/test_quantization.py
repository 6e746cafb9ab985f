"""int8 / int4 weight-only quantization: the checkpoint layout, quantize(), quantize-while-loading, save/reload."""

import os

import pytest
import torch

from conftest import as_lists, dedup, golden_case, loaded, model_dir
from model import load_model
from model.quantization import QuantizedLinear, dequantize_weight, quantize_weight, unpack_int4


def golden_quantized_state(bits):
    return torch.load(os.path.join(model_dir(f"chatglm2-tiny-int{bits}"), "pytorch_model.bin"), weights_only=True)


def test_int4_packing_layout():
    w = torch.tensor([[7.0, -7.0, 1.0, 0.0], [-1.0, 2.0, 3.0, -4.0]], dtype=torch.float16)
    q, scale = quantize_weight(w, 4)
    assert q.dtype == torch.int8 and q.shape == (2, 2)
    # high nibble = even column, low nibble = odd column, two's complement
    assert q[0].tolist() == [0x79, 0x10] and scale[0] == 1
    assert unpack_int4(q)[0].tolist() == [7, -7, 1, 0]
    torch.testing.assert_close(dequantize_weight(q, scale, 4, torch.float32), torch.tensor(
        [[7.0, -7.0, 1.0, 0.0], [-4 / 7 * 2, 4 / 7 * 4, 4 / 7 * 5, -4.0]]), atol=1e-3, rtol=0)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_reproduces_the_reference_checkpoint(bits):
    """Quantizing the fp16 weights of chatglm2-tiny gives exactly the tensors of the golden int checkpoint."""
    golden = golden_quantized_state(bits)
    while_loading, _ = load_model(model_dir("chatglm2-tiny"), device="cpu", dtype="float16", quantize=bits)
    after, _ = load_model(model_dir("chatglm2-tiny"), device="cpu", dtype="float16")
    after.quantize(bits)
    for model in (while_loading, after):
        state = model.state_dict()
        for name, tensor in golden.items():
            if name.endswith("inv_freq"):
                continue
            assert torch.equal(state[name], tensor), name
        assert model.config.quantization_bit == bits


@pytest.mark.parametrize("bits", [4, 8])
def test_save_and_reload_round_trip(tmp_path, bits):
    model, tokenizer = load_model(model_dir("chatglm2-tiny"), device="cpu", dtype="float32", quantize=bits)
    model.save_pretrained(str(tmp_path))
    tokenizer.save_pretrained(str(tmp_path))
    again, tok = load_model(str(tmp_path), device="cpu", dtype="float32")
    assert again.config.quantization_bit == bits
    assert isinstance(again.transformer.encoder.layers[0].mlp.dense_h_to_4h, QuantizedLinear)
    ids = torch.tensor([tokenizer.encode("你好 hello world")])
    with torch.inference_mode():
        assert torch.equal(again(ids).logits, model(ids).logits)
    with pytest.raises(ValueError, match="cannot be loaded as"):
        load_model(str(tmp_path), quantize=12 - bits)


def test_quantized_chat_matches_reference():
    model, tokenizer = loaded("chatglm2-tiny-int4")
    chat = golden_case("chatglm2-tiny-int4")["runs"]["float32"]["chat"]
    for case in chat["chat"]:
        response, history = model.chat(tokenizer, case["query"], case["history_in"], **chat["gen_kwargs"])
        assert response == case["response"] and as_lists(history) == case["history_out"]
    for case in chat["stream_chat"]:
        items = list(model.stream_chat(tokenizer, case["query"], case["history_in"], **chat["gen_kwargs"]))
        assert dedup([r for r, _ in items]) == dedup(case["stream"])


def test_quantization_error_is_that_of_round_to_nearest():
    """Per-row error of the dequantized weights stays within half a quantization step (plus the fp16 rounding
    of the weight and of the quotient, since scales and quotients are computed in fp16 as in the original)."""
    model, _ = loaded("chatglm2-tiny")
    for bits in (4, 8):
        w = model.transformer.encoder.layers[0].mlp.dense_h_to_4h.weight.detach()
        q, scale = quantize_weight(w, bits)
        err = (dequantize_weight(q, scale, bits, torch.float32) - w).abs()
        assert bool((err <= scale[:, None] / 2 + w.abs() * 2**-10 + 1e-6).all())
