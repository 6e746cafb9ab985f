"""Per-platform choices (attention kernels, sampling, stop-id lookup) checked on a CPU.

The CUDA and MPS branches are chosen by pure functions called here with those device types, and
CHATGLM_FORCE_GPU_PATHS runs them on CPU tensors (tests/test_model_golden.py runs the golden cases so).
"""

import pytest
import torch
import torch.nn.functional as F

from conftest import golden_case, loaded
from model.devices import code_path, parse_version
from model.generation import SamplingParams, draw_by_cdf, is_in, next_token, warp
from model.modeling import AttentionPlan, attention_plan, planned_attention

HALF = (torch.float16, torch.bfloat16)


def plan(device_type, **kwargs):
    args = dict(grouped=True, decode=False, masked=False, dtype=torch.bfloat16, torch_version=(2, 13),
                flash_arch=True, grad=False)
    args.update(kwargs)
    return attention_plan(device_type, **args)


def test_cpu_plan_is_unchanged():
    assert plan("cpu", decode=True) == AttentionPlan(grouped_decode=True, expand_kv=False, explicit_causal=False)
    assert plan("cpu", decode=True, grad=True).grouped_decode is False
    assert plan("cpu", masked=True) == AttentionPlan(grouped_decode=False, expand_kv=False, explicit_causal=False)


@pytest.mark.parametrize("dtype", HALF + (torch.float32,))
@pytest.mark.parametrize("decode", [False, True])
def test_cuda_expands_kv_unless_flash_takes_the_call(dtype, decode):
    # flash: GQA without a mask in half precision on sm80+
    assert plan("cuda", dtype=dtype, decode=decode).expand_kv is (dtype == torch.float32)
    # a mask (engine decode steps, padded batches, chunked prefill, a second chat turn) or a pre-Ampere GPU
    assert plan("cuda", dtype=dtype, decode=decode, masked=True).expand_kv is True
    assert plan("cuda", dtype=dtype, decode=decode, flash_arch=False).expand_kv is True
    assert plan("cuda", dtype=dtype, decode=decode, torch_version=(2, 4)).expand_kv is True
    assert plan("cuda", grouped=False, dtype=dtype, masked=True).expand_kv is False  # nothing to expand
    assert not plan("cuda", dtype=dtype, decode=decode).grouped_decode
    assert not plan("cuda", dtype=dtype, decode=decode).explicit_causal


@pytest.mark.parametrize("version", [(2, 5), (2, 6), (2, 9), (2, 13), (2, 14)])
@pytest.mark.parametrize("dtype", HALF + (torch.float32,))
def test_mps_never_uses_enable_gqa_or_is_causal(version, dtype):
    for decode in (False, True):
        for masked in (False, True):
            p = plan("mps", dtype=dtype, decode=decode, masked=masked, torch_version=version)
            assert p == AttentionPlan(grouped_decode=False, expand_kv=True, explicit_causal=True)


def test_code_path_switch(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("CHATGLM_FORCE_GPU_PATHS", raising=False)
    assert code_path(cpu) == "cpu"
    for value, expected in (("1", "cuda"), ("cuda", "cuda"), ("mps", "mps"), ("0", "cpu")):
        monkeypatch.setenv("CHATGLM_FORCE_GPU_PATHS", value)
        assert code_path(cpu) == expected
    monkeypatch.setenv("CHATGLM_FORCE_GPU_PATHS", "tpu")
    with pytest.raises(ValueError, match="CHATGLM_FORCE_GPU_PATHS"):
        code_path(cpu)
    # meta tensors too (tests/test_meta.py runs the GPU branches on meta); GPU tensors never
    monkeypatch.setenv("CHATGLM_FORCE_GPU_PATHS", "mps")
    assert code_path(torch.device("meta")) == "mps" and code_path(torch.device("cuda")) == "cuda"
    monkeypatch.delenv("CHATGLM_FORCE_GPU_PATHS")
    assert code_path(torch.device("meta")) == "meta"
    assert parse_version("2.13.0+cpu") == (2, 13) and parse_version("2.10.0a0+git1234") == (2, 10)


def reference_attention(q, k, v, allowed):
    """float64 attention, query head h reading group h // (nh / g); allowed (.., T, S) bool or None."""
    g, nh = k.shape[1], q.shape[1]
    k = k.double().repeat_interleave(nh // g, dim=1)
    v = v.double().repeat_interleave(nh // g, dim=1)
    scores = q.double() @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("device_type", ["cpu", "cuda", "mps"])
@pytest.mark.parametrize("T,S,masked", [(5, 5, False), (5, 5, True), (1, 7, False), (1, 7, True), (3, 8, True)])
def test_planned_attention_is_grouped_attention(device_type, T, S, masked):
    gen = torch.Generator().manual_seed(T * 100 + S)
    q = torch.randn(2, 8, T, 16, generator=gen)
    k, v = torch.randn(2, 2, S, 16, generator=gen), torch.randn(2, 2, S, 16, generator=gen)
    causal = torch.ones(T, S, dtype=torch.bool).tril(S - T)  # (T, S): the last T keys are the queries'
    itself = torch.arange(S)[None, :] == torch.arange(S - T, S)[:, None]
    allowed = (causal & (torch.rand(2, 1, 1, S, generator=gen) > 0.3)) | itself if masked else None
    p = plan(device_type, decode=T == 1, masked=masked, dtype=torch.float32)
    out = planned_attention(q, k, v, allowed, p)
    expected = reference_attention(q, k, v, allowed if masked else (causal if T == S else None))
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)


def sdpa_calls(monkeypatch, path, run):
    """The (q heads, k heads, mask given, is_causal, enable_gqa, T) of every SDPA call run() makes on `path`."""
    calls, sdpa = [], F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False, **kwargs):
        calls.append((q.shape[1], k.shape[1], attn_mask is not None, is_causal, enable_gqa, q.shape[2]))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=enable_gqa, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    monkeypatch.setenv("CHATGLM_FORCE_GPU_PATHS", path)
    run()
    return calls


def padded_batch_generation():
    model, tokenizer = loaded("chatglm2-tiny")
    enc = tokenizer(golden_case("chatglm2-tiny")["runs"]["float32"]["batch"]["texts"], padding=True,
                    return_tensors="pt")
    single = tokenizer(["你好"], return_tensors="pt")
    return lambda: (model.generate(**enc, max_new_tokens=3), model.generate(**single, max_new_tokens=3))


def test_forced_cuda_path_expands_grouped_kv_for_masked_calls(monkeypatch):
    calls = sdpa_calls(monkeypatch, "cuda", padded_batch_generation())
    assert any(masked and T == 1 for _, _, masked, _, _, T in calls)  # batched decode steps reached SDPA
    # float32: no flash, so every call expanded (the memory-efficient kernel), none with enable_gqa
    assert calls and all(nh == g and not gqa for nh, g, _, _, gqa, _ in calls)


def test_forced_mps_path_avoids_enable_gqa_and_is_causal(monkeypatch):
    calls = sdpa_calls(monkeypatch, "mps", padded_batch_generation())
    assert any(T > 1 and masked for _, _, masked, _, _, T in calls)  # the unpadded prompt: explicit causal mask
    assert calls and all(nh == g and not gqa and not causal for nh, g, _, causal, gqa, _ in calls)


# ---- sampling and stop ids -------------------------------------------------------------------------
def test_draw_by_cdf_never_draws_zero_probability_and_follows_the_distribution():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.2, 0.3, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]]).repeat(20000, 1)
    gen = torch.Generator().manual_seed(1)
    ids = draw_by_cdf(probs, gen)
    assert ids.shape == (40000,)
    first, second = ids[0::2], ids[1::2]
    assert bool((probs[torch.arange(40000), ids] > 0).all())
    assert bool((second == 5).all())
    freq = torch.bincount(first, minlength=6).double() / first.numel()
    torch.testing.assert_close(freq, probs[0].double(), atol=0.015, rtol=0)
    again = draw_by_cdf(probs, torch.Generator().manual_seed(1))  # a request's seed reproduces its draws
    assert torch.equal(ids, again)


def test_draw_by_cdf_at_the_top_of_the_uniform_range(monkeypatch):
    """u * total rounding up to the total must not fall off the end onto a trailing zero-probability id."""
    probs = torch.tensor([[0.3, 0.7, 0.0, 0.0]])
    monkeypatch.setattr(torch, "rand", lambda *shape, **kw: torch.ones(*shape, dtype=kw.get("dtype")))
    assert draw_by_cdf(probs, None).tolist() == [1]
    monkeypatch.setattr(torch, "rand", lambda *shape, **kw: torch.zeros(*shape, dtype=kw.get("dtype")))
    assert draw_by_cdf(torch.tensor([[0.0, 0.0, 0.4, 0.6]]), None).tolist() == [2]


def test_next_token_samples_by_cdf_on_mps_and_by_multinomial_elsewhere(monkeypatch):
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(do_sample=True, temperature=0.8, top_k=10, top_p=0.9)
    monkeypatch.delenv("CHATGLM_FORCE_GPU_PATHS", raising=False)
    ours = next_token(logits, params, torch.Generator().manual_seed(7))
    probs = warp(logits, params).softmax(-1)
    assert torch.equal(ours, torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(7)).squeeze(1))
    monkeypatch.setenv("CHATGLM_FORCE_GPU_PATHS", "mps")
    monkeypatch.setattr(torch, "multinomial", lambda *a, **k: pytest.fail("multinomial on the MPS path"))
    drawn = next_token(logits, params, torch.Generator().manual_seed(7))
    assert torch.equal(drawn, draw_by_cdf(probs, torch.Generator().manual_seed(7)))
    assert bool((probs[torch.arange(3), drawn] > 0).all())


def test_is_in_matches_torch_isin():
    gen = torch.Generator().manual_seed(3)
    for n in (1, 2, 5):
        ids = torch.randint(0, 12, (64,), generator=gen)
        table = torch.randint(0, 12, (n,), generator=gen)
        assert torch.equal(is_in(ids, table), torch.isin(ids, table))
    big = torch.tensor([2**40, 5, -1])
    assert is_in(big, torch.tensor([2**40, -1])).tolist() == [True, False, True]
