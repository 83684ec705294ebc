"""`tokenrm score`'s view: a response with its tokens coloured by reward, a table of the most
negative tokens, the total.

The parts are pure (`render_response`, `most_negative`, `render_table`): text, offsets and
rewards in, rich renderables out, so they are tested without a server. Which characters show
which reward is `tokenrm.core.segments.reward_segments`, shared with other views.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from rich.color import Color
from rich.console import Console
from rich.style import Style
from rich.table import Table
from rich.text import Text

from tokenrm.client import ItemScore
from tokenrm.core.segments import reward_segments

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


def render_response(response: str, offsets: Sequence[Sequence[int]], rewards: Sequence[float],
                    *, neutral: float = NEUTRAL) -> Text:
    """The response with each token's characters coloured by its reward.

    Every character of `response` appears exactly once and in order (characters no token covers
    are plain); rich drops terminal control characters such as a carriage return.
    """
    scale = colour_scale(rewards)
    text = Text()
    for start, end, reward in reward_segments(len(response), offsets, rewards):
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


def show(console: Console, response: str, result: ItemScore, model: str, top: int) -> None:
    """Print the coloured response, the table of the `top` most negative tokens, the total.
    `result` is the text item's score, asked for with return_tokens (it needs offsets)."""
    if result.offsets is None:
        raise ScoreCliError("the server sent no token offsets for the response")
    if len(result.offsets) != len(result.rewards):
        raise ScoreCliError(f"the server sent {len(result.offsets)} offsets for "
                            f"{len(result.rewards)} rewards")
    offsets, rewards = result.offsets.tolist(), result.rewards.tolist()
    console.print(Text(f"model {model} · {len(rewards)} response tokens", style="dim"))
    console.print(render_response(response, offsets, rewards))
    if top > 0:
        console.print()
        rows = most_negative(response, offsets, rewards, top, result.tokens)
        console.print(render_table(rows, colour_scale(rewards)))
    total = Text("total ", style="bold")
    total.append(f"{result.total:+.3f}",
                 style=reward_style(result.total, max(1.0, abs(result.total))) or "")
    console.print(total)
