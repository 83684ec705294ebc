"""`tokenrm score`'s work: one text item through tokenrm.client (HTTP or gRPC, the client's
retries within one deadline), then the view (score_view) or the answer in /score's JSON shape.
Every failure becomes a ScoreCliError of one line."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rich.console import Console

from tokenrm.cli.score_view import ScoreCliError, show
from tokenrm.client import (
    AuthenticationError,
    DeadlineError,
    InputError,
    Item,
    ItemScore,
    ModelInfo,
    ResultError,
    RewardClient,
    RewardClientError,
    ServerError,
)

FIRST_WAIT_S = 3.0  # at a terminal, how long before a silent wait is explained


def score_one(url: str, prompt: str, response: str, *, api_key: str | None = None,
              timeout: float = 60.0) -> tuple[ModelInfo, ItemScore]:
    """The served model and the item's score with its tokens and offsets, within `timeout`
    seconds in all (retries included); ScoreCliError saying why not."""
    try:
        client = RewardClient(url, api_key=api_key, timeout_s=timeout)
    except ValueError as exc:  # not a URL the client speaks
        raise ScoreCliError(_one_line(exc)) from None
    try:
        with client:
            deadline = time.monotonic() + timeout
            if sys.stderr.isatty() and timeout > FIRST_WAIT_S:
                _say_when_it_waits(client, url, timeout)
            [score] = client.score([Item.text(prompt, response)], return_tokens=True,
                                   timeout_s=max(0.001, deadline - time.monotonic()))
            return client.model_info(), score  # read by score() already: no request
    except (RewardClientError, ValueError) as exc:
        raise _failure(url, timeout, exc) from None


def _say_when_it_waits(client: RewardClient, url: str, timeout: float) -> None:
    """At a terminal: one line when the server has not answered within FIRST_WAIT_S (it is
    not running, or still starting), so that the rest of the wait is not silent."""
    try:
        client.model_info(FIRST_WAIT_S)  # remembered: score() asks no more
    except DeadlineError as exc:
        print(f"tokenrm score: no answer from {url} yet ({_one_line(exc)}); trying until "
              f"--timeout ({timeout:g} s) passes, Ctrl-C stops", file=sys.stderr, flush=True)


def _failure(url: str, timeout: float, exc: Exception) -> ScoreCliError:
    """The client's error, said for a person in one line."""
    what = _one_line(exc)
    if isinstance(exc, InputError):
        return ScoreCliError(f"the server refused the request: {what}")
    if isinstance(exc, AuthenticationError):
        return ScoreCliError(f"the server wants a (different) --api-key: {what}")
    if isinstance(exc, DeadlineError):
        return ScoreCliError(f"no answer from {url} within {timeout:g} s: {what}")
    if isinstance(exc, ServerError):
        after = f" (retry after {exc.retry_after_s:g} s)" if exc.retry_after_s else ""
        return ScoreCliError(f"server error: {what}{after}")
    if isinstance(exc, ResultError):
        return ScoreCliError(f"{url} sent an answer that is not a score: {what}")
    return ScoreCliError(f"request to {url} failed: {what}")


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def score_json(model: ModelInfo, score: ItemScore) -> dict[str, Any]:
    """The score of one item in POST /score's JSON shape (without `usage`, which the client
    does not report): what the server answers, whichever transport brought it."""
    return {"model": model.name, "model_version": model.version, "results": [{
        "rewards": _float32s(score.rewards), "total": score.total,
        "token_ids": score.token_ids.tolist(), "tokens": score.tokens,
        "offsets": None if score.offsets is None else score.offsets.tolist(),
        "span_rewards": None if score.span_rewards is None else _float32s(score.span_rewards),
    }]}


def _float32s(values: Iterable[Any]) -> list[float]:
    """Float32 values written as the server writes them: the shortest decimal that reads back
    as the same float32 (-0.054746836, not the float64 -0.0547468364238739)."""
    return [float(str(v)) for v in values]


def run(url: str, prompt: str, response: str, *, top: int = 5, api_key: str | None = None,
        raw_json: bool = False, timeout: float = 60.0, console: Console | None = None) -> None:
    """Score one (prompt, response) and print it; raises ScoreCliError on any failure."""
    if top < 0:
        raise ScoreCliError(f"--top must be 0 or more, not {top}")
    if not timeout > 0:
        raise ScoreCliError(f"--timeout must be more than 0, not {timeout:g}")
    model, score = score_one(url, prompt, response, api_key=api_key, timeout=timeout)
    if raw_json:
        print(json.dumps(score_json(model, score), ensure_ascii=False))
        return
    show(console or Console(highlight=False), response, score, model.name, top)


def read_response(path: str) -> str:
    """The text of a file as UTF-8, verbatim (a final newline is kept); `-` reads stdin."""
    try:
        if path == "-":
            return sys.stdin.read()
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ScoreCliError(f"{'stdin' if path == '-' else path}: not UTF-8 text ({exc.reason} "
                            f"at byte {exc.start})") from None
    except OSError as exc:
        raise ScoreCliError(f"cannot read {path}: {exc.strerror or exc}") from None
