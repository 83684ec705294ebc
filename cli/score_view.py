"""`tokenrm score`: post one item to a running server and show its tokens coloured by reward.

The rendering is pure (`render_response`, `most_negative`, `render_table`): text, offsets and
rewards in, rich renderables out, so it is tested without a server. `run` does the one request.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
from pydantic import ValidationError
from rich.color import Color
from rich.console import Console
from rich.style import Style
from rich.table import Table
from rich.text import Text

from tokenrm.server.protocol import ErrorResponse, ItemResult, ScoreResponse

NEUTRAL = 0.05
"""Rewards smaller than this (relative to the colour scale) are shown plain."""

# Colour ramps, faint (just past neutral) to strong (|reward| at the top of the scale). The faint
# ends still read as red and green where a terminal has only 16 colours.
_NEGATIVE = ((230, 120, 120), (215, 0, 0))
_POSITIVE = ((120, 210, 120), (0, 175, 0))


class ScoreCliError(Exception):
    """What went wrong, as one line for stderr."""


def colour_scale(rewards: Sequence[float]) -> float:
    """The |reward| shown at full intensity: 1 (the range of P(pos) − P(neg)), or more if a
    logit head gives larger rewards."""
    finite = [abs(r) for r in rewards if math.isfinite(r)]
    return max(1.0, *finite) if finite else 1.0


def reward_style(reward: float, scale: float = 1.0, neutral: float = NEUTRAL) -> Style | None:
    """Red for negative, green for positive, more saturated (and bold from half the scale up)
    as |reward| grows; None (plain) near 0 or for a non-finite reward."""
    if not math.isfinite(reward):
        return None
    t = min(1.0, abs(reward) / scale)
    if t < neutral:
        return None
    faint, strong = _NEGATIVE if reward < 0 else _POSITIVE
    r, g, b = (round(f + (s - f) * t) for f, s in zip(faint, strong, strict=True))
    return Style(color=Color.from_rgb(r, g, b), bold=t >= 0.5)


def _segments(n_chars: int, offsets: Sequence[Sequence[int]], rewards: Sequence[float]
              ) -> list[tuple[int, int, float | None]]:
    """Cover [0, n_chars) once, in order: token pieces carry a reward, gaps carry None.

    Offsets are clamped so no character is shown twice, and no reward is dropped: a token whose
    characters were already shown (several byte-level tokens of one character) adds its reward
    to the previous token's piece; a zero-width token (such as a lone space token whose offsets
    the tokenizer trimmed) adds it to the next token's piece, or the last one if none follows.
    """
    if len(offsets) != len(rewards):
        raise ValueError(f"{len(offsets)} offsets but {len(rewards)} rewards")
    pieces: list[tuple[int, int, float | None]] = []
    cursor, pending, last_token = 0, 0.0, -1
    for (raw_start, raw_end), reward in zip(offsets, rewards, strict=True):
        start = min(max(raw_start, cursor), n_chars)
        end = min(max(raw_end, start), n_chars)
        if end == start:
            if raw_end > raw_start and last_token >= 0:
                a, b, r = pieces[last_token]
                pieces[last_token] = (a, b, (r or 0.0) + reward)
            else:
                pending += reward
            continue
        if start > cursor:
            pieces.append((cursor, start, None))
        pieces.append((start, end, reward + pending))
        pending, last_token, cursor = 0.0, len(pieces) - 1, end
    if pending and last_token >= 0:
        a, b, r = pieces[last_token]
        pieces[last_token] = (a, b, (r or 0.0) + pending)
    if cursor < n_chars:
        pieces.append((cursor, n_chars, None))
    return pieces


def render_response(response: str, offsets: Sequence[Sequence[int]], rewards: Sequence[float],
                    *, neutral: float = NEUTRAL) -> Text:
    """The response with each token's characters coloured by its reward.

    Every character of `response` appears exactly once and in order (characters no token covers
    are plain); rich drops terminal control characters such as a carriage return.
    """
    scale = colour_scale(rewards)
    text = Text()
    for start, end, reward in _segments(len(response), offsets, rewards):
        style = None if reward is None else reward_style(reward, scale, neutral)
        text.append(response[start:end], style=style)
    return text


@dataclass(frozen=True)
class TokenRow:
    index: int      # position among the response tokens
    text: str       # the token's characters in the response; the token string if it has none
    start: int | None
    end: int | None
    reward: float


def most_negative(response: str, offsets: Sequence[Sequence[int]] | None,
                  rewards: Sequence[float], k: int,
                  tokens: Sequence[str] | None = None) -> list[TokenRow]:
    """The k tokens with the lowest rewards, lowest first (ties: earlier token first)."""
    rows = []
    for i, reward in enumerate(rewards):
        start, end = offsets[i] if offsets is not None else (None, None)
        text = response[start:end] if start is not None else ""
        if not text and tokens is not None:
            text = tokens[i]  # a zero-width token, e.g. a space whose offsets were trimmed
        rows.append(TokenRow(i, text, start, end, reward))
    rows.sort(key=lambda row: (row.reward, row.index))
    return rows[:max(0, k)]


def render_table(rows: Sequence[TokenRow], scale: float = 1.0) -> Table:
    table = Table(title="most negative tokens", title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("token")
    table.add_column("chars", justify="right")
    table.add_column("reward", justify="right")
    for row in rows:
        chars = "" if row.start is None else f"[{row.start}, {row.end})"
        # Text cells: a token such as "[b]" is shown as is, not read as rich markup.
        table.add_row(Text(str(row.index)), Text(repr(row.text)), Text(chars),
                      Text(f"{row.reward:+.3f}", style=reward_style(row.reward, scale) or ""))
    return table


def show(console: Console, response: str, result: ItemResult, model: str, top: int) -> None:
    """Print the coloured response, the table of the `top` most negative tokens, the total."""
    if result.offsets is None:
        raise ScoreCliError("the server sent no token offsets for the response")
    if len(result.offsets) != len(result.rewards):
        raise ScoreCliError(f"the server sent {len(result.offsets)} offsets for "
                            f"{len(result.rewards)} rewards")
    console.print(Text(f"model {model} · {len(result.rewards)} response tokens", style="dim"))
    console.print(render_response(response, result.offsets, result.rewards))
    if top > 0:
        console.print()
        rows = most_negative(response, result.offsets, result.rewards, top, result.tokens)
        console.print(render_table(rows, colour_scale(result.rewards)))
    total = Text("total ", style="bold")
    total.append(f"{result.total:+.3f}",
                 style=reward_style(result.total, max(1.0, abs(result.total))) or "")
    console.print(total)


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


def _endpoint(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/score") else f"{url}/score"


def _server_error(endpoint: str, answer: httpx.Response) -> ScoreCliError:
    try:
        error = ErrorResponse.model_validate_json(answer.content).error
    except ValidationError:
        body = " ".join(answer.text.split())[:200]
        return ScoreCliError(f"{endpoint} answered HTTP {answer.status_code}, not a tokenrm "
                             f"error: {body or '(empty body)'}")
    message = f"server error {error.code} (HTTP {answer.status_code}): {error.message}"
    retry_after = answer.headers.get("retry-after")
    if retry_after:
        message += f" (retry after {retry_after} s)"
    return ScoreCliError(message)


def post_item(url: str, prompt: str, response: str, *, api_key: str | None = None,
              timeout: float = 60.0) -> httpx.Response:
    """POST one text item with `return_tokens`; a 200 answer, or ScoreCliError saying why not."""
    endpoint = _endpoint(url)
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    body = {"items": [{"prompt": prompt, "response": response}], "return_tokens": True}
    try:
        answer = httpx.post(endpoint, json=body, headers=headers, timeout=timeout)
    except httpx.TimeoutException:
        raise ScoreCliError(f"no answer from {endpoint} within {timeout:g} s") from None
    except httpx.ConnectError as exc:
        raise ScoreCliError(f"could not reach {endpoint}: {exc}") from None
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise ScoreCliError(f"request to {endpoint} failed: {exc}") from None
    if answer.status_code != 200:
        raise _server_error(endpoint, answer)
    return answer


def run(url: str, prompt: str, response: str, *, top: int = 5, api_key: str | None = None,
        raw_json: bool = False, timeout: float = 60.0, console: Console | None = None) -> None:
    """Score one (prompt, response) and print it; raises ScoreCliError on any failure."""
    if top < 0:
        raise ScoreCliError(f"--top must be 0 or more, not {top}")
    answer = post_item(url, prompt, response, api_key=api_key, timeout=timeout)
    if raw_json:
        print(answer.text)
        return
    try:
        parsed = ScoreResponse.model_validate_json(answer.content)
    except ValidationError as exc:
        raise ScoreCliError(f"{_endpoint(url)} sent an answer that is not a score response: "
                            f"{exc.errors(include_url=False)[0]['msg']}") from None
    if len(parsed.results) != 1:
        raise ScoreCliError(f"the server sent {len(parsed.results)} results for one item")
    show(console or Console(highlight=False), response, parsed.results[0], parsed.model, top)
