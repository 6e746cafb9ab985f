"""Chat with ChatGLM in the browser (Gradio): python web_demo.py [--model DIR_OR_HUB_ID] [--port 7860] [--share]
[--auth USER:PASS]."""


import html
import logging
import os
import sys
import time

from utils import build_parser, load_or_exit, model_id

logger = logging.getLogger("web_demo")

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local demo

# A fast model (or a GPU) can produce hundreds of tokens a second; redrawing the chat for each one would flood
# the browser. Updates closer together than this are merged (a slow model still shows every token at once).
UPDATE_INTERVAL_S = 0.05

LATEX = [{"left": "$$", "right": "$$", "display": True}, {"left": "$", "right": "$", "display": False},
         {"left": "\\(", "right": "\\)", "display": False}, {"left": "\\[", "right": "\\]", "display": True}]


def reply_stream(engine, history: list[dict], system: str, max_length: int, top_p: float, temperature: float,
                 on_start=None, length_label: str = "Maximum length"):
    """Yield the assistant's reply text as it grows, for a history ending in the user's message.

    on_start(handle) receives the engine handle, so a Stop button elsewhere can cancel the generation;
    length_label names the page's maximum length control in the error for a too long conversation.
    """
    from model.service import CompletionSettings, ConversationError, Finish, LocalService, Message

    service = LocalService(engine)
    # (the tokenizer reads lone surrogates as U+FFFD: no cleaning needed for the prompt itself)
    messages = service.capabilities.system_messages(system)
    messages += [Message(m["role"], _text(m["content"])) for m in history]
    settings = CompletionSettings(temperature=temperature, top_p=top_p, max_length=int(max_length))
    try:
        ids = service.prompt_ids(messages, settings)
    except ConversationError as e:
        if e.param != "max_length":
            raise
        raise ValueError(str(e).replace("raise max_length", f"raise {length_label}")) from None
    (completion,) = service.start(messages, settings, prompt_ids=ids)
    if on_start is not None:
        on_start(completion)
    text = ""
    try:
        for item in completion:
            if isinstance(item, Finish):
                if item.reason == "error":
                    raise RuntimeError(item.error)
                if item.reason == "cancelled":
                    return  # Stop / Clear: nothing more may reach the page
            elif item.content:
                text += item.content
                yield text
    finally:
        completion.cancel()  # Stop button, closed tab, or finished: the engine moves on


def logins(auth: list[str] | None) -> list[tuple[str, str]]:
    """The (user, password) pairs of --auth values (USER:PASS or @FILE of such lines), else of env WEB_AUTH."""
    entries = []
    for value in auth if auth else [os.environ.get("WEB_AUTH", "")]:
        if value.startswith("@"):
            with open(value[1:], encoding="utf-8") as f:
                entries += [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
        elif value:
            entries.append(value)
    pairs = []
    for entry in entries:
        user, sep, password = entry.partition(":")
        if not (user and sep and password):
            raise ValueError("a login must be USER:PASS, neither empty")
        pairs.append((user, password))
    return pairs


def clean_text(text: str) -> str:
    """text with unpaired surrogates (which browsers can send and UTF-8 cannot hold) replaced by U+FFFD."""
    from model.tokenizer import replace_lone_surrogates

    return replace_lone_surrogates(text)


def _text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # Gradio's normalised form: [{"type": "text", "text": ...}]
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content or "")


def create_demo(engine):
    import gradio as gr

    from model.service import ServiceBusy

    v3 = engine.format.has_system_role
    active = {}  # browser session -> the handle of the reply being generated for it

    def cancel_reply(request: gr.Request):
        handle = active.pop(request.session_hash, None)
        if handle is not None:
            handle.cancel()

    def add_user(message: str, history: list):
        if not message.strip():
            return message, history  # nothing to send: keep the box as it is
        return "", history + [{"role": "user", "content": clean_text(message)}]  # JSON cannot carry a lone surrogate

    def bot(history: list, system: str, max_length: int, top_p: float, temperature: float, request: gr.Request):
        """(chat, input box) updates as the reply grows; on an error the unanswered message goes back to the box."""
        if not history or history[-1]["role"] != "user":
            return
        cancel_reply(request)  # one reply at a time per session

        mine = []

        def started(handle):
            active[request.session_hash] = handle
            mine.append(handle)

        try:
            shown, latest, last_shown = "", "", 0.0
            for latest in reply_stream(engine, history, system or "", max_length, top_p, temperature, started):
                if mine[0].cancelled:  # Stop / Clear came while this text was on its way
                    return
                now = time.monotonic()
                if now - last_shown >= UPDATE_INTERVAL_S:
                    shown, last_shown = latest, now
                    yield history + [{"role": "assistant", "content": latest}], gr.skip()
            # Still ours unless Stop / Clear took it (the handle itself reads cancelled once the reply is done).
            if latest != shown and active.get(request.session_hash) is mine[0]:
                yield history + [{"role": "assistant", "content": latest}], gr.skip()
        except Exception as e:  # noqa: BLE001 - every failure becomes a toast
            if isinstance(e, ServiceBusy):
                message = "The model is busy with other users; try again in a moment."
            elif isinstance(e, ValueError):
                message = str(e)
            else:
                logger.exception("the reply failed")  # once: gradio's own printing is turned off below
                message = f"The reply failed: {e}"
            if not mine or active.get(request.session_hash) is mine[0]:
                # Left in the chat, the message would merge with the next one into one unanswered turn.
                yield history[:-1], _text(history[-1]["content"])
            raise gr.Error(message, print_exception=False) from None
        finally:
            if mine and active.get(request.session_hash) is mine[0]:
                del active[request.session_hash]  # finished: nothing left to stop

    def regenerate(history: list, system: str, max_length: int, top_p: float, temperature: float,
                   request: gr.Request):
        while history and history[-1]["role"] == "assistant":
            history = history[:-1]
        yield history, gr.skip()
        yield from bot(history, system, max_length, top_p, temperature, request)

    with gr.Blocks(title=f"ChatGLM — {engine.model_name}") as demo:
        gr.HTML(f'<h1 align="center">ChatGLM</h1><p align="center">{html.escape(engine.model_name)}</p>')
        chatbot = gr.Chatbot(label="Chat", latex_delimiters=LATEX, height=480, elem_id="chatbot")
        with gr.Row():
            with gr.Column(scale=4):
                system = gr.Textbox(label="System prompt", lines=1, visible=v3, elem_id="system")
                user_input = gr.Textbox(show_label=False, placeholder="Input...", lines=4, elem_id="user-input")
                with gr.Row():
                    submit_btn = gr.Button("Submit", variant="primary", elem_id="submit")
                    stop_btn = gr.Button("Stop", elem_id="stop")
                    regen_btn = gr.Button("Regenerate", elem_id="regenerate")
            with gr.Column(scale=1):
                clear_btn = gr.Button("Clear History", elem_id="clear")
                max_length = gr.Slider(0, 32768, value=8192, step=1.0, label="Maximum length", interactive=True,
                                       elem_id="max-length")
                top_p = gr.Slider(0, 1, value=0.8, step=0.01, label="Top P", interactive=True)
                temperature = gr.Slider(0, 1, value=0.95, step=0.01, label="Temperature", interactive=True,
                                        elem_id="temperature")
        settings = [chatbot, system, max_length, top_p, temperature]
        sent = submit_btn.click(add_user, [user_input, chatbot], [user_input, chatbot], queue=False)
        replied = [chatbot, user_input]
        sent_reply = sent.then(bot, settings, replied)
        entered = user_input.submit(add_user, [user_input, chatbot], [user_input, chatbot], queue=False)
        entered_reply = entered.then(bot, settings, replied)
        # One queued event for Regenerate, so Clear or Stop can never fall between dropping the reply and
        # starting the new one.
        regen_reply = regen_btn.click(regenerate, settings, replied)
        replies = [sent_reply, entered_reply, regen_reply]
        # Stop and Clear end the generation in the engine and cancel the Gradio event streaming it.
        stop_btn.click(cancel_reply, None, None, cancels=replies, queue=False)
        # Clear first ends the reply (as Stop does), then empties the chat in a queued step: that step's result
        # travels on the same ordered stream as the reply's updates, after any already on their way, so a late
        # update cannot bring the history back.
        clear_btn.click(cancel_reply, None, None, cancels=replies, queue=False).then(lambda: [], None, chatbot)
    demo.queue(default_concurrency_limit=engine.max_queue)
    return demo


def main(argv=None) -> int:
    ap = build_parser(__doc__, web=True, port=7860)
    ap.add_argument("--share", action="store_true", help="also publish a public gradio.live link")
    args = ap.parse_args(argv)
    try:
        auth = logins(args.auth)
    except (OSError, ValueError) as e:
        ap.error(f"--auth: {e}")
    from model.engine import Engine

    model, tokenizer = load_or_exit(args)
    engine = Engine(model, tokenizer, model_name=model_id(args.model), max_batch=args.max_batch,
                    prefill_chunk=args.prefill_chunk)
    launch(create_demo(engine), args.host, args.port, share=args.share, auth=auth)
    return 0


def launch(demo, host: str, port: int, *, share: bool = False, auth: list[tuple[str, str]] = ()) -> None:
    """Serve the demo until interrupted; with auth, every page and route asks for one of the logins."""
    import gradio as gr

    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])  # no web fonts: works offline
    # quiet: gradio's own start lines name its Python API (share=True), not this script's flags.
    # max_file_size: the demo has no file input, so its upload route takes nothing of any size.
    demo.launch(server_name=host, server_port=port, share=share, inbrowser=False, theme=theme, quiet=True,
                auth=list(auth) or None, max_file_size=1, prevent_thread_lock=True)
    print(f"Running on http://{host}:{port}" + (" (login required)" if auth else ""), flush=True)
    if demo.share_url:
        print(f"Public link: {demo.share_url} (anyone with it can chat; see --auth)", flush=True)
    elif not share:
        print("Add --share for a public gradio.live link, --auth USER:PASS to ask for a login.", flush=True)
    demo.block_thread()


if __name__ == "__main__":
    sys.exit(main())
