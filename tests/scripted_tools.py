"""The composite demo (composite_demo/main.py) with a scripted engine that also calls tools, for its browser tests:

    streamlit run tests/scripted_tools.py -- --model TOKENIZER_DIR [composite demo flags]

A message containing call(NAME, ARGUMENTS) gets, as the model's first turn, a ChatGLM3 tool call of NAME with
ARGUMENTS (a dict, written as `tool_call(...)` the way ChatGLM3 writes it); the turn after the tool's result
(the observation) says "Observed: " and that result, as the model received it in its prompt; with
call(..., again=True) every turn calls the tool again. A message containing run(CODE) gets a few words and then a
ChatGLM3 interpreter turn (metadata line `interpreter`, CODE in a python code block), as ChatGLM3 writes them; the
turn after the run's result is "Observed: " and that result (run(CODE, again=True): the code again, every turn).
Every other message is answered as tests/scripted_demo.py answers it.
"""

from __future__ import annotations

import json
import os
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from scripted_demo import ScriptedEngine, scripted_service  # noqa: E402

CALL, RUN, END = "please call tool ", "please run code ", " :end"
RUN_INTRO = "Let me run that."
OBSERVED = "Observed: "
OBSERVATION_MARK = "<|observation|>"


def call(name: str, arguments: dict, again: bool = False) -> str:
    return f"{CALL}{json.dumps({'name': name, 'arguments': arguments, 'again': again})}{END}"


def run(code: str, again: bool = False) -> str:
    return f"{RUN}{json.dumps({'code': code, 'again': again})}{END}"


class ToolScriptedEngine(ScriptedEngine):
    """ScriptedEngine, plus tool calls (see above)."""

    def submit(self, request, loop=None):
        from model.engine import Event, RequestHandle

        prompt = self.tokenizer.decode(request.input_ids)
        user = prompt[prompt.rfind("<|user|>"):]
        kind = next((k for k in (CALL, RUN) if k in user and END in user), None)
        if kind is None:
            return super().submit(request, loop)
        handle = RequestHandle(request, loop)  # a server iterates it in its event loop
        spec = json.loads(user[user.index(kind) + len(kind):user.rindex(END)])
        if OBSERVATION_MARK in user and not spec["again"]:  # the tool's result came back: say what was received
            observed = user[user.rindex(OBSERVATION_MARK) + len(OBSERVATION_MARK):]
            observed = observed.rsplit("<|assistant|>", 1)[0].strip()
            events = [Event(text="\n"), Event(text=OBSERVED + observed, completion_tokens=1)]
        elif kind == RUN:  # an empty metadata line and a few words, then the interpreter turn, token by token
            pieces = ["\n", RUN_INTRO, "<|assistant|>", "interpreter", "\n", "```", "python", "\n",
                      *spec["code"].splitlines(keepends=True), "\n", "```"]
            events = [Event(text=p, completion_tokens=n) for n, p in enumerate(pieces, 1)]
        else:
            from model.formats import render_tool_call

            text = f"{spec['name']}\n{render_tool_call(spec['name'], json.dumps(spec['arguments']))}"
            events = [Event(text=text[i:i + 8], completion_tokens=n) for n, i in enumerate(range(0, len(text), 8))]

        def stream():
            for event in events:
                handle._put(event)
            handle._put(Event(finish="stop"))

        threading.Thread(target=stream, daemon=True).start()
        return handle


def scripted_tool_service(argv: tuple):
    """A LocalService over a ToolScriptedEngine with the tokenizer of --model."""
    from model.service import LocalService

    service = scripted_service(argv)
    return LocalService(ToolScriptedEngine(service.engine.tokenizer))


if __name__ == "__main__":
    import streamlit as st

    from composite_demo import main as composite

    composite.main(st.cache_resource(scripted_tool_service))
