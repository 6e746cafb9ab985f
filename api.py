"""The original ChatGLM API (POST / with prompt and history): python api.py --model DIR_OR_HUB_ID."""

import sys


def parser():
    from server.http import server_parser

    return server_parser(__doc__)


def main(argv=None) -> int:
    from server.basic_app import create_app
    from server.http import serve

    return serve(create_app, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
