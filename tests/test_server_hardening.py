"""Hostile and unlucky traffic against both servers: rebinding Host names, lone surrogates, choices that do not
fit the queue, huge prompts and message lists, shutdown under load. Each answer is a clear 4xx/503, nothing runs
for nobody, and the server keeps serving."""

import json
import threading

import httpx
import pytest

from conftest import KEY, loaded
from model.engine import Engine, EngineBusy, GenerationRequest
from model.generation import SamplingParams
from serving import StepGate, ThreadServer
from server.http import Settings, accepted_hosts, host_name
from server.protocol import MAX_MESSAGES

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]
GREEDY = SamplingParams()


# ---- DNS rebinding and the API key --------------------------------------------------------------------
@pytest.mark.parametrize("fixture", ["v3", "basic_v3"])
@pytest.mark.slow
def test_a_foreign_host_name_is_refused(request, fixture):
    server = request.getfixturevalue(fixture)
    port = server.url.rsplit(":", 1)[1]
    for host in ("attacker.example", f"attacker.example:{port}", f"127.0.0.1.nip.example:{port}"):
        r = httpx.get(f"{server.url}/health", headers={"Host": host})
        assert r.status_code == 400, host
        assert "host name" in r.json()["error"]["message"]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}", f"LocalHost:{port}"):
        assert httpx.get(f"{server.url}/health", headers={"Host": host}).status_code == 200, host


def test_accepted_host_names():
    assert accepted_hosts("127.0.0.1", []) == {"localhost", "127.0.0.1", "::1"}
    assert "my.box" in accepted_hosts("127.0.0.1", ["My.Box"])
    assert "10.1.2.3" in accepted_hosts("10.1.2.3", [])
    assert accepted_hosts("0.0.0.0", []) is None  # every interface: clients use names we cannot know
    assert accepted_hosts("0.0.0.0", ["gpu.lan"]) == {"gpu.lan", "localhost", "127.0.0.1", "::1"}
    assert accepted_hosts("127.0.0.1", ["*"]) is None
    assert [host_name(h) for h in ("A.example:80", "[::1]:8000", "::1", "x")] == ["a.example", "::1", "::1", "x"]


@pytest.mark.slow
def test_allowed_hosts_flag(v3_dir):
    from serving import ServerProcess

    with ServerProcess("openai_api.py", v3_dir, "--allowed-hosts", "chat.lan, other.lan") as server:
        assert httpx.get(f"{server.url}/health", headers={"Host": "chat.lan:1234"}).status_code == 200
        assert httpx.get(f"{server.url}/health", headers={"Host": "other.lan"}).status_code == 200
        assert httpx.get(f"{server.url}/health", headers={"Host": "evil.lan"}).status_code == 400


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_the_bearer_scheme_is_case_insensitive(v2_keyed, scheme):
    r = httpx.get(f"{v2_keyed.url}/v1/models", headers={"Authorization": f"{scheme} {KEY}"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("header", [f"Basic {KEY}", KEY, f"Bearer{KEY}", f"Bearer {KEY}x", "Bearer", ""])
def test_other_authorization_headers_are_refused(v2_keyed, header):
    r = httpx.get(f"{v2_keyed.url}/v1/models", headers={"Authorization": header})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


# ---- lone surrogates -----------------------------------------------------------------------------------
def raw_post(url: str, body: str) -> httpx.Response:
    """POST a JSON text as written (json.dumps would escape the surrogate the same way a client does)."""
    return httpx.post(url, content=body.encode("ascii"), headers={"content-type": "application/json"}, timeout=60)


SURROGATE_BODIES = [
    '{"messages": [{"role": "user", "content": "a\\ud800b"}], "max_tokens": 3, "temperature": 0}',
    '{"messages": [{"role": "system", "content": "\\udfff"}, {"role": "user", "content": "hi"}], "max_tokens": 3}',
    '{"messages": [{"role": "user", "content": [{"type": "text", "text": "x\\udc00"}]}], "max_tokens": 3}',
    '{"messages": [{"role": "user", "content": "hi"}], "stop": ["\\ud83d"], "max_tokens": 3}',
    '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "tools": [{"type": "function", "function":'
    ' {"name": "f", "description": "\\ud800", "parameters": {"type": "object", "\\udbff": "\\udc01"}}}]}',
]


@pytest.mark.parametrize("body", SURROGATE_BODIES)
def test_a_lone_surrogate_is_replaced_not_a_crash(v3, body):
    with httpx.Client(timeout=60) as client:  # one keep-alive connection for both requests
        r = client.post(f"{v3.url}{CHAT}", content=body.encode("ascii"), headers={"content-type": "application/json"})
        assert r.status_code == 200, r.text
        assert client.get(f"{v3.url}/health").status_code == 200


def test_a_paired_surrogate_escape_stays_the_character(v3):
    """"\\ud83d\\ude00" in JSON is one emoji: the prompt must hold the emoji, not two replacement characters."""
    emoji = raw_post(f"{v3.url}{CHAT}", '{"messages": [{"role": "user", "content": "\\ud83d\\ude00"}], '
                                         '"max_tokens": 1}').json()
    plain = httpx.post(f"{v3.url}{CHAT}", json={"messages": [{"role": "user", "content": "😀"}], "max_tokens": 1},
                       timeout=60).json()
    assert emoji["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]


@pytest.mark.parametrize("body", [
    '{"prompt": "a\\ud800b", "max_length": 200}',
    '{"prompt": "hi", "history": [["\\udc00", "x\\ud800"]], "max_length": 200}',
    '{"prompt": "hi", "history": [{"role": "system", "content": "\\ud800"}], "max_length": 200}',
])
def test_basic_api_replaces_lone_surrogates(basic_v3, body):
    r = raw_post(basic_v3.url + "/", body)
    assert r.status_code == 200, r.text
    assert "\ufffd" in json.dumps(r.json()["history"], ensure_ascii=False)


# ---- n choices: all admitted or none ------------------------------------------------------------------
@pytest.fixture()
def small_queue():
    """openai_api's app over an engine with room for 4 waiting requests and 2 running; its worker held."""
    model, tokenizer = loaded("chatglm3-tiny")
    engine = Engine(model, tokenizer, model_name="small", max_queue=4, max_batch=2)
    from server.openai_app import create_app

    server = ThreadServer(create_app(engine, Settings()))
    gate = StepGate(model)
    yield server, engine, gate
    gate.remove()
    server.stop()
    engine.close()


def metric(server, name: str) -> float:
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def test_more_choices_than_the_queue_holds_is_a_400_and_nothing_runs(small_queue):
    server, engine, gate = small_queue
    gate.open()
    r = httpx.post(f"{server.url}{CHAT}", json={"messages": USER, "n": 8, "max_tokens": 200}, timeout=60)
    assert r.status_code == 400 and "queue" in r.json()["error"]["message"]
    assert metric(server, "chatglm_requests_total") == 0 and engine.stats.tokens_generated == 0


def test_choices_that_do_not_fit_now_are_a_503_and_none_of_them_runs(small_queue):
    server, engine, gate = small_queue
    ids = engine.tokenizer.build_chat_ids("hi")
    running = engine.submit(GenerationRequest(ids, GREEDY, 4))
    gate.wait_held()  # the worker holds the first request's forward pass; the next ones wait in the queue
    waiting = engine.submit_all([GenerationRequest(ids, GREEDY, 4) for _ in range(3)])
    assert engine.stats.queued == 3
    r = httpx.post(f"{server.url}{CHAT}", json={"messages": USER, "n": 2, "max_tokens": 50}, timeout=60)
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert engine.stats.queued == 3 and engine.stats.requests_total == 4  # neither choice was queued
    with pytest.raises(EngineBusy):
        engine.submit_all([GenerationRequest(ids, GREEDY, 4) for _ in range(2)])
    assert engine.stats.queued == 3
    gate.open()
    assert all(list(h)[-1].finish in ("stop", "length") for h in [running, *waiting])
    assert engine.stats.requests_total == 4
    r = httpx.post(f"{server.url}{CHAT}", json={"messages": USER, "n": 4, "max_tokens": 2}, timeout=60)
    assert r.status_code == 200 and len(r.json()["choices"]) == 4  # a full queue's worth fits when idle


# ---- big inputs do not stall the event loop -----------------------------------------------------------
def test_prompts_are_built_off_the_event_loop(monkeypatch):
    import server.basic_app
    import server.openai_app

    model, tokenizer = loaded("chatglm2-tiny")
    engine = Engine(model, tokenizer, model_name="t")
    threads = []

    def recording(build):
        def wrapper(*args, **kwargs):
            threads.append(threading.current_thread())
            return build(*args, **kwargs)
        return wrapper

    from model.formats import ChatFormat

    monkeypatch.setattr(ChatFormat, "prompt_ids", recording(ChatFormat.prompt_ids))  # what every prompt goes through
    servers = [ThreadServer(server.openai_app.create_app(engine)), ThreadServer(server.basic_app.create_app(engine))]
    try:
        r = httpx.post(f"{servers[0].url}{CHAT}", json={"messages": USER, "max_tokens": 2}, timeout=60)
        assert r.status_code == 200
        r = httpx.post(f"{servers[1].url}/", json={"prompt": "hi", "max_length": 40}, timeout=60)
        assert r.status_code == 200
    finally:
        for s in servers:
            s.stop()
        engine.close()
    assert len(threads) == 2
    assert all(t not in (servers[0].thread, servers[1].thread) for t in threads)  # not the loops' threads


def test_an_oversized_message_list_is_refused_before_its_items_are_read(v3):
    # items that are each invalid: the answer names the count, so they were never validated one by one
    body = {"messages": [{"role": "wizard"}] * (MAX_MESSAGES + 1)}
    r = httpx.post(f"{v3.url}{CHAT}", json=body, timeout=60)
    assert r.status_code == 400 and f"at most {MAX_MESSAGES}" in r.json()["error"]["message"]


def test_basic_api_refuses_an_oversized_history(basic_v3):
    r = httpx.post(f"{basic_v3.url}/", json={"prompt": "hi", "history": [["a", "b"]] * (MAX_MESSAGES + 1)},
                   timeout=60)
    assert r.status_code == 400 and f"at most {MAX_MESSAGES}" in r.json()["error"]["message"]


# ---- shutting down while every slot is busy ------------------------------------------------------------
def test_close_with_every_slot_busy_ends_after_the_current_step():
    model, tokenizer = loaded("chatglm3-tiny")
    engine = Engine(model, tokenizer, max_queue=4, max_batch=1)
    ids = tokenizer.build_chat_ids("hi")
    gate = StepGate(model)
    try:
        running = engine.submit(GenerationRequest(ids, GREEDY, 200))  # no stop ids: runs until its budget
        waiting = engine.submit(GenerationRequest(ids, GREEDY, 200))
        gate.step()  # its prompt is read; the worker is held before the first decode step
        closer = threading.Thread(target=engine.close, kwargs={"timeout": 30})
        closer.start()
        gate.wait_held()
        while not engine._closed:
            closer.join(0.01)
        gate.open()
        closer.join(30)
        assert not closer.is_alive() and not engine._worker.is_alive()
        events = list(running)
        assert events[-1].finish == "cancelled" and events[-1].completion_tokens <= 2
        assert list(waiting)[-1].finish == "cancelled"
    finally:
        gate.remove()
