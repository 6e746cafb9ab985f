"""Properties that must hold whatever the weights: cache exactness, streaming, batching, sampling."""

import pytest
import torch

from conftest import FLOAT_MODELS, loaded
from model.generation import SamplingParams, apply_repetition_penalty, generate_tokens, warp

PROMPTS = ["你好", "Tell me a story about the weather in 北京 today, please.", "def f(x):\n\treturn x"]


@pytest.mark.parametrize("name", FLOAT_MODELS)
@pytest.mark.slow
def test_cache_continuation_equals_full_forward(name):
    model, tokenizer = loaded(name)
    ids = torch.tensor([tokenizer.encode(PROMPTS[1])])
    with torch.inference_mode():
        full = model(ids, use_cache=False).logits
        n = 5
        out = model(ids[:, :n])
        cache = out.past_key_values
        pieces = [out.logits]
        pieces.append(model(ids[:, n:n + 4], past_key_values=cache).logits)  # a chunk on top of a cache
        for t in range(n + 4, ids.shape[1]):  # then one token at a time
            pieces.append(model(ids[:, t:t + 1], past_key_values=cache).logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-4, rtol=0)
    assert cache.length == ids.shape[1]


@pytest.mark.parametrize("name", FLOAT_MODELS)
@pytest.mark.slow
def test_cache_grows_past_its_capacity(name):
    model, tokenizer = loaded(name)
    ids = torch.tensor([tokenizer.encode(" ".join(PROMPTS) * 3)])
    from model.cache import KVCache

    cache = KVCache.for_model(model.config, 1, torch.float32, "cpu", capacity=4)
    with torch.inference_mode():
        step = [model(ids[:, i:i + 7], past_key_values=cache).logits for i in range(0, ids.shape[1], 7)]
        full = model(ids, use_cache=False).logits
    assert cache.capacity >= ids.shape[1]
    torch.testing.assert_close(torch.cat(step, dim=1), full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", FLOAT_MODELS)
@pytest.mark.slow
def test_reused_chat_cache_equals_rereading_the_conversation(name):
    """Turn 2 on turn 1's cache gives the reply of a fresh run over exactly the tokens in that cache."""
    model, tokenizer = loaded(name)
    kwargs = dict(do_sample=False, max_new_tokens=12)
    _, history, past = list(model.stream_chat(tokenizer, "你好", [], return_past_key_values=True, **kwargs))[-1]
    first_len = past.length
    reply2, _, past = list(model.stream_chat(tokenizer, "再说一遍", history, past_key_values=past,
                                             return_past_key_values=True, **kwargs))[-1]
    # Rebuild the same token sequence without a cache.
    v3 = tokenizer.family == "chatglm3"
    prompt1 = (tokenizer.build_chat_ids("你好", []) if v3 else tokenizer.encode(tokenizer.build_prompt("你好")))
    stop = [tokenizer.eos_token_id] + ([tokenizer.get_command("<|user|>"), tokenizer.get_command("<|observation|>")]
                                       if v3 else [])
    gen1 = model.generate(torch.tensor([prompt1]), max_new_tokens=12, eos_token_id=stop)[0, len(prompt1):].tolist()
    fed1 = prompt1 + gen1[:-1]
    assert len(fed1) == first_len
    cont = (tokenizer.build_chat_ids("再说一遍", [], prefix=False) if v3
            else tokenizer.build_continuation_ids("再说一遍", history))
    text = "".join(d for d, _ in model.stream_ids(tokenizer, fed1 + cont, params=SamplingParams(),
                                                   max_new_tokens=12, stop_ids=stop))
    expected = model.process_response(text, history + [{"role": "user", "content": "再说一遍"}])[0] if v3 \
        else model.process_response(text)
    assert reply2 == expected


@pytest.mark.parametrize("name", FLOAT_MODELS)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.slow
def test_stream_equals_chat(name, seed):
    model, tokenizer = loaded(name)
    kwargs = dict(do_sample=True, temperature=1.5, top_p=0.95, max_new_tokens=30, seed=seed)
    history = [] if name == "chatglm2-tiny" else [{"role": "system", "content": "You are ChatGLM3."}]
    response, hist = model.chat(tokenizer, "讲一个故事 tell me a story", history, **kwargs)
    items = list(model.stream_chat(tokenizer, "讲一个故事 tell me a story", history, **kwargs))
    assert items[-1] == (response, hist)
    texts = [r for r, _ in items]
    assert all(texts[i] != texts[i + 1] for i in range(len(texts) - 1))


@pytest.mark.parametrize("name", FLOAT_MODELS)
@pytest.mark.slow
def test_batched_greedy_equals_one_by_one(name):
    model, tokenizer = loaded(name)
    enc = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    batched = model.generate(**enc, max_new_tokens=15)[:, enc["input_ids"].shape[1]:]
    for i, prompt in enumerate(PROMPTS):
        single = tokenizer([prompt], return_tensors="pt")
        alone = model.generate(**single, max_new_tokens=15)[0, single["input_ids"].shape[1]:].tolist()
        got = batched[i].tolist()[:len(alone)]
        assert got == alone
        assert all(t == tokenizer.pad_token_id for t in batched[i].tolist()[len(alone):])


@pytest.mark.slow
def test_seeded_sampling_is_reproducible_and_greedy_limits():
    model, tokenizer = loaded("chatglm2-tiny")
    ids = torch.tensor([tokenizer.encode("你好")])

    def run(**kw):
        return model.generate(ids, max_new_tokens=10, **kw)[0].tolist()

    greedy = run()
    assert run(do_sample=True, temperature=1.3, seed=7) == run(do_sample=True, temperature=1.3, seed=7)
    assert run(do_sample=True, temperature=1.3, seed=7) != run(do_sample=True, temperature=1.3, seed=8)
    assert run(do_sample=True, top_k=1, seed=3) == greedy
    assert run(do_sample=True, top_p=1e-6, seed=3) == greedy
    assert run(do_sample=True, temperature=0.0, seed=3) == greedy


def test_warpers_and_penalty():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0, -1.0]])
    assert torch.isinf(warp(logits, SamplingParams(do_sample=True, top_k=2))).tolist() == [[True, True, False, False,
                                                                                            True]]
    probs = logits.softmax(-1)[0]
    # top_p keeps the smallest set of most likely tokens whose mass reaches p
    p = float(probs[3] + probs[2]) - 1e-4
    kept = ~torch.isinf(warp(logits, SamplingParams(do_sample=True, top_p=p)))
    assert kept.tolist() == [[False, False, True, True, False]]
    penalised = apply_repetition_penalty(logits, torch.tensor([[3, 4]]), 2.0)
    assert penalised.tolist() == [[1.0, 2.0, 3.0, 2.0, -2.0]]
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0).validate()


def test_stop_ids_and_length_limit():
    model, tokenizer = loaded("chatglm2-tiny")
    ids = torch.tensor([tokenizer.encode("你好")])
    free = model.generate(ids, max_new_tokens=6)[0, ids.shape[1]:].tolist()
    stopped = model.generate(ids, max_new_tokens=6, eos_token_id=free[2])[0, ids.shape[1]:].tolist()
    assert stopped == free[:3]
    with pytest.raises(ValueError, match="context"):
        list(generate_tokens(model, torch.zeros(1, model.config.seq_length + 1, dtype=torch.long),
                             max_new_tokens=1, params=SamplingParams()))


def test_conversation_too_long_is_a_clear_error():
    model, tokenizer = loaded("chatglm2-tiny")
    with pytest.raises(ValueError, match="clear the history"):
        model.chat(tokenizer, "x " * model.config.seq_length)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_equals_sdpa(dtype):
    """The CPU decoding attention equals torch's fused attention: grouped keys, padding masks (bool and additive)."""
    import torch.nn.functional as F

    from model.modeling import decode_attention

    gen = torch.Generator().manual_seed(0)
    B, nh, g, S, d = 3, 8, 2, 37, 16
    q = torch.randn(B, nh, 1, d, generator=gen).to(dtype)
    k, v = (torch.randn(B, g, S + 5, d, generator=gen).to(dtype)[:, :, :S] for _ in range(2))  # cache slices
    keep = torch.ones(B, 1, 1, S, dtype=torch.bool)
    keep[1, ..., :9] = False  # a left-padded row
    keep[2, ..., S - 4:] = False
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 8e-3, "rtol": 0}
    masks = (None, keep, torch.zeros(B, 1, 1, S).masked_fill(~keep, float("-inf")))
    for mask, mode in zip(masks, (torch.inference_mode, torch.no_grad, torch.inference_mode)):
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=True,
                                             attn_mask=None if mask is None else mask).to(dtype)
        with mode():  # its reused buffers serve inference mode and no_grad alike
            out = decode_attention(q, k, v, mask)
        assert out.dtype == dtype and out.shape == (B, nh, 1, d)
        torch.testing.assert_close(out, ref, **tol)
    # query head h reads group h // (nh / g): zeroing group 1's values zeroes exactly heads nh/2..nh-1
    out = decode_attention(q, k, torch.cat([v[:, :1], torch.zeros_like(v[:, 1:])], dim=1), None)
    assert out[:, nh // 2:].abs().max() == 0 and out[:, : nh // 2].abs().min() > 0
