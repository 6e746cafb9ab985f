"""Chat with ChatGLM in the terminal: python cli_demo.py [--model DIR_OR_HUB_ID] [--quantize 4]."""

from __future__ import annotations

import sys

from utils import build_parser, load_or_exit

WELCOME = "欢迎使用 {name} 模型，输入内容即可进行对话，clear 清空对话历史，stop 终止程序 (Ctrl-C 打断回答)"


def parse_args(argv=None):
    from model.flags import float_range, int_range

    ap = build_parser(__doc__)
    ap.add_argument("--temperature", type=float_range(0), default=0.8, help=">= 0; 0: always the most likely token")
    ap.add_argument("--top-p", type=float_range(0, 1, low_open=True), default=0.8, help="> 0 and <= 1")
    ap.add_argument("--max-length", type=int_range(1), default=None, help="conversation length limit in tokens")
    ap.add_argument("--system", default=None, help="system prompt (ChatGLM3)")
    return ap.parse_args(argv)


class Conversation:
    """History plus the KV cache of everything said so far, so each turn only reads the new message."""

    def __init__(self, model, tokenizer, args):
        self.model, self.tokenizer, self.args = model, tokenizer, args
        self.clear()

    def clear(self) -> None:
        self.history = []
        if self.args.system and self.tokenizer.family == "chatglm3":
            self.history = [{"role": "system", "content": self.args.system}]
        self.cache = None

    def reply(self, query: str):
        """Yield text deltas of the reply; on Ctrl-C (KeyboardInterrupt) keep what was said and re-raise."""
        shown, before = "", self.history
        sampling = dict(do_sample=self.args.temperature > 0, temperature=self.args.temperature or 1.0,
                        top_p=self.args.top_p, max_length=self.args.max_length)
        from model.reply import PUNCTUATION_MARKS

        v1 = self.tokenizer.family == "chatglm1"  # re-reads the whole conversation each turn (no cache reuse)
        stream = self.model.stream_chat(self.tokenizer, query, before, past_key_values=None if v1 else self.cache,
                                        return_past_key_values=True, **sampling)
        response = ""
        try:
            for response, history, cache in stream:
                # ChatGLM-6B rewrites a last , ! : ; ? once the next character is known: print it then.
                stable = response[:-1] if v1 and response[-1:] in PUNCTUATION_MARKS else response
                if isinstance(stable, str) and stable.startswith(shown) and len(stable) > len(shown):
                    yield stable[len(shown):]
                    shown = stable
                self.history, self.cache = history, cache
            if isinstance(response, str) and response.startswith(shown) and len(response) > len(shown):
                yield response[len(shown):]
        except KeyboardInterrupt:
            stream.close()
            self.cache = None  # it holds the interrupted tokens; the next turn re-reads the history instead
            if self.tokenizer.family == "chatglm3":
                self.history = before + [{"role": "user", "content": query},
                                         {"role": "assistant", "metadata": "", "content": shown}]
            else:
                self.history = before + [(query, shown)]
            raise


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    model, tokenizer = load_or_exit(args)
    name = {"chatglm3": "ChatGLM3-6B", "chatglm2": "ChatGLM2-6B", "chatglm1": "ChatGLM-6B"}.get(tokenizer.family,
                                                                                                "ChatGLM")
    conversation = Conversation(model, tokenizer, args)
    print(WELCOME.format(name=name))
    while True:
        try:
            query = input("\n用户：").strip()
        except (KeyboardInterrupt, EOFError):
            print()
            return 0
        if query == "stop":
            return 0
        if query == "clear":
            conversation.clear()
            print("\n" + WELCOME.format(name=name))
            continue
        if not query:
            continue
        print("\nChatGLM：", end="", flush=True)
        try:
            for delta in conversation.reply(query):
                print(delta, end="", flush=True)
            print()
        except KeyboardInterrupt:
            print("\n[回答已打断 / reply interrupted]")
        except ValueError as e:  # e.g. the conversation no longer fits the context
            print(f"\nerror: {e}\n(type clear to start a new conversation)")


if __name__ == "__main__":
    sys.exit(main())
