"""ChatGLM3's composite demo in the browser (Streamlit): Chat; Tool (the model calls the functions of
composite_demo/tools.py, sees their results and goes on); Code Interpreter (the model writes Python, which runs in a
Jupyter kernel on this machine, only when started with --allow-code-execution).

    python composite_demo/main.py [--model DIR_OR_HUB_ID] [--host 127.0.0.1] [--port 8501] [--auth USER:PASS] ...
    streamlit run composite_demo/main.py -- [the same flags]

(the flags of web_demo2.py, plus --allow-code-execution and --code-timeout; with `streamlit run`, Streamlit's own
options, such as --server.port, go before the `--`).
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import time
import weakref

import streamlit as st

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `streamlit run` adds only this folder

from composite_demo import tools  # noqa: E402
from composite_demo.interpreter import Kernel, code_of  # noqa: E402
from model.flags import build_parser, float_range, service_from_args  # noqa: E402
from model.service import (CompletionSettings, ConversationError, Finish, LocalService, Message,  # noqa: E402
                           ServiceError)
from server import streamlit_page as page  # noqa: E402
from server.webchat import clean_text, images_as_links, reply_stream  # noqa: E402

CODE = "Code Interpreter"
MODES = ("Chat", "Tool", CODE)
MAX_ROUNDS = 5  # model turns per message in the Tool and Code Interpreter modes: a model that keeps calling is
# stopped there
INTERPRETER = "interpreter"  # the metadata line of a ChatGLM3 turn whose code block is to be run
# The Code Interpreter mode's default system prompt (ChatGLM3 was trained to use its interpreter under one like it).
INTERPRETER_PROMPT = ("You are ChatGLM, an AI assistant with a Python interpreter on the user's computer, which has "
                      "no internet access. You may solve tasks by running Python code and reading its output; when "
                      "the output shows an error, correct the code and run it again. Plots drawn with matplotlib are "
                      "shown to the user. Files you write go to the current folder.")
CODE_OFF = ("**Code execution is off.** In this mode the model writes Python code that the demo would run on the "
            "computer serving this page, with the rights of the user who started it (it could read, change or "
            "delete files there). Only enable it for a model and users you trust: start the demo with "
            "`--allow-code-execution`, e.g. `python composite_demo/main.py --model ... --allow-code-execution`. "
            "Until then the model's code is shown but never run.")


SCRIPT = "composite_demo/main.py"  # how the page names itself in messages

def parser():
    ap = build_parser(__doc__, web=True, port=page.DEFAULT_PORT)
    ap.add_argument("--allow-code-execution", action="store_true",
                    help="Code Interpreter mode: run the Python the model writes, in a Jupyter kernel on this "
                         "machine (off by default)")
    ap.add_argument("--code-timeout", type=float_range(0, low_open=True), default=60.0, metavar="SECONDS",
                    help="Code Interpreter mode: time limit of one run; past it the run is interrupted (default 60)")
    return ap


def parse_args(argv: list[str]):
    """The flags, with host / port None where not given; FlagError instead of exiting on a bad one."""
    return page.parse_args(parser(), argv)


@st.cache_resource(show_spinner="Loading the model...")
def get_service(argv: tuple):
    """One completion service per process, shared by every browser session."""
    return service_from_args(parse_args(list(argv)))


# ---- the Code Interpreter's kernels: one per browser session ------------------------------------------------------
_kernels: dict[str, Kernel] = {}  # session id -> its kernel (to shut down those whose session has gone)
_kernels_lock = threading.Lock()


class _KernelHolder:
    """Kept in a session's state: when Streamlit drops the session (or the process exits), its kernel stops."""

    def __init__(self, session_id: str):
        self.kernel = Kernel()
        weakref.finalize(self, _drop_kernel, session_id, self.kernel)


def _drop_kernel(session_id: str, kernel: Kernel) -> None:
    with _kernels_lock:
        if _kernels.get(session_id) is kernel:
            del _kernels[session_id]
    kernel.shutdown()


def sweep_kernels(is_active) -> None:
    """Shut down the kernels of sessions that are no longer active (is_active(session id) -> bool); a session that
    comes back gets a new kernel on its next run."""
    with _kernels_lock:
        gone = [(sid, k) for sid, k in _kernels.items() if not is_active(sid)]
        for sid, _ in gone:
            del _kernels[sid]
    for _, kernel in gone:
        kernel.shutdown()


def session_kernel() -> Kernel:
    """This browser session's kernel (not started: it starts on its first run)."""
    from streamlit.runtime import get_instance
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    session_id = get_script_run_ctx().session_id
    holder = st.session_state.get("kernel_holder")
    if holder is None:
        holder = st.session_state["kernel_holder"] = _KernelHolder(session_id)
    with _kernels_lock:
        _kernels[session_id] = holder.kernel
    sweep_kernels(get_instance().is_active_session)
    return holder.kernel


def run_code(code: str, allowed: bool, kernel_for, timeout: float) -> dict:
    """The result entry of an interpreter turn's code; kernel_for() gives the kernel, asked only when allowed."""
    if not allowed:
        return {"role": "tool", "name": INTERPRETER, "content": "[not run: code execution is off]", "not_run": True}
    result = kernel_for().run(code, timeout)
    return {"role": "tool", "name": INTERPRETER, "content": result.observation(), "output": result.text,
            "images": result.images, "error": result.error, "timed_out": result.timed_out}


def interpreter_entries(segments: list[str]) -> list[dict] | None:
    """A ChatGLM3 reply's segments (raw, each opening with its metadata line) as conversation entries: the text,
    then each `interpreter` turn with its code. None when no segment is an interpreter turn."""
    text, calls = [], []
    for segment in segments:
        line, newline, body = segment.partition("\n")
        if newline and line.strip() == INTERPRETER:
            code = code_of(body)
            if code is not None:
                calls.append({"role": "assistant", "metadata": INTERPRETER, "content": body.strip(), "code": code})
                continue
        text.append(body if newline and not line.strip() else segment)
    if not calls:
        return None
    content = "\n\n".join(t.strip() for t in text if t.strip())
    return ([{"role": "assistant", "content": content}] if content else []) + calls


# ---- the conversation: entries {"role": user / assistant / tool, "content", "tool_calls"?, "error"?, ...} ----------
def show(entry: dict) -> None:
    """One entry as a chat message; markdown is rendered (images as links to them), HTML in it shown as text (no
    unsafe_allow_html)."""
    if entry["role"] == "tool" and entry["name"] == INTERPRETER:
        with st.chat_message("tool", avatar=":material/terminal:"):
            if entry.get("not_run"):
                st.markdown("**Not run** · code execution is off (start with `--allow-code-execution`)")
                return
            label = ("Run stopped (time limit)" if entry.get("timed_out") else
                     "Code error" if entry.get("error") else "Code output")
            st.markdown(f"**{label}** · `{INTERPRETER}`")
            if entry.get("output") or not entry.get("images"):
                st.code(entry.get("output") or "[no output]", language=None)
            for image in entry.get("images", ()):
                st.image(image)
        return
    if entry["role"] == "tool":
        with st.chat_message("tool", avatar=":material/build:"):
            label = "Tool error" if entry.get("error") else "Tool result"
            st.markdown(f"**{label}** · `{entry['name']}`")
            st.code(entry["content"], language=None)
        return
    with st.chat_message(entry["role"]):
        if entry.get("metadata") == INTERPRETER:
            st.markdown(f"**Code** · `{INTERPRETER}`")
            st.code(entry["code"], language="python")
            return
        if entry["content"]:
            st.markdown(images_as_links(entry["content"]))
        for call in entry.get("tool_calls", ()):
            st.markdown(f"**Tool call** · `{call['name']}`")
            st.code(call["arguments"], language="json")


def messages_of(conversation: list[dict], system_messages: list[Message]) -> list[Message]:
    out = list(system_messages)
    for e in conversation:
        out.append(Message(e["role"], e["content"], tool_calls=[dict(c) for c in e.get("tool_calls", ())],
                           metadata=e.get("metadata", "")))
    return out


def run_tool(call: dict) -> dict:
    """The tool entry for a call: its result, or its error (both go back to the model as the observation)."""
    try:
        return {"role": "tool", "name": call["name"], "content": tools.run(call["name"], call["arguments"])}
    except Exception as e:  # noqa: BLE001 - any failure of a tool is shown and sent back, never ends the page
        return {"role": "tool", "name": call["name"], "content": f"{type(e).__name__}: {e}", "error": True}


def model_turns(service, conversation: list[dict], settings: CompletionSettings, system: list[Message], owns,
                run_code_of=None):
    """The model's turns for the user's last message: reply; run its tool calls (or, with run_code_of(code) ->
    result entry, its interpreter turns' code); send the results back; up to MAX_ROUNDS turns. owns() says
    whether this run may still change the conversation (a Stop or a new message ends it). Drawn as it goes."""
    for _ in range(MAX_ROUNDS):
        reply = {"role": "assistant", "content": "", "tool_calls": []}
        conversation.append(reply)
        placeholder = st.empty()
        completion = service.complete(messages_of(conversation[:-1], system), settings)
        try:
            shown = 0.0
            for item in completion:
                if not owns():
                    return
                if isinstance(item, Finish):
                    if item.reason == "error":
                        raise ServiceError(item.error or "the reply failed")
                    if item.reason == "cancelled":
                        return
                elif item.tool_call is not None:
                    reply["tool_calls"].append(item.tool_call)
                else:
                    reply["content"] += item.content
                    if time.monotonic() - shown > 0.1:
                        placeholder.markdown(images_as_links(reply["content"]))
                        shown = time.monotonic()
        finally:
            completion.cancel()
        placeholder.empty()
        turns = [reply]
        if run_code_of is not None:  # the raw segments keep the metadata lines that the content drops
            entries = interpreter_entries(getattr(getattr(completion, "parser", None), "segments", None) or [])
            if entries is not None:
                replace_entry(conversation, reply, entries, owns)
                turns = entries
        for turn in turns:
            show(turn)
        calls = [t for t in turns if t.get("code") is not None] if run_code_of else reply["tool_calls"]
        if not calls:
            return
        for call in calls:
            result = run_code_of(call["code"]) if run_code_of else run_tool(call)
            if not owns():
                return
            conversation.append(result)
            show(result)
            if result.get("not_run"):  # nothing to send back: the page says how to enable code execution
                return
    what = "ran code" if run_code_of else "called tools"
    st.warning(f"The model {what} {MAX_ROUNDS} times in a row: stopped there. Send a message to go on.")


def replace_entry(conversation: list[dict], reply: dict, entries: list[dict], owns) -> None:
    """Put entries where reply is in the conversation (while this run still owns it)."""
    if owns() and reply in conversation:
        i = conversation.index(reply)
        conversation[i:i + 1] = entries


def drop_last_answer(conversation: list[dict]) -> bool:
    """Regenerate: remove everything after the last user message (the answer, its tool or interpreter turns);
    False when there is no user message to answer again."""
    last = max((i for i, e in enumerate(conversation) if e["role"] == "user"), default=None)
    if last is None:
        return False
    del conversation[last + 1:]
    return True


def main(service_for=None) -> None:
    """The page; service_for(argv tuple) gives the completion service (default: the flags', made once)."""
    st.set_page_config(page_title="ChatGLM3 composite demo", page_icon=":robot:", layout="wide")
    args, service = page.open_page(sys.argv[1:], parse_args, service_for or get_service, SCRIPT,
                                   runs_streamlit=True)
    caps = service.capabilities
    state = st.session_state
    conversations = state.setdefault("conversations", {mode: [] for mode in MODES})  # this browser session's
    # A Stop or a new message starts the next run before the streaming one notices: only the writer may change
    # the conversation, and each new run ends the old one's turn (as in web_demo2.py).
    shared = state.setdefault("shared", {"lock": threading.Lock(), "writer": None})
    with shared["lock"]:
        shared["writer"] = None
    if state.get("kernel_holder") is not None:  # ... and its code, if it is running some
        state.kernel_holder.kernel.interrupt()
    # The interpreter needs each turn's metadata line, which only a local model's replies keep.
    interpreter_ok = caps.supports_tools and isinstance(service, LocalService)

    with st.sidebar:
        st.markdown(f"**{caps.display_name}** · {service.model_name}")
        modes = MODES if interpreter_ok else MODES[:2] if caps.supports_tools else MODES[:1]
        mode = st.radio("Mode", modes, horizontal=True, key="mode")
        if not caps.supports_tools:
            st.info(f"Only Chat is offered: calling tools needs a ChatGLM3 checkpoint, and this model is "
                    f"{caps.display_name}, which was not trained to call tools.")
        elif not interpreter_ok:
            st.caption("Code Interpreter is offered with a local model only: the replies of a server (--api-base) "
                       "do not say which code blocks the model meant to run.")
        context = service.context_length or 32768
        max_length = st.slider("max_length", 0, context, min(8192, context), step=1)
        top_p = st.slider("top_p", 0.0, 1.0, float(caps.top_p), step=0.01)
        temperature = st.slider("temperature", 0.0, 1.0, float(caps.temperature), step=0.01)
        system = ""
        if caps.has_system_role:
            system = (st.text_input("system prompt", value=INTERPRETER_PROMPT, key="system-interpreter")
                      if mode == CODE else st.text_input("system prompt"))
        if mode == "Tool":
            with st.expander(f"Tools ({len(tools.REGISTRY)})"):
                for fn in tools.REGISTRY.values():
                    st.markdown(f"`{fn.__name__}`: {fn.tool_description['description']}")
        if mode == CODE:
            if args.allow_code_execution:
                st.caption(f"Code runs in a Jupyter kernel on this machine, in a temporary folder; each run may "
                           f"take {args.code_timeout:g} s. Clear history also restarts the kernel.")
            else:
                st.caption("Code execution is off: the model's code is shown, not run.")
        if st.button("Clear history", key="clear"):
            with shared["lock"]:
                conversations[mode] = []
            if mode == CODE and state.get("kernel_holder") is not None and state.kernel_holder.kernel.alive:
                state.kernel_holder.kernel.restart()
        regenerate = st.button("Regenerate", key="regenerate", help="answer the last message again")
        st.button("Stop", key="stop", help="end the reply being written (it is kept)")

    conversation = conversations[mode]
    if mode == CODE and not args.allow_code_execution:
        st.info(CODE_OFF)
    me = object()
    query = st.chat_input("Input...")  # one placeholder: a new one would make it another widget, losing text
    if query:
        entry = {"role": "user", "content": clean_text(query)}
        with shared["lock"]:
            shared["writer"] = me
            conversation.append(entry)
    elif regenerate:
        with shared["lock"]:
            shared["writer"] = me
            if not drop_last_answer(conversation):
                shared["writer"] = None
    for entry in conversation:
        show(entry)
    if shared["writer"] is not me:
        return

    def owns():
        with shared["lock"]:
            return shared["writer"] is me

    try:
        if mode == "Chat":
            chat_turn(service, conversation, system, max_length, top_p, temperature, owns)
        else:
            offered = [fn.tool_description for fn in tools.REGISTRY.values()] if mode == "Tool" else None
            settings = CompletionSettings(temperature=temperature, top_p=top_p, max_length=int(max_length),
                                          tools=offered)
            run_code_of = (functools.partial(run_code, allowed=args.allow_code_execution, kernel_for=session_kernel,
                                             timeout=args.code_timeout) if mode == CODE else None)
            model_turns(service, conversation, settings, caps.system_messages(system), owns, run_code_of)
    except (ConversationError, ServiceError) as e:
        with shared["lock"]:
            while conversation and conversation[-1]["role"] == "assistant" and not (
                    conversation[-1]["content"] or conversation[-1].get("tool_calls")):
                conversation.pop()
        st.error(str(e))


def chat_turn(service, conversation, system, max_length, top_p, temperature, owns) -> None:
    """The Chat mode's reply, streamed (web_demo2.py's reply stream over the same service)."""
    reply = {"role": "assistant", "content": ""}
    conversation.append(reply)  # grows as it streams, so a Stop keeps what was written
    placeholder = st.empty()
    history = [{"role": e["role"], "content": e["content"]} for e in conversation[:-1]]
    stream = reply_stream(service, history, system, max_length, top_p, temperature, length_label="max_length")
    try:
        shown = 0.0
        for text in stream:
            if not owns():
                return
            reply["content"] = text
            if time.monotonic() - shown > 0.1:
                placeholder.markdown(images_as_links(text))
                shown = time.monotonic()
        placeholder.empty()
        show(reply)
    finally:
        stream.close()


if __name__ == "__main__":
    if page.under_streamlit():
        main()
    else:
        sys.exit(page.run_streamlit(__file__, sys.argv[1:], parse_args))
