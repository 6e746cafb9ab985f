"""The engine keeps finished sequences' keys and values (model/cache.py PrefixStore): the next turn of a
conversation, Regenerate, or a shared system prompt reads only what follows the stored ids, and gets exactly the
text it gets when the whole prompt is read (cached == re-encoded), for ChatGLM2 / ChatGLM3, with a P-Tuning
prefix and with the fixed cache. ChatGLM-6B keeps none (its prompt attends to itself both ways)."""

import pytest
import torch

from conftest import loaded
from model.cache import BatchCache, KVCache, PrefixStore, common_prefix
from model.engine import PREFIX_MIN_REUSE, Engine, GenerationRequest
from model.formats import Message, format_for
from model.generation import SamplingParams
from test_engine_batched_prefill import PromptPasses

GREEDY = SamplingParams()
SEEDED = SamplingParams(do_sample=True, temperature=0.9, top_p=0.8, seed=11)
LONG_QUESTION = ("Please tell me, in some detail, how the tides of the sea follow the moon, why there are two "
                 "of them a day, and what the sun has to do with spring tides and neap tides.")


def run(engine, ids, params=GREEDY, n=16):
    tok = engine.tokenizer
    events = list(engine.submit(GenerationRequest(ids, params, n, tuple(tok.reply_stop_ids()))))
    return "".join(e.text for e in events), events[-1].finish


def conversation(tok, turns):
    """The prompt ids of a conversation of (question, answer) turns ending with an open question."""
    messages = []
    for question, answer in turns:
        messages.append(Message("user", question))
        if answer is not None:
            messages.append(Message("assistant", answer))
    return format_for(tok.family).prompt_ids(tok, messages)


def read_tokens(passes):
    return sum(b * t for b, t in passes.shapes)


@pytest.mark.parametrize("name", ["chatglm2-tiny", "chatglm3-tiny", "chatglm2-tiny-ptuning-p4"])
@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_the_next_turn_reads_only_what_follows_and_gets_the_same_text(name, params):
    model, tok = loaded(name)
    with_store = Engine(model, tok, prefill_chunk=64)
    without = Engine(model, tok, prefill_chunk=64, prefix_cache_tokens=0)
    try:
        first = conversation(tok, [(LONG_QUESTION, None)])
        assert len(first) > PREFIX_MIN_REUSE
        reply, _ = run(with_store, first, params)
        assert run(without, first, params)[0] == reply
        second = conversation(tok, [(LONG_QUESTION, reply), ("And in a lake?", None)])
        reused = common_prefix(first + tok.encode(reply, add_special_tokens=False), second)
        assert reused >= len(first)  # at least the first prompt is where the second starts
        passes = PromptPasses(model)
        try:
            got = run(with_store, second, params)
        finally:
            passes.remove()
        assert got == run(without, second, params)  # cached == re-encoded
        assert with_store.stats.prefix_hits == 1 and with_store.stats.prefix_tokens_reused >= len(first)
        assert read_tokens(passes) == len(second) - with_store.stats.prefix_tokens_reused
    finally:
        with_store.close()
        without.close()


def test_regenerate_reads_one_token_and_draws_the_same_text():
    """The same prompt again (Regenerate with the same seed): every prompt token but the last comes from the
    store, and the text is the one a fresh engine draws."""
    model, tok = loaded("chatglm3-tiny")
    engine = Engine(model, tok)
    fresh = Engine(model, tok, prefix_cache_tokens=0)
    try:
        ids = conversation(tok, [(LONG_QUESTION, None)])
        first = run(engine, ids, SEEDED)
        passes = PromptPasses(model)
        try:
            again = run(engine, ids, SEEDED)
        finally:
            passes.remove()
        assert again == first == run(fresh, ids, SEEDED)
        assert engine.stats.prefix_tokens_reused == len(ids) - 1
        assert passes.shapes == []  # one token: read by a forward pass of one position (not a prompt pass)
    finally:
        engine.close()
        fresh.close()


def test_a_shared_system_prompt_is_read_once_with_the_fixed_cache():
    model, tok = loaded("chatglm3-tiny")
    system = Message("system", "You are a careful assistant. " * 8)
    fmt = format_for(tok.family)
    engine = Engine(model, tok, cache_capacity=512)
    plain = Engine(model, tok, cache_capacity=512, prefix_cache_tokens=0)
    try:
        a = fmt.prompt_ids(tok, [system, Message("user", "hi")])
        b = fmt.prompt_ids(tok, [system, Message("user", "what is the time?")])
        run(engine, a)
        assert run(engine, b) == run(plain, b)
        assert engine.stats.prefix_hits == 1 and engine.stats.prefix_tokens_reused == common_prefix(a, b)
    finally:
        engine.close()
        plain.close()


def test_short_shared_beginnings_and_chatglm1_are_read_whole():
    model, tok = loaded("chatglm3-tiny")
    engine = Engine(model, tok)
    try:
        run(engine, conversation(tok, [("hi", None)]))
        run(engine, conversation(tok, [("hello", None)]))  # shares [gMASK]sop<|user|>: fewer than the minimum
        assert engine.stats.prefix_hits == 0
    finally:
        engine.close()
    v1, v1_tok = loaded("chatglm1-tiny")
    engine = Engine(v1, v1_tok)
    try:
        assert engine.prefixes is None
    finally:
        engine.close()


def test_a_cancelled_reply_is_kept_and_a_failed_one_is_not(monkeypatch):
    model, tok = loaded("chatglm2-tiny")
    engine = Engine(model, tok)
    try:
        ids = conversation(tok, [(LONG_QUESTION, None)])
        handle = engine.submit(GenerationRequest(ids, GREEDY, 200, ()))
        for event in handle:
            if event.completion_tokens >= 3:
                handle.cancel()
        assert event.finish == "cancelled" and len(engine.prefixes) == 1
        engine.prefixes = PrefixStore(8192)
        calls = {"n": 0}
        real = model.transformer.forward

        def fail_on_decode(input_ids, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:  # the first decode step
                raise RuntimeError("out of memory")
            return real(input_ids, *args, **kwargs)

        monkeypatch.setattr(model.transformer, "forward", fail_on_decode)
        assert run(engine, ids)[1] == "error"
        assert len(engine.prefixes) == 0
    finally:
        engine.close()


def batch_cache_with(ids_rows, layers=2, groups=1, dim=4, prefix=0):
    class Config:
        num_layers, num_kv_heads, kv_channels, seq_length = layers, groups, dim, 64

    cache = BatchCache(Config, len(ids_rows), torch.float32, "cpu", capacity=64)
    for r, ids in enumerate(ids_rows):
        row = cache.add_row()
        n = prefix + len(ids)
        for layer in range(layers):
            cache.keys[layer][r, :, :n] = torch.arange(n, dtype=torch.float32)[None, :, None] + 100 * r
            cache.values[layer][r, :, :n] = -cache.keys[layer][r, :, :n]
        row.advance(n)
    return cache


def test_prefix_store_budget_supersession_and_least_recently_used():
    cache = batch_cache_with([[1, 2, 3, 4], [1, 2, 3, 4, 5, 6], [7, 8, 9]])
    store = PrefixStore(budget=10)
    store.remember([1, 2, 3, 4], cache, 0)
    store.remember([1, 2, 3, 4, 5, 6], cache, 1)  # starts with the first: replaces it
    assert len(store) == 1 and store.tokens == 6
    assert store.match([1, 2, 3, 4, 5, 6, 7]) == (1, 6)
    assert store.match([1, 2, 3, 4, 5, 6]) == (1, 5)  # the last prompt token is always read
    assert store.match([9, 9]) == (None, 0)
    store.remember([7, 8, 9], cache, 2)
    assert store.tokens == 9
    key, n = store.match([1, 2, 3, 0])
    kv = KVCache(2, 1, 1, 4, torch.float32, "cpu", capacity=8)
    store.restore(key, n, kv)  # used: now the most recent
    assert kv.length == 3 and torch.equal(kv.keys[1][0, 0, :3, 0], torch.tensor([100.0, 101.0, 102.0]))
    assert torch.equal(kv.values[0][0, 0, :3, 0], -kv.keys[0][0, 0, :3, 0])
    store.remember([5, 5], cache, 2)  # over budget: the least recently used ([7, 8, 9]) goes
    assert store.match([7, 8, 9, 1]) == (None, 0) and store.match([1, 2, 3, 4, 0])[1] == 4
    store.remember(list(range(11)), batch_cache_with([list(range(11))]), 0)  # larger than the budget: not kept
    assert store.tokens == 8


@pytest.mark.parametrize("a,b,n", [([], [1], 0), ([1, 2, 3], [1, 2, 3], 3), ([1, 2, 3], [1, 2], 2),
                                   ([1, 2, 3, 4, 5], [1, 2, 9, 4, 5], 2), ([5], [6], 0),
                                   (list(range(1000)), list(range(999)) + [0], 999)])
def test_common_prefix(a, b, n):
    assert common_prefix(a, b) == common_prefix(b, a) == n
