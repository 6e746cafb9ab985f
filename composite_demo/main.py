"""ChatGLM3's composite demo in the browser (Streamlit): Chat, and Tool (the model calls the functions of
composite_demo/tools.py, sees their results and goes on).

    streamlit run composite_demo/main.py -- [--model DIR_OR_HUB_ID] [--host 127.0.0.1] [--auth USER:PASS] ...

(the flags of web_demo2.py; Streamlit's own options, such as --server.port, go before the `--`).
"""

from __future__ import annotations

import os
import sys
import threading
import time

import streamlit as st

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `streamlit run` adds only this folder

from composite_demo import tools  # noqa: E402
from model.flags import build_parser, service_from_args  # noqa: E402
from model.service import CompletionSettings, ConversationError, Finish, Message, ServiceError  # noqa: E402
from server import streamlit_page as page  # noqa: E402
from server.webchat import clean_text, reply_stream  # noqa: E402

MODES = ("Chat", "Tool")
MAX_ROUNDS = 5  # model turns per message in the Tool mode: a model that keeps calling tools is stopped there
LATER = "Code Interpreter: not available yet (it comes in a later version)."


SCRIPT = "composite_demo/main.py"  # how the page names itself in messages

def parser():
    return build_parser(__doc__, web=True)


def parse_args(argv: list[str]):
    """The flags, with host / port None where not given; FlagError instead of exiting on a bad one."""
    return page.parse_args(parser(), argv)


@st.cache_resource(show_spinner="Loading the model...")
def get_service(argv: tuple):
    """One completion service per process, shared by every browser session."""
    return service_from_args(parse_args(list(argv)))


# ---- the conversation: entries {"role": user / assistant / tool, "content", "tool_calls"?, "error"?} ---------------
def show(entry: dict) -> None:
    """One entry as a chat message; markdown is rendered, HTML in it shown as text (no unsafe_allow_html)."""
    if entry["role"] == "tool":
        with st.chat_message("tool", avatar=":material/build:"):
            label = "Tool error" if entry.get("error") else "Tool result"
            st.markdown(f"**{label}** · `{entry['name']}`")
            st.code(entry["content"], language=None)
        return
    with st.chat_message(entry["role"]):
        if entry["content"]:
            st.markdown(entry["content"])
        for call in entry.get("tool_calls", ()):
            st.markdown(f"**Tool call** · `{call['name']}`")
            st.code(call["arguments"], language="json")


def messages_of(conversation: list[dict], system_messages: list[Message]) -> list[Message]:
    out = list(system_messages)
    for e in conversation:
        out.append(Message(e["role"], e["content"], tool_calls=[dict(c) for c in e.get("tool_calls", ())]))
    return out


def run_tool(call: dict) -> dict:
    """The tool entry for a call: its result, or its error (both go back to the model as the observation)."""
    try:
        return {"role": "tool", "name": call["name"], "content": tools.run(call["name"], call["arguments"])}
    except Exception as e:  # noqa: BLE001 - any failure of a tool is shown and sent back, never ends the page
        return {"role": "tool", "name": call["name"], "content": f"{type(e).__name__}: {e}", "error": True}


def tool_turns(service, conversation: list[dict], settings: CompletionSettings, system: list[Message], owns):
    """The model's turns for the user's last message: reply, run its tool calls, send their results back, up to
    MAX_ROUNDS turns. owns() says whether this run may still change the conversation (a Stop or a new message
    ends it). Drawn as it goes."""
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
                        placeholder.markdown(reply["content"])
                        shown = time.monotonic()
        finally:
            completion.cancel()
        placeholder.empty()
        show(reply)
        if not reply["tool_calls"]:
            return
        for call in reply["tool_calls"]:
            result = run_tool(call)
            if not owns():
                return
            conversation.append(result)
            show(result)
    st.warning(f"The model called tools {MAX_ROUNDS} times in a row: stopped there. Send a message to go on.")


def main(service_for=None) -> None:
    """The page; service_for(argv tuple) gives the completion service (default: the flags', made once)."""
    st.set_page_config(page_title="ChatGLM3 composite demo", page_icon=":robot:", layout="wide")
    args, service = page.open_page(sys.argv[1:], parse_args, service_for or get_service, SCRIPT,
                                   runs_streamlit=False)
    caps = service.capabilities
    state = st.session_state
    conversations = state.setdefault("conversations", {mode: [] for mode in MODES})  # this browser session's
    # A Stop or a new message starts the next run before the streaming one notices: only the writer may change
    # the conversation, and each new run ends the old one's turn (as in web_demo2.py).
    shared = state.setdefault("shared", {"lock": threading.Lock(), "writer": None})
    with shared["lock"]:
        shared["writer"] = None

    with st.sidebar:
        st.markdown(f"**{caps.display_name}** · {service.model_name}")
        modes = MODES if caps.supports_tools else MODES[:1]
        mode = st.radio("Mode", modes, horizontal=True, key="mode")
        if not caps.supports_tools:
            st.info(f"Only Chat is offered: calling tools needs a ChatGLM3 checkpoint, and this model is "
                    f"{caps.display_name}, which was not trained to call tools.")
        st.caption(LATER)
        context = service.context_length or 32768
        max_length = st.slider("max_length", 0, context, min(8192, context), step=1)
        top_p = st.slider("top_p", 0.0, 1.0, float(caps.top_p), step=0.01)
        temperature = st.slider("temperature", 0.0, 1.0, float(caps.temperature), step=0.01)
        system = st.text_input("system prompt") if caps.has_system_role else ""
        if mode == "Tool":
            with st.expander(f"Tools ({len(tools.REGISTRY)})"):
                for fn in tools.REGISTRY.values():
                    st.markdown(f"`{fn.__name__}`: {fn.tool_description['description']}")
        if st.button("Clear history", key="clear"):
            conversations[mode] = []
        st.button("Stop", key="stop", help="end the reply being written (it is kept)")

    conversation = conversations[mode]
    for entry in conversation:
        show(entry)
    query = st.chat_input("Input...")  # one placeholder: a new one would make it another widget, losing text
    if not query:
        return
    entry = {"role": "user", "content": clean_text(query)}
    me = object()
    with shared["lock"]:
        shared["writer"] = me
        conversation.append(entry)
    show(entry)

    def owns():
        with shared["lock"]:
            return shared["writer"] is me

    try:
        if mode == "Tool":
            settings = CompletionSettings(temperature=temperature, top_p=top_p, max_length=int(max_length),
                                          tools=[fn.tool_description for fn in tools.REGISTRY.values()])
            tool_turns(service, conversation, settings, caps.system_messages(system), owns)
        else:
            chat_turn(service, conversation, system, max_length, top_p, temperature, owns)
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
                placeholder.markdown(text)
                shown = time.monotonic()
        placeholder.empty()
        show(reply)
    finally:
        stream.close()


if __name__ == "__main__":
    main()
