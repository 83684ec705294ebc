"""`tokenrm score`: its arguments. The work (through tokenrm.client) is in score_run, the
rendering in score_view; both are imported only when the command runs."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any


def _score(args: argparse.Namespace) -> None:
    from tokenrm.cli.score_run import read_response, run
    from tokenrm.cli.score_view import ScoreCliError

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
    p.add_argument("--url", default="http://127.0.0.1:8000",
                   help="the server: http://HOST:PORT or https://... (a URL ending in /score "
                        "works too), grpc://HOST:PORT or grpcs://... (default: %(default)s)")
    p.add_argument("--prompt", required=True, help="the prompt (context, not scored)")
    given = p.add_mutually_exclusive_group(required=True)
    given.add_argument("--response", help="the response text to score")
    given.add_argument("--response-file", metavar="PATH",
                       help="read the response from a UTF-8 file, verbatim; - for stdin")
    p.add_argument("--top", type=int, default=5, metavar="K", help="most negative tokens to list")
    p.add_argument("--api-key", default=os.environ.get("TOKENRM_API_KEY"),
                   help="sent as 'Authorization: Bearer <key>' (default: TOKENRM_API_KEY, "
                        "which keeps it out of the process list)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds to wait for the answer, retries included (default: "
                        "%(default)g)")
    p.add_argument("--json", action="store_true",
                   help="print the answer in /score's JSON shape (model, results: rewards, "
                        "total, token_ids, tokens, offsets, span_rewards) instead of the view")
    p.set_defaults(run=_score)
