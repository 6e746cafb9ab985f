"""The ChatGLM2 / ChatGLM3 network; module attribute names equal the checkpoint tensor names."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .cache import KVCache
from .config import ChatGLMConfig
from .hub import UnsupportedConfigError
from .devices import TORCH_VERSION, code_path, sm80_or_newer


class Linear(nn.Linear):
    """nn.Linear (same parameters and state dict) with faster CPU paths for inference.

    bf16 on a CPU: a few rows (decoding) through the native matrix-vector kernels (kernels.gemv_bf16: bf16
    products summed in float32, as torch's bf16 matmul, at about the memory bandwidth, where torch's
    matrix-vector path for these shapes is compute-bound); more rows on CPUs without native bf16 GEMMs
    through float32 GEMMs over the weight widened block by block (kernels.blocked_gemm). float32 on a CPU: a
    few rows through kernels_avx2.c on AVX2 CPUs (kernels.linear_f32), else oneDNN (kernels.onednn_linear).
    Anything else: nn.Linear.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.device.type != "cpu" or x.dtype != self.weight.dtype:
            return self._torch_linear(x)
        if x.dtype == torch.bfloat16 and self.weight.is_contiguous():
            rows = x.reshape(-1, self.in_features)
            bias = None if self.bias is None else self.bias.float()
            if rows.shape[0] <= kernels.decode_rows() and kernels.has_bf16():
                y = kernels.linear_bf16io(rows.contiguous(), self.weight, 4, None, bias)
                return y.reshape(*x.shape[:-1], self.out_features)
            if kernels.gemm_dtype(x.dtype) == torch.float32:
                y = kernels.blocked_gemm(rows, self.out_features,
                                         lambda n0, n1, buffer: buffer.copy_(self.weight[n0:n1]), torch.float32)
                if bias is not None:
                    y = y + bias
            else:
                return self._torch_linear(x)
            return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        if x.dtype == torch.float32:
            y = kernels.linear_f32(x, self.weight, self.bias)
            if y is None:
                y = kernels.onednn_linear(x, self.weight, self.bias)
            if y is not None:
                return y
        return self._torch_linear(x)

    def _torch_linear(self, x: torch.Tensor) -> torch.Tensor:
        """F.linear over x's rows as a 2-D view. torch's matmul of a [1, 1, K] slice of a longer sequence (the
        last token's hidden state, as the output layer gets it) with a weight that needs no gradient and no
        bias multiplies a copy of the weight expanded to a batch: on a CPU 2.2 s instead of 45 ms for the
        65024x4096 bf16 output layer of a 6B model, on a GPU a transient copy of it."""
        return F.linear(x.reshape(-1, self.in_features), self.weight, self.bias).reshape(*x.shape[:-1],
                                                                                         self.out_features)


def glue(x: torch.Tensor) -> bool:
    """Whether the steps between the matrix products run as the native bf16 glue kernels (kernels_glue.h: one
    C call instead of 3-13 torch ops each): bf16 on a CPU without autograd. Their results equal the torch
    code beside each call, but for RMSNorm's sum of squares, summed in another order (a last-bit difference
    in about 1 of 25,000 values), and SiLU's exp."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and not torch.is_grad_enabled() and \
        kernels.glue_available() and code_path(x.device) == "cpu"


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, dtype=None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size, dtype=dtype, device=device))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if glue(x) and self.weight.dtype == torch.bfloat16:
            return kernels.rmsnorm_bf16(x.contiguous(), self.weight, self.eps)
        variance = x.float().pow(2).mean(-1, keepdim=True)  # statistics in fp32 whatever the dtype
        return (self.weight * (x * torch.rsqrt(variance + self.eps))).to(x.dtype)


def rotary_cos_sin(config: ChatGLMConfig, position_ids: torch.Tensor, dtype: torch.dtype):
    """cos, sin of shape (B, 1, T, rot/2) for the interleaved rotary on the first half of each head."""
    rot = config.kv_channels // 2
    base = 10000.0
    positions = position_ids.float()
    if config.rope_ratio != 1:
        if config.rope_ratio_scales == "base":
            base = base * config.rope_ratio  # NTK-style base scaling (chatglm3-6b-32k / -128k)
        elif config.rope_ratio_scales == "positions":
            positions = positions / config.rope_ratio  # position interpolation (chatglm2-6b-32k)
        else:
            raise UnsupportedConfigError(f"rope_ratio_scales={config.rope_ratio_scales!r}")
    theta = 1.0 / (base ** (torch.arange(0, rot, 2, dtype=torch.float32, device=position_ids.device) / rot))
    angles = positions[..., None] * theta  # (B, T, rot/2), always fp32
    return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (2i, 2i+1) of the first 2*cos.shape[-1] dims of x (B, h, T, d)."""
    rot = 2 * cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    x0, x1 = x_rot.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)
    return torch.cat((rotated, x_pass), dim=-1)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of one new token per sequence: q (B, nh, 1, d) over k, v (B, g, S, d) with g | nh, query head h
    reading key group h // (nh / g); mask (B|1, 1, 1, S), bool (True = may attend) or additive. Scores and
    softmax in float32, as torch's fused CPU attention computes them.

    For CPU decoding instead of F.scaled_dot_product_attention, whose CPU kernel (torch 2.13) copies the
    grouped keys and values out per head: measured on the 6B shape (32 heads, 2 groups) in bf16, one layer at
    512 cached tokens took 4.5 ms there and 0.33 ms here, at 8192 tokens 50 ms and 6.9 ms.

    bf16 on a CPU with the AVX-512 kernels: kernels.decode_attention, the same float32 arithmetic on the cache
    as stored (widening it to float32 first wrote and read twice its bytes every layer and step). Measured on a
    2-core Sapphire Rapids Xeon (bench/decode_attention.py), one layer of the 6B shape at 8192 cached tokens:
    1.18 ms against 2.66 ms (512 tokens: 0.11 against 0.28 ms); the mid model decodes at 94% of its
    short-context rate on top of 8192 cached tokens, against 86%.
    """
    if q.dtype == k.dtype == v.dtype == torch.bfloat16 and q.device.type == "cpu":
        out = kernels.decode_attention(q, k, v, mask)
        if out is not None:
            return out
    return _float32_decode_attention(q, k, v, mask)


def _float32_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              mask: torch.Tensor | None) -> torch.Tensor:
    """decode_attention through torch: keys and values widened to float32, two float32 matmuls."""
    B, nh, _, d = q.shape
    g = k.shape[1]
    k, v = _as_float32(k, "keys"), _as_float32(v, "values")
    scores = torch.matmul(q.reshape(B, g, nh // g, d).float(), k.transpose(-1, -2))  # (B, g, nh/g, S)
    scores.mul_(d ** -0.5)
    if mask is not None:
        if mask.dtype == torch.bool:
            scores.masked_fill_(~mask, float("-inf"))
        else:
            scores.add_(mask.float())
    out = torch.matmul(torch.softmax(scores, dim=-1), v)
    return out.to(q.dtype).reshape(B, nh, 1, d)


@dataclass(frozen=True)
class AttentionPlan:
    grouped_decode: bool  # decode_attention: grouped matmuls in float32 (CPU decoding)
    expand_kv: bool  # repeat each K/V group for its nh/g query heads before SDPA instead of enable_gqa
    explicit_causal: bool  # a boolean causal mask instead of is_causal=True


def attention_plan(device_type: str, *, grouped: bool, decode: bool, masked: bool, dtype: torch.dtype,
                   torch_version: tuple[int, int] = TORCH_VERSION, flash_arch: bool = False,
                   grad: bool = False) -> AttentionPlan:
    """How one attention call runs on `device_type` ("cpu", "cuda", "mps", ...); pure, for tests to call.

    grouped: fewer K/V groups than query heads; decode: one new token; masked: an explicit mask is passed;
    flash_arch: a CUDA GPU the flash kernel runs on (sm80+, flash enabled).
    - CPU: decoding through decode_attention (no autograd), otherwise SDPA with enable_gqa, as before.
    - CUDA: with enable_gqa=True only the flash kernel accepts GQA (torch <= 2.13), and flash takes no mask,
      no float32 and no pre-Ampere GPU; anything else fell back to the math kernel, which materialises
      (B, nh, T, S) float scores (8 rows at 8K context: 512 MiB per layer and step). Expanding K/V to all
      heads (as the original does) lets the memory-efficient kernel take masked, float32 and sm7x calls.
    - MPS: K/V always expanded and causality always an explicit mask: enable_gqa crashes (torch <= 2.6),
      decode with q (1, 32, 1, 128) over k (1, 2, S, 128) gives wrong results (2.8-2.10), is_causal=True
      leaks future tokens in half precision.
    - torch < 2.5 has no enable_gqa: expanded everywhere.
    """
    no_gqa = torch_version < (2, 5)
    if device_type == "cpu":
        return AttentionPlan(grouped_decode=decode and not grad, expand_kv=grouped and no_gqa, explicit_causal=False)
    if device_type == "cuda":
        flash_gqa = flash_arch and not masked and dtype in (torch.float16, torch.bfloat16)
        return AttentionPlan(grouped_decode=False, expand_kv=grouped and (no_gqa or not flash_gqa),
                             explicit_causal=False)
    return AttentionPlan(grouped_decode=False, expand_kv=grouped, explicit_causal=device_type == "mps")


def flash_arch(device: torch.device) -> bool:
    """Whether the flash SDPA kernel can run on `device`: an sm80+ CUDA GPU with flash enabled."""
    if device.type != "cuda" or not torch.backends.cuda.flash_sdp_enabled():
        return False
    return sm80_or_newer(device.index if device.index is not None else torch.cuda.current_device())


def planned_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                      plan: AttentionPlan) -> torch.Tensor:
    """SDPA of q (B, nh, T, d) over k, v (B, g, S, d), query head h reading group h // (nh / g), as planned."""
    T, S = q.shape[2], k.shape[2]
    causal = mask is None and T > 1 and S == T
    if causal and plan.explicit_causal:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()  # (T, S), True = may attend
        causal = False
    if plan.expand_kv and k.shape[1] != q.shape[1]:
        repeat = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(repeat, dim=1)  # (B, nh, S, d): a copy of each group per query head
        v = v.repeat_interleave(repeat, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                          enable_gqa=k.shape[1] != q.shape[1])


def _as_float32(t: torch.Tensor, slot: str) -> torch.Tensor:
    """t in float32, widened into a buffer this thread reuses (kernels.scratch: no fresh pages per layer and
    step). The buffer grows to the largest cache this thread has read and is kept."""
    if t.dtype == torch.float32:
        return t
    return kernels.scratch(slot, t.numel(), torch.float32).view(t.shape).copy_(t)


class SelfAttention(nn.Module):
    def __init__(self, config: ChatGLMConfig, layer_number: int, dtype=None, device=None):
        super().__init__()
        self.layer_number = layer_number
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.kv_channels
        self.query_key_value = Linear(config.hidden_size, config.qkv_size,
                                         bias=config.add_bias_linear or config.add_qkv_bias,
                                         dtype=dtype, device=device)
        self.dense = Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.add_bias_linear,
                               dtype=dtype, device=device)

    def forward(self, x, cos, sin, mask, cache: KVCache | None):
        B, T, _ = x.shape
        qkv = self.query_key_value(x)
        rotated = glue(qkv) and qkv.is_contiguous() and B * T > 0
        if rotated:  # q's and k's heads lead each row: rotated in place in qkv (a hook keeping it sees that)
            pairs = cos.shape[-1]
            kernels.rotary_bf16_(qkv.view(B * T, -1), self.num_heads + self.num_kv_heads, self.head_dim,
                                 cos.expand(B, 1, T, pairs).reshape(B * T, pairs),
                                 sin.expand(B, 1, T, pairs).reshape(B * T, pairs))
        q, k, v = qkv.split(
            [self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.num_kv_heads * self.head_dim],
            dim=-1)
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, d)
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, g, T, d)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if not rotated:
            q = apply_rotary(q, cos, sin)
            k = apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_number, k, v)
        plan = attention_plan(code_path(q.device), grouped=self.num_kv_heads != self.num_heads, decode=T == 1,
                              masked=mask is not None, dtype=q.dtype, flash_arch=flash_arch(q.device),
                              grad=torch.is_grad_enabled())
        if plan.grouped_decode:
            out = decode_attention(q, k, v, mask)
        else:
            out = planned_attention(q, k, v, mask, plan)
        return self.dense(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: ChatGLMConfig, dtype=None, device=None):
        super().__init__()
        self.dense_h_to_4h = Linear(config.hidden_size, 2 * config.ffn_hidden_size, bias=config.add_bias_linear,
                                       dtype=dtype, device=device)
        self.dense_4h_to_h = Linear(config.ffn_hidden_size, config.hidden_size, bias=config.add_bias_linear,
                                       dtype=dtype, device=device)

    def forward(self, x):
        ab = self.dense_h_to_4h(x)
        if glue(ab):
            return self.dense_4h_to_h(kernels.silu_mul_bf16(ab.contiguous()))
        a, b = ab.chunk(2, dim=-1)
        return self.dense_4h_to_h(F.silu(a) * b)


class GLMBlock(nn.Module):
    def __init__(self, config: ChatGLMConfig, layer_number: int, dtype=None, device=None):
        super().__init__()
        self.post_norm_residual = config.apply_residual_connection_post_layernorm
        self.input_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon, dtype, device)
        self.self_attention = SelfAttention(config, layer_number, dtype, device)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon, dtype, device)
        self.mlp = MLP(config, dtype, device)

    def forward(self, x, cos, sin, mask, cache):
        h = self.input_layernorm(x)
        x = (h if self.post_norm_residual else x) + self.self_attention(h, cos, sin, mask, cache)
        h = self.post_attention_layernorm(x)
        return (h if self.post_norm_residual else x) + self.mlp(h)


class Embedding(nn.Module):
    def __init__(self, config: ChatGLMConfig, dtype=None, device=None):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size, dtype=dtype, device=device)

    def forward(self, input_ids):
        return self.word_embeddings(input_ids)


class Encoder(nn.Module):
    def __init__(self, config: ChatGLMConfig, dtype=None, device=None):
        super().__init__()
        self.layers = nn.ModuleList(GLMBlock(config, i, dtype, device) for i in range(config.num_layers))
        self.final_layernorm = (RMSNorm(config.hidden_size, config.layernorm_epsilon, dtype, device)
                                if config.post_layer_norm else None)

    gradient_checkpointing = False  # set by PreTrainedModel.gradient_checkpointing_enable()

    def forward(self, x, cos, sin, mask, cache):
        checkpointed = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if checkpointed:  # recomputed in the backward pass (no cache while training: see ChatGLMModel)
                x = self._gradient_checkpointing_func(layer.__call__, x, cos, sin, mask, cache)
            else:
                x = layer(x, cos, sin, mask, cache)
        return self.final_layernorm(x) if self.final_layernorm is not None else x


class StaticPrefix:
    """The P-Tuning v2 prefix as a read-only stand-in for a KVCache, for training passes: update() returns the
    layer's prefix keys/values concatenated with the new ones (differentiable, stored nowhere), so the prefix
    encoder gets gradients and gradient checkpointing can recompute a block any number of times."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        self.keys, self.values = keys, values
        self.length = keys[0].shape[2] if keys else 0

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([self.keys[layer], key], dim=2), torch.cat([self.values[layer], value], dim=2)


class PrefixEncoder(nn.Module):
    """P-Tuning v2: the learned keys and values of pre_seq_len virtual tokens for every layer (the checkpoint's
    `transformer.prefix_encoder.*`): an embedding of the prefix positions, with prefix_projection through
    Linear(embedding -> hidden), tanh, Linear(hidden -> kv), as the original. Kept and computed in float32
    whatever the model's dtype (as the original demos keep it); only its output is cast to the model's dtype.

    The embedding of the projection is as wide as the keys/values (ChatGLM2/3) or as the hidden state
    (ChatGLM-6B: projection_input=hidden_size, its original's layout)."""

    def __init__(self, config, device=None, projection_input: int | None = None):
        super().__init__()
        kv_size = config.num_layers * 2 * config.num_kv_heads * config.kv_channels
        width = (projection_input or kv_size) if config.prefix_projection else kv_size
        self.embedding = nn.Embedding(config.pre_seq_len, width, dtype=torch.float32, device=device)
        self.trans = nn.Sequential(
            nn.Linear(width, config.hidden_size, dtype=torch.float32, device=device),
            nn.Tanh(),
            nn.Linear(config.hidden_size, kv_size, dtype=torch.float32, device=device),
        ) if config.prefix_projection else None

    def forward(self) -> torch.Tensor:
        """(pre_seq_len, num_layers * 2 * kv_heads * head_dim) float32: the embedding of arange(pre_seq_len)."""
        x = self.embedding.weight.float()
        if self.trans is not None:
            first, last = self.trans[0], self.trans[2]
            x = F.linear(x, first.weight.float(), first.bias.float()).tanh()
            x = F.linear(x, last.weight.float(), last.bias.float())
        return x


class PrefixTuning:
    """The P-Tuning v2 prefix of a network module (ChatGLMModel, ChatGLM1Model): `prefix_encoder` (None without
    a prefix) and `config`; the subclass names its blocks (prefix_blocks) and its word embeddings' dtype
    (prefix_dtype). Both families lay the prefix out alike: as the original's past_key_values, layer i's keys
    are the encoder output [:, 2i] and its values [:, 2i + 1], viewed as (pre_seq_len, num_layers * 2, kv_heads,
    head_dim), stored without rotary (the tokens' positions still start at 0)."""

    PREFIX_PROJECTION_INPUT: str | None = None  # the config field the projection's embedding is as wide as

    def make_prefix_encoder(self, device=None) -> PrefixEncoder | None:
        c = self.config
        if not c.pre_seq_len:
            return None
        width = getattr(c, self.PREFIX_PROJECTION_INPUT) if self.PREFIX_PROJECTION_INPUT else None
        return PrefixEncoder(c, device, projection_input=width)

    @property
    def prefix_length(self) -> int:
        """Cache positions the P-Tuning v2 prefix takes before the tokens (0 without one)."""
        return self.config.pre_seq_len if self.prefix_encoder is not None else 0

    def seed_prefix(self, cache):
        """Write the prefix keys/values into an empty cache (KVCache, or a BatchCache's RowCache) at positions
        0..pre_seq_len-1 of every layer and return the cache; a cache that is not empty, or a model without a
        prefix: unchanged. The one place a cache gets the prefix: every code path that creates a cache calls it."""
        if self.prefix_encoder is None or cache.length:
            return cache
        P = self.config.pre_seq_len
        cache.reserve(P)
        for i, (key, value) in enumerate(self.prefix_key_values(cache.batch_size)):
            cache.update(i, key, value)
        cache.advance(P)
        return cache

    def prefix_key_values(self, batch: int):
        """Each layer's prefix (key, value), (batch, kv_heads, pre_seq_len, head_dim) in the model's dtype on
        the layer's device (see seed_prefix)."""
        P, c = self.config.pre_seq_len, self.config
        kv = self.prefix_encoder().view(P, c.num_layers * 2, c.num_kv_heads, c.kv_channels)
        kv = kv.permute(1, 2, 0, 3)  # (num_layers * 2, kv_heads, P, head_dim)
        dtype = self.prefix_dtype
        for i, layer in enumerate(self.prefix_blocks):
            device = layer.input_layernorm.weight.device  # the layer's own device when split over GPUs
            yield tuple(t.to(device=device, dtype=dtype)[None].expand(batch, -1, -1, -1)
                        for t in (kv[2 * i], kv[2 * i + 1]))

    def prefixed_cache(self, cache, batch: int, new_tokens: int, use_cache: bool, dtype, device):
        """The cache a forward of `new_tokens` tokens reads and writes: a training pass with a prefix (no
        cache, gradients on) gets a StaticPrefix (the prefix concatenated in each layer, differentiably); else a
        new KVCache when use_cache or a prefix asks for one (a prefix is read from a cache, even without
        use_cache), which, as an empty given one, starts with the prefix."""
        prefix = self.prefix_length
        if cache is None and prefix and not use_cache and torch.is_grad_enabled():
            pairs = list(self.prefix_key_values(batch))
            return StaticPrefix([k for k, _ in pairs], [v for _, v in pairs])
        if cache is None and (use_cache or prefix):
            cache = KVCache.for_model(self.config, batch, dtype, device, capacity=max(new_tokens, 256) + prefix)
        if cache is not None:
            self.seed_prefix(cache)
            cache.reserve(new_tokens)
        return cache

    def token_key_padding(self, attention_mask, batch: int, cached: int, new_tokens: int):
        """A (B, S) key-padding mask that covers the tokens only (the original's convention) gets the prefix's
        columns in front, all 'attend'; one that covers the prefix too is unchanged."""
        prefix = self.prefix_length
        if prefix and attention_mask is not None and attention_mask.dim() == 2 \
                and attention_mask.shape[-1] == cached - prefix + new_tokens:
            return torch.cat([attention_mask.new_ones(batch, prefix), attention_mask], dim=-1)
        return attention_mask


def build_attention_mask(attention_mask: torch.Tensor | None, past_length: int, new_length: int,
                         device) -> torch.Tensor | None:
    """Boolean (B|1, 1, T, S) mask, True = may attend; None when plain causal attention is right.

    attention_mask is (B, S) with 0 at (left) padding, covering cached and new tokens. A query may see
    every earlier real key and itself (so rows at padded positions are never empty).
    """
    if attention_mask is None and (new_length == 1 or past_length == 0):
        return None
    total = past_length + new_length
    q_idx = torch.arange(past_length, total, device=device)[:, None]
    k_idx = torch.arange(total, device=device)[None, :]
    allowed = (k_idx <= q_idx)[None, None]  # (1, 1, T, S)
    if attention_mask is not None:
        if attention_mask.shape[-1] != total:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions, expected {total} "
                             f"({past_length} cached + {new_length} new)")
        allowed = (allowed & attention_mask[:, None, None, :].bool()) | (k_idx == q_idx)[None, None]
    return allowed


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, vocab), or (B, 1, vocab) with last_logits_only
    past_key_values: KVCache | None = None
    loss: torch.Tensor | None = None  # with labels: the shifted cross-entropy (see causal_lm_loss)

    def __getitem__(self, key):
        if isinstance(key, (int, slice)):  # transformers' to_tuple order: (loss,) logits, past_key_values
            return self.to_tuple()[key]
        return getattr(self, key)

    def to_tuple(self) -> tuple:
        return tuple(v for v in (self.loss, self.logits, self.past_key_values) if v is not None)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """transformers' causal LM loss: the logits at position t predict labels[t + 1]; -100 is ignored; the mean
    over counted tokens, computed in float32 whatever the logits' dtype."""
    logits = logits[:, :-1].float()
    labels = labels[:, 1:].to(logits.device)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def resolve_use_cache(model: nn.Module, use_cache: bool | None, labels, checkpointing: bool) -> bool:
    """transformers' convention: no cache while training (a pass with labels, or a module in training mode with
    gradients on), else a cache unless told otherwise; a checkpointed training pass never keeps one."""
    training = model.training and torch.is_grad_enabled()
    if use_cache is None:
        return not (training or labels is not None)
    return use_cache and not (training and checkpointing)


class ChatGLMModel(PrefixTuning, nn.Module):
    """Embedding -> blocks -> final norm -> output layer (the checkpoint's `transformer.` prefix)."""

    def __init__(self, config: ChatGLMConfig, dtype=None, device=None):
        super().__init__()
        self.config = config
        self.embedding = Embedding(config, dtype, device)
        self.encoder = Encoder(config, dtype, device)
        self.output_layer = Linear(config.hidden_size, config.padded_vocab_size, bias=False,
                                      dtype=dtype, device=device)
        # registered last, so that the model's dtype (its first floating parameter's) stays the network's
        self.prefix_encoder = self.make_prefix_encoder(device)

    @property
    def prefix_blocks(self) -> nn.ModuleList:
        return self.encoder.layers

    @property
    def prefix_dtype(self) -> torch.dtype:
        return self.embedding.word_embeddings.weight.dtype

    def forward(self, input_ids, position_ids=None, attention_mask=None, past_key_values: KVCache | None = None,
                use_cache: bool = True, last_logits_only: bool = False) -> ModelOutput:
        B, T = input_ids.shape
        x = self.embedding(input_ids)  # (B, T, H)
        prefix = self.prefix_length
        cache = self.prefixed_cache(past_key_values, B, T, use_cache, x.dtype, x.device)
        past = cache.length if cache is not None else 0
        if position_ids is None:  # the prefix takes cache positions, not rotary ones: tokens start at 0
            position_ids = torch.arange(past - prefix, past - prefix + T, device=input_ids.device).expand(B, T)
        cos, sin = rotary_cos_sin(self.config, position_ids, x.dtype)
        if attention_mask is not None and attention_mask.dim() == 4:  # (B, 1, T, S) bool, built by the caller
            mask = attention_mask
        else:
            attention_mask = self.token_key_padding(attention_mask, B, past, T)  # every query sees the prefix
            mask = build_attention_mask(attention_mask, past, T, input_ids.device)
        x = self.encoder(x, cos, sin, mask, cache)
        if isinstance(cache, StaticPrefix):
            cache = None
        elif cache is not None:
            cache.advance(T)
        if last_logits_only:
            x = x[:, -1:]
        return ModelOutput(logits=self.output_layer(x), past_key_values=cache if use_cache else None)


from transformers import PreTrainedModel  # noqa: E402


class TrainingConventions:
    """transformers' causal-LM training surface, shared by the PreTrainedModel classes of both networks (listed
    before PreTrainedModel): `labels` -> `loss`, the input embeddings (peft, enable_input_require_grads). A
    subclass says where its word embeddings are (_embedding_owner) and which module checkpoints its blocks
    (_checkpointed, with a `gradient_checkpointing` flag)."""

    @classmethod
    def can_generate(cls) -> bool:
        """False for transformers: generate() is the chat layer's own, not GenerationMixin's, so no
        GenerationConfig is attached (prepare_inputs_for_generation exists for peft and generation loops)."""
        return False

    def get_input_embeddings(self) -> nn.Embedding:
        return self._embedding_owner().word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self._embedding_owner().word_embeddings = value

    def causal_lm_forward(self, input_ids, position_ids, attention_mask, past_key_values,
                          use_cache: bool | None, return_last_logit: bool, labels) -> ModelOutput:
        """self.transformer's output, with labels (B, T) the shifted cross-entropy `loss` (-100 ignored) as
        transformers' causal LMs; no cache while training unless use_cache says so (see resolve_use_cache)."""
        use_cache = resolve_use_cache(self, use_cache, labels, self._checkpointed().gradient_checkpointing)
        out = self.transformer(input_ids, position_ids, attention_mask, past_key_values, use_cache,
                               last_logits_only=return_last_logit and labels is None)
        if labels is not None:
            out.loss = causal_lm_loss(out.logits, labels)
        return out


class PrefixTuningMethods:
    """The P-Tuning v2 surface of both families' PreTrainedModel classes (self.transformer a PrefixTuning)."""

    @property
    def prefix_length(self) -> int:
        """Cache positions the P-Tuning v2 prefix takes (0 without one); see PrefixTuning.seed_prefix."""
        return self.transformer.prefix_length

    def seed_prefix(self, cache):
        """An empty cache with the P-Tuning v2 prefix written in (see PrefixTuning.seed_prefix)."""
        return self.transformer.seed_prefix(cache)

    def add_prefix_encoder(self, pre_seq_len: int, prefix_projection: bool = False) -> PrefixEncoder:
        """A new P-Tuning v2 prefix encoder of pre_seq_len tokens (float32, initialised as the original's: the
        embedding N(0, 1)), to train; the config says pre_seq_len / prefix_projection from now on."""
        self.config.pre_seq_len, self.config.prefix_projection = pre_seq_len, prefix_projection
        device = self.get_input_embeddings().weight.device
        self.transformer.prefix_encoder = self.transformer.make_prefix_encoder(device)
        return self.transformer.prefix_encoder


class ChatGLMPreTrainedModel(TrainingConventions, PrefixTuningMethods, PreTrainedModel):
    """The ChatGLM2/3 network as a transformers PreTrainedModel: no chat and no loading here (the public
    model.chatglm.ChatGLMForConditionalGeneration adds chat(), from_pretrained(), quantize(), save_pretrained())."""

    config_class = ChatGLMConfig
    base_model_prefix = "transformer"
    main_input_name = "input_ids"
    _no_split_modules = ["GLMBlock"]
    supports_gradient_checkpointing = True
    # the linears of every block, by their path in it: what weight-only quantization swaps
    BLOCK_LINEARS = ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h",
                     "mlp.dense_4h_to_h")

    def __init__(self, config: ChatGLMConfig, dtype=None, device=None):
        super().__init__(config)
        self.transformer = ChatGLMModel(config, dtype, device)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.encoder.layers

    def _embedding_owner(self) -> nn.Module:
        return self.transformer.embedding

    def _checkpointed(self) -> nn.Module:
        return self.transformer.encoder

    def forward(self, input_ids, position_ids=None, attention_mask=None, past_key_values=None,
                use_cache: bool | None = None, return_last_logit: bool = False, labels=None,
                **kwargs) -> ModelOutput:
        """labels (B, T): the shifted cross-entropy `loss` (see TrainingConventions.causal_lm_forward)."""
        return self.causal_lm_forward(input_ids, position_ids, attention_mask, past_key_values, use_cache,
                                      return_last_logit, labels)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None,
                                      position_ids=None, use_cache: bool | None = None, **kwargs) -> dict:
        """The inputs of the next forward of a generation loop (transformers' convention): with a cache, only
        the ids it does not hold yet, at the positions that follow it."""
        if past_key_values is not None:
            held = past_key_values.length - self.prefix_length
            input_ids = input_ids[:, held:]
            if position_ids is not None:
                position_ids = position_ids[..., held:]
            else:
                position_ids = torch.arange(held, held + input_ids.shape[1],
                                            device=input_ids.device).expand_as(input_ids)
        return {"input_ids": input_ids, "past_key_values": past_key_values, "attention_mask": attention_mask,
                "position_ids": position_ids, "use_cache": True if use_cache is None else use_cache,
                "return_last_logit": True}
