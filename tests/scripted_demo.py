"""The web demos with a scripted engine (in a LocalService, as the demos get it), for their browser tests: each reply
is text the test chose.

    python tests/scripted_demo.py --model TOKENIZER_DIR [web_demo.py flags]              (Gradio)
    streamlit run tests/scripted_demo.py -- --model TOKENIZER_DIR [web_demo2.py flags]   (Streamlit)

A message containing say(TEXT) gets TEXT as its reply; one containing LONG gets a reply that goes on until
stopped; one containing FAIL gets an engine error; any other gets a short numbered reply, a new one each time.
Replies stream a few characters at a time, through the demos' real prompt building and reply parsing.
"""

from __future__ import annotations

import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SAY, END = "please say: ", " :end"
LONG = "write a very long story"
FAIL = "please fail"
PIECE_S = 0.06  # between streamed pieces: slow enough that both pages show the reply growing in steps
NUMBERED_PIECE_S = 0.15  # the short numbered reply: above web_demo2's 0.1 s redraw interval, so it shows growing


CANCELLED = "scripted reply cancelled"  # what the engine prints when a reply is cancelled


def say(text: str) -> str:
    return f"{SAY}{text}{END}"


def closing_cancels(page, server, timeout_s: float = 20.0) -> bool:
    """Close the browser page; whether the server's scripted engine then cancels a reply within timeout_s."""
    before = server.output().count(CANCELLED)
    page.close()
    deadline = time.monotonic() + timeout_s
    while server.output().count(CANCELLED) == before:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


class ScriptedEngine:
    """What LocalService uses of model.engine.Engine, replying by the script above."""

    def __init__(self, tokenizer, model_name: str = "scripted"):
        from model.formats import format_for

        self.tokenizer, self.format, self.model_name = tokenizer, format_for(tokenizer.family), model_name
        self.context_length, self.max_queue = 8192, 32
        self.replies = 0
        self._lock = threading.Lock()

    def close(self) -> None:
        pass

    def submit_all(self, requests, loop=None):
        return [self.submit(r, loop) for r in requests]

    def submit(self, request, loop=None):
        from model.engine import RequestHandle

        prompt = self.tokenizer.decode(request.input_ids)
        mark = next((m for m in ("<|user|>", "问：", "问:") if m in prompt), "")
        user = prompt[prompt.rfind(mark):]  # the last message: earlier ones must not steer this reply
        handle = RequestHandle(request, None)
        threading.Thread(target=self._stream, args=(handle, user), daemon=True).start()
        return handle

    def _reply(self, user: str):
        """(pieces of the reply, error or None)."""
        if SAY in user and END in user:
            text = user[user.index(SAY) + len(SAY):user.rindex(END)]
            return [text[i:i + 4] for i in range(0, len(text), 4)], None
        if LONG in user.lower():
            return (f"word{i} " for i in range(100_000)), None
        if FAIL in user.lower():
            return ["Half a reply"], "the scripted engine failed"
        with self._lock:
            self.replies += 1
            n = self.replies
        return [f"Reply {n}:", " this", " is", " a", " scripted", " reply", "."], None

    def _stream(self, handle, user: str) -> None:
        from model.engine import Event

        pieces, error = self._reply(user)
        numbered = isinstance(pieces, list) and pieces[0].startswith("Reply ")
        if self.format.segments:
            handle._put(Event(text="\n"))  # a ChatGLM3 reply opens with its (empty) metadata line
        for count, piece in enumerate(pieces, 1):
            if handle.cancelled or count >= handle.request.max_new_tokens:
                break
            # A said reply's last piece follows at once (as a fast model's do): the page must show what it merged.
            if not (isinstance(pieces, list) and count == len(pieces) and SAY in user):
                time.sleep(NUMBERED_PIECE_S if numbered else PIECE_S)
            handle._put(Event(text=piece, completion_tokens=count))
        if handle.cancelled:
            print(f"{CANCELLED} after {count} pieces", flush=True)  # tests read the server's output
            handle._put(Event(finish="cancelled"))
        elif error:
            handle._put(Event(finish="error", error=error))
        else:
            handle._put(Event(finish="stop"))


def scripted_service(argv: tuple):
    """A LocalService over a ScriptedEngine with the tokenizer of --model."""
    from model import load_model
    from model.flags import build_parser
    from model.service import LocalService

    args, _ = build_parser(__doc__, web=True).parse_known_args(list(argv))
    _, tokenizer = load_model(args.model, device="cpu", dtype="float32")
    return LocalService(ScriptedEngine(tokenizer))


def main_gradio(argv: list[str]) -> None:
    import logging

    import web_demo
    from model.flags import build_parser, logins

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser(__doc__, web=True, port=7860).parse_args(argv)
    service = scripted_service(tuple(argv))
    web_demo.launch(web_demo.create_demo(service), args.host, args.port, auth=logins(args.auth))


if __name__ == "__main__":
    from streamlit import runtime

    if runtime.exists():
        import streamlit as st

        import web_demo2

        web_demo2.main(st.cache_resource(scripted_service))
    else:
        main_gradio(sys.argv[1:])
