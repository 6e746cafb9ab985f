"""Malformed and hostile requests: each gets the right 4xx in the OpenAI error shape; the server keeps serving."""

import json

import httpx
import pytest

from conftest import KEY

USER = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
TOOL2 = {"type": "function", "function": {"name": "g", "parameters": {"type": "object"}}}
CHAT = "/v1/chat/completions"


def chat(**fields):
    return {"json": {"model": "m", "messages": USER, **fields}}


# (id, method, path, request kwargs, status, text the error message must contain)
CASES = [
    ("not json", "POST", CHAT, {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400,
     "not valid JSON"),
    ("json array body", "POST", CHAT, {"json": [1, 2]}, 400, "JSON object"),
    ("json string body", "POST", CHAT, {"json": "hello"}, 400, "JSON object"),
    ("no messages", "POST", CHAT, {"json": {"model": "m"}}, 400, "messages"),
    ("empty messages", "POST", CHAT, {"json": {"model": "m", "messages": []}}, 400, "messages"),
    ("messages not a list", "POST", CHAT, {"json": {"messages": "hi"}}, 400, "messages"),
    ("unknown role", "POST", CHAT, {"json": {"messages": [{"role": "wizard", "content": "x"}]}}, 400, "role"),
    ("content is a number", "POST", CHAT, {"json": {"messages": [{"role": "user", "content": 5}]}}, 400, "content"),
    ("user without content", "POST", CHAT, {"json": {"messages": [{"role": "user"}]}}, 400, "needs content"),
    ("image part", "POST", CHAT, {"json": {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}}, 400, "content"),
    ("last message from assistant", "POST", CHAT, {"json": {"messages": USER + [
        {"role": "assistant", "content": "x"}]}}, 400, "last message"),
    ("temperature below 0", "POST", CHAT, chat(temperature=-0.1), 400, "temperature"),
    ("temperature above 2", "POST", CHAT, chat(temperature=2.5), 400, "temperature"),
    ("temperature a word", "POST", CHAT, chat(temperature="hot"), 400, "temperature"),
    ("top_p above 1", "POST", CHAT, chat(top_p=1.5), 400, "top_p"),
    ("max_tokens 0", "POST", CHAT, chat(max_tokens=0), 400, "max_tokens"),
    ("max_tokens negative", "POST", CHAT, chat(max_tokens=-5), 400, "max_tokens"),
    ("max_tokens beyond context", "POST", CHAT, chat(max_tokens=10**6), 400, "maximum context length"),
    ("prompt beyond context", "POST", CHAT, {"json": {"messages": [{"role": "user", "content": "你好" * 9000}]}},
     400, "maximum context length"),
    ("n 0", "POST", CHAT, chat(n=0), 400, "n"),
    ("n 100", "POST", CHAT, chat(n=100), 400, "n"),
    ("five stop strings", "POST", CHAT, chat(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    ("empty stop string", "POST", CHAT, chat(stop=[""]), 400, "stop"),
    ("stop a number", "POST", CHAT, chat(stop=5), 400, "stop"),
    ("seed too large", "POST", CHAT, chat(seed=2**70), 400, "seed"),
    ("presence_penalty 5", "POST", CHAT, chat(presence_penalty=5), 400, "presence_penalty"),
    ("frequency_penalty -3", "POST", CHAT, chat(frequency_penalty=-3), 400, "frequency_penalty"),
    ("logprobs", "POST", CHAT, chat(logprobs=True), 400, "logprobs"),
    ("json response format", "POST", CHAT, chat(response_format={"type": "json_object"}), 400, "response_format"),
    ("tools not a list", "POST", CHAT, chat(tools={"name": "f"}), 400, "tools"),
    ("tool of unknown type", "POST", CHAT, chat(tools=[{"type": "retrieval"}]), 400, "tools"),
    ("tool name with spaces", "POST", CHAT, chat(tools=[{"type": "function", "function": {"name": "rm -rf"}}]),
     400, "name"),
    ("duplicate tool names", "POST", CHAT, chat(tools=[TOOL, TOOL]), 400, "unique"),
    ("tool_choice not offered", "POST", CHAT, chat(tools=[TOOL], tool_choice={
        "type": "function", "function": {"name": "zzz"}}), 400, "not in tools"),
    ("tool_choice without tools", "POST", CHAT, chat(tool_choice="required"), 400, "needs tools"),
    ("required with two tools", "POST", CHAT, chat(tools=[TOOL, TOOL2], tool_choice="required"), 400,
     "exactly one tool"),
    ("tool_calls on a user message", "POST", CHAT, {"json": {"messages": [{"role": "user", "content": "x",
        "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}}, 400, "tool_calls"),
    ("tool call arguments not JSON", "POST", CHAT, {"json": {"messages": USER + [
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{x"}}]},
        {"role": "tool", "content": "1"}]}}, 400, "not valid JSON"),
    ("deeply nested JSON", "POST", CHAT, {"content": ("[" * 5000 + "]" * 5000).encode(),
                                         "headers": {"content-type": "application/json"}}, 400, "could not be parsed as JSON"),
    ("unknown route", "POST", "/v1/completions/../../etc/passwd", chat(), 404, "not found"),
    ("GET on the chat route", "GET", CHAT, {}, 405, "method not allowed"),
    ("unknown model", "GET", "/v1/models/gpt-9", {}, 404, "does not exist"),
    ("body too large", "POST", CHAT, {"json": {"messages": [{"role": "user", "content": "x" * (5 * 1024 * 1024)}]}},
     413, "larger than"),
    ("form-encoded body", "POST", CHAT, {"content": b"messages=hi", "headers": {
        "content-type": "application/x-www-form-urlencoded"}}, 400, "JSON object"),
]


@pytest.mark.parametrize("name, method, path, kwargs, status, needle", CASES, ids=[c[0] for c in CASES])
def test_bad_request_gets_a_clear_4xx_and_the_server_lives(v3, name, method, path, kwargs, status, needle):
    r = httpx.request(method, v3.url + path, timeout=30, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
    assert needle.lower() in error["message"].lower(), error
    assert v3.alive()
    assert httpx.get(f"{v3.url}/health").json()["status"] == "ok"


def test_server_still_answers_after_the_table(v3):
    r = httpx.post(f"{v3.url}{CHAT}", json={"messages": USER, "max_tokens": 2, "temperature": 0}, timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop")


def test_tools_on_a_chatglm2_model_are_refused(v2_keyed):
    r = httpx.post(f"{v2_keyed.url}{CHAT}", json={"messages": USER, "tools": [TOOL]},
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and "ChatGLM3" in r.json()["error"]["message"]


def test_request_size_limit_is_configurable(v2_keyed):
    big = {"messages": [{"role": "user", "content": "x" * 30000}]}
    r = httpx.post(f"{v2_keyed.url}{CHAT}", json=big, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 413
    chunked = httpx.post(f"{v2_keyed.url}{CHAT}", headers={"Authorization": f"Bearer {KEY}",
                                                           "content-type": "application/json"},
                         content=iter([json.dumps(big).encode()]))  # no Content-Length: counted as it arrives
    assert chunked.status_code == 413


def test_a_stream_whose_service_fails_midway_ends_with_an_error_event():
    """A completion that raises mid-stream (a device lost, a bug) must reach the client as an error event before
    [DONE], not as a stream that simply stops without a finish reason."""
    import asyncio
    from types import SimpleNamespace

    from model.service import ReplyPart
    from server.openai_app import stream_chunks

    class Failing:
        cancelled = False

        def cancel(self):
            self.cancelled = True

        async def _items(self):
            yield ReplyPart("Hello")
            raise RuntimeError("the device was lost")

        def __aiter__(self):
            return self._items()

    completion = Failing()
    plan = SimpleNamespace(id="chatcmpl-test", created=0, include_usage=False, prompt_tokens=3)

    async def collect():
        return [event async for event in stream_chunks(SimpleNamespace(model_name="m"), plan, [completion])]

    events = asyncio.run(collect())
    assert events[-1] == "data: [DONE]\n\n"
    bodies = [json.loads(event.removeprefix("data: ")) for event in events[:-1]]
    assert [b["choices"][0]["delta"] for b in bodies[:2]] == [{"role": "assistant", "content": ""},
                                                              {"content": "Hello"}]
    assert bodies[2:] == [{"error": {"message": "generation failed: RuntimeError: the device was lost",
                                     "type": "server_error", "param": None, "code": None}}]
    assert completion.cancelled
