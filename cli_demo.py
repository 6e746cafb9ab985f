"""Chat with ChatGLM in the terminal: python cli_demo.py [--model DIR_OR_HUB_ID] [--quantize 4]
[--api-base URL]."""

from __future__ import annotations

import sys

from model.flags import build_parser, service_or_exit, settings_from_args
from model.service import (CompletionSettings, ConversationError, Finish, Message, ServiceBusy, ServiceError,
                           ServiceUnavailable)

WELCOME = "欢迎使用 {name} 模型，输入内容即可进行对话，clear 清空对话历史，stop 终止程序 (Ctrl-C 打断回答)"


def parser():
    return build_parser(__doc__, sampling=True)


def parse_args(argv=None):
    return parser().parse_args(argv)


class Conversation:
    """The messages said so far, answered through the completion service.

    Each turn sends the whole conversation: the engine reads it again (the original CLI kept the KV cache between
    turns; a service, local or remote, keeps nothing between calls).
    """

    def __init__(self, service, settings: CompletionSettings | None = None, system: str | None = None):
        self.service, self.settings, self.system = service, settings or CompletionSettings(), system or ""
        self.clear()

    def clear(self) -> None:
        self.messages: list[Message] = self.service.capabilities.system_messages(self.system)

    def ask(self, query: str, show) -> Finish:
        """Reply to query, calling show(delta) with each piece of text as it comes; the finish.

        The turn joins the conversation with the text shown, also when interrupted (Ctrl-C: KeyboardInterrupt,
        re-raised after the completion is cancelled in the service). ConversationError, ServiceBusy,
        ServiceUnavailable before anything is shown, ServiceError when the reply fails: the conversation is
        unchanged.
        """
        asked = self.messages + [Message("user", query)]
        completion = self.service.complete(asked, self.settings)
        shown, finish = "", None
        try:
            for item in completion:
                if isinstance(item, Finish):
                    finish = item
                elif item.content:
                    shown += item.content  # before showing it: a Ctrl-C while it prints keeps it
                    show(item.content)
        except BaseException as e:
            completion.cancel()  # Ctrl-C: the service stops generating now, not at the end of the reply
            if not isinstance(e, ServiceError):  # interrupted: what was shown stays in the conversation
                self.messages = asked + [Message("assistant", shown)]
            raise
        if finish is not None and finish.reason == "error":
            raise ServiceError(f"the reply failed: {finish.error}")
        self.messages = asked + [Message("assistant", shown)]
        return finish


def what_to_do(error: Exception) -> str:
    """The line printed for a reply that could not be had; the program goes on."""
    if isinstance(error, ConversationError):
        return f"error: {error}\n(type clear to start a new conversation)"
    if isinstance(error, ServiceBusy):
        return f"error: {error}\n(send the message again in a moment: the up arrow brings it back)"
    if isinstance(error, ServiceUnavailable):
        return f"error: {error}\n(check that the model service is running, then send the message again)"
    return f"error: {error}\n(send the message again, or type clear to start a new conversation)"


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import readline  # noqa: F401  (line editing and history for input(): the up arrow brings a message back)
    except ImportError:
        pass
    service = service_or_exit(args)
    try:
        return chat(service, settings_from_args(args), args.system)
    finally:
        service.close()


def chat(service, settings: CompletionSettings, system: str | None) -> int:
    name = service.capabilities.display_name
    conversation = Conversation(service, settings, system)
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
            conversation.ask(query, lambda delta: print(delta, end="", flush=True))
            print()
        except KeyboardInterrupt:
            print("\n[回答已打断 / reply interrupted]")
        except (ValueError, ServiceError) as e:  # ConversationError is a ValueError
            print("\n" + what_to_do(e))


if __name__ == "__main__":
    sys.exit(main())
