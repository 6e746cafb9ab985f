"""Weight-only int8 / int4 linears in the chatglm2-6b-int4 checkpoint layout, and quantize(model, bits).

Layout (spec section 4): per output row r, scale[r] = max|W[r]| / (2^(bits-1) - 1) and q = round(W / scale),
both in the float checkpoint dtype. int8 stores q as [out, in]; int4 packs two values per byte as [out, in/2],
the even column in the high nibble.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

QUANTIZED_LINEARS = ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h",
                     "mlp.dense_4h_to_h")


def quantize_weight(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 in checkpoint layout, scale [out]) for a float weight [out, in]."""
    qmax = 2 ** (bits - 1) - 1
    # In the weight's dtype as the original (fp16); bf16 has too few mantissa bits to round to 1/127.
    work = weight.float() if weight.dtype == torch.bfloat16 else weight
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
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, bits, linear.bias is not None, dtype=w.dtype,
                    device=w.device)
        q, scale = quantize_weight(w, bits)
        layer.weight.data, layer.weight_scale.data = q, scale
        if linear.bias is not None:
            layer.bias.data = linear.bias.detach()
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = dequantize_weight(self.weight, self.weight_scale, self.bits, x.dtype)
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"


def swap_linears(model: nn.Module, bits: int, quantize_values: bool) -> None:
    """Replace the four linears of every block by QuantizedLinear (quantizing their values if asked)."""
    for layer in model.transformer.encoder.layers:
        for path in QUANTIZED_LINEARS:
            parent_name, _, attr = path.rpartition(".")
            parent = layer.get_submodule(parent_name)
            linear = getattr(parent, attr)
            if isinstance(linear, QuantizedLinear):
                raise ValueError(f"the model is already quantized to {linear.bits} bits")
            if quantize_values:
                new = QuantizedLinear.from_linear(linear, bits)
            else:
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
