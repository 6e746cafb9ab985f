"""api.py: the original request/response schema, as a real process."""

import datetime

import httpx
import pytest

from conftest import loaded
from model import load_model
from model.formats import reply_parser
from model.generation import SamplingParams


def post(server, **body):
    return httpx.post(f"{server.url}/", json=body, timeout=60)


def test_v2_reply_and_history_equal_the_model_chat(basic_v2):
    model, tokenizer = loaded("chatglm2-tiny")
    r = post(basic_v2, prompt="你好", history=[], temperature=0)
    assert r.status_code == 200
    body = r.json()
    expected, history = model.chat(tokenizer, "你好", history=[], do_sample=False)
    assert body["response"] == expected and body["history"] == [["你好", expected]] and body["status"] == 200
    datetime.datetime.strptime(body["time"], "%Y-%m-%d %H:%M:%S")

    second = post(basic_v2, prompt="再说一次", history=body["history"], temperature=0, max_length=200).json()
    expected2, _ = model.chat(tokenizer, "再说一次", history=history, do_sample=False, max_length=200)
    assert second["response"] == expected2
    assert second["history"] == [["你好", expected], ["再说一次", expected2]]


def test_v3_role_history(basic_v3, v3_dir):
    model, tokenizer = load_model(v3_dir, device="cpu", dtype="float32")
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
               {"role": "assistant", "metadata": "", "content": "hello"}]
    body = post(basic_v3, prompt="more", history=history, temperature=0, max_length=120).json()
    ids = tokenizer.build_chat_ids("more", history)
    parser = reply_parser("chatglm3")
    text = ""
    for delta, _ in model.stream_ids(tokenizer, ids, params=SamplingParams(), max_new_tokens=120 - len(ids),
                                     stop_ids=tokenizer.reply_stop_ids()):
        text += "".join(p.content for p in parser.feed(delta))
    text += "".join(p.content for p in parser.finish())
    assert body["response"] == text
    assert body["history"] == history + [{"role": "user", "content": "more"},
                                         {"role": "assistant", "metadata": "", "content": text}]
    pairs = post(basic_v3, prompt="more", history=[["hi", "hello"]], temperature=0, max_length=60).json()
    assert pairs["history"][:2] == [{"role": "user", "content": "hi"},
                                    {"role": "assistant", "metadata": "", "content": "hello"}]


@pytest.mark.parametrize("body, needle", [
    ({}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": "x", "history": "nope"}, "history"),
    ({"prompt": "x", "history": [["only one"]]}, "history"),
    ({"prompt": "x", "history": [{"role": "user", "content": "a"}]}, "ChatGLM3"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "max_length": 3}, "max_length"),
    ({"prompt": "x", "max_length": "long"}, "max_length"),
])
def test_v2_bad_requests(basic_v2, body, needle):
    r = httpx.post(f"{basic_v2.url}/", json=body)
    assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text
    assert basic_v2.alive() and post(basic_v2, prompt="ok", max_length=40, temperature=0).status_code == 200


def test_v3_unknown_role_is_refused(basic_v3):
    r = post(basic_v3, prompt="x", history=[{"role": "wizard", "content": "a"}])
    assert r.status_code == 400 and "role" in r.json()["error"]["message"]
