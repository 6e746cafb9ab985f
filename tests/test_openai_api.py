"""openai_api.py as a real process, used through the official openai client, curl and raw HTTP."""

import json
import shutil
import subprocess
import time

import httpx
import openai
import pytest

from conftest import KEY, loaded
from model import load_model
from model.formats import reply_parser
from model.engine import Engine
from model.generation import SamplingParams
from serving import ScriptedModel, ThreadServer


def client(server, key="unused"):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=60)


def expected_reply(model, tokenizer, ids, max_tokens, stop=None):
    """What the reply must be: the model's own greedy stream, through the reply rules."""
    parser = reply_parser(tokenizer.family, stop=stop)
    text, finish = "", None
    for delta, finish in model.stream_ids(tokenizer, ids, params=SamplingParams(), max_new_tokens=max_tokens,
                                          stop_ids=tokenizer.reply_stop_ids()):
        text += "".join(p.content for p in parser.feed(delta))
        if parser.stopped:
            break
    text += "".join(p.content for p in parser.finish())
    return text, ("stop" if parser.stopped else finish)


def test_models_and_health(v3):
    models = client(v3).models.list()
    assert [m.id for m in models.data] == ["glm3-tiny"]
    assert client(v3).models.retrieve("glm3-tiny").id == "glm3-tiny"
    assert httpx.get(f"{v3.url}/health").json()["status"] == "ok"


def test_greedy_reply_equals_the_model_chat(v2_keyed):
    model, tokenizer = loaded("chatglm2-tiny")
    reply = client(v2_keyed, KEY).chat.completions.create(
        model="anything", messages=[{"role": "user", "content": "你好"}], temperature=0, max_tokens=30)
    response, _ = model.chat(tokenizer, "你好", do_sample=False, max_new_tokens=30)
    assert reply.choices[0].message.content == response
    assert reply.choices[0].message.role == "assistant" and reply.model == "chatglm2-tiny"
    prompt_tokens = len(tokenizer.encode(tokenizer.build_prompt("你好")))
    assert reply.usage.prompt_tokens == prompt_tokens
    assert reply.usage.total_tokens == prompt_tokens + reply.usage.completion_tokens
    assert 1 <= reply.usage.completion_tokens <= 30


def test_stream_joined_equals_non_stream(v3, v3_dir):
    c = client(v3)
    messages = [{"role": "system", "content": "Be short."}, {"role": "user", "content": "Tell me a story"}]
    full = c.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=40)
    chunks = list(c.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=40,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({ch.id for ch in chunks}) == 1 and all(ch.model == "glm3-tiny" for ch in chunks)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()
    model, tokenizer = load_model(v3_dir, device="cpu", dtype="float32")
    ids = tokenizer.build_chat_ids("Tell me a story", [{"role": "system", "content": "Be short."}])
    assert (text, finishes[0]) == expected_reply(model, tokenizer, ids, 40)


def test_max_tokens_ends_with_length(v3):
    reply = client(v3).chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                               temperature=0, max_tokens=3)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 3


@pytest.mark.parametrize("stream", [False, True])
def test_stop_sequence_cuts_the_reply_before_it(v3, stream):
    c = client(v3)
    messages = [{"role": "user", "content": "Count"}]
    full = c.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=60)
    text = full.choices[0].message.content
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop.strip(), text
    kwargs = dict(model="m", messages=messages, temperature=0, max_tokens=60, stop=[stop, "never appears"])
    if stream:
        chunks = list(c.chat.completions.create(stream=True, **kwargs))
        got = "".join(ch.choices[0].delta.content or "" for ch in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        reply = c.chat.completions.create(**kwargs)
        got, finish = reply.choices[0].message.content, reply.choices[0].finish_reason
    assert got == text[:text.index(stop)].strip() and finish == "stop"


def test_n_choices_with_a_seed_are_reproducible(v3):
    c = client(v3)
    kwargs = dict(model="m", messages=[{"role": "user", "content": "hi"}], temperature=1.0, top_p=1.0,
                  max_tokens=20, n=3, seed=1234)
    a, b = c.chat.completions.create(**kwargs), c.chat.completions.create(**kwargs)
    assert [ch.index for ch in a.choices] == [0, 1, 2]
    assert [ch.message.content for ch in a.choices] == [ch.message.content for ch in b.choices]
    assert len({ch.message.content for ch in a.choices}) > 1  # each choice samples on its own
    single = c.chat.completions.create(**{**kwargs, "n": 1})
    assert a.usage.prompt_tokens == single.usage.prompt_tokens  # usage counts the prompt once, whatever n is
    assert single.choices[0].message.content == a.choices[0].message.content  # choice 0 uses the seed itself
    streamed = list(c.chat.completions.create(stream=True, **kwargs))
    for i, choice in enumerate(a.choices):
        text = "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices and ch.choices[0].index == i)
        assert text == choice.message.content


def test_api_key_is_required_when_set(v2_keyed):
    with pytest.raises(openai.AuthenticationError) as err:
        client(v2_keyed, "wrong").models.list()
    assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
    r = httpx.post(f"{v2_keyed.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 401 and r.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(f"{v2_keyed.url}/health").status_code == 200  # health needs no key
    assert client(v2_keyed, KEY).models.list().data[0].id == "chatglm2-tiny"


def test_cors_only_for_the_allowed_origin(v2_keyed):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    ok = httpx.options(f"{v2_keyed.url}/v1/chat/completions", headers={"Origin": "http://allowed.example",
                                                                        **preflight})
    assert ok.headers.get("access-control-allow-origin") == "http://allowed.example"
    bad = httpx.options(f"{v2_keyed.url}/v1/chat/completions", headers={"Origin": "http://evil.example",
                                                                         **preflight})
    assert "access-control-allow-origin" not in bad.headers


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_plain_and_streaming(v3):
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "你好"}], "temperature": 0,
                       "max_tokens": 12})
    url = f"{v3.url}/v1/chat/completions"
    plain = subprocess.run(["curl", "-s", url, "-H", "Content-Type: application/json", "-d", body],
                           capture_output=True, text=True, check=True).stdout
    reply = json.loads(plain)
    stream_body = json.dumps({**json.loads(body), "stream": True})
    raw = subprocess.run(["curl", "-sN", url, "-H", "Content-Type: application/json", "-d", stream_body],
                         capture_output=True, text=True, check=True).stdout
    events = [line[len("data: "):] for line in raw.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and raw.endswith("\n\n")
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == reply["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == reply["choices"][0]["finish_reason"]


def metrics(server) -> dict:
    out = {}
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.split()
            out[name] = float(value)
    return out


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_stops_its_generation(v3, stream):
    before = metrics(v3)["chatglm_generated_tokens_total"]
    body = {"model": "m", "messages": [{"role": "user", "content": "go on forever"}], "temperature": 0,
            "max_tokens": 8000, "stream": stream}
    if stream:
        with httpx.stream("POST", f"{v3.url}/v1/chat/completions", json=body, timeout=30) as r:
            for line in r.iter_lines():
                if '"content"' in line and '"role"' not in line:
                    break  # one content chunk arrived: hang up
    else:
        with pytest.raises(httpx.ReadTimeout):  # give up waiting for the whole reply
            httpx.post(f"{v3.url}/v1/chat/completions", json=body, timeout=1.0)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the server notices the hang-up within its 0.2 s disconnect poll
        m = metrics(v3)
        if not m["chatglm_running_sequences"] and not m["chatglm_queue_depth"]:
            break
        time.sleep(0.05)
    # nothing running or waiting: the request was cancelled, not left to generate its 8000 tokens for nobody
    assert m["chatglm_running_sequences"] == 0 and m["chatglm_queue_depth"] == 0
    assert m["chatglm_generated_tokens_total"] - before < 8000
    reply = client(v3).chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                               temperature=0, max_tokens=2)
    assert reply.choices[0].finish_reason in ("length", "stop")


# ---- tools, with a scripted ChatGLM3 model ---------------------------------------------------------
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture()
def scripted(v3_dir):
    model, tokenizer = load_model(v3_dir, device="cpu", dtype="float32")
    sp = tokenizer.sp

    def reply(text, end):
        return sp.encode(text) + [tokenizer.get_command(end) if end.startswith("<|") else tokenizer.eos_token_id]

    call = "get_weather\n```python\ntool_call(city='Paris')\n```"
    scripted_model = ScriptedModel(model, len(tokenizer), [
        reply(call, "<|observation|>"), reply("\nIt is 21 degrees in Paris.", "</s>"),
        reply(call, "<|observation|>"),
    ])
    engine = Engine(scripted_model, tokenizer, model_name="scripted", max_batch=1,  # the script is one stream,
                    prefill_chunk=None, prefix_cache_tokens=0)  # with one forward pass per whole prompt
    from server.openai_app import create_app

    server = ThreadServer(create_app(engine))
    yield server, scripted_model, tokenizer
    server.stop()
    engine.close()


def test_tool_call_round_trip(scripted):
    server, scripted_model, tokenizer = scripted
    c = client(server)
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    first = c.chat.completions.create(model="m", messages=messages, tools=[WEATHER])
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris"}

    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    second = c.chat.completions.create(model="m", messages=messages, tools=[WEATHER])
    assert second.choices[0].message.content == "It is 21 degrees in Paris."
    assert second.choices[0].finish_reason == "stop" and not second.choices[0].message.tool_calls

    tools = [WEATHER["function"]]
    history = [{"role": "system", "content": "Answer the following questions as best as you can. You have access "
                                             "to the following tools:", "tools": tools},
               {"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "metadata": "get_weather",
                "content": "```python\ntool_call(city='Paris')\n```"}]
    assert scripted_model.prompts[0] == tokenizer.build_chat_ids("Weather in Paris?", history[:1])
    assert scripted_model.prompts[1] == tokenizer.build_chat_ids('{"temperature": 21}', history, "observation")

    chunks = list(c.chat.completions.create(model="m", messages=messages[:1], tools=[WEATHER], stream=True))
    deltas = [ch.choices[0].delta.tool_calls for ch in chunks if ch.choices[0].delta.tool_calls]
    assert len(deltas) == 1 and deltas[0][0].index == 0 and deltas[0][0].function.name == "get_weather"
    assert json.loads(deltas[0][0].function.arguments) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
