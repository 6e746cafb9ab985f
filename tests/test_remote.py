"""model.remote.RemoteService: the completion service answered by an OpenAI-compatible server (our openai_api.py)."""

import json
import re
import threading
import time

import httpx
import pytest

from conftest import KEY
from model.reply import ReplyPart
from model.remote import (RemoteService, SSEReader, chat_request, normalize_api_base, openai_messages, sse_data,
                          status_error)
from model.service import (CompletionSettings, ConversationError, Finish, LocalService, Message, ServiceBusy,
                           ServiceError, ServiceUnavailable)
from serving import free_port
from test_openai_api import WEATHER, scripted  # noqa: F401 - the fixture: a server whose model follows a script


# ---- without a server ----------------------------------------------------------------------------------
def feed_all(lines):
    reader, out = SSEReader(), []
    for line in lines:
        out += reader.feed(line)
    return out


def chunk(delta=None, finish=None, usage=None, choices=True):
    body = {"object": "chat.completion.chunk", "choices": []}
    if choices:
        body["choices"] = [{"index": 0, "delta": delta or {}, "finish_reason": finish}]
    if usage is not None:
        body["usage"] = usage
    return f"data: {json.dumps(body)}\n"


def test_sse_lines_become_parts_and_a_finish():
    usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    lines = [": a comment\n", chunk({"role": "assistant", "content": ""}), "\n", chunk({"content": "Hel"}), "\n",
             "event: message\n", chunk({"content": "lo"}), chunk(finish="length"), chunk(usage=usage, choices=False),
             "data: [DONE]\n", chunk({"content": "after done"})]
    assert feed_all(lines) == [ReplyPart("Hel"), ReplyPart("lo"), Finish("length", 7, 3)]
    assert sse_data("data: [DONE]") is not None and sse_data("") is None and sse_data("id: 3") is None


def test_tool_calls_are_assembled_from_deltas_and_given_whole():
    lines = [chunk({"tool_calls": [{"index": 0, "id": "a", "type": "function",
                                    "function": {"name": "get_", "arguments": ""}}]}),
             chunk({"tool_calls": [{"index": 0, "function": {"name": "weather", "arguments": '{"city": '}}]}),
             chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
             chunk({"tool_calls": [{"index": 1, "id": "b", "type": "function",
                                    "function": {"name": "time", "arguments": "{}"}}]}),
             chunk(finish="tool_calls"), "data: [DONE]\n"]
    reader, out = SSEReader(), []
    for i, line in enumerate(lines):
        got = reader.feed(line)
        if i == 3:  # the first call is complete once the second begins
            assert got == [ReplyPart(tool_call={"name": "get_weather", "arguments": '{"city": "Paris"}'})]
        out += got
    assert out[1:] == [ReplyPart(tool_call={"name": "time", "arguments": "{}"}), Finish("tool_calls")]


def test_an_error_mid_stream_and_a_cut_stream_end_with_error():
    error = 'data: {"error": {"message": "generation failed: boom", "type": "server_error"}}\n'
    assert feed_all([chunk({"content": "a"}), error, chunk({"content": "b"})]) == [
        ReplyPart("a"), Finish("error", error="generation failed: boom")]
    reader = SSEReader()
    assert reader.feed(chunk({"content": "a"})) == [ReplyPart("a")]
    (finish,) = reader.end()
    assert finish.reason == "error" and "before the reply finished" in finish.error
    assert feed_all(["data: {not json\n"])[0].reason == "error"


def test_request_body_omits_unset_settings_and_maps_tools():
    tool = {"name": "weather", "description": "", "parameters": {}}
    messages = [Message("user", "hi"), Message("assistant", "", tool_calls=[{"name": "weather", "arguments": "{}"}]),
                Message("tool", "sunny")]
    body = chat_request("m", messages, CompletionSettings(temperature=0.5, max_length=100, stop=["x"],
                                                          tools=[tool], forced_tool="weather"), context_length=50)
    assert body["stream"] and body["stream_options"] == {"include_usage": True} and body["temperature"] == 0.5
    assert not {"top_p", "top_k", "max_tokens", "seed", "repetition_penalty", "presence_penalty"} & set(body)
    assert body["stop"] == ["x"] and body["tools"] == [{"type": "function", "function": tool}]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "weather"}}
    sent = body["messages"]
    assert sent[2] == {"role": "tool", "content": "sunny", "tool_call_id": sent[1]["tool_calls"][0]["id"]}
    assert sent[1]["tool_calls"][0]["function"] == {"name": "weather", "arguments": "{}"}
    assert openai_messages([Message("system", "s")]) == [{"role": "system", "content": "s"}]


def test_api_base_forms():
    assert normalize_api_base("http://h:8000/v1/") == "http://h:8000/v1"
    assert normalize_api_base("http://h:8000") == "http://h:8000/v1"
    assert normalize_api_base("h:8000") == "http://h:8000/v1"
    assert normalize_api_base("https://h/openai/v1") == "https://h/openai/v1"
    with pytest.raises(ValueError):
        normalize_api_base("ftp://h/v1")


def test_error_statuses_become_service_errors():
    def body(message, param=None):
        return json.dumps({"error": {"message": message, "type": "x", "param": param, "code": None}}).encode()

    url = "http://h/v1/chat/completions"
    refused = status_error(400, body("max_tokens is too large", "max_tokens"), url)
    assert isinstance(refused, ConversationError) and refused.param == "max_tokens"
    assert str(refused) == "max_tokens is too large"
    assert isinstance(status_error(422, b'{"detail": "bad field"}', url), ConversationError)
    key = status_error(401, body("wrong key"), url)
    assert type(key) is ServiceError and "--api-key" in str(key) and "wrong key" in str(key)
    assert isinstance(status_error(503, body("queue full"), url), ServiceBusy)
    assert isinstance(status_error(429, b"", url), ServiceBusy)
    crash = status_error(502, b"<html>Bad Gateway</html>", url)
    assert type(crash) is ServiceError and "Bad Gateway" in str(crash) and url in str(crash)


def test_a_server_that_is_down_is_told_quickly():
    url = f"http://127.0.0.1:{free_port()}/v1"
    began = time.monotonic()
    with pytest.raises(ServiceUnavailable, match=re.escape(url)) as err:
        RemoteService(url)
    assert time.monotonic() - began < 5 and "is it running" in str(err.value)


# ---- against openai_api.py as a process ----------------------------------------------------------------
MESSAGES = [Message("system", "Be short."), Message("user", "Tell me a story")]


@pytest.fixture(scope="module")
def remote(v3):
    service = RemoteService(f"{v3.url}/v1")
    yield service
    service.close()


def test_model_card(remote, v3):
    assert remote.model_name == "glm3-tiny" and remote.context_length == 8192
    assert remote.capabilities.display_name == "glm3-tiny" and remote.capabilities.supports_tools
    with pytest.raises(ServiceUnavailable, match="/v1"):
        RemoteService(f"{v3.url}/api")  # not the OpenAI URL


def test_sampled_stream_equals_local_service_and_a_plain_post(remote, v3, v3_dir):
    from model import load_model
    from model.engine import Engine

    settings = CompletionSettings(temperature=0.8, top_p=0.9, seed=7, max_tokens=40)
    parts = list(remote.complete(MESSAGES, settings))
    finish = parts[-1]
    text = "".join(p.content for p in parts[:-1])
    assert isinstance(finish, Finish) and finish.reason in ("stop", "length") and text

    model, tokenizer = load_model(v3_dir, device="cpu", dtype="float32")
    engine = Engine(model, tokenizer, model_name="glm3-tiny")
    try:
        local_text, local_finish = LocalService(engine).complete(MESSAGES, settings).text()
    finally:
        engine.close()
    assert (text, finish) == (local_text, local_finish)

    body = {"model": "m", "messages": [{"role": "system", "content": "Be short."},
                                       {"role": "user", "content": "Tell me a story"}],
            "temperature": 0.8, "top_p": 0.9, "seed": 7, "max_tokens": 40}
    plain = httpx.post(f"{v3.url}/v1/chat/completions", json=body, timeout=60).json()
    assert plain["choices"][0]["message"]["content"] == text
    assert plain["choices"][0]["finish_reason"] == finish.reason
    assert (plain["usage"]["prompt_tokens"], plain["usage"]["completion_tokens"]) == (
        finish.prompt_tokens, finish.completion_tokens)


def test_stop_strings_end_the_reply(remote):
    settings = CompletionSettings(temperature=0, max_tokens=60)
    text, _ = remote.complete([Message("user", "Count")], settings).text()
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop.strip(), text
    got, finish = remote.complete([Message("user", "Count")],
                                  CompletionSettings(temperature=0, max_tokens=60, stop=[stop])).text()
    assert got == text[:text.index(stop)].strip() and finish.reason == "stop"


def running(url: str) -> int:
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    return int(re.search(r"^chatglm_running_sequences (\d+)", metrics, re.M).group(1))


def test_cancel_from_another_thread_ends_the_reply_and_the_generation(remote, v3):
    # greedy, the tiny model never writes a stop token: 8000 tokens would take many seconds
    completion = remote.complete([Message("user", "Tell me a long story")],
                                 CompletionSettings(temperature=0, max_tokens=8000))
    items = iter(completion)
    first = next(items)
    assert isinstance(first, ReplyPart)
    assert running(v3.url) == 1
    began = time.monotonic()
    threading.Thread(target=completion.cancel).start()
    rest = list(items)
    assert time.monotonic() - began < 2
    assert isinstance(rest[-1], Finish) and rest[-1].reason == "cancelled"
    wait_idle(v3.url)
    for item in remote.complete([Message("user", "Tell me a long story")],
                                CompletionSettings(temperature=0, max_tokens=8000)):
        break  # a consumer that stops reading lets the reply go too
    wait_idle(v3.url)


def wait_idle(url: str) -> None:
    deadline = time.monotonic() + 10
    while running(url) != 0:
        assert time.monotonic() < deadline, "the server kept generating after the client left"
        time.sleep(0.1)


def test_a_refused_request_is_a_conversation_error(remote):
    with pytest.raises(ConversationError, match="maximum context length") as err:
        remote.complete(MESSAGES, CompletionSettings(max_tokens=100_000))
    assert err.value.param == "max_tokens"
    with pytest.raises(TypeError):
        remote.start(MESSAGES, loop=object())


def test_a_wrong_api_key_is_told(v2_keyed):
    with pytest.raises(ServiceError, match="--api-key") as err:
        RemoteService(f"{v2_keyed.url}/v1", api_key="wrong")
    assert "API key" in str(err.value)
    service = RemoteService(v2_keyed.url, api_key=KEY)  # a bare host: /v1 is added
    text, finish = service.complete([Message("user", "hi")], CompletionSettings(temperature=0, max_tokens=5)).text()
    assert service.model_name == "chatglm2-tiny" and finish.reason in ("stop", "length")
    assert finish.completion_tokens >= 1 and finish.prompt_tokens > 0


@pytest.mark.slow
def test_tool_call_round_trip(scripted):
    server, scripted_model, tokenizer = scripted
    service = RemoteService(f"{server.url}/v1")
    settings = CompletionSettings(tools=[WEATHER["function"]])
    messages = [Message("user", "Weather in Paris?")]
    *parts, finish = service.complete(messages, settings)
    assert [p.tool_call for p in parts] == [{"name": "get_weather", "arguments": '{"city": "Paris"}'}]
    assert finish.reason == "tool_calls"
    messages += [Message("assistant", "", tool_calls=[parts[0].tool_call]), Message("tool", '{"temperature": 21}')]
    text, finish = service.complete(messages, settings).text()
    assert (text, finish.reason) == ("It is 21 degrees in Paris.", "stop")
    history = [{"role": "system", "content": "Answer the following questions as best as you can. You have access "
                                             "to the following tools:", "tools": settings.tools},
               {"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "metadata": "get_weather",
                "content": "```python\ntool_call(city='Paris')\n```"}]
    assert scripted_model.prompts[1] == tokenizer.build_chat_ids('{"temperature": 21}', history, "observation")
