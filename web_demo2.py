"""Chat with ChatGLM in the browser (Streamlit): streamlit run web_demo2.py -- [--model DIR_OR_HUB_ID]."""

import base64
import sys
import time

import streamlit as st

from utils import ModelLoadError, build_parser, load_from_args, model_id

# Avatars drawn here (streamlit-chat's default ones come from a web service, which an offline machine lacks).
_AVATAR = ('<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><circle cx="32" cy="32" r="32" '
           'fill="{color}"/><text x="32" y="41" font-size="26" text-anchor="middle" fill="white" '
           'font-family="sans-serif">{letter}</text></svg>')
AVATARS = {role: "data:image/svg+xml;base64," + base64.b64encode(_AVATAR.format(color=c, letter=l).encode()).decode()
           for role, c, l in (("user", "#4f7cff", "U"), ("assistant", "#f97316", "G"))}


@st.cache_resource(show_spinner="Loading the model...")
def get_engine(argv: tuple):
    """One model and engine per process, shared by every browser session."""
    from model.engine import Engine

    args = build_parser(__doc__, engine=True).parse_args(list(argv))
    model, tokenizer = load_from_args(args)
    return Engine(model, tokenizer, model_name=model_id(args.model), max_batch=args.max_batch,
                  prefill_chunk=args.prefill_chunk)


def to_html(text: str) -> str:
    """Markdown and LaTeX to HTML for the chat bubble."""
    import mdtex2html

    try:
        return mdtex2html.convert(text)
    except Exception:  # half-written markdown / LaTeX while streaming: show it as text
        import html

        return f"<p>{html.escape(text)}</p>"


def bubble(text: str, role: str, key: str) -> None:
    try:
        from streamlit_chat import message
    except ImportError:  # fallback: Streamlit's own chat elements
        with st.chat_message(role):
            st.markdown(text)
        return
    message(to_html(text), is_user=role == "user", key=key, allow_html=True, logo=AVATARS[role])


def main() -> None:
    from web_demo import reply_stream

    st.set_page_config(page_title="ChatGLM", page_icon=":robot:", layout="wide")
    try:
        engine = get_engine(tuple(sys.argv[1:]))
    except ModelLoadError as e:
        st.error(f"The model could not be loaded. {e}")
        st.stop()
    state = st.session_state
    state.setdefault("history", [])  # [{"role", "content"}], this browser session's own

    with st.sidebar:
        st.markdown(f"**{engine.model_name}**")
        max_length = st.slider("max_length", 0, 32768, 8192, step=1)
        top_p = st.slider("top_p", 0.0, 1.0, 0.8, step=0.01)
        temperature = st.slider("temperature", 0.0, 1.0, 0.95, step=0.01)
        system = st.text_input("system prompt") if engine.family == "chatglm3" else ""
        if st.button("Clear history", key="clear"):
            state.history = []
        st.button("Stop", key="stop", help="end the reply being written (it is kept)")

    for i, item in enumerate(state.history):
        bubble(item["content"], item["role"], key=f"msg-{i}")

    query = st.chat_input("Input...")
    if not query:
        return
    state.history.append({"role": "user", "content": query})
    bubble(query, "user", key=f"msg-{len(state.history) - 1}")
    reply = {"role": "assistant", "content": ""}
    placeholder = st.empty()
    try:
        stream = reply_stream(engine, list(state.history), system, max_length, top_p, temperature)
        state.history.append(reply)  # updated as it grows, so a Stop (a rerun) keeps what was written
        shown = 0.0
        for text in stream:
            reply["content"] = text
            # While it grows the reply is plain HTML (a chat bubble is an iframe that would reload per redraw).
            if time.monotonic() - shown > 0.1:
                placeholder.markdown(f'<div id="streaming-reply">{to_html(text)}</div>', unsafe_allow_html=True)
                shown = time.monotonic()
        placeholder.empty()
        bubble(reply["content"], "assistant", key=f"msg-{len(state.history) - 1}")
    except Exception as e:  # the message stays in the history; say what went wrong
        if reply in state.history and not reply["content"]:
            state.history.remove(reply)
        st.error(str(e))


if __name__ == "__main__":
    main()
