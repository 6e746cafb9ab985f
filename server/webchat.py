"""What both web demos (web_demo.py: Gradio, web_demo2.py: Streamlit) share: the reply stream over the completion
service, and the text cleaning where browser text enters the page.

It lives in server/ with the other web-facing code rather than in model/: it knows page concerns (Gradio's
message shapes, the name of a page's length control), which the model package does not.
"""

from __future__ import annotations

import re

from model.service import CompletionSettings, ConversationError, Finish, Message, ServiceError


def reply_stream(service, history: list[dict], system: str, max_length: int, top_p: float, temperature: float,
                 on_start=None, length_label: str = "Maximum length"):
    """Yield the assistant's reply text as it grows, for a history ending in the user's message.

    service: a LocalService or RemoteService. on_start(completion) receives the completion, so a Stop button
    elsewhere can cancel it; length_label names the page's maximum length control in the error for a too long
    conversation. Ends quietly when the completion is cancelled; ServiceError when the reply fails.
    """
    # (the tokenizer reads lone surrogates as U+FFFD: no cleaning needed for the prompt itself)
    messages = service.capabilities.system_messages(system)
    messages += [Message(m["role"], content_text(m["content"])) for m in history]
    settings = CompletionSettings(temperature=temperature, top_p=top_p, max_length=int(max_length))
    try:
        completion = service.complete(messages, settings)
    except ConversationError as e:
        if e.param != "max_length":
            raise
        raise ConversationError(str(e).replace("raise max_length", f"raise {length_label}"), e.param) from None
    if on_start is not None:
        on_start(completion)
    text = ""
    try:
        for item in completion:
            if isinstance(item, Finish):
                if item.reason == "error":
                    raise ServiceError(item.error or "the reply failed")
                if item.reason == "cancelled":
                    return  # Stop / Clear: nothing more may reach the page
            elif item.content:
                text += item.content
                yield text
    finally:
        completion.cancel()  # Stop button, closed tab, or finished: the service moves on


def clean_text(text: str) -> str:
    """text with unpaired surrogates (which browsers can send and UTF-8 cannot hold) replaced by U+FFFD."""
    from model.tokenizer import replace_lone_surrogates

    return replace_lone_surrogates(text)


# Markdown's images: a page that shows one loads it from wherever it points, so a reply (or text the model was
# given to read) could send the browser to any server, with whatever the address carries. The demos show them
# as links instead; web_demo.py also forbids the page images from other origins (IMAGE_POLICY).
IMAGE_POLICY = '<meta http-equiv="Content-Security-Policy" content="img-src \'self\' data: blob:">'
_CODE_OR_IMAGE = re.compile(r"(`{3,}|~{3,})(?:.*?\n\1|.*\Z)|`+[^`]*?`+|(?<!\\)(\\*)!\[", re.S)


def images_as_links(markdown: str) -> str:
    """markdown with every image (`![alt](address)`, `![alt][ref]`) turned into a link to its address; code
    (fenced, inline) is left as it is."""
    def escape(match):  # an image's "!" escaped, unless an odd run of backslashes already escapes it
        slashes = match.group(2)
        if slashes is None or len(slashes) % 2:
            return match.group(0)
        return slashes + "\\!["

    return _CODE_OR_IMAGE.sub(escape, markdown)


def content_text(content) -> str:
    """A chat message's text, whatever shape the page gave it."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # Gradio's normalised form: [{"type": "text", "text": ...}]
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content or "")
