"""The ChatGLM-6B (first generation) network: GLM blocks with 2-D rotary positions and a prefix-LM mask.

Module attribute names equal the checkpoint tensor names (`transformer.layers.N.attention.query_key_value`, ...).
Per block, with alpha = sqrt(2 * 28) (see GLMBlock): a = LN(x); h = a * alpha + attention(a); m = LN(h);
x = m * alpha + mlp(m). The output projection is the word-embedding matrix (the stored lm_head is a copy).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from .config_v1 import ChatGLM1Config
from .modeling import Linear, ModelOutput, PrefixTuning, PrefixTuningMethods, StaticPrefix, TrainingConventions
from .cache import KVCache


ALPHA_LAYERS = 28


def rotary_cos_sin(head_dim: int, positions: torch.Tensor, dtype: torch.dtype):
    """cos, sin (B, 1, T, r) for one half of the head (r = head_dim / 2), in rotate-half order."""
    r = head_dim // 2
    # The frequencies are rounded to fp16, as the trained model saw them; the angles are then fp32.
    inv_freq = (1.0 / 10000 ** (torch.arange(0, r, 2, dtype=torch.float32, device=positions.device) / r)).half().float()
    angles = positions.float()[..., None] * inv_freq  # (B, T, r/2)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def apply_rotary_2d(x: torch.Tensor, rope) -> torch.Tensor:
    """First half of each head rotated by position, second half by block position."""
    (cos_p, sin_p), (cos_b, sin_b) = rope
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos_p + rotate_half(x1) * sin_p, x2 * cos_b + rotate_half(x2) * sin_b), dim=-1)


class SelfAttention(nn.Module):
    def __init__(self, config: ChatGLM1Config, layer_number: int, dtype=None, device=None):
        super().__init__()
        self.layer_number = layer_number
        self.num_heads = config.num_attention_heads
        self.head_dim = config.kv_channels
        self.query_key_value = Linear(config.hidden_size, 3 * config.hidden_size, bias=True, dtype=dtype,
                                      device=device)
        self.dense = Linear(config.hidden_size, config.hidden_size, bias=True, dtype=dtype, device=device)

    def forward(self, x, rope, mask, cache):
        B, T, _ = x.shape
        qkv = self.query_key_value(x).view(B, T, self.num_heads, 3 * self.head_dim).transpose(1, 2)
        q, k, v = qkv.split(self.head_dim, dim=-1)  # per head: [q | k | v]
        q, k = apply_rotary_2d(q, rope), apply_rotary_2d(k, rope)
        if cache is not None:
            k, v = cache.update(self.layer_number, k.contiguous(), v.contiguous())
        if T == 1:  # decode: scores are one row per head, so spell them out (closer to the original's sums)
            scores = self._decode_scores(q, k)  # (B, nh, 1, S) float32
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            out = scores.softmax(-1).to(v.dtype) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.dense(out.transpose(1, 2).reshape(B, T, -1))

    def _decode_scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """q k^T / sqrt(hd) in float32 for q (B, nh, 1, hd), k (B, nh, S, hd).

        fp16 / bf16: as the original, q divided by sqrt(hd) * (layer + 1) before the product and the float32
        scores multiplied by (layer + 1) again, since a raw fp16 q.k overflows past 65504 (inf, then NaN after
        the softmax). float32 / float64: the product, then the scale (the golden float32 logits match this way).
        """
        if q.dtype in (torch.float16, torch.bfloat16):
            coeff = float(self.layer_number + 1)
            return (q / (math.sqrt(self.head_dim) * coeff) @ k.transpose(-1, -2)).float() * coeff
        return (q @ k.transpose(-1, -2)).float() / math.sqrt(self.head_dim)


class MLP(nn.Module):
    def __init__(self, config: ChatGLM1Config, dtype=None, device=None):
        super().__init__()
        self.dense_h_to_4h = Linear(config.hidden_size, config.inner_hidden_size, bias=True, dtype=dtype,
                                    device=device)
        self.dense_4h_to_h = Linear(config.inner_hidden_size, config.hidden_size, bias=True, dtype=dtype,
                                    device=device)

    def forward(self, x):
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate="tanh"))


class GLMBlock(nn.Module):
    def __init__(self, config: ChatGLM1Config, layer_number: int, dtype=None, device=None):
        super().__init__()
        eps = config.layernorm_epsilon
        # sqrt(2 * 28) whatever num_layers says: the original never passes num_layers to its blocks, whose
        # default is 28 (the golden 2-layer model agrees only with 28).
        self.alpha = math.sqrt(2 * ALPHA_LAYERS)
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=eps, dtype=dtype, device=device)
        self.attention = SelfAttention(config, layer_number, dtype, device)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=eps, dtype=dtype, device=device)
        self.mlp = MLP(config, dtype, device)

    def forward(self, x, rope, mask, cache):
        a = self.input_layernorm(x)
        h = a * self.alpha + self.attention(a, rope, mask, cache)
        m = self.post_attention_layernorm(h)
        return m * self.alpha + self.mlp(m)


class ChatGLM1Model(PrefixTuning, nn.Module):
    """Embedding -> GLM blocks -> final LayerNorm -> logits through the embedding (the `transformer.` prefix).

    P-Tuning v2 (config.pre_seq_len), as the original ChatGLM-6B: the prefix encoder's keys/values precede the
    tokens' in every layer (see modeling.PrefixTuning; with prefix_projection its embedding is hidden_size wide);
    every query attends to them, and the 2-D position ids are the tokens' own (not shifted by the prefix)."""

    gradient_checkpointing = False  # set by PreTrainedModel.gradient_checkpointing_enable()
    PREFIX_PROJECTION_INPUT = "hidden_size"  # the original's v1 PrefixEncoder: Embedding(P, hidden) -> MLP

    def __init__(self, config: ChatGLM1Config, dtype=None, device=None):
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype, device=device)
        self.layers = nn.ModuleList(GLMBlock(config, i, dtype, device) for i in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon, dtype=dtype,
                                            device=device)
        # registered last, so that the model's dtype (its first floating parameter's) stays the network's
        self.prefix_encoder = self.make_prefix_encoder(device)

    @property
    def prefix_blocks(self) -> nn.ModuleList:
        return self.layers

    @property
    def prefix_dtype(self) -> torch.dtype:
        return self.word_embeddings.weight.dtype

    # ---- positions and masks ----------------------------------------------------------------------
    def prompt_position_ids(self, input_ids: torch.Tensor, past: int = 0) -> torch.Tensor:
        """(B, 2, T) position and block position ids of prompts (left padding allowed: pads get 0, 0). Worked out
        on the ids' device, without reading them on the host (no sync on a GPU): a token before the prompt's
        <bos> (its context) is at its own place with block position 0; from <bos> on, every token is at the
        place of the first [gMASK] (else [MASK], else <bos>) with block positions 1, 2, ..."""
        if past:
            raise ValueError("ChatGLM-6B prompts are read whole: pass position_ids to continue from a cache")
        cfg = self.config
        B, T = input_ids.shape
        col = torch.arange(T, device=input_ids.device)[None]
        if cfg.pad_token_id is None:
            start = input_ids.new_zeros(B, 1, dtype=torch.long)
        else:  # the leading pads: up to the first other token (no scan op, which MPS lacks for int64 on old macOS)
            start = torch.where(input_ids != cfg.pad_token_id, col, T).amin(1, keepdim=True)
        j = col - start  # place in the prompt (< 0: padding)
        real = j >= 0

        def first(token_id):  # (place of the prompt's first token_id, whether it has one), per row
            hit = (input_ids == token_id) & real
            return torch.where(hit, j, T).amin(1, keepdim=True), hit.any(1, keepdim=True)

        bos_at, has_bos = first(cfg.bos_token_id)
        context = torch.where(has_bos, bos_at, T - start)
        gmask_at, has_gmask = first(cfg.gmask_token_id)
        mask_at, has_mask = first(cfg.mask_token_id)
        mask_at = torch.where(has_gmask, gmask_at, torch.where(has_mask, mask_at, context))
        zero = torch.zeros_like(j)
        positions = torch.where(real, torch.where(j < context, j, mask_at), zero)
        blocks = torch.where(real & (j >= context), j - context + 1, zero)
        return torch.stack((positions, blocks), dim=1)

    @staticmethod
    def next_position_ids(last: torch.Tensor) -> torch.Tensor:
        """(B, 2, 1) ids of the token after `last` (..., -1:): same position, next block position."""
        last = last[..., -1:]
        return torch.cat((last[:, :1], last[:, 1:] + 1), dim=1)

    def _mask(self, input_ids, attention_mask, past: int, prefix: int = 0) -> torch.Tensor | None:
        """Boolean (B, 1, T, S), True = may attend: the prompt's context sees itself, the rest is causal. `past`
        counts every cached position, the first `prefix` of them a P-Tuning prefix that every query sees (the
        original prepends pre_seq_len 'attend' columns to its token mask)."""
        B, T = input_ids.shape
        S = past + T
        if attention_mask is not None and attention_mask.dim() == 4:
            return attention_mask
        if attention_mask is None and T == 1:  # one new token sees every cached position
            return None
        device = input_ids.device
        q = torch.arange(past, S, device=device)[:, None]
        k = torch.arange(S, device=device)[None, :]
        allowed = (k <= q)[None].expand(B, T, S)
        if past == prefix and T > 1:  # a prompt read whole: its context (before <bos>) sees itself both ways
            bos = (input_ids == self.config.bos_token_id).int()
            context = torch.where(bos.any(1), bos.argmax(1), torch.full((B,), T, device=device))
            allowed = allowed | (k[None] < prefix + context[:, None, None])
        if attention_mask is not None:  # (B, S) key padding: 0 at pads
            allowed = allowed & attention_mask[:, None, :].bool()
        # several tokens: always a mask, even one that blocks nothing (a prompt without <bos>), since asking
        # whether it blocks anything would read a value on the host (a sync on a GPU)
        return (allowed | (k == q)[None])[:, None]  # a padded query row still sees itself

    def forward(self, input_ids, position_ids=None, attention_mask=None, past_key_values: KVCache | None = None,
                use_cache: bool = True, last_logits_only: bool = False) -> ModelOutput:
        B, T = input_ids.shape
        x = self.word_embeddings(input_ids)
        prefix = self.prefix_length
        cache = self.prefixed_cache(past_key_values, B, T, use_cache, x.dtype, x.device)
        past = cache.length if cache is not None else 0
        if position_ids is None:  # the tokens' own positions: the prefix does not shift them
            position_ids = self.prompt_position_ids(input_ids, past - prefix)
        rope = (rotary_cos_sin(self.config.kv_channels, position_ids[:, 0], x.dtype),
                rotary_cos_sin(self.config.kv_channels, position_ids[:, 1], x.dtype))
        mask = self._mask(input_ids, self.token_key_padding(attention_mask, B, past, T), past, prefix)
        checkpointed = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if checkpointed:  # recomputed in the backward pass (no cache while training)
                x = self._gradient_checkpointing_func(layer.__call__, x, rope, mask, cache)
            else:
                x = layer(x, rope, mask, cache)
        if isinstance(cache, StaticPrefix):
            cache = None
        elif cache is not None:
            cache.advance(T)
        if last_logits_only:
            x = x[:, -1:]
        weight = self.word_embeddings.weight  # tied output: on the embedding's device, wherever the norm ran
        x = self.final_layernorm(x).to(weight.device)
        return ModelOutput(logits=F.linear(x, weight),
                           past_key_values=cache if use_cache else None)


class ChatGLM1PreTrainedModel(TrainingConventions, PrefixTuningMethods, PreTrainedModel):
    """The ChatGLM-6B network as a transformers PreTrainedModel: no chat and no loading here (the public
    model.chatglm.ChatGLM1ForConditionalGeneration adds chat(), from_pretrained(), quantize(), save_pretrained())."""

    config_class = ChatGLM1Config
    base_model_prefix = "transformer"
    main_input_name = "input_ids"
    _no_split_modules = ["GLMBlock"]
    supports_gradient_checkpointing = True
    BLOCK_LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")

    def __init__(self, config: ChatGLM1Config, dtype=None, device=None):
        super().__init__(config)
        self.transformer = ChatGLM1Model(config, dtype, device)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.layers

    def _embedding_owner(self) -> nn.Module:
        return self.transformer

    def _checkpointed(self) -> nn.Module:
        return self.transformer

    def forward(self, input_ids, position_ids=None, attention_mask=None, past_key_values=None,
                use_cache: bool | None = None, return_last_logit: bool = False, labels=None,
                **kwargs) -> ModelOutput:
        """As the original: attention_mask is its (B, 1, T, T) mask with True (or 1) = blocked. labels: the
        shifted cross-entropy `loss` (see modeling.TrainingConventions.causal_lm_forward)."""
        if attention_mask is not None and attention_mask.dim() == 4:
            attention_mask = ~attention_mask[:, 0, -1, :].bool()  # the keys the last real query may see
        return self.causal_lm_forward(input_ids, position_ids, attention_mask, past_key_values, use_cache,
                                      return_last_logit, labels)

    def prompt_position_ids(self, input_ids, past: int = 0):
        return self.transformer.prompt_position_ids(input_ids, past)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None,
                                      position_ids=None, use_cache: bool | None = None, **kwargs) -> dict:
        """The inputs of the next forward of a generation loop (transformers' convention): with a cache, only
        the ids it does not hold yet, at their 2-D positions (counted over the whole sequence)."""
        if position_ids is None:
            position_ids = self.transformer.prompt_position_ids(input_ids)
        if past_key_values is not None:
            held = past_key_values.length - self.prefix_length  # tokens held (a P-Tuning prefix is no token)
            input_ids, position_ids = input_ids[:, held:], position_ids[..., held:]
        return {"input_ids": input_ids, "past_key_values": past_key_values, "attention_mask": attention_mask,
                "position_ids": position_ids, "use_cache": True if use_cache is None else use_cache,
                "return_last_logit": True}

    def next_position_ids(self, last):
        return self.transformer.next_position_ids(last)
