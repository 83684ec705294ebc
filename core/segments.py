"""A response's characters cut into pieces, each with the reward of the tokens it shows: what a
view needs to colour a response by token reward (the terminal's `tokenrm score`, a web page).

Pure and torch-free (standard library only), so any front end can use it on a /score answer:

    for start, end, reward in reward_segments(len(response), result["offsets"], result["rewards"]):
        ...  # response[start:end], coloured by `reward`; None: no token covers these characters
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple


class Segment(NamedTuple):
    """Characters [start, end) of the response and the reward shown on them (None: a gap)."""

    start: int
    end: int
    reward: float | None


def reward_segments(n_chars: int, offsets: Sequence[Sequence[int]],
                    rewards: Sequence[float]) -> list[Segment]:
    """Cover [0, n_chars) once, in order: token pieces carry a reward, gaps carry None.

    `offsets` are the tokens' character spans [start, end) in the response (as /score returns
    them with return_tokens), `rewards` one value per token. Offsets are clamped so that no
    character is shown twice, and no reward is dropped while some token has characters:
    - a token whose characters were already shown (several byte-level tokens of one character,
      or overlapping offsets) adds its reward to the previous token's piece;
    - a zero-width token (such as a lone space token whose offsets the tokenizer trimmed) adds
      its reward to the next token's piece, or to the last one if none follows;
    - characters no token covers (spaces between words, a final newline) form gaps;
    - offsets past `n_chars` are cut at `n_chars`.
    So the rewards of the pieces sum to the sum of `rewards`, unless no token covers any
    character (then there is nothing to attach them to and the whole text is one gap).

    Raises ValueError if `offsets` and `rewards` differ in length.
    """
    if len(offsets) != len(rewards):
        raise ValueError(f"{len(offsets)} offsets but {len(rewards)} rewards")
    pieces: list[Segment] = []
    cursor, pending, last_token = 0, 0.0, -1
    for (raw_start, raw_end), reward in zip(offsets, rewards, strict=True):
        start = min(max(raw_start, cursor), n_chars)
        end = min(max(raw_end, start), n_chars)
        if end == start:
            if raw_end > raw_start and last_token >= 0:  # its characters were shown already
                pieces[last_token] = _plus(pieces[last_token], reward)
            else:  # zero-width: it goes with the next token shown
                pending += reward
            continue
        if start > cursor:
            pieces.append(Segment(cursor, start, None))
        pieces.append(Segment(start, end, reward + pending))
        pending, last_token, cursor = 0.0, len(pieces) - 1, end
    if pending and last_token >= 0:
        pieces[last_token] = _plus(pieces[last_token], pending)
    if cursor < n_chars:
        pieces.append(Segment(cursor, n_chars, None))
    return pieces


def _plus(piece: Segment, reward: float) -> Segment:
    return piece._replace(reward=(piece.reward or 0.0) + reward)
