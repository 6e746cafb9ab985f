"""Chat with ChatGLM in the browser (Gradio): python web_demo.py [--model DIR_OR_HUB_ID] [--port 7860] [--share]."""


import os
import sys
import time

from utils import build_parser, load_or_exit, model_id

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local demo

# A fast model (or a GPU) can produce hundreds of tokens a second; redrawing the chat for each one would flood
# the browser. Updates closer together than this are merged (a slow model still shows every token at once).
UPDATE_INTERVAL_S = 0.05

LATEX = [{"left": "$$", "right": "$$", "display": True}, {"left": "$", "right": "$", "display": False},
         {"left": "\\(", "right": "\\)", "display": False}, {"left": "\\[", "right": "\\]", "display": True}]


def reply_stream(engine, history: list[dict], system: str, max_length: int, top_p: float, temperature: float,
                 on_start=None):
    """Yield the assistant's reply text as it grows, for a history ending in the user's message.

    on_start(handle) receives the engine handle, so a Stop button elsewhere can cancel the generation.
    """
    from model.conversation import Message, ReplyParser, build_prompt_ids
    from model.engine import GenerationRequest
    from model.generation import SamplingParams

    messages = [Message("system", system)] if system.strip() and engine.family == "chatglm3" else []
    messages += [Message(m["role"], _text(m["content"])) for m in history]
    ids = build_prompt_ids(engine.tokenizer, messages)
    limit = min(int(max_length), engine.context_length)
    if len(ids) >= limit:
        raise ValueError(f"the conversation is {len(ids)} tokens, over the maximum length {limit}: "
                         f"clear the history or raise Maximum length")
    greedy = temperature <= 0 or top_p <= 0  # the sliders' zero ends: always the most likely token
    params = SamplingParams(do_sample=not greedy, temperature=1.0 if greedy else temperature,
                            top_p=1.0 if greedy else top_p)
    handle = engine.submit(GenerationRequest(ids, params, limit - len(ids), tuple(engine.tokenizer.reply_stop_ids())))
    if on_start is not None:
        on_start(handle)
    parser, text = ReplyParser(engine.family), ""
    try:
        for event in handle:
            if event.finish == "error":
                raise RuntimeError(event.error)
            if event.finish == "cancelled":
                return  # Stop / Clear: nothing more may reach the page
            parts = parser.feed(event.text) + (parser.finish() if event.finish else [])
            delta = "".join(p.content for p in parts)
            if delta:
                text += delta
                yield text
    finally:
        handle.cancel()  # Stop button, closed tab, or finished: the engine moves on


def _text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # Gradio's normalised form: [{"type": "text", "text": ...}]
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content or "")


def create_demo(engine):
    import gradio as gr

    from model.engine import EngineBusy

    v3 = engine.family == "chatglm3"
    active = {}  # browser session -> the handle of the reply being generated for it

    def cancel_reply(request: gr.Request):
        handle = active.pop(request.session_hash, None)
        if handle is not None:
            handle.cancel()

    def add_user(message: str, history: list):
        if not message.strip():
            return message, history  # nothing to send: keep the box as it is
        return "", history + [{"role": "user", "content": message}]

    def bot(history: list, system: str, max_length: int, top_p: float, temperature: float, request: gr.Request):
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
                    yield history + [{"role": "assistant", "content": latest}]
            if latest != shown and not mine[0].cancelled:
                yield history + [{"role": "assistant", "content": latest}]
        except EngineBusy:
            raise gr.Error("The model is busy with other users; try again in a moment.")
        except ValueError as e:
            raise gr.Error(str(e))
        finally:
            if mine and active.get(request.session_hash) is mine[0]:
                del active[request.session_hash]  # finished: nothing left to stop

    def regenerate(history: list, system: str, max_length: int, top_p: float, temperature: float,
                   request: gr.Request):
        while history and history[-1]["role"] == "assistant":
            history = history[:-1]
        yield history
        yield from bot(history, system, max_length, top_p, temperature, request)

    with gr.Blocks(title=f"ChatGLM — {engine.model_name}") as demo:
        gr.HTML(f'<h1 align="center">ChatGLM</h1><p align="center">{engine.model_name}</p>')
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
                max_length = gr.Slider(0, 32768, value=8192, step=1.0, label="Maximum length", interactive=True)
                top_p = gr.Slider(0, 1, value=0.8, step=0.01, label="Top P", interactive=True)
                temperature = gr.Slider(0, 1, value=0.95, step=0.01, label="Temperature", interactive=True,
                                        elem_id="temperature")
        settings = [chatbot, system, max_length, top_p, temperature]
        sent = submit_btn.click(add_user, [user_input, chatbot], [user_input, chatbot], queue=False)
        sent_reply = sent.then(bot, settings, chatbot)
        entered = user_input.submit(add_user, [user_input, chatbot], [user_input, chatbot], queue=False)
        entered_reply = entered.then(bot, settings, chatbot)
        # One queued event for Regenerate, so Clear or Stop can never fall between dropping the reply and
        # starting the new one.
        regen_reply = regen_btn.click(regenerate, settings, chatbot)
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
    import gradio as gr

    from model.engine import Engine

    model, tokenizer = load_or_exit(args)
    engine = Engine(model, tokenizer, model_name=model_id(args.model), max_batch=args.max_batch,
                    prefill_chunk=args.prefill_chunk)
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])  # no web fonts: works offline
    create_demo(engine).launch(server_name=args.host, server_port=args.port, share=args.share, inbrowser=False,
                               theme=theme)
    return 0


if __name__ == "__main__":
    sys.exit(main())
