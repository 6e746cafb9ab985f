"""Chat with ChatGLM in the browser (Streamlit): python web_demo2.py [--model DIR_OR_HUB_ID] [--host 127.0.0.1]
[--port 8501] [--auth USER:PASS] (or: streamlit run web_demo2.py -- [the same flags])."""

import base64
import html
import re
import secrets
import sys
import threading
import time

import streamlit as st

from model.flags import build_parser, service_from_args
from server import streamlit_page as page
from server.webchat import clean_text, reply_stream

# Avatars drawn here (streamlit-chat's default ones come from a web service, which an offline machine lacks).
_AVATAR = ('<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><circle cx="32" cy="32" r="32" '
           'fill="{color}"/><text x="32" y="41" font-size="26" text-anchor="middle" fill="white" '
           'font-family="sans-serif">{letter}</text></svg>')
AVATARS = {role: "data:image/svg+xml;base64," + base64.b64encode(_AVATAR.format(color=c, letter=l).encode()).decode()
           for role, c, l in (("user", "#4f7cff", "U"), ("assistant", "#f97316", "G"))}

SCRIPT = "web_demo2.py"  # how the page names itself in messages

def parser():
    return build_parser(__doc__, web=True, port=page.DEFAULT_PORT)


def parse_args(argv: list[str]):
    """The flags, with host / port None where not given; FlagError instead of exiting on a bad one."""
    return page.parse_args(parser(), argv)


@st.cache_resource(show_spinner="Loading the model...")
def get_service(argv: tuple):
    """One completion service (model and engine, or the server at --api-base) per process, shared by every
    browser session."""
    return service_from_args(parse_args(list(argv)))


# ---- markdown and LaTeX to HTML, with the text's own HTML shown as text -------------------------------------------
# Code (left for markdown) or a formula: $$..$$, \[..\], \(..\), or $..$ hugging its text (so "$5 and $10" is text).
_PIECES = re.compile(r"(```.*?(?:```|$)|`[^`\n]*`)|\$\$(.+?)\$\$|\\\[(.+?)\\\]|\\\((.+?)\\\)"
                     r"|(?<![\\$\w])\$(?=\S)([^$\n]*?\S)\$(?!\w)", re.S)
_MATHML_TAGS = {"math", "mrow", "mi", "mn", "mo", "mtext", "mspace", "ms", "mfrac", "msqrt", "mroot", "mstyle",
                "merror", "mpadded", "mphantom", "mfenced", "menclose", "msub", "msup", "msubsup", "munder", "mover",
                "munderover", "mmultiscripts", "mprescripts", "none", "mtable", "mtr", "mtd", "mlabeledtr"}
_MATHML_ATTRS = {"display", "mathvariant", "stretchy", "fence", "separator", "accent", "accentunder", "lspace",
                 "rspace", "width", "height", "depth", "columnalign", "rowalign", "columnspacing", "rowspacing",
                 "columnlines", "rowlines", "frame", "linethickness", "minsize", "maxsize", "movablelimits",
                 "largeop", "symmetric", "mathsize", "mathcolor", "mathbackground", "displaystyle", "scriptlevel",
                 "notation", "form", "open", "close", "separators", "columnspan", "rowspan", "xmlns"}
_SAFE_SCHEMES = {"http", "https", "mailto"}


def _mathml(tex: str, display: bool):
    """The formula as an element tree of MathML elements only (None where it cannot be drawn safely)."""
    import xml.etree.ElementTree as ET

    from latex2mathml.converter import convert

    try:
        root = ET.fromstring(convert(tex, display="block" if display else "inline"))
    except Exception:  # noqa: BLE001 - half-written or unsupported LaTeX: shown as its source
        return None
    for element in root.iter():
        element.tag = element.tag.rpartition("}")[2]
        # latex2mathml copies \text{..}, \href and \style into the output as they are: only MathML stays.
        if element.tag not in _MATHML_TAGS or not set(element.attrib) <= _MATHML_ATTRS:
            return None
    return root


def _safe_url(url: str) -> bool:
    """Whether a link or image address is a web or mail address (no javascript:, data:, vbscript: ...)."""
    plain = re.sub(r"[\x00-\x20]", "", html.unescape(url))  # browsers drop these inside a scheme
    scheme = re.match(r"([a-zA-Z][a-zA-Z0-9+.-]*):", plain)
    return scheme is None or scheme.group(1).lower() in _SAFE_SCHEMES


def to_html(text: str) -> str:
    """Markdown and LaTeX to HTML for the chat bubble; HTML in the text is shown as text, never run."""
    import markdown
    from markdown.treeprocessors import Treeprocessor

    formulas, token = [], f"mathformula{secrets.token_hex(6)}n"

    def take(match):
        code, *tex = match.groups()
        if code is not None:
            return code
        display = tex[0] is not None or tex[1] is not None
        source = next(t for t in tex if t is not None)
        formulas.append((_mathml(source, display), match.group(0)))
        return f"{token}{len(formulas) - 1}x"

    class Finish(Treeprocessor):
        """Formulas in place of their tokens; links and images to other than web / mail addresses disarmed;
        images shown as links to their addresses (the page would load them from there)."""

        def run(self, root):
            import xml.etree.ElementTree as ET

            for parent in root.iter():
                for attr, value in list(parent.attrib.items()):  # a formula in an address is its source again
                    parent.attrib[attr] = re.sub(f"{token}(\\d+)x", lambda m: formulas[int(m.group(1))][1], value)
                for attr in ("href", "src"):
                    if attr in parent.attrib and not _safe_url(parent.attrib[attr]):
                        del parent.attrib[attr]
                if parent.tag == "img":
                    src, alt = parent.attrib.pop("src", ""), parent.attrib.pop("alt", "")
                    parent.attrib.clear()
                    parent.tag, parent.text = "a", alt or src or "image"
                    if src:
                        parent.attrib["href"] = src
                for i, child in reversed(list(enumerate(parent))):
                    self._expand(parent, child, i + 1, "tail", ET)
                self._expand(parent, parent, 0, "text", ET)

        @staticmethod
        def _expand(parent, node, index, field, ET):
            pieces = re.split(f"{token}(\\d+)x", getattr(node, field) or "")
            if len(pieces) == 1:
                return
            setattr(node, field, pieces[0])
            for n, rest in reversed(list(zip(pieces[1::2], pieces[2::2]))):
                math, source = formulas[int(n)]
                if math is None:
                    math = ET.Element("code")
                    math.text = source
                math.tail = rest
                parent.insert(index, math)

    md = markdown.Markdown(extensions=["fenced_code", "tables"])
    md.preprocessors.deregister("html_block")  # raw HTML stays text (escaped when serialised)
    md.inlinePatterns.deregister("html")
    md.ESCAPED_CHARS.append("$")  # \$ is a dollar sign
    md.treeprocessors.register(Finish(md), "finish", 0)
    return md.convert(_PIECES.sub(take, text))


def bubble(text: str, role: str, key: str) -> None:
    try:
        from streamlit_chat import message
    except ImportError:  # fallback: Streamlit's own chat elements
        with st.chat_message(role):
            st.markdown(to_html(text), unsafe_allow_html=True)
        return
    message(to_html(text), is_user=role == "user", key=key, allow_html=True, logo=AVATARS[role])


# ---- start, flags and login -------------------------------------------------------------------------------------
def main(service_for=None) -> None:
    """The page; service_for(argv tuple) gives the completion service (default: the flags', made once)."""
    st.set_page_config(page_title="ChatGLM", page_icon=":robot:", layout="wide")
    args, service = page.open_page(sys.argv[1:], parse_args, service_for or get_service, SCRIPT,
                                   runs_streamlit=True)
    state = st.session_state
    state.setdefault("history", [])  # [{"role", "content"}], this browser session's own
    # Streamlit starts the next run (Stop, a new message) before the one still streaming has noticed that it was
    # stopped: the older run may change the history only while it is the writer, which each new run ends.
    shared = state.setdefault("shared", {"lock": threading.Lock(), "writer": None})
    with shared["lock"]:
        shared["writer"] = None

    with st.sidebar:
        st.markdown(f"**{html.escape(service.capabilities.display_name)}** · {html.escape(service.model_name)}")
        context = service.context_length or 32768  # a remote server may not say
        max_length = st.slider("max_length", 0, context, min(8192, context), step=1)
        # the family's own defaults (formats.py), as every other front end samples
        top_p = st.slider("top_p", 0.0, 1.0, float(service.capabilities.top_p), step=0.01)
        temperature = st.slider("temperature", 0.0, 1.0, float(service.capabilities.temperature), step=0.01)
        system = st.text_input("system prompt") if service.capabilities.has_system_role else ""
        if st.button("Clear history", key="clear"):
            state.history = []
        st.button("Stop", key="stop", help="end the reply being written (it is kept)")

    for i, item in enumerate(state.history):
        bubble(item["content"], item["role"], key=f"msg-{i}")

    query = st.chat_input("Input...")
    if not query:
        return
    query = clean_text(query)
    state.history.append({"role": "user", "content": query})
    bubble(query, "user", key=f"msg-{len(state.history) - 1}")
    reply, me = {"role": "assistant", "content": ""}, object()
    placeholder = st.empty()
    stream = reply_stream(service, list(state.history), system, max_length, top_p, temperature,
                          length_label="max_length")
    try:
        with shared["lock"]:
            shared["writer"] = me
            state.history.append(reply)  # updated as it grows, so a Stop (a rerun) keeps what was written
        shown = 0.0
        for text in stream:
            with shared["lock"]:
                if shared["writer"] is not me:
                    return  # a newer run has drawn the history: it keeps what it showed
                reply["content"] = text
            # While it grows the reply is plain HTML (a chat bubble is an iframe that would reload per redraw).
            if time.monotonic() - shown > 0.1:
                placeholder.markdown(f'<div id="streaming-reply">{to_html(text)}</div>', unsafe_allow_html=True)
                shown = time.monotonic()
        placeholder.empty()
        bubble(reply["content"], "assistant", key=f"msg-{len(state.history) - 1}")
    except Exception as e:  # the message stays in the history; say what went wrong
        with shared["lock"]:
            if reply in state.history and not reply["content"]:
                state.history.remove(reply)
        st.error(str(e))
    finally:
        stream.close()  # ends the generation in the service, also when Streamlit stopped this run


if __name__ == "__main__":
    if page.under_streamlit():
        main()
    else:
        sys.exit(page.run_streamlit(__file__, sys.argv[1:], parse_args))
