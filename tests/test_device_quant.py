"""int4 / int8 on CUDA and MPS without a GPU: the fused weight-only products, their packing and the round trip to
the stored layout, run through CHATGLM_FORCE_GPU_PATHS on CPU and meta tensors (model/quantization.py says which
stand-ins replace the device ops there). What only a GPU can show (torch's own CUDA packing equals
tinygemm_pack, speed) is checked at run time per layer and by bench/gpu_check.py.
"""

import logging

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import model_dir
from model import load_model, quantization
from model.devices import FORCE_ENV
from model.quantization import (QuantizedLinear, dequantize_weight, quantize_weight, tinygemm_pack, tinygemm_unpack,
                                unpack_int4)


def layout_by_the_kernels_indexing(u: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
    """The tinygemm B layout element by element, as torch's CUDA packing kernel indexes it: lane t of n-tile
    nt reads row 8 nt + t // 4, the bytes k0 + t % 4 and k0 + t % 4 + 4 of each of the two 16-column k-tiles
    starting at byte k0, and writes their high nibbles to bits 0-15 and their low nibbles to bits 16-31."""
    n, half = u.shape
    outer = 2 * half // (16 * inner_k_tiles)
    out = torch.zeros(n // 8, outer, 32, inner_k_tiles // 2, dtype=torch.int64)
    for nt in range(n // 8):
        for ko in range(outer):
            for t in range(32):
                for tile in range(0, inner_k_tiles, 2):
                    row = 8 * nt + t // 4
                    k0 = (ko * inner_k_tiles + tile) * 8
                    v = [int(u[row, k]) for k in (k0 + t % 4, k0 + t % 4 + 4, k0 + 8 + t % 4, k0 + 12 + t % 4)]
                    word = sum((b >> 4) << (4 * i) for i, b in enumerate(v))
                    word |= sum((b & 15) << (16 + 4 * i) for i, b in enumerate(v))
                    out[nt, ko, t, tile // 2] = word - (1 << 32) if word >= 1 << 31 else word
    return out.to(torch.int32)


@pytest.mark.parametrize("tiles", [2, 4, 8])
def test_tinygemm_pack_is_the_cuda_layout_and_unpack_inverts_it(tiles):
    torch.manual_seed(tiles)
    u = torch.randint(0, 256, (24, 16 * tiles), dtype=torch.uint8)  # K = 32 t: two super-tiles
    packed = tinygemm_pack(u, tiles)
    assert packed.dtype == torch.int32 and packed.shape == (3, 2, 32, tiles // 2)
    assert torch.equal(packed, layout_by_the_kernels_indexing(u, tiles))
    assert torch.equal(tinygemm_unpack(packed), u)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequantize_weight_is_q_times_scale_rounded_once(bits, dtype):
    torch.manual_seed(bits)
    q, scale = quantize_weight(torch.randn(48, 64, dtype=dtype), bits)
    values = unpack_int4(q) if bits == 4 else q
    assert torch.equal(dequantize_weight(q, scale, bits, dtype), values.to(dtype) * scale.to(dtype)[:, None])


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequantize_into_blocks_gives_every_byte_its_value(bits, dtype):
    """The CPU's blocked route (int16 pairs of signed nibbles) against the whole-matrix one and the values
    themselves: every byte 0..255 in every row, rows in blocks that do not divide the matrix, scales of both
    signs, an offset view of q (a layer's rows n0:n1) and a result buffer larger than needed."""
    torch.manual_seed(bits)
    n, width = 37, 256
    stored = torch.arange(256, dtype=torch.int16).roll(5).repeat(n, 1).to(torch.uint8).view(torch.int8)
    stored = torch.cat([torch.zeros(3, width, dtype=torch.int8), stored])
    q = stored  # int8 weights, or int4 bytes of two nibbles each
    scale = (torch.randn(q.shape[0]) * 0.1).to(dtype)
    values = unpack_int4(q) if bits == 4 else q
    expected = values.to(dtype) * scale[:, None]
    whole = quantization.dequantize_into(q, scale, bits, torch.empty_like(expected), block_rows=None)
    assert torch.equal(whole, expected)
    buffer = torch.full((q.shape[0] - 3 + 5, expected.shape[1]), float("nan"), dtype=dtype)
    blocked = quantization.dequantize_into(q[3:], scale[3:], bits, buffer[:-5], block_rows=7)
    assert torch.equal(blocked, expected[3:])
    assert buffer[-5:].isnan().all()  # nothing past the rows asked for


class Allocations(TorchDispatchMode):
    """Records (op, dtype, numel) of every tensor the ops under it return in new storage (not views, not
    in-place results)."""

    def __init__(self):
        super().__init__()
        self.seen, self.storages = [], set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and storage(t) not in self.storages:
                self.storages.add(storage(t))
                self.seen.append((str(func), t.dtype, t.numel()))
        return out


def storage(t: torch.Tensor):
    return t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t.untyped_storage())


def test_dequantize_weight_makes_no_temporaries_wider_than_a_byte():
    """The de-quantizing path (prompts on a GPU, fp16 on CUDA, pre-Ampere GPUs) allocated 1.3 GB of int16
    temporaries for one 27392x4096 int4 matrix; now only byte-sized ones besides the result."""
    q, scale = quantize_weight(torch.randn(64, 128), 4)
    with Allocations() as record:
        w = dequantize_weight(q, scale, 4, torch.bfloat16)
    big = [(op, dt) for op, dt, n in record.seen if n >= q.numel() and dt.itemsize > 1 and dt != torch.bfloat16]
    assert not big, big
    assert [op for op, dt, n in record.seen if dt == torch.bfloat16 and n >= w.numel()] == [
        "aten.empty.memory_format"]  # the result


def forced_layer(monkeypatch, path, bits, dtype, out_features=96, in_features=256, bias=True):
    monkeypatch.setenv(FORCE_ENV, path)
    torch.manual_seed(bits + in_features)
    linear = torch.nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    layer = QuantizedLinear.from_linear(linear, bits)
    dense = dequantize_weight(layer.weight, layer.weight_scale, bits, torch.float64)
    bias64 = None if layer.bias is None else layer.bias.double()
    return layer, dense, bias64


@pytest.mark.parametrize("path", ["cuda", "mps"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 64, 65])
def test_forced_gpu_paths_compute_the_quantized_linear(monkeypatch, path, bits, dtype, rows):
    layer, dense, bias = forced_layer(monkeypatch, path, bits, dtype)
    x = torch.randn(rows, layer.in_features, dtype=dtype)
    with torch.inference_mode():
        y = layer(x)
    assert y.dtype == dtype and y.shape == (rows, layer.out_features)
    ref = F.linear(x.double(), dense, bias)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5  # bf16: the inputs and each product round to 8 bits
    assert (y.double() - ref).abs().max() <= tol * ref.abs().max()


def fused_calls(monkeypatch):
    """Counts the calls of the fused products the device paths select."""
    calls = {"int4": 0, "int8": 0}
    pack4, mm4 = quantization.int4_device_ops(torch.device("cpu"))
    mm8 = quantization.int8_device_product(torch.device("cpu"))

    def counted(kind, fn):
        def call(*args):
            calls[kind] += 1
            return fn(*args)
        return call

    monkeypatch.setattr(quantization, "int4_device_ops", lambda device: (pack4, counted("int4", mm4)))
    monkeypatch.setattr(quantization, "int8_device_product", lambda device: counted("int8", mm8))
    return calls


@pytest.mark.parametrize("path,dtype,fused", [
    ("cuda", torch.bfloat16, True),  # tinygemm: bf16 inputs only
    ("cuda", torch.float16, False),
    ("cuda", torch.float32, False),
    ("mps", torch.float16, True),
    ("mps", torch.float32, True),
])
@pytest.mark.parametrize("bits", [4, 8])
def test_which_calls_take_the_fused_products(monkeypatch, path, dtype, fused, bits):
    calls = fused_calls(monkeypatch)
    layer, _, _ = forced_layer(monkeypatch, path, bits, dtype)
    with torch.inference_mode():
        layer(torch.randn(3, layer.in_features, dtype=dtype))
        layer(torch.randn(quantization.DEVICE_FUSED_MAX_ROWS + 1, layer.in_features, dtype=dtype))
    expect = 1 if fused or bits == 8 else 0  # int8's product takes every float dtype
    assert calls[f"int{bits}"] == expect


def test_a_decode_step_reads_the_packed_weights_and_makes_no_dense_copy(monkeypatch):
    """The CUDA path of an int4 model: a decode step calls the fused product for every linear and allocates
    no floating-point tensor as large as a weight (before: each linear de-quantized its whole matrix per
    call). On meta tensors, as a GPU would refuse any tensor made on the CPU."""
    monkeypatch.setenv(FORCE_ENV, "cuda")
    calls = fused_calls(monkeypatch)
    model, _ = load_model(model_dir("chatglm2-tiny-int4"), device="meta", dtype="bfloat16")
    linears = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    smallest = min(m.in_features * m.out_features for m in linears)
    ids = torch.tensor([[5, 6, 7]], device="meta")
    with torch.inference_mode():
        out = model(ids, position_ids=torch.arange(3, device="meta")[None])
        calls["int4"] = 0
        with Allocations() as record:
            model(torch.tensor([[8]], device="meta"), position_ids=torch.tensor([[3]], device="meta"),
                  past_key_values=out.past_key_values)
    assert calls["int4"] == len(linears)
    dense = [(op, n) for op, dt, n in record.seen if dt.is_floating_point and n >= smallest
             and op != "aten.embedding.default" and "mm" not in op]  # the output layer's own products
    assert not dense, dense


def test_cuda_repacks_in_place_and_gives_the_stored_layout_back(monkeypatch, tmp_path):
    """On CUDA the repacked int4 weight replaces the stored one (no second copy); saving, state_dict, moving or
    casting the model and loading a state dict all see the checkpoint layout."""
    model, tokenizer = load_model(model_dir("chatglm2-tiny-int4"), device="cpu", dtype="bfloat16")
    stored = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([tokenizer.encode("你好 hello")])
    with torch.inference_mode():
        monkeypatch.setenv(FORCE_ENV, "cuda")
        first = model(ids).logits
        layer = model.transformer.encoder.layers[0].mlp.dense_h_to_4h
        assert layer._tinygemm and layer.weight.dtype == torch.int32 and layer.weight.dim() == 4
        assert all(torch.equal(v, stored[k]) for k, v in model.state_dict().items())
        model.save_pretrained(str(tmp_path))
        tokenizer.save_pretrained(str(tmp_path))
        assert layer._tinygemm  # saving did not undo it
        assert torch.equal(model(ids).logits, first)
        model.load_state_dict(stored)  # in place, into the stored layout
        assert not layer._tinygemm and torch.equal(layer.weight, stored["transformer.encoder.layers.0.mlp"
                                                                          ".dense_h_to_4h.weight"])
        assert torch.equal(model(ids).logits, first)  # repacked again
        model.float()
        assert not layer._tinygemm and layer.weight.dtype == torch.int8
        monkeypatch.setenv(FORCE_ENV, "0")
        cpu_logits = model(ids).logits
    again, _ = load_model(str(tmp_path), device="cpu", dtype="float32")
    with torch.inference_mode():
        assert torch.equal(again(ids).logits, cpu_logits)


def test_a_refused_fused_product_falls_back_once_with_a_warning(monkeypatch, caplog):
    """A torch whose GPU lacks an op (int8 on CUDA before torch 2.9, a build without the int4 kernels) refuses
    the call: the layer de-quantizes instead, says so once, and does not try again."""
    monkeypatch.setattr(quantization, "_refused", set())
    tries = []

    def refuse(*args):
        tries.append(1)
        raise NotImplementedError("Could not run 'aten::_weight_int8pack_mm' with arguments from the 'CUDA' backend")

    monkeypatch.setattr(quantization, "int8_device_product", lambda device: refuse)
    layer, dense, bias = forced_layer(monkeypatch, "cuda", 8, torch.float32)
    x = torch.randn(2, layer.in_features)
    with caplog.at_level(logging.WARNING, logger="model.quantization"), torch.inference_mode():
        for _ in range(3):
            torch.testing.assert_close(layer(x).double(), F.linear(x.double(), dense, bias), atol=1e-4, rtol=0)
    assert len(tries) == 1
    assert [r.getMessage() for r in caplog.records if "refused" in r.getMessage()] == [
        "int8 on cuda: torch's fused product refused float32 inputs (Could not run 'aten::_weight_int8pack_mm' "
        "with arguments from the 'CUDA' backend); de-quantizing per call instead"]
