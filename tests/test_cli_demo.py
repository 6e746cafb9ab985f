"""cli_demo.py through a real pseudo-terminal (streamed replies, clear, stop, Ctrl-C, wide characters), and its
conversation in-process over the completion service (Ctrl-C cancels in the engine; errors keep it running)."""

import os
import sys
import threading
import time

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

    second = ask(child, "再来")  # the whole conversation, read again by the engine
    assert second == model.chat(tokenizer, "再来", history, do_sample=False)[0]

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


# ---- in-process: the conversation over the completion service -------------------------------------------------
def test_ctrl_c_cancels_in_the_engine_and_keeps_what_was_shown():
    """KeyboardInterrupt while a reply streams: the engine ends the request (finish "cancelled", nothing running),
    the conversation keeps the question and the text shown, and the next turn is answered."""
    import cli_demo
    from model.engine import Engine
    from model.service import CompletionSettings, LocalService, Message
    from serving import StepGate

    model, tokenizer = loaded("chatglm2-tiny")
    gate = StepGate(model)  # the reply cannot end on its own: every forward pass waits for the test
    engine = Engine(model, tokenizer, max_batch=1)
    handles = []
    submit_all = engine.submit_all
    engine.submit_all = lambda requests, loop=None: handles.extend(submit_all(requests, loop)) or handles[-1:]
    conversation = cli_demo.Conversation(LocalService(engine), CompletionSettings(temperature=0, max_tokens=60))
    shown, outcome = [], []

    def show(delta):
        shown.append(delta)
        raise KeyboardInterrupt  # Ctrl-C right after the first piece reached the terminal

    def turn():
        try:
            conversation.ask("讲一个很长的故事", show)
        except BaseException as e:  # noqa: BLE001 - the test looks at it
            outcome.append(e)

    try:
        consumer = threading.Thread(target=turn)
        consumer.start()
        for _ in range(30):  # one forward pass at a time until the first text arrives
            if not consumer.is_alive():
                break
            gate.step(idle=lambda: not consumer.is_alive())
        consumer.join(10)
        assert len(outcome) == 1 and isinstance(outcome[0], KeyboardInterrupt)
        generated = engine.stats.tokens_generated
        gate.open()  # the worker may go on: it must find the request cancelled
        deadline = time.monotonic() + 10
        while not handles[0].done and time.monotonic() < deadline:
            time.sleep(0.01)
        events = list(handles[0])  # what the engine sent after the consumer stopped reading
        assert events and events[-1].finish == "cancelled"
        assert engine.stats.running == 0 and engine.stats.queued == 0
        assert engine.stats.tokens_generated <= generated + 1 < 60  # at most the pass already under way
        assert conversation.messages == [Message("user", "讲一个很长的故事"), Message("assistant", "".join(shown))]
        assert shown and shown[0]

        reply = []
        conversation.ask("继续", reply.append)  # the conversation goes on, interrupted turn included
        assert conversation.messages[-2:] == [Message("user", "继续"), Message("assistant", "".join(reply))]
        assert len(conversation.messages) == 4
    finally:
        gate.remove()
        engine.close()


class FailingService:
    """A completion service whose every reply fails with the given errors in turn, then replies "ok"."""

    def __init__(self, *errors):
        from model.service import Capabilities

        self.capabilities, self.errors, self.asked = Capabilities("ChatGLM-Test"), list(errors), []

    def complete(self, messages, settings):
        from model.service import Completion, Finish, ReplyPart

        self.asked.append(list(messages))
        error = self.errors.pop(0) if self.errors else None
        if isinstance(error, Exception):
            raise error

        class Done(Completion):
            def cancel(self):
                pass

            def __iter__(self):
                if error == "mid-reply":
                    yield ReplyPart(content="half")
                    yield Finish("error", error="the GPU fell over")
                    return
                yield ReplyPart(content="ok")
                yield Finish("stop")

        return Done()

    def close(self):
        pass


def test_errors_say_what_to_do_and_the_program_goes_on(monkeypatch, capsys):
    import cli_demo
    from model.service import CompletionSettings, ConversationError, Message, ServiceBusy, ServiceUnavailable

    service = FailingService(ConversationError("the conversation is too long", "messages"), ServiceBusy("busy"),
                             ServiceUnavailable("gone"), "mid-reply")
    typed = iter(["one", "two", "three", "four", "five", "stop"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(typed))
    assert cli_demo.chat(service, CompletionSettings(), None) == 0
    out = capsys.readouterr().out
    assert "欢迎使用 ChatGLM-Test" in out
    assert "too long\n(type clear" in out and "busy\n(send the message again in a moment" in out
    assert "gone\n(check that the model service is running" in out
    assert "the reply failed: the GPU fell over" in out
    # every message reached the service; only the answered one joined the conversation
    assert [m[-1].content for m in service.asked] == ["one", "two", "three", "four", "five"]
    assert service.asked[-1] == [Message("user", "five")]
