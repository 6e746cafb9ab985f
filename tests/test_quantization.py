"""int8 / int4 weight-only quantization: the checkpoint layout, quantize(), quantize-while-loading, save/reload."""

import os

import pytest
import torch

from conftest import as_lists, dedup, golden_case, golden_tensors, loaded, model_dir
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


@pytest.mark.slow
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


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.slow
def test_quantized_model_error_is_no_worse_than_the_originals(bits):
    """Quantized vs float logits on the golden prompts: our error equals the original's (same weights, same
    rows), and on the way every quantized linear's error is the error of round-to-nearest itself: the
    kernels (matrix-vector for one token, blocked GEMM for the prompt) add nothing measurable to it."""
    ref, ref_t = golden_case("chatglm2-tiny"), golden_tensors("chatglm2-tiny")
    orig, orig_t = golden_case(f"chatglm2-tiny-int{bits}"), golden_tensors(f"chatglm2-tiny-int{bits}")
    float_model, tokenizer = loaded("chatglm2-tiny")
    quantized, _ = load_model(model_dir("chatglm2-tiny"), device="cpu", dtype="float32", quantize=bits)
    rel = lambda y, r: ((y.double() - r.double()).norm() / r.double().norm()).item()  # noqa: E731
    inputs = {}
    hooks = [m.register_forward_hook(lambda mod, args, out: inputs.__setitem__(mod, args[0]))
             for m in float_model.modules() if type(m).__name__ == "Linear" and m.out_features != 1024]
    try:
        for a, b in zip(ref["runs"]["float32"]["cases"], orig["runs"]["float32"]["cases"]):
            ids = torch.tensor([a["input_ids"]])
            with torch.inference_mode():
                ours_float = float_model(ids).logits[0, a["prefill_rows"]]
                ours_quant = quantized(ids).logits[0, a["prefill_rows"]]
            theirs_float, theirs_quant = ref_t[a["prefill_logits"]], orig_t[b["prefill_logits"]]
            # within 2%: the original's int checkpoints also hold the other weights (embedding, norms, output
            # layer) rounded to fp16, which our quantized copy of the float32 model keeps in float32
            assert rel(ours_quant, ours_float) <= 1.02 * rel(theirs_quant, theirs_float)
            assert rel(ours_quant, ours_float) >= 0.98 * rel(theirs_quant, theirs_float)
            assert len(inputs) == 4 * len(float_model.transformer.encoder.layers)
            with torch.inference_mode():
                for linear, x in inputs.items():
                    x = x.reshape(-1, x.shape[-1])
                    exact = torch.nn.functional.linear(x.double(), linear.weight.double(), linear.bias.double()
                                                       if linear.bias is not None else None)
                    q = QuantizedLinear.from_linear(linear, bits)
                    rtn = rel(torch.nn.functional.linear(
                        x.double(), dequantize_weight(q.weight, q.weight_scale, bits, torch.float64),
                        None if linear.bias is None else linear.bias.double()), exact)
                    for rows in (x, x[-1:]):  # the whole prompt, then one token
                        err = rel(q(rows), exact[-rows.shape[0]:])
                        if rows.shape[0] == x.shape[0]:
                            assert err <= rtn * 1.0001 + 1e-7
                        else:
                            assert err <= 3 * rtn
            inputs.clear()
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_inside_inference_mode(monkeypatch, bits):
    """model.quantize(bits) called under torch.inference_mode() leaves a model whose later forwards work (in
    inference mode, as generate and chat run, and outside it) on the de-quantizing path of CUDA, MPS and CPUs
    without the native kernels, with the logits of a model quantized outside inference mode."""
    from model import kernels

    monkeypatch.setattr(kernels, "available", lambda: False)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])  # more rows than a decode step: the F.linear path
    outside, _ = load_model(model_dir("chatglm2-tiny"), device="cpu", dtype="float32")
    outside.quantize(bits)
    inside, _ = load_model(model_dir("chatglm2-tiny"), device="cpu", dtype="float32")
    with torch.inference_mode():
        inside.quantize(bits)
    assert not any(p.is_inference() for p in inside.parameters())
    with torch.inference_mode():
        expected = outside(ids).logits
        assert torch.equal(inside(ids).logits, expected)
    with torch.no_grad():
        assert torch.equal(inside(ids).logits, expected)
