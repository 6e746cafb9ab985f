"""Chat with ChatGLM in the browser (Gradio): python web_demo.py [--model DIR_OR_HUB_ID] [--port 7860] [--share]
[--auth USER:PASS]."""


import html
import logging
import os
import sys
import time

from model.flags import build_parser, logins, service_or_exit
from server.webchat import IMAGE_POLICY, clean_text, content_text, reply_stream

logger = logging.getLogger("web_demo")

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local demo

# A fast model (or a GPU) can produce hundreds of tokens a second; redrawing the chat for each one would flood
# the browser. Updates closer together than this are merged (a slow model still shows every token at once).
UPDATE_INTERVAL_S = 0.05

CLICKED = "performance.timeOrigin + performance.now()"  # the page's clock, finer than a millisecond

LATEX = [{"left": "$$", "right": "$$", "display": True}, {"left": "$", "right": "$", "display": False},
         {"left": "\\(", "right": "\\)", "display": False}, {"left": "\\[", "right": "\\]", "display": True}]


class Reply:
    """One reply being written for a browser session: Stop / Clear cancel it (and its completion, once started)."""

    def __init__(self):
        self.completion, self.cancelled = None, False

    def started(self, completion) -> None:
        self.completion = completion
        if self.cancelled:
            completion.cancel()

    def cancel(self) -> None:
        self.cancelled = True
        if self.completion is not None:
            self.completion.cancel()


def create_demo(service):
    """The page, over a completion service (model.service.LocalService, or model.remote.RemoteService)."""
    import gradio as gr

    from model.service import ServiceBusy, ServiceUnavailable

    active = {}  # browser session -> the Reply being written for it
    # browser session -> when (the page's clock, ms) its last Stop / Clear was clicked. A reply asked for before
    # that (Regenerate then Clear at once, the reply's queued event not yet started) must not start afterwards.
    stopped_at: dict[str, float] = {}

    def cancel_reply(clicked_at: float | None, request: gr.Request):
        if clicked_at is not None:
            stopped_at[request.session_hash] = max(clicked_at, stopped_at.get(request.session_hash, clicked_at))
        reply = active.pop(request.session_hash, None)
        if reply is not None:
            reply.cancel()

    def forget_session(request: gr.Request):
        """The tab was closed or reloaded: end its reply, if one is still being written (nobody will read
        it), and drop what was kept for the session, so a long-running demo does not keep an entry per visitor."""
        stopped_at.pop(request.session_hash, None)
        cancel_reply(None, request)

    def overtaken(clicked_at: float | None, request: gr.Request) -> bool:
        """Whether a Stop / Clear was clicked after the click that asked for this reply."""
        return clicked_at is not None and clicked_at <= stopped_at.get(request.session_hash, float("-inf"))

    def add_user(message: str, history: list):
        if not message.strip():
            return message, history  # nothing to send: keep the box as it is
        return "", history + [{"role": "user", "content": clean_text(message)}]  # JSON cannot carry a lone surrogate

    def bot(history: list, system: str, max_length: int, top_p: float, temperature: float,
            clicked_at: float | None, request: gr.Request):
        """(chat, input box) updates as the reply grows; on an error the unanswered message goes back to the box."""
        if not history or history[-1]["role"] != "user" or overtaken(clicked_at, request):
            return
        cancel_reply(None, request)  # one reply at a time per session (not a Stop: no time to record)
        mine = Reply()
        active[request.session_hash] = mine
        try:
            shown, latest, last_shown = "", "", 0.0
            for latest in reply_stream(service, history, system or "", max_length, top_p, temperature,
                                       mine.started):
                if mine.cancelled:  # Stop / Clear came while this text was on its way
                    return
                now = time.monotonic()
                if now - last_shown >= UPDATE_INTERVAL_S:
                    shown, last_shown = latest, now
                    yield history + [{"role": "assistant", "content": latest}], gr.skip()
            if latest != shown and not mine.cancelled:
                yield history + [{"role": "assistant", "content": latest}], gr.skip()
        except Exception as e:  # noqa: BLE001 - every failure becomes a toast
            if isinstance(e, ServiceBusy):
                message = "The model is busy with other users; try again in a moment."
            elif isinstance(e, ServiceUnavailable):
                message = f"The model service is not available: {e}"
            elif isinstance(e, ValueError):
                message = str(e)
            else:
                logger.exception("the reply failed")  # once: gradio's own printing is turned off below
                message = f"The reply failed: {e}"
            if not mine.cancelled:
                # Left in the chat, the message would merge with the next one into one unanswered turn.
                yield history[:-1], content_text(history[-1]["content"])
            raise gr.Error(message, print_exception=False) from None
        finally:
            if active.get(request.session_hash) is mine:
                del active[request.session_hash]  # finished: nothing left to stop

    def regenerate(history: list, system: str, max_length: int, top_p: float, temperature: float,
                   clicked_at: float | None, request: gr.Request):
        if overtaken(clicked_at, request):
            return
        while history and history[-1]["role"] == "assistant":
            history = history[:-1]
        yield history, gr.skip()
        yield from bot(history, system, max_length, top_p, temperature, clicked_at, request)

    name, caps = service.model_name, service.capabilities
    context = service.context_length or 32768  # a remote server may not say
    with gr.Blocks(title=f"ChatGLM — {name}") as demo:
        gr.HTML(f'<h1 align="center">{html.escape(caps.display_name)}</h1>'
                f'<p align="center">{html.escape(name)}</p>')
        chatbot = gr.Chatbot(label="Chat", latex_delimiters=LATEX, height=480, elem_id="chatbot")
        with gr.Row():
            with gr.Column(scale=4):
                system = gr.Textbox(label="System prompt", lines=1, visible=caps.has_system_role, elem_id="system")
                user_input = gr.Textbox(show_label=False, placeholder="Input...", lines=4, elem_id="user-input")
                with gr.Row():
                    submit_btn = gr.Button("Submit", variant="primary", elem_id="submit")
                    stop_btn = gr.Button("Stop", elem_id="stop")
                    regen_btn = gr.Button("Regenerate", elem_id="regenerate")
            with gr.Column(scale=1):
                clear_btn = gr.Button("Clear History", elem_id="clear")
                # the sliders start at the family's own defaults (formats.py), as every other front end samples
                max_length = gr.Slider(0, context, value=min(8192, context), step=1.0, label="Maximum length",
                                       interactive=True, elem_id="max-length")
                top_p = gr.Slider(0, 1, value=caps.top_p, step=0.01, label="Top P", interactive=True)
                temperature = gr.Slider(0, 1, value=caps.temperature, step=0.01, label="Temperature",
                                        interactive=True, elem_id="temperature")
        # when the page asked (its clock, set by CLICKED below), so a later Stop / Clear wins however events queue
        clicked_at = gr.Number(value=None, visible=False)
        settings = [chatbot, system, max_length, top_p, temperature, clicked_at]
        stamp = f"(...values) => [...values.slice(0, {len(settings) - 1}), {CLICKED}]"  # the inputs, time added
        sent = submit_btn.click(add_user, [user_input, chatbot], [user_input, chatbot], queue=False)
        replied = [chatbot, user_input]
        sent_reply = sent.then(bot, settings, replied, js=stamp)
        entered = user_input.submit(add_user, [user_input, chatbot], [user_input, chatbot], queue=False)
        entered_reply = entered.then(bot, settings, replied, js=stamp)
        # One queued event for Regenerate, so Clear or Stop can never fall between dropping the reply and
        # starting the new one.
        regen_reply = regen_btn.click(regenerate, settings, replied, js=stamp)
        replies = [sent_reply, entered_reply, regen_reply]
        # Stop and Clear end the generation in the service and cancel the Gradio event streaming it.
        now = f"() => [{CLICKED}]"
        stop_btn.click(cancel_reply, [clicked_at], None, cancels=replies, queue=False, js=now)
        # Clear first ends the reply (as Stop does), then empties the chat in a queued step: that step's result
        # travels on the same ordered stream as the reply's updates, after any already on their way, so a late
        # update cannot bring the history back.
        clear_btn.click(cancel_reply, [clicked_at], None, cancels=replies, queue=False, js=now).then(
            lambda: [], None, chatbot)
        demo.unload(forget_session)
    demo.queue(default_concurrency_limit=service.max_queue)
    return demo


def parser():
    ap = build_parser(__doc__, web=True, port=7860)
    ap.add_argument("--share", action="store_true", help="also publish a public gradio.live link")
    return ap


def main(argv=None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    try:
        auth = logins(args.auth)
    except (OSError, ValueError) as e:
        ap.error(f"--auth: {e}")
    service = service_or_exit(args)
    try:
        launch(create_demo(service), args.host, args.port, share=args.share, auth=auth)
    finally:
        service.close()
    return 0


def launch(demo, host: str, port: int, *, share: bool = False, auth: list[tuple[str, str]] = ()) -> None:
    """Serve the demo until interrupted; with auth, every page and route asks for one of the logins."""
    import gradio as gr

    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])  # no web fonts: works offline
    # quiet: gradio's own start lines name its Python API (share=True), not this script's flags.
    # max_file_size: the demo has no file input, so its upload route takes nothing of any size.
    # head: the page loads no images from other origins, such as one a reply's markdown points to.
    demo.launch(server_name=host, server_port=port, share=share, inbrowser=False, theme=theme, quiet=True,
                auth=list(auth) or None, max_file_size=1, prevent_thread_lock=True, head=IMAGE_POLICY)
    print(f"Running on http://{host}:{port}" + (" (login required)" if auth else ""), flush=True)
    if demo.share_url:
        print(f"Public link: {demo.share_url} (anyone with it can chat; see --auth)", flush=True)
    elif not share:
        print("Add --share for a public gradio.live link, --auth USER:PASS to ask for a login.", flush=True)
    demo.block_thread()


if __name__ == "__main__":
    sys.exit(main())
