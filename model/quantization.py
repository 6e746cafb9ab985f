"""Weight-only int8 / int4 linears in the chatglm2-6b-int4 checkpoint layout, and quantize(model, bits).

Layout (spec section 4): per output row r, scale[r] = max|W[r]| / (2^(bits-1) - 1) and q = round(W / scale),
both in the float checkpoint dtype. int8 stores q as [out, in]; int4 packs two values per byte as [out, in/2],
the even column in the high nibble. The stored layout is also the layout every kernel reads.

Kernels, chosen per call by device, dtype and the number of tokens:
- CPU, up to kernels.decode_rows() tokens (decoding, also a batch of sequences): the native kernels
  (model/kernels.c with AVX-512, model/kernels_avx2.c with AVX2) read the packed weights directly (float32
  inputs exactly; bf16 inputs through integer dot products).
- CPU, longer inputs (prompts): the layer is de-quantized block by block by the native kernel (to bf16 where
  the CPU has native bf16 GEMMs, else float32) and multiplied with a regular GEMM, which beats any
  matrix-vector kernel once there are many tokens.
- CPU without the native kernels (ARM, macOS, Windows, no compiler, CHATGLM_NATIVE_KERNELS=0): torch's packed
  products. int8: `_weight_int8pack_mm` (reads the stored layout as is). int4: `_weight_int4pack_mm_for_cpu`
  on a copy repacked once per layer (`_convert_weight_to_int4pack_for_cpu`, as packed as the stored weight),
  whose value = (u - 8) * scale + zero per group of K: u = q + 8, the row's scale repeated in every group and
  zero 0 give q * scale exactly. bf16 inputs for up to INT4PACK_MAX_ROWS rows, float32 inputs for up to
  INT4PACK_MAX_ROWS_F32 (torch's float32 variant is far slower); other dtypes, shapes the op refuses (out %
  16, in % 32) and a torch without the op de-quantize + GEMM.
- CUDA and MPS: de-quantize with torch, then the vendor GEMM. (cpm_kernels ships no weight-only int4 / int8
  kernel of its own: the original's extraction kernels are a CUDA binary embedded in its source that it
  loads through cpm_kernels' module loader.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import logging

from . import kernels

log = logging.getLogger(__name__)

INT4PACK_MAX_ROWS = 256  # bf16 rows up to which torch's int4 packed product beats de-quantize + GEMM
INT4PACK_MAX_ROWS_F32 = 4  # float32: torch's kernel costs ~1/5 of a de-quantize per row
_INT4PACK_INNER_K_TILES = 2
INT4PACK_CHUNK_ROWS = 1024  # a multiple of 64, the row block of the CPU packing (N % 64 may be a tail)
_logged: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        log.info(message)


def int4pack_available() -> bool:
    return (hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
            and hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"))


def _int4pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """The stored int4 weight [out, in/2] repacked for _weight_int4pack_mm_for_cpu, INT4PACK_CHUNK_ROWS rows at
    a time (torch's packing is row-local: tests/test_kernels.py checks it against one whole-matrix call), so
    the int32 input the op wants costs a chunk's memory, not 8 bytes per weight."""
    packed = None
    for r0 in range(0, weight.shape[0], INT4PACK_CHUNK_ROWS):
        w = weight[r0:r0 + INT4PACK_CHUNK_ROWS].to(torch.int32)
        unsigned = torch.stack(((w >> 4) + 8, (w & 0x0F) ^ 0x08), dim=-1).flatten(-2)  # q + 8, even column first
        chunk = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned, _INT4PACK_INNER_K_TILES)
        if packed is None:
            packed = chunk.new_empty((weight.shape[0],) + chunk.shape[1:])
        packed[r0:r0 + chunk.shape[0]] = chunk
    return packed


def int4pack_group_size(in_features: int) -> int | None:
    """The largest group size torch's CPU int4 product takes that divides in_features (None: none does)."""
    return next((g for g in (256, 128, 64, 32) if in_features % g == 0), None)


def quantize_weight(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 in checkpoint layout, scale [out]) for a float weight [out, in]."""
    qmax = 2 ** (bits - 1) - 1
    # In fp16 as the original (the official int4 / int8 checkpoints were made from fp16 weights), also for
    # float32 weights; bf16 has too few mantissa bits to round to 1/127, so it works in float32.
    work = {torch.bfloat16: torch.float32, torch.float32: torch.float16}.get(weight.dtype, weight.dtype)
    work = weight.to(work)
    scale = work.abs().amax(dim=-1) / qmax
    q = torch.round(work / scale[:, None]).to(torch.int8)  # round half to even
    if bits == 4:
        q16 = q.to(torch.int16)
        q = ((q16[:, 0::2] << 4) | (q16[:, 1::2] & 0x0F)).to(torch.int8)
    return q, scale.to(weight.dtype)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[out, in/2] int8 (high nibble = even column) -> [out, in] int8 in -8..7."""
    p = packed.to(torch.int16)
    high = p >> 4
    low = ((p & 0x0F) ^ 0x08) - 0x08
    return torch.stack((high, low), dim=-1).flatten(-2).to(torch.int8)


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    values = unpack_int4(q) if bits == 4 else q
    return values.to(dtype) * scale.to(dtype)[:, None]


class QuantizedLinear(nn.Module):
    """y = x (q * scale)^T + b, with q stored as int8 (8 bit) or packed nibbles (4 bit)."""

    def __init__(self, in_features: int, out_features: int, bits: int, bias: bool, dtype=None, device=None):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits}")
        if bits == 4 and in_features % 2:
            raise ValueError("int4 needs an even number of input features")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        cols = in_features if bits == 8 else in_features // 2
        self.weight = nn.Parameter(torch.empty(out_features, cols, dtype=torch.int8, device=device),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int) -> "QuantizedLinear":
        # Outside inference mode whatever the caller's: a parameter made under torch.inference_mode() and then
        # given a normal tensor's .data (the bias) fails every later forward in inference mode through F.linear
        # ("Inference tensors do not track version counter"), which is the path of CUDA, MPS and CPUs
        # without the native kernels; inference tensors would also refuse a later in-place load.
        with torch.inference_mode(False), torch.no_grad():
            w = linear.weight.detach()
            layer = cls(linear.in_features, linear.out_features, bits, linear.bias is not None, dtype=w.dtype,
                        device=w.device)
            q, scale = quantize_weight(w, bits)
            layer.weight.data, layer.weight_scale.data = q, scale
            if linear.bias is not None:
                layer.bias.data = linear.bias.detach()
        return layer

    def _f32(self, name: str) -> torch.Tensor | None:
        """float32 copy of weight_scale / bias for the native kernels, remade when the parameter changes."""
        param = getattr(self, name)
        if param is None:
            return None
        try:
            version = param._version
        except RuntimeError:  # made under torch.inference_mode(): such tensors carry no version counter
            version = None
        key = (param.data_ptr(), version)
        cached = self.__dict__.get("_f32_cache", {}).get(name)
        if cached is None or cached[0] != key:
            cached = (key, param.detach().float().contiguous())
            self.__dict__.setdefault("_f32_cache", {})[name] = cached
        return cached[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)
        if x.device.type == "cpu" and kernels.available() and self.weight.is_contiguous():
            if rows.shape[0] <= kernels.decode_rows():
                y = self._gemv_native(rows)
            else:
                y = self._blocked_gemm(rows)
            return y.to(x.dtype).reshape(*shape, self.out_features)
        if x.device.type == "cpu" and self.bits == 4 and self._int4pack_fits(rows):
            y = self._int4pack_mm(rows)
            return y.reshape(*shape, self.out_features)
        if (x.device.type == "cpu" and self.bits == 8 and rows.shape[0] <= kernels.DECODE_TOKENS
                and x.dtype in (torch.float32, torch.bfloat16)):
            y = torch._weight_int8pack_mm(rows.contiguous(), self.weight, self.weight_scale.to(x.dtype))
            if self.bias is not None:
                y = y + self.bias.to(x.dtype)
            return y.reshape(*shape, self.out_features)
        weight = dequantize_weight(self.weight, self.weight_scale, self.bits, x.dtype)
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))

    def _int4pack_fits(self, rows: torch.Tensor) -> bool:
        limit = {torch.bfloat16: INT4PACK_MAX_ROWS, torch.float32: INT4PACK_MAX_ROWS_F32}.get(rows.dtype, 0)
        if rows.shape[0] > limit:
            return False
        if not int4pack_available():
            _log_once("int4 on CPU without the native kernels: this torch has no _weight_int4pack_mm_for_cpu; "
                      "de-quantizing the whole layer per call")
            return False
        if self.out_features % 16 or int4pack_group_size(self.in_features) is None:
            _log_once(f"int4 on CPU without the native kernels: {self.out_features}x{self.in_features} does not "
                      "fit torch's int4 packed product (out % 16, in % 32); de-quantizing per call")
            return False
        return True

    def _int4pack(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(torch's int4 packed weight, scales_and_zeros in dtype, group size), made once per layer and kept
        (remade when weight / weight_scale change). The repacked weight is as large as the stored one."""
        def key(param):
            try:
                return param.data_ptr(), param._version
            except RuntimeError:  # made under torch.inference_mode(): no version counter
                return param.data_ptr(), None

        cache = self.__dict__.setdefault("_int4pack_cache", {})
        wkey = key(self.weight)
        if cache.get("key") != wkey:
            cache.clear()
            cache["key"] = wkey
            cache["packed"] = _int4pack_weight(self.weight.detach())
            _log_once("int4 on CPU without the native kernels: torch's _weight_int4pack_mm_for_cpu (weights "
                      "repacked once per layer)")
        group = int4pack_group_size(self.in_features)
        skey = (dtype, key(self.weight_scale))
        if cache.get("scales_key") != skey:
            scale = self.weight_scale.detach().to(dtype)
            sz = torch.stack((scale, torch.zeros_like(scale)), dim=-1)
            cache["scales_key"] = skey
            cache["scales"] = sz.expand(self.in_features // group, self.out_features, 2).contiguous()
        return cache["packed"], cache["scales"], group

    def _int4pack_mm(self, rows: torch.Tensor) -> torch.Tensor:
        packed, scales, group = self._int4pack(rows.dtype)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows.contiguous(), packed, group, scales)
        if self.bias is not None:
            y = y + self.bias.to(rows.dtype)
        return y

    def _blocked_gemm(self, rows: torch.Tensor) -> torch.Tensor:
        """Many tokens: de-quantize a cache-sized block of output rows at a time and multiply it with a GEMM."""
        work = kernels.gemm_dtype(rows.dtype)
        scale = self._f32("weight_scale")

        def fill(n0, n1, buffer):
            return kernels.dequantize(self.weight[n0:n1], self.bits, scale[n0:n1], self.in_features, work, out=buffer)

        y = kernels.blocked_gemm(rows, self.out_features, fill, work)
        if self.bias is not None:
            y = y + self.bias.to(work)
        return y

    def _gemv_native(self, rows: torch.Tensor) -> torch.Tensor:
        scale, bias = self._f32("weight_scale"), self._f32("bias")
        integer = rows.dtype == torch.bfloat16 and kernels.has_integer_kernels()
        return kernels.gemv_quantized(rows.float().contiguous(), self.weight, self.bits, scale, bias, integer)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"


def swap_linears(model: nn.Module, bits: int, quantize_values: bool) -> None:
    """Replace the linears of every block (the network's BLOCK_LINEARS) by QuantizedLinear (quantizing their
    values if asked)."""
    for layer in model.blocks:
        for path in model.BLOCK_LINEARS:
            parent_name, _, attr = path.rpartition(".")
            parent = layer.get_submodule(parent_name)
            linear = getattr(parent, attr)
            if isinstance(linear, QuantizedLinear):
                raise ValueError(f"the model is already quantized to {linear.bits} bits")
            if quantize_values:
                new = QuantizedLinear.from_linear(linear, bits)
            else:
                with torch.inference_mode(False):  # normal tensors, to be loaded in place later (see from_linear)
                    new = QuantizedLinear(linear.in_features, linear.out_features, bits, linear.bias is not None,
                                          dtype=linear.weight.dtype, device=linear.weight.device)
            setattr(parent, attr, new)
    model.config.quantization_bit = bits


def quantize(model: nn.Module, bits: int) -> nn.Module:
    """Quantize a loaded float model in place (as the original's model.quantize(bits)); returns it."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    swap_linears(model, bits, quantize_values=True)
    return model
