"""Every front end on the tiny ChatGLM-6B (v1) checkpoint: the same scripts, unchanged, picking v1 up from it."""

import random

import httpx
import pexpect
import pytest

from browser import wait_until
from conftest import loaded, model_dir
from serving import ServerProcess
from test_cli_demo import PROMPT, ask, spawn

V1 = "chatglm1-tiny"


def greedy_chat(query, history=(), **kwargs):
    model, tokenizer = loaded(V1)
    return model.chat(tokenizer, query, list(history), do_sample=False, **kwargs)[0]


@pytest.fixture(scope="module")
def openai_v1():
    with ServerProcess("openai_api.py", model_dir(V1)) as server:
        yield server


@pytest.fixture(scope="module")
def basic_v1():
    with ServerProcess("api.py", model_dir(V1)) as server:
        yield server


@pytest.mark.slow
def test_openai_api_reply_equals_chat_streamed_or_not(openai_v1):
    body = {"model": "m", "temperature": 0, "max_tokens": 24,
            "messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好!有什么事?"},
                         {"role": "user", "content": "今天天气怎么样,适合出门吗?"}]}
    reply = httpx.post(f"{openai_v1.url}/v1/chat/completions", json=body, timeout=60).json()
    content = reply["choices"][0]["message"]["content"]
    assert content == greedy_chat("今天天气怎么样,适合出门吗?", [("你好", "你好!有什么事?")], max_new_tokens=24)
    streamed = ""
    with httpx.stream("POST", f"{openai_v1.url}/v1/chat/completions", json=body | {"stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                import json

                for choice in json.loads(line[6:])["choices"]:
                    streamed += choice["delta"].get("content") or ""
    assert streamed == content
    tools = body | {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}
    refused = httpx.post(f"{openai_v1.url}/v1/chat/completions", json=tools, timeout=60)
    assert refused.status_code == 400 and "ChatGLM3" in refused.json()["error"]["message"]


@pytest.mark.slow
def test_basic_api_keeps_question_answer_pairs(basic_v1):
    history = [["你好", "你好!"]]
    r = httpx.post(basic_v1.url, json={"prompt": "写一句诗", "history": history, "temperature": 0,
                                       "max_length": 200}, timeout=60).json()
    assert r["response"] == greedy_chat("写一句诗", [tuple(history[0])], max_length=200)
    assert r["history"] == history + [["写一句诗", r["response"]]]


@pytest.mark.slow
def test_cli_demo_streams_and_clears():
    child = spawn(model_dir(V1))
    first = ask(child, "你好,世界")
    assert first == greedy_chat("你好,世界") and first
    second = ask(child, "再来")
    assert second == greedy_chat("再来", [("你好,世界", first)])  # the whole conversation re-read
    child.sendline("clear")
    child.expect(PROMPT)
    assert ask(child, "再来") == greedy_chat("再来")
    child.sendline("stop")
    child.expect(pexpect.EOF)


def test_web_demo_replies(browser):
    from test_web_demo import last_bot, open_page, user_texts

    with ServerProcess("web_demo.py", model_dir(V1), ready_path="/") as server:
        page = open_page(browser, server.url)
        assert not page.locator("#system").is_visible()  # no system prompt in the first generation
        page.locator("#user-input textarea").fill("你好")
        page.locator("#submit").click()
        wait_until(page, lambda: last_bot(page), what="a reply")
        assert user_texts(page) == ["你好"]
        page.locator("#stop").click()


def test_web_demo2_replies(browser):
    from test_web_demo2 import bubble_texts, open_page, send

    with ServerProcess("web_demo2.py", model_dir(V1), ready_path="/_stcore/health", streamlit=True) as server:
        page = open_page(browser, server.url)
        send(page, "你好")
        wait_until(page, lambda: len(bubble_texts(page)) == 2 and all(t.strip() for t in bubble_texts(page)),
                   timeout_s=90, what="the reply in a chat bubble")
        assert bubble_texts(page)[0].strip() == "你好"


def test_stream_parser_rewrites_punctuation_as_the_original():
    """Streamed in random pieces, a v1 reply's text equals the original post-processing of the whole text."""
    from model.reply import process_response_v1
    from model.formats import reply_parser

    rng = random.Random(0)
    alphabet = list("中文ab ,!:;?，\n") + ["[[训练时间]]"]
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 25)))
        parser, pieces, i = reply_parser("chatglm1"), [], 0
        while i < len(text):
            j = i + rng.randint(1, 4)
            pieces += [p.content for p in parser.feed(text[i:j])]
            i = j
        pieces += [p.content for p in parser.finish()]
        assert "".join(pieces) == process_response_v1(text), text
