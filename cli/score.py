"""`tokenrm score`: its arguments; the request and the rendering are in score_view."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any


def _score(args: argparse.Namespace) -> None:
    from tokenrm.cli.score_view import ScoreCliError, read_response, run

    logging.getLogger("httpx").setLevel(logging.WARNING)  # no per-request INFO lines
    try:
        response = args.response if args.response is not None else read_response(
            args.response_file)
        run(args.url, args.prompt, response, top=args.top, api_key=args.api_key,
            raw_json=args.json, timeout=args.timeout)
    except ScoreCliError as exc:
        print(f"tokenrm score: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


def add_score_command(sub: Any) -> None:
    """The `score` subcommand, onto the parser's subparsers."""
    p = sub.add_parser("score", help="score one response on a running server; show its tokens "
                                     "coloured by reward")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    p.add_argument("--prompt", required=True, help="the prompt (context, not scored)")
    given = p.add_mutually_exclusive_group(required=True)
    given.add_argument("--response", help="the response text to score")
    given.add_argument("--response-file", metavar="PATH",
                       help="read the response from a UTF-8 file, verbatim; - for stdin")
    p.add_argument("--top", type=int, default=5, metavar="K", help="most negative tokens to list")
    p.add_argument("--api-key", help="sent as 'Authorization: Bearer <key>'")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the answer")
    p.add_argument("--json", action="store_true", help="print the server's raw JSON instead")
    p.set_defaults(run=_score)

