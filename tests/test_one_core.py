"""One decode core and one format layer: every way to ask for a reply gives the same reply.

For the same seed and settings, model.chat(), model.stream_chat(), the completion service, openai_api.py and
api.py sample the same tokens (one sampler, one context rule, one table of defaults) and post-process them with
the same parser.
"""

import httpx
import pytest
import torch

from conftest import KEY, loaded
from model.engine import Engine
from model.formats import FORMATS, Message, format_for
from model.generation import SamplingParams, SequenceSampler, choose_rows, reply_budget
from model.service import CompletionSettings, Finish, LocalService

QUERY = "你好，请介绍一下你自己"
SEED = 1234
LENGTH = 60  # prompt + reply, in tokens (the original API's max_length)


def chat_reply(stream: bool, seed: int = SEED) -> str:
    model, tokenizer = loaded("chatglm2-tiny")
    if stream:
        *_, (response, _) = model.stream_chat(tokenizer, QUERY, [], max_length=LENGTH, seed=seed)
        return response
    return model.chat(tokenizer, QUERY, [], max_length=LENGTH, seed=seed)[0]


def service_reply(seed: int = SEED) -> tuple[str, Finish]:
    model, tokenizer = loaded("chatglm2-tiny")
    service = LocalService(Engine(model, tokenizer, model_name="t"))
    try:
        return service.complete([Message("user", QUERY)], CompletionSettings(max_length=LENGTH, seed=seed)).text()
    finally:
        service.close()


def test_chat_stream_chat_and_the_service_sample_the_same_reply():
    chat = chat_reply(stream=False)
    assert chat == chat_reply(stream=True)
    text, finish = service_reply()
    assert text == chat and finish.reason in ("stop", "length")
    assert chat != chat_reply(stream=False, seed=SEED + 1)  # the seed matters: the equality above is not luck


@pytest.mark.slow
def test_the_servers_give_the_same_reply_as_chat(v2_keyed, basic_v2):
    expected = chat_reply(stream=False)
    prompt = len(loaded("chatglm2-tiny")[1].encode(loaded("chatglm2-tiny")[1].build_prompt(QUERY)))
    body = {"messages": [{"role": "user", "content": QUERY}], "max_tokens": LENGTH - prompt, "seed": SEED}
    r = httpx.post(f"{v2_keyed.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == expected
    r = httpx.post(f"{basic_v2.url}/", json={"prompt": QUERY, "max_length": LENGTH, "seed": SEED}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["response"] == expected


def test_one_table_of_sampling_defaults():
    model, _ = loaded("chatglm2-tiny")
    params, _ = model._chat_params(True, None, None, 1, {})
    served = SamplingParams.resolve(format_for("chatglm2").defaults)
    assert (params.temperature, params.top_p, params.top_k) == (served.temperature, served.top_p, served.top_k)
    assert SamplingParams.resolve(format_for("chatglm2").defaults, temperature=0).greedy
    assert {f.defaults.top_k for f in FORMATS.values()} == {50}  # the original chat()'s, through generate


def test_one_context_rule():
    assert reply_budget(100, 90, None) == 10
    assert reply_budget(100, 90, 5) == 5
    assert reply_budget(100, 90, 50) == 10
    model, tokenizer = loaded("chatglm2-tiny")
    ids = tokenizer.encode(tokenizer.build_prompt(QUERY))
    limit = model.config.seq_length
    # generate may fill the context exactly, never more: the same limit as the engine's
    from model.generation import generate_tokens

    long = torch.tensor([ids * ((limit - 8) // len(ids))])
    steps = list(generate_tokens(model, long, max_new_tokens=10_000, params=SamplingParams()))
    assert long.shape[1] + len(steps) == limit


def test_an_engine_step_samples_every_row_with_one_host_sync(monkeypatch):
    calls = []
    for name in ("tolist", "item", "__bool__", "__int__", "__index__", "__float__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    logits = torch.randn(6, 50)
    samplers = [SequenceSampler(SamplingParams(do_sample=i % 2 == 0, top_k=5 * i, top_p=0.9,
                                               repetition_penalty=1.0 + i / 10, presence_penalty=i / 5, seed=i),
                                torch.tensor([[1, 2, 3]])) for i in range(6)]
    calls.clear()
    ids = choose_rows(samplers, logits)
    assert calls == ["tolist"] and len(ids) == 6
    calls.clear()
    choose_rows(samplers, logits)  # the penalties now count the first step's ids, still on the device
    assert calls == ["tolist"]


def test_the_servers_cache_capacity_flag_gives_a_fixed_cache():
    from conftest import model_dir
    from model.flags import build_parser, service_from_args

    args = build_parser("t", server=True).parse_args(["--model", model_dir("chatglm2-tiny"), "--device", "cpu",
                                                      "--cache-capacity", "64"])
    service = service_from_args(args)
    try:
        assert service.context_length == 64 and service.engine.cache.fixed and service.engine.cache.capacity == 64
        text, finish = service.complete([Message("user", QUERY)], CompletionSettings(temperature=0)).text()
        assert finish.reason in ("stop", "length") and finish.prompt_tokens + finish.completion_tokens <= 64
    finally:
        service.close()


def prefix_store_budget(engine):
    return None if engine.prefixes is None else engine.prefixes.budget


@pytest.mark.parametrize("flag, read, value, expected", [
    ("--prefill-batch-tokens", lambda engine: engine.prefill_batch_tokens, "0", None),
    ("--prefill-batch-tokens", lambda engine: engine.prefill_batch_tokens, "64", 64),
    ("--prefill-batch-tokens", lambda engine: engine.prefill_batch_tokens, None, 256),
    ("--prefix-cache-tokens", prefix_store_budget, "0", None),
    ("--prefix-cache-tokens", prefix_store_budget, "100", 100),
    ("--prefix-cache-tokens", prefix_store_budget, None, 8192),
])
@pytest.mark.parametrize("group", ["server", "engine"])
def test_engine_flags_reach_the_engine(flag, read, value, expected, group):
    from conftest import model_dir
    from model.flags import build_parser, service_from_args

    argv = ["--model", model_dir("chatglm2-tiny"), "--device", "cpu"]
    args = build_parser("t", **{group: True}).parse_args(argv + ([flag, value] if value else []))
    service = service_from_args(args)
    try:
        assert read(service.engine) == expected
    finally:
        service.close()
