"""OpenRLHF's reward queries: the decoded prompt + response, split back into the two.

OpenRLHF sends `query = decode(prompt_ids + response_ids, skip_special_tokens=False)` and the
prompt text. The prompt is usually a prefix of the query, perhaps after a few characters of
special-token text the policy's tokenizer added (a BOS); when the prompt was too long, its ids
were cut from the left, and the query starts with the prompt's tail. torch-free.
"""

from __future__ import annotations

from typing import NamedTuple

MAX_ADDED_PREFIX = 32   # characters of added special-token text before the prompt (e.g. BOS)
MIN_TAIL = 16           # a cut prompt's tail must be at least this long to count as found


class Split(NamedTuple):
    prompt: str     # the prompt (its tail, if it was cut); text added before it is dropped
    response: str   # the rest of the query


def split_query(query: str, prompt: str) -> Split | None:
    """The prompt part and the response of `query`, or None if the query does not hold its
    prompt (neither whole near its start nor as a tail of at least MIN_TAIL characters)."""
    if not prompt:
        return Split("", query)
    at = query.find(prompt, 0, MAX_ADDED_PREFIX + len(prompt))
    if at >= 0:
        return Split(prompt, query[at + len(prompt):])
    tail = _longest_tail(query, prompt)
    return None if tail is None else Split(prompt[tail:], query[len(prompt) - tail:])


def _longest_tail(query: str, prompt: str) -> int | None:
    """The smallest k such that the query starts with prompt[k:] (at least MIN_TAIL long)."""
    head = query[:MIN_TAIL]
    if len(head) < MIN_TAIL:
        return None
    k = prompt.find(head)
    while 0 <= k <= len(prompt) - MIN_TAIL:
        if query.startswith(prompt[k:]):
            return k
        k = prompt.find(head, k + 1)
    return None
