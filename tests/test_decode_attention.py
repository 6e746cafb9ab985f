"""The native decode attention over a bf16 KV cache (kernels.decode_attention, decode_attention_bf16 in
model/kernels.c) against a float64 reference, and its place in modeling.decode_attention. The shapes take each
of the kernel's paths: on CPUs with AMX, tiles for up to 16 heads a group and d a multiple of 32; without AMX,
16 heads in the lanes of a vector where a group has a multiple of 16 heads; per-head vector loops for the rest.
The AVX2 build (tests/test_kernels.py runs these tests on it too) puts 8 heads in the lanes of a vector and
declines other groups (None: the caller uses torch)."""

import pytest
import torch

from model import kernels, modeling

def _has_kernel() -> bool:
    one = torch.zeros(1, 1, 1, 16, dtype=torch.bfloat16)
    return kernels.decode_attention(one.expand(1, 8, 1, 16), one, one, None) is not None


def _declined(nh: int, g: int) -> bool:
    """Whether the kernel leaves this many heads a group to torch: the AVX2 build's lanes hold 8 heads."""
    return kernels.f32_library() is not None and (nh // g) % 8 != 0


native = pytest.mark.skipif(not _has_kernel(), reason="no native decode attention: "
                            f"{kernels.why_unavailable() or 'the AVX2 build has none'}")


def _inputs(B, nh, g, S, d, seed=0, spare=3):
    """q (B, nh, 1, d) and k, v as (B, g, S, d) views into a cache with `spare` more positions, bf16."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, nh, 1, d, generator=gen).bfloat16()
    k, v = (torch.randn(B, g, S + spare, d, generator=gen).bfloat16()[:, :, :S] for _ in range(2))
    return q, k, v


def _reference(q, k, v, mask):
    """float64 attention of the bf16 values; masked positions (False / -inf) left out altogether."""
    B, nh, _, d = q.shape
    g = k.shape[1]
    scores = q.double().reshape(B, g, nh // g, d) @ k.double().transpose(-1, -2) * d ** -0.5
    if mask is None:
        keep = torch.ones(scores.shape[0], 1, 1, scores.shape[-1], dtype=torch.bool)
    elif mask.dtype == torch.bool:
        keep = mask.expand(B, 1, 1, -1)
    else:
        keep = mask.expand(B, 1, 1, -1) != float("-inf")
        scores = scores + torch.where(keep, mask.double(), 0)
    scores = scores.masked_fill(~keep, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    values = v.double().masked_fill(~keep.reshape(B, 1, -1, 1), 0)  # never 0 * inf
    return (weights @ values).reshape(B, nh, 1, d)


def _close_to(out, ref):
    """Within one bf16 rounding of the float64 result (plus float32 sums)."""
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    err = (out.double() - ref).abs()
    bound = ref.abs() * 2.0 ** -8 + 1e-6
    assert bool((err <= bound).all()), f"max error {err.max().item():.3g}, worst over bound {(err / bound).max():.3g}"


def _masks(B, S, seed=0):
    gen = torch.Generator().manual_seed(seed + 1)
    keep = torch.rand(B, 1, 1, S, generator=gen) > 0.3
    keep[..., -1] = True  # the new token itself
    if B > 1:
        keep[1, ..., : S // 2] = False  # a left-padded row
    additive = torch.zeros(B, 1, 1, S).masked_fill(~keep, float("-inf"))
    soft = torch.randn(1, 1, 1, S, generator=gen)  # finite additive values, broadcast over the batch
    return {"none": None, "bool": keep, "additive": additive, "additive bf16": additive.bfloat16(), "soft": soft}


SHAPES = [  # B, nh, g, S, d
    (1, 32, 2, 1, 128), (1, 32, 2, 17, 128), (2, 32, 2, 300, 128), (1, 32, 2, 513, 128), (1, 32, 2, 4999, 128),
    (16, 32, 2, 129, 128), (4, 32, 2, 1500, 128),  # the 6B head shape
    (3, 8, 8, 77, 128), (2, 4, 4, 1030, 16),  # g = nh (no grouping), a small head
    (2, 6, 2, 131, 48), (1, 36, 4, 200, 64), (5, 16, 1, 33, 32),  # d % 32 == 16, 9 heads a group, one group
    (2, 32, 1, 300, 128),  # 32 heads a group: more than an AMX tile's 16 rows, so the vector loops
    (2, 48, 1, 260, 32),  # 48 heads a group: three vectors of 16 heads without AMX
]


@native
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-nh{}-g{}-S{}-d{}".format(*s))
@pytest.mark.parametrize("mask", ["none", "bool", "additive", "additive bf16", "soft"])
def test_kernel_equals_a_float64_reference(shape, mask):
    B, nh, g, S, d = shape
    q, k, v = _inputs(B, nh, g, S, d)
    m = _masks(B, S)[mask]
    out = kernels.decode_attention(q, k, v, m)
    if _declined(nh, g):
        assert out is None
        return
    _close_to(out, _reference(q, k, v, m))
    # the torch path it replaces: the same float32 arithmetic in another order, so at most one bf16 step apart
    old = modeling._float32_decode_attention(q, k, v, m)
    step = old.double().abs() * 2.0 ** -7 + 1e-6
    assert bool(((out.double() - old.double()).abs() <= step).all())


@native
@pytest.mark.parametrize("mask", ["bool", "additive"])
@pytest.mark.parametrize("poison", [float("inf"), float("nan"), 3e38])
def test_masked_positions_never_contribute(mask, poison):
    """Whatever a masked slot holds (a stale or never written cache slot) cannot reach the result."""
    B, nh, g, S, d = 3, 32, 2, 700, 128
    q, k, v = _inputs(B, nh, g, S, d)
    m = _masks(B, S)[mask]
    keep = m if m.dtype == torch.bool else m != float("-inf")
    hidden = ~keep.reshape(B, 1, S, 1).expand(B, g, S, d)
    k[hidden], v[hidden] = poison, -poison
    out = kernels.decode_attention(q, k, v, m)
    assert torch.isfinite(out).all()
    clean_k, clean_v = k.masked_fill(hidden, 0), v.masked_fill(hidden, 0)
    _close_to(out, _reference(q, clean_k, clean_v, m))


@native
def test_any_cache_layout():
    """Views into a preallocated cache, the (B, T, g, d) layout transposed (no cache), a batch slice of a
    larger cache and a broadcast mask all give the contiguous inputs' result; a non-dense last dimension is
    copied first."""
    B, nh, g, S, d = 3, 32, 2, 300, 128
    q, k, v = _inputs(B, nh, g, S, d, spare=50)
    mask = _masks(B, S)["bool"]
    want = kernels.decode_attention(q.contiguous(), k.contiguous(), v.contiguous(), mask)
    assert torch.equal(kernels.decode_attention(q, k, v, mask), want)
    bsgd = lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)  # noqa: E731  strides (S*g*d, d, g*d, 1)
    assert torch.equal(kernels.decode_attention(q, bsgd(k), bsgd(v), mask), want)
    strided = lambda t: torch.stack([t, t], dim=-1)[..., 0]  # noqa: E731  last dimension 2 apart
    assert torch.equal(kernels.decode_attention(q, strided(k), strided(v), mask), want)
    big_k, big_v = (torch.cat([t, t[:1]]) for t in (k, v))  # rows 0..B-1 of a cache of B+1 rows
    assert torch.equal(kernels.decode_attention(q, big_k[:B], big_v[:B], mask), want)
    one = mask[:1]
    assert torch.equal(kernels.decode_attention(q, k, v, one), kernels.decode_attention(q, k, v, one.expand(B, 1, 1, S)))
    assert torch.equal(kernels.decode_attention(q, k, v, one.reshape(S)),
                       kernels.decode_attention(q, k, v, one.expand(B, 1, 1, S)))


@native
def test_a_sequence_gets_the_same_bits_alone_or_in_a_batch():
    """Fixed chunks of positions: a row's sums do not depend on the batch, nor on masked positions past its end."""
    B, nh, g, S, d = 6, 32, 2, 1300, 128
    q, k, v = _inputs(B, nh, g, S, d)
    mask = _masks(B, S)["bool"]
    out = kernels.decode_attention(q, k, v, mask)
    for b in range(B):
        alone = kernels.decode_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], mask[b:b + 1])
        assert torch.equal(alone, out[b:b + 1])
    # the batched engine's steps: each row at its own length, the keys past it masked (BatchCache.step_mask)
    lengths = torch.tensor([1, 17, 512, 513, 1024, S])
    out = kernels.decode_attention(q, k, v, (torch.arange(S) < lengths[:, None])[:, None, None, :])
    for b, n in enumerate(lengths.tolist()):
        alone = kernels.decode_attention(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], None)
        assert torch.equal(alone, out[b:b + 1])


@native
def test_a_query_with_nothing_to_attend_to_is_nan_as_in_torch():
    q, k, v = _inputs(2, 16, 2, 40, 16)
    mask = torch.ones(2, 1, 1, 40, dtype=torch.bool)
    mask[1] = False
    out = kernels.decode_attention(q, k, v, mask)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[0]).all()
    assert torch.isnan(modeling._float32_decode_attention(q, k, v, mask)[1]).all()


@native
@pytest.mark.parametrize("change, error, message", [
    (lambda q, k, v: (q.float(), k, v), TypeError, "q must be a 4-d bf16"),
    (lambda q, k, v: (q, k.half(), v), TypeError, "k must be a 4-d bf16"),
    (lambda q, k, v: (q, k, v[0]), TypeError, "v must be a 4-d bf16"),
    (lambda q, k, v: (q.expand(2, 4, 2, 16), k, v), ValueError, "q \\(B, nh, 1, d\\)"),
    (lambda q, k, v: (q, k[:, :, :5], v), ValueError, "k, v \\(B, g, S, d\\)"),
    (lambda q, k, v: (q[:, :3], k, v), ValueError, "g dividing nh"),
    (lambda q, k, v: (q, k[:, :, :0], v[:, :, :0]), ValueError, "S >= 1"),
])
def test_kernel_rejects_wrong_arguments(change, error, message):
    q, k, v = _inputs(2, 4, 2, 10, 16)
    with pytest.raises(error, match=message):
        kernels.decode_attention(*change(q, k, v), None)


def test_decode_attention_uses_the_kernel_for_bf16_only(monkeypatch):
    """modeling.decode_attention: bf16 CPU tensors go to the kernel where it runs, the rest (float32, a head
    size the kernel does not take, no kernel) through torch, with the same results up to bf16 rounding."""
    calls = []
    real = kernels.decode_attention
    monkeypatch.setattr(kernels, "decode_attention", lambda *a: calls.append(a[0].dtype) or real(*a))
    q, k, v = _inputs(2, 8, 2, 50, 32)
    mask = _masks(2, 50)["bool"]
    out = modeling.decode_attention(q, k, v, mask)
    assert calls == [torch.bfloat16]
    _close_to(out, _reference(q, k, v, mask))
    calls.clear()
    out32 = modeling.decode_attention(q.float(), k.float(), v.float(), mask)
    assert calls == [] and out32.dtype == torch.float32
    odd = _inputs(2, 8, 2, 50, 24)  # d % 16: torch's path
    _close_to(modeling.decode_attention(*odd, mask), _reference(*odd, mask))
    monkeypatch.setattr(kernels, "decode_attention", lambda *a: None)  # no native kernel
    _close_to(modeling.decode_attention(q, k, v, mask), _reference(q, k, v, mask))


@native
def test_a_bf16_model_decodes_as_through_torch(monkeypatch):
    """End to end: a bf16 model reading a prompt token by token over its cache gives the torch path's logits
    (the kernel runs in every layer and step: the tiny model's head size is 16)."""
    from conftest import loaded

    model, tokenizer = loaded("chatglm2-tiny", "bfloat16")
    ids = torch.tensor([tokenizer.encode("Tell me a story about the weather in 北京 today, please.")])
    calls = []
    real = kernels.decode_attention

    def run(path):
        monkeypatch.setattr(kernels, "decode_attention", path)
        with torch.inference_mode():
            out = model(ids[:, :3])
            pieces = [model(ids[:, t:t + 1], past_key_values=out.past_key_values).logits
                      for t in range(3, ids.shape[1])]
        return torch.cat(pieces, dim=1).float()

    def native(*a):
        out = real(*a)
        calls.append(out is not None)
        return out

    native_logits = run(native)
    torch_logits = run(lambda *a: None)
    assert len(calls) == model.config.num_layers * (ids.shape[1] - 3)
    config = model.config
    assert set(calls) == {not _declined(config.num_attention_heads, config.num_kv_heads)}
    torch.testing.assert_close(native_logits, torch_logits, atol=0.05, rtol=0.02)
    assert torch.equal(native_logits.argmax(-1), torch_logits.argmax(-1))
