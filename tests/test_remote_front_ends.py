"""The terminal and web demos as the interface of a model served elsewhere (--api-base), against our own
openai_api.py started as a process: replies stream, Ctrl-C cancels the generation on the server, and a server
that is down or refuses is reported in one line with what to do."""

import os
import re
import sys
import time

import httpx
import pexpect
import pytest

from conftest import ROOT
from serving import free_port

pytestmark = pytest.mark.slow
PROMPT = "用户："


def cli(*args):
    child = pexpect.spawn(sys.executable, ["cli_demo.py", *args], cwd=ROOT, encoding="utf-8", timeout=90,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"), dimensions=(40, 200))
    return child


def running(server) -> int:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return int(re.search(r"^chatglm_running_sequences (\d+)", text, re.M).group(1))


def test_the_cli_chats_with_a_remote_server_and_ctrl_c_cancels_there(v3):
    child = cli("--api-base", f"{v3.url}/v1", "--temperature", "0", "--max-new-tokens", "8000")
    child.expect("欢迎使用")
    child.expect(PROMPT)
    # greedy, this tiny model never writes a stop token for this message: 8000 tokens would take many seconds
    child.sendline("Tell me a long story")
    child.expect("ChatGLM：")
    deadline = time.monotonic() + 60
    while running(v3) == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running(v3) == 1  # generating on the server
    child.sendintr()
    child.expect("reply interrupted")
    child.expect(PROMPT)
    deadline = time.monotonic() + 10
    while running(v3) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running(v3) == 0  # the server saw the client leave and stopped generating
    # a new conversation: the reply shown is the server's own reply to it
    child.sendline("clear")
    child.expect(PROMPT)
    expected = httpx.post(f"{v3.url}/v1/chat/completions", timeout=120, json={
        "messages": [{"role": "user", "content": "你好"}], "temperature": 0, "max_tokens": 8000}).json()
    child.sendline("你好")
    child.expect("ChatGLM：")
    child.expect("\r\n\r\n" + PROMPT)
    assert child.before.replace("\r\n", "\n") == expected["choices"][0]["message"]["content"]
    child.sendline("stop")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_a_server_that_is_down_is_reported_in_one_line():
    url = f"http://127.0.0.1:{free_port()}/v1"
    child = cli("--api-base", url)
    child.expect(pexpect.EOF)
    child.close()
    out = child.before
    assert child.exitstatus == 2 and "Traceback" not in out
    assert "cannot reach" in out and url.removesuffix("/v1") in out


def test_a_refused_key_is_reported_and_the_cli_goes_on(v2_keyed):
    child = cli("--api-base", f"{v2_keyed.url}/v1", "--api-key", "wrong-key")
    child.expect(pexpect.EOF)  # the model list is read when the service starts: refused at once
    child.close()
    assert child.exitstatus == 2 and "Traceback" not in child.before and "--api-key" in child.before


def test_the_web_demos_reply_stream_over_a_remote_server(v3):
    from model.remote import RemoteService
    from server.webchat import reply_stream

    service = RemoteService(f"{v3.url}/v1")
    history = [{"role": "user", "content": "你好"}]
    texts = list(reply_stream(service, history, "", 8192, 0.8, 0))  # temperature 0: greedy
    expected = httpx.post(f"{v3.url}/v1/chat/completions", timeout=120, json={
        "messages": history, "temperature": 0}).json()["choices"][0]["message"]["content"]
    assert texts and texts[-1] == expected and all(expected.startswith(t) for t in texts)
