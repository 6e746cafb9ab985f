"""One-shot chat from the command line: python -m model [--model DIR_OR_HUB_ID] "your question".

The same flags and default model as cli_demo.py (model/flags.py), through the same completion service; Ctrl-C
cancels the reply."""

import sys

from .flags import build_parser, service_or_exit, settings_from_args

ONE_SHOT_TOKENS = 256  # a one-shot reply's default length (--max-new-tokens)


def parser():
    ap = build_parser(__doc__, sampling=True, prog="python -m model", max_new_tokens=ONE_SHOT_TOKENS)
    ap.add_argument("query")
    return ap


def main(argv=None) -> int:
    from .service import ConversationError, Finish, Message, ServiceError

    args = parser().parse_args(argv)
    service = service_or_exit(args)
    try:
        messages = service.capabilities.system_messages(args.system or "") + [Message("user", args.query)]
        completion = service.complete(messages, settings_from_args(args))
        finish = None
        try:
            for item in completion:
                if isinstance(item, Finish):
                    finish = item
                else:
                    print(item.content, end="", flush=True)
        except KeyboardInterrupt:
            completion.cancel()  # the service stops generating
            print()
            return 130
        print()
        if finish is not None and finish.reason == "error":
            print(f"error: the reply failed: {finish.error}", file=sys.stderr)
            return 1
        return 0
    except (ConversationError, ServiceError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    finally:
        service.close()


if __name__ == "__main__":
    sys.exit(main())
