"""cli_demo.py through a real pseudo-terminal: streamed replies, clear, stop, Ctrl-C, wide characters."""

import os
import sys

import pexpect
import pytest

from conftest import ROOT, loaded, model_dir

PROMPT = "用户："


def spawn(model, *args, env=None):
    child = pexpect.spawn(sys.executable, ["cli_demo.py", "--model", model, "--device", "cpu", "--dtype", "float32",
                                           "--temperature", "0", *args],
                          cwd=ROOT, encoding="utf-8", timeout=90, env=env or dict(os.environ, HF_HUB_OFFLINE="1"),
                          dimensions=(40, 200))
    child.expect("欢迎使用 ChatGLM")
    child.expect(PROMPT)
    return child


def ask(child, text) -> str:
    """Send a message; return the reply as shown (up to the next prompt)."""
    child.sendline(text)
    child.expect("ChatGLM：")
    child.expect("\r\n\r\n" + PROMPT)
    return child.before.replace("\r\n", "\n")


@pytest.mark.slow
def test_replies_equal_the_model_and_clear_forgets(tmp_path):
    model, tokenizer = loaded("chatglm2-tiny")
    child = spawn(model_dir("chatglm2-tiny"))
    first = ask(child, "你好😀，世界")
    expected, history = model.chat(tokenizer, "你好😀，世界", do_sample=False)
    assert first == expected and first

    second = ask(child, "再来")  # continues on the cached conversation
    _, _, cache = list(model.stream_chat(tokenizer, "你好😀，世界", [], do_sample=False,
                                         return_past_key_values=True))[-1]
    expected2 = list(model.stream_chat(tokenizer, "再来", history, past_key_values=cache, do_sample=False,
                                       return_past_key_values=True))[-1][0]
    assert second == expected2

    child.sendline("clear")
    child.expect("欢迎使用")
    child.expect(PROMPT)
    assert ask(child, "再来") == model.chat(tokenizer, "再来", do_sample=False)[0]  # no history any more
    child.sendline("stop")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.mark.slow
def test_ctrl_c_stops_the_reply_not_the_program(tmp_path):
    from model.tiny import write_checkpoint

    write_checkpoint(str(tmp_path / "long"), "chatglm3", "tiny", "float32")  # 8192 tokens of context
    child = spawn(str(tmp_path / "long"), "--max-length", "8000")
    child.sendline("讲一个很长的故事")
    child.expect("ChatGLM：")
    child.expect(r"\S{3}")  # the reply is streaming
    child.sendintr()
    child.expect("interrupted")
    child.expect(PROMPT)
    assert child.isalive()
    child.sendline("继续")  # the conversation goes on after an interrupted reply
    child.expect("ChatGLM：")
    child.expect(r"\S{3}")
    child.sendintr()
    child.expect(PROMPT)
    child.sendintr()  # Ctrl-C at the prompt: leave cleanly
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and "Traceback" not in (child.before or "")


@pytest.mark.slow
def test_missing_model_says_what_to_do(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), MODEL_PATH="")
    child = pexpect.spawn(sys.executable, ["cli_demo.py"], cwd=ROOT, encoding="utf-8", timeout=60, env=env)
    child.expect(pexpect.EOF)
    child.close()
    output = child.before
    assert child.exitstatus == 2 and "Traceback" not in output
    assert "THUDM/chatglm2-6b" in output and "--model" in output and "python -m model.tiny" in output
