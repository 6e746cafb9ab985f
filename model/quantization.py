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
  INT4PACK_MAX_ROWS_F32 (torch's float32 variant is far slower). Longer inputs, other dtypes, shapes the op
  refuses (out % 16, in % 32) and a torch without the op: the same blocked GEMM as with the native kernels,
  its blocks de-quantized by torch's ops (dequantize_into).
- CUDA and MPS, up to DEVICE_FUSED_MAX_ROWS rows (decoding, batches of sequences): torch's fused weight-only
  products, which read the packed weights once per call. int8: `_weight_int8pack_mm` on the stored layout.
  int4: `_weight_int4pack_mm` (bf16 inputs on sm80+ CUDA GPUs; float32 / fp16 / bf16 on MPS) on the weight
  repacked once per layer by `_convert_weight_to_int4pack` from u = q + 8 (the stored bytes XOR 0x88), with
  the row's scale repeated per group and zero 0: (u - 8) * scale + 0 = q * scale, the stored value exactly.
  On CUDA the repacked form replaces the stored one (no second copy on a 6 GB card) once it is checked to be
  the layout `tinygemm_pack` writes, so that `tinygemm_unpack` can give the stored bytes back for saving, for
  moving the model and for de-quantizing; anywhere else (MPS packs its own way) it is kept beside the stored
  weight. A torch that lacks an op (int8 on CUDA before torch 2.9) or refuses a call falls back, logged once.
- CUDA and MPS, longer inputs (prompts), fp16 on CUDA, pre-Ampere GPUs and shapes the ops refuse: the weight
  is de-quantized in a few torch ops (`dequantize_weight`) and multiplied by the vendor GEMM. (cpm_kernels
  ships no weight-only int4 / int8 kernel of its own: the original's extraction kernels are a CUDA binary
  embedded in its source that it loads through cpm_kernels' module loader.)

CHATGLM_FORCE_GPU_PATHS=cuda / mps (model/devices.py) runs CPU tensors through the CUDA / MPS branches: torch's
CPU product of the same values (`_weight_int4pack_mm_for_cpu`) stands in for the CUDA / MPS int4 op, and
`tinygemm_pack` for the CUDA packing, so the golden tests cover the selection, the repacking, the scales and
the round trip to the stored layout without a GPU.

Training through a quantized model (P-Tuning v2 on int4 / int8, as the original's --quantization_bit): where x
needs a gradient, the layer runs its inference product inside an autograd Function whose backward
de-quantizes the weight block by block for grad_x = grad_y (q * scale); the weight and scales stay frozen, a
trained bias gets its gradient. Nothing of the weight is kept between the passes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import logging

from . import kernels
from .devices import code_path, cuda_sm80

log = logging.getLogger(__name__)

INT4PACK_MAX_ROWS = 48  # bf16 rows up to which torch's int4 packed product beats de-quantize + GEMM
INT4PACK_MAX_ROWS_F32 = 4  # float32: torch's kernel costs ~1/5 of a de-quantize per row
_INT4PACK_INNER_K_TILES = 2
INT4PACK_CHUNK_ROWS = 1024  # a multiple of 64, the row block of the CPU packing (N % 64 may be a tail)
DEVICE_FUSED_MAX_ROWS = 64  # CUDA / MPS: fused products up to this many rows, de-quantize + GEMM above
_logged: set[str] = set()
_refused: set[tuple] = set()  # (device type, bits, dtype) whose fused product this torch refused


def _param_key(param: torch.Tensor) -> tuple:
    """What identifies a parameter's current values for the caches below: its storage and version counter."""
    try:
        return param.data_ptr(), param.device, param._version
    except RuntimeError:  # made under torch.inference_mode(): such tensors carry no version counter
        return param.data_ptr(), param.device, None


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


def unsigned_nibbles(q: torch.Tensor) -> torch.Tensor:
    """The stored int4 bytes [out, in/2] as uint8 holding u = q + 8 in each nibble (even column high), the
    input torch's int4 packing ops take: flipping each nibble's top bit maps -8..7 to 0..15."""
    return q.contiguous().view(torch.uint8) ^ 0x88


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """q * scale as a [out, in] tensor in dtype, rounded once (as torch's fused products compute each weight).
    In a few ops with no wider temporaries than uint8: it runs per call on the paths without a fused product
    (a 27392x4096 int4 matrix used to take 11 ops and 1.3 GB of int16 temporaries)."""
    cols = q.shape[1] * (2 if bits == 4 else 1)
    out = torch.empty(q.shape[0], cols, dtype=dtype, device=q.device)
    return dequantize_into(q, scale.to(dtype), bits, out, block_rows=None)


DEQUANTIZE_BLOCK_ROWS = 512  # CPU: rows de-quantized at a time, so the temporaries stay in the cache


def dequantize_into(q: torch.Tensor, scale: torch.Tensor, bits: int, out: torch.Tensor,
                    block_rows: int | None = DEQUANTIZE_BLOCK_ROWS) -> torch.Tensor:
    """Write q * scale (scale already in out's dtype) into out [rows, in], each weight rounded once; block_rows
    rows at a time (on a CPU through temporaries reused from kernels.scratch), or all at once (None).

    int4 in blocks: each stored byte widens to an int16 whose two bytes are its two signed nibbles in column
    order (little-endian: the even column, the high nibble, in the low byte), in contiguous int16 ops; viewed
    as int8 they are the weight's integers, and one multiply by the scale writes out. All at once (a GPU's
    whole matrix): byte-sized temporaries only (int16 ones would be as large as the result), the nibbles
    written into every other element of out, which is slower on a CPU: strided byte writes cost as much as all
    of the int16 route (27392x4096 into bf16 on a 2-core Xeon: 131 ms against 81)."""
    n = q.shape[0]
    step = n if block_rows is None else block_rows
    half = q.shape[1]
    cpu = q.device.type == "cpu"

    def temporary(slot, rows, dtype):
        if cpu:
            return kernels.scratch(slot, rows * half, dtype).view(rows, half)
        return torch.empty(rows, half, dtype=dtype, device=q.device)

    for r0 in range(0, n, step):
        r1 = min(r0 + step, n)
        block, dest, s = q[r0:r1], out[r0:r1], scale[r0:r1, None]
        if bits == 8:
            torch.mul(block, s, out=dest)
        elif block_rows is not None:
            pair = temporary("dequantize_pair", r1 - r0, torch.int16)
            low = temporary("dequantize_low", r1 - r0, torch.int16)
            pair.copy_(block)  # the stored byte, sign-extended
            torch.bitwise_left_shift(pair, 12, out=low).bitwise_right_shift_(4)  # low nibble, signed, high byte
            pair.bitwise_right_shift_(4).bitwise_and_(0xFF).bitwise_or_(low)  # high nibble, signed, low byte
            torch.mul(pair.view(torch.int8), s, out=dest)
        else:
            u, t = temporary("dequantize_u", r1 - r0, torch.uint8), temporary("dequantize_t", r1 - r0, torch.uint8)
            torch.bitwise_xor(block.view(torch.uint8), 0x88, out=u)  # u = q + 8 in each nibble
            pairs = dest.view(r1 - r0, half, 2)
            pairs[..., 0].copy_(torch.bitwise_right_shift(u, 4, out=t))  # even column: the high nibble
            pairs[..., 1].copy_(torch.bitwise_and(u, 0x0F, out=t))
            dest.sub_(8).mul_(s)
    return out


def int4_inner_k_tiles(in_features: int) -> int | None:
    """The inner k-tiles (8, 4 or 2: 16 columns each) of torch's device int4 packing that divide in_features."""
    return next((t for t in (8, 4, 2) if in_features % (16 * t) == 0), None)


def tinygemm_pack(u: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
    """uint8 [N, K/2] nibbles (even column high) -> int32 [N/8, K/(16 t), 32, t/2]: the layout
    `_convert_weight_to_int4pack` writes on CUDA for the tensor-core kernel (torch's int4mm.cu). Lane l of a
    warp holds row 8 n + l // 4; its int32 for a pair of 16-column k-tiles holds the bytes at columns
    c, c+4 of the first tile and c, c+4 of the second (c = l % 4, in bytes), their high nibbles in the low
    16 bits and their low nibbles in the high 16, in that order. Works in bytes (little-endian int32), so
    its temporaries are a few times the packed size, not 8 int32 per byte."""
    n, half = u.shape
    outer, pairs = 2 * half // (16 * inner_k_tiles), inner_k_tiles // 2
    b = u.view(n // 8, 8, outer, pairs, 2, 2, 4)  # (n tile, lane // 4, k super-tile, pair, tile, +0/+4, lane % 4)
    nibbles = torch.stack((b >> 4, b & 0x0F), dim=-1)  # high first
    nibbles = nibbles.permute(0, 2, 1, 6, 3, 7, 4, 5).reshape(n // 8, outer, 32, pairs, 4, 2)
    packed = nibbles[..., 0] | (nibbles[..., 1] << 4)  # nibble 2i in the low half of byte i
    return packed.contiguous().view(torch.int32).view(n // 8, outer, 32, pairs)


def tinygemm_unpack(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of tinygemm_pack: int32 [N/8, K/(16 t), 32, t/2] -> uint8 [N, K/2]."""
    tiles, outer, _, pairs = packed.shape
    b = packed.contiguous().view(torch.uint8).view(tiles, outer, 32, pairs, 4)
    nibbles = torch.stack((b & 0x0F, b >> 4), dim=-1)  # (..., pairs, byte, low/high) = nibble 0..7
    nibbles = nibbles.view(tiles, outer, 8, 4, pairs, 2, 2, 2).permute(0, 2, 1, 4, 6, 7, 3, 5)
    return ((nibbles[..., 0] << 4) | nibbles[..., 1]).reshape(tiles * 8, outer * pairs * 16)


def int4_device_ops(device: torch.device):
    """(packing, product) of the CUDA / MPS int4 path for tensors on `device`: torch's ops on a GPU; for CPU
    and meta tensors on a forced GPU path, stand-ins (torch has no CPU kernel of the device packing, and its
    meta kernel of the device product fails on plain meta tensors): tinygemm_pack, and torch's CPU product of
    the same values."""
    if device.type in ("cpu", "meta"):
        return tinygemm_pack, _emulated_int4pack_mm
    return torch.ops.aten._convert_weight_to_int4pack, torch.ops.aten._weight_int4pack_mm


def int8_device_product(device: torch.device):
    """torch's int8 weight-only product (it has CPU and meta kernels too, so no stand-in is needed)."""
    return torch.ops.aten._weight_int8pack_mm


def stored_from_tinygemm(packed: torch.Tensor) -> torch.Tensor:
    """The checkpoint layout (int8 [N, K/2]) of a weight in the tinygemm layout."""
    return (tinygemm_unpack(packed) ^ 0x88).view(torch.int8)


def _emulated_int4pack_mm(x: torch.Tensor, packed: torch.Tensor, group: int, scales_and_zeros: torch.Tensor):
    """CPU tensors on a forced GPU path: the CUDA / MPS int4 product, computed by torch's CPU kernel on the
    same values (read back from the tinygemm layout) with the same scales and zeros."""
    cpu = _int4pack_weight(stored_from_tinygemm(packed))
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, cpu, group, scales_and_zeros)


BACKWARD_BLOCK_BYTES = 64 << 20  # de-quantized weight per block of a backward pass


class _FrozenQuantizedProduct(torch.autograd.Function):
    """y = layer(x) for training through a quantized layer (P-Tuning v2 on an int4 / int8 model, gradients to
    layers below): the forward is the layer's own inference product, recording nothing; the backward gives x's
    gradient grad_y (q * scale) from the weight de-quantized a block of output rows at a time (no float copy of
    the layer is kept between the passes), and the bias's (its sum over the tokens) where it is trained. The
    quantized weight and its scales stay frozen."""

    @staticmethod
    def forward(ctx, x, bias, layer):
        ctx.layer = layer
        return layer._product(x)  # autograd records nothing inside a Function's forward

    @staticmethod
    def backward(ctx, grad_y):
        layer = ctx.layer
        grad_x = layer._input_grad(grad_y) if ctx.needs_input_grad[0] else None
        grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0).to(layer.bias.dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_bias, None


class QuantizedLinear(nn.Module):
    """y = x (q * scale)^T + b, with q stored as int8 (8 bit) or packed nibbles (4 bit); with a LoRA adapter
    (add_lora), plus (x lora_A^T) lora_B^T * lora_scaling, kept beside the quantized weight."""

    lora_scaling = 0.0  # no LoRA until add_lora
    lora_dropout = 0.0

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
        key = _param_key(param)
        cached = self.__dict__.get("_f32_cache", {}).get(name)
        if cached is None or cached[0] != key:
            cached = (key, param.detach().float().contiguous())
            self.__dict__.setdefault("_f32_cache", {})[name] = cached
        return cached[1]

    # ---- the stored layout and the CUDA repacked form ----
    # `weight` holds the stored layout, except on CUDA after the first fused int4 call, when it holds the
    # tinygemm layout instead (self._tinygemm is True). Everything that reads or writes the stored layout
    # (saving, loading, moving or casting the module, the CPU paths) puts it back first.

    _tinygemm = False

    def stored_weight(self) -> torch.Tensor:
        """The weight in the checkpoint layout, whatever form the module holds it in."""
        return stored_from_tinygemm(self.weight.detach()) if self._tinygemm else self.weight

    def _restore_stored_layout(self) -> None:
        if self._tinygemm:
            with torch.inference_mode(False), torch.no_grad():
                self.weight.data = self.stored_weight()
            self._tinygemm = False
            self.__dict__.pop("_device_cache", None)

    def _apply(self, fn, *args, **kwargs):
        self._restore_stored_layout()
        return super()._apply(fn, *args, **kwargs)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._tinygemm:
            destination[prefix + "weight"] = self.stored_weight()

    def _load_from_state_dict(self, *args, **kwargs):
        self._restore_stored_layout()
        # every form made from the parameters: their keys miss an in-place load into inference tensors
        for cache in ("_device_cache", "_f32_cache", "_int4pack_cache", "_lora_bt_cache"):
            self.__dict__.pop(cache, None)
        return super()._load_from_state_dict(*args, **kwargs)

    def add_lora(self, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, trainable: bool = False,
                 dropout: float = 0.0) -> None:
        """Keep a LoRA update beside the quantized weight, as PEFT runs LoRA on a quantized base (QLoRA):
        forward adds (dropout(x) lora_a^T) lora_b^T * scaling, computed in lora_a's dtype, to the layer's product.
        Merging it into the weight instead would lose most of it: a trained update is far smaller than an int4
        step. lora_a is (r, in_features), lora_b (out_features, r); trainable: as parameters to train (the
        dropout then applies in training mode), else frozen."""
        r = lora_a.shape[0]
        if lora_a.shape != (r, self.in_features) or lora_b.shape != (self.out_features, r):
            raise ValueError(f"LoRA of shapes {tuple(lora_a.shape)} and {tuple(lora_b.shape)} does not fit a "
                             f"{self.in_features} -> {self.out_features} layer (needs (r, in) and (out, r))")
        self.lora_A = nn.Parameter(lora_a, requires_grad=trainable)
        self.lora_B = nn.Parameter(lora_b, requires_grad=trainable)
        self.lora_scaling, self.lora_dropout = float(scaling), float(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = None
        if torch.is_grad_enabled():
            if self.weight_scale.requires_grad:
                raise RuntimeError("a quantized layer's weight and scales cannot be trained (they stay frozen); "
                                   "train a P-Tuning prefix or LoRA")
            if x.requires_grad or (self.bias is not None and self.bias.requires_grad):
                y = _FrozenQuantizedProduct.apply(x, self.bias, self)
        if y is None:
            y = self._product(x)
        if not self.lora_scaling:
            return y
        a = self.lora_A
        h = x.to(a.dtype)
        if torch.is_grad_enabled() and (a.requires_grad or self.lora_B.requires_grad or x.requires_grad):
            if self.training and self.lora_dropout:
                h = F.dropout(h, self.lora_dropout)
            return y + (F.linear(F.linear(h, a), self.lora_B) * self.lora_scaling).to(y.dtype)
        # inference: B^T * scaling kept contiguous (x A^T times a transposed view of B took 74-215 us per 6B
        # linear at one row against 11), the update added into the fresh output in place
        delta = torch.mm(F.linear(h.reshape(-1, self.in_features), a), self._lora_bt())
        y = y.contiguous()
        y.view(-1, self.out_features).add_(delta.to(y.dtype))
        return y

    def _lora_bt(self) -> torch.Tensor:
        """lora_B^T * lora_scaling, contiguous: remade when B or the scaling changes."""
        key = (_param_key(self.lora_B), self.lora_scaling)
        cached = self.__dict__.get("_lora_bt_cache")
        if cached is None or cached[0] != key:
            cached = (key, (self.lora_B.detach().t() * self.lora_scaling).contiguous())
            self.__dict__["_lora_bt_cache"] = cached
        return cached[1]

    def _input_grad(self, grad_y: torch.Tensor) -> torch.Tensor:
        """grad_y (..., out) (q * scale) -> (..., in): the weight de-quantized in grad_y's dtype,
        BACKWARD_BLOCK_BYTES of it at a time."""
        rows = grad_y.reshape(-1, self.out_features)
        q, scale = self.stored_weight(), self.weight_scale
        step = max(1, BACKWARD_BLOCK_BYTES // (self.in_features * rows.element_size()))
        grad_x = None  # the blocks' products summed in float32 (one rounding to grad_y's dtype at the end)
        for n0 in range(0, self.out_features, step):
            w = dequantize_weight(q[n0:n0 + step], scale[n0:n0 + step], self.bits, rows.dtype)
            part = rows[:, n0:n0 + step] @ w
            if step >= self.out_features:
                return part.reshape(*grad_y.shape[:-1], self.in_features)
            grad_x = part.float() if grad_x is None else grad_x.add_(part)
        return grad_x.to(rows.dtype).reshape(*grad_y.shape[:-1], self.in_features)

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)
        path = code_path(x.device)
        if path in ("cuda", "mps"):
            y = self._device_fused(rows, path)
            return self._dequantized_linear(x) if y is None else y.reshape(*shape, self.out_features)
        self._restore_stored_layout()  # a forced GPU path has been left (tests)
        if x.device.type == "cpu" and path == "cpu" and kernels.available() and self.weight.is_contiguous():
            if rows.shape[0] <= kernels.decode_rows():
                if rows.dtype == torch.bfloat16:  # bf16 in and out in C: no float32 copies as tensors
                    y = kernels.linear_bf16io(rows.contiguous(), self.weight,
                                              kernels.LINEAR_KINDS[self.bits, kernels.has_integer_kernels()],
                                              self._f32("weight_scale"), self._f32("bias"))
                    return y.reshape(*shape, self.out_features)
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
        if x.device.type == "cpu":
            return self._dequantized_gemm(rows).to(x.dtype).reshape(*shape, self.out_features)
        return self._dequantized_linear(x)

    def _dequantized_linear(self, x: torch.Tensor) -> torch.Tensor:
        """The whole weight de-quantized in x's dtype, then the device's GEMM (GPUs, meta)."""
        weight = dequantize_weight(self.stored_weight(), self.weight_scale, self.bits, x.dtype)
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))

    def _dequantized_gemm(self, rows: torch.Tensor) -> torch.Tensor:
        """CPU without the native kernels, many tokens: kernels.blocked_gemm over blocks that torch's ops
        de-quantize (dequantize_into), in the GEMM dtype of the input."""
        work = kernels.gemm_dtype(rows.dtype)
        scale = self.weight_scale.detach().to(work)

        def fill(n0, n1, buffer):
            return dequantize_into(self.weight[n0:n1], scale[n0:n1], self.bits, buffer)

        y = kernels.blocked_gemm(rows, self.out_features, fill, work)
        if self.bias is not None:
            y = y + self.bias.to(work)
        return y

    def _device_fused(self, rows: torch.Tensor, path: str) -> torch.Tensor | None:
        """y from torch's fused weight-only product on CUDA / MPS (see the module docstring), or None where
        none applies: then the caller de-quantizes."""
        dtype = rows.dtype
        if rows.shape[0] > DEVICE_FUSED_MAX_ROWS or (path, self.bits, dtype) in _refused:
            return None
        if self.bits == 8:
            if dtype not in (torch.float32, torch.float16, torch.bfloat16) or (
                    path == "mps" and (self.out_features % 32 or self.in_features % 32)):
                return None

            fused = int8_device_product(rows.device)

            def product():
                return fused(rows.contiguous(), self.weight, self.weight_scale.to(dtype))
        else:
            allowed = (torch.bfloat16,) if path == "cuda" else (torch.float32, torch.float16, torch.bfloat16)
            group = int4pack_group_size(self.in_features)
            if (dtype not in allowed or self.out_features % 8 or group is None
                    or int4_inner_k_tiles(self.in_features) is None
                    or (path == "cuda" and not cuda_sm80(rows.device))):
                return None

            fused = int4_device_ops(rows.device)[1]

            def product():
                packed, scales = self._device_int4pack(rows, path, group)
                return fused(rows.contiguous(), packed, group, scales)
        try:
            y = product()
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, NotImplementedError) as e:
            if fused is _emulated_int4pack_mm:
                raise  # a stand-in refusing is a bug of ours, not a limit of the device
            _refused.add((path, self.bits, dtype))
            log.warning("int%d on %s: torch's fused product refused %s inputs (%s); de-quantizing per call "
                        "instead", self.bits, path, str(dtype).removeprefix("torch."), str(e).splitlines()[0])
            return None
        if self.bias is not None:
            y = y + self.bias.to(dtype)
        return y

    def _device_int4pack(self, rows: torch.Tensor, path: str, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(the weight in the device's int4 packed layout, scales_and_zeros [K/group, N, 2] in the input dtype),
        made on first use and kept; on CUDA the packed form takes the stored one's place (module docstring)."""
        cache = self.__dict__.setdefault("_device_cache", {})
        key = (_param_key(self.weight), path)
        if not self._tinygemm and cache.get("key") != key:
            cache.clear()
            with torch.inference_mode(False), torch.no_grad():  # a normal tensor: it may become the parameter
                u = unsigned_nibbles(self.weight.detach())
                tiles = int4_inner_k_tiles(self.in_features)
                pack = int4_device_ops(rows.device)[0]
                packed = pack(u, tiles)
                in_place = path == "cuda" and (pack is tinygemm_pack or (  # checked once per layer on a GPU
                    packed.device.type == "cuda" and torch.equal(packed, tinygemm_pack(u, tiles))))
                if in_place:
                    self.weight.data = packed
            self._tinygemm = in_place
            if not in_place:
                cache["key"], cache["packed"] = key, packed
            _log_once(f"int4 on {path}: torch's _weight_int4pack_mm on "
                      + ("weights repacked in place" if in_place else "a repacked copy of each weight"))
        packed = self.weight if self._tinygemm else cache["packed"]
        return packed, self._scales_and_zeros(cache, rows.dtype, group)

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
        cache = self.__dict__.setdefault("_int4pack_cache", {})
        wkey = _param_key(self.weight)
        if cache.get("key") != wkey:
            cache.clear()
            cache["key"] = wkey
            cache["packed"] = _int4pack_weight(self.weight.detach())
            _log_once("int4 on CPU without the native kernels: torch's _weight_int4pack_mm_for_cpu (weights "
                      "repacked once per layer)")
        group = int4pack_group_size(self.in_features)
        return cache["packed"], self._scales_and_zeros(cache, dtype, group), group

    def _scales_and_zeros(self, cache: dict, dtype: torch.dtype, group: int) -> torch.Tensor:
        """[K/group, N, 2] in dtype for torch's int4 products: the row's scale in every group, zero 0 (kept in
        cache until weight_scale changes)."""
        key = (dtype, _param_key(self.weight_scale))
        if cache.get("scales_key") != key:
            scale = self.weight_scale.detach().to(dtype)
            sz = torch.stack((scale, torch.zeros_like(scale)), dim=-1)
            cache["scales_key"] = key
            cache["scales"] = sz.expand(self.in_features // group, self.out_features, 2).contiguous()
        return cache["scales"]

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
    if getattr(model, "merged_adapter", None):
        log.warning("the LoRA adapter %s was merged into the float weights this quantizes, where most of a "
                    "trained update rounds away; load with quantize=%d (--quantize %d) instead, which keeps the "
                    "adapter beside the quantized layers", model.merged_adapter, bits, bits)
    swap_linears(model, bits, quantize_values=True)
    return model
