"""OpenAI-compatible API server: python openai_api.py --model DIR_OR_HUB_ID [--port 8000]."""

import sys


def parser():
    from server.http import server_parser

    return server_parser(__doc__)


def main(argv=None) -> int:
    from server.openai_app import create_app
    from server.http import serve

    return serve(create_app, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
