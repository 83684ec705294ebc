"""Preference pairs with a minimally edited response: the JSONL format, its loader and writer."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """A data file that cannot be read as pairs; the message names file:line and the reason."""


@dataclass(frozen=True)
class ErrorSpan:
    """An oracle error in the rejected response: its kind and character span [start, end)."""

    kind: str
    start: int
    end: int


@dataclass(frozen=True)
class Pair:
    """One prompt with a rejected response and its minimally edited (better) version."""

    prompt: str
    rejected: str
    edited: str
    id: str | None = None
    errors: tuple[ErrorSpan, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        row: dict[str, Any] = {"prompt": self.prompt, "rejected": self.rejected,
                               "edited": self.edited}
        if self.id is not None:
            row["id"] = self.id
        if self.errors:
            row["errors"] = [asdict(e) for e in self.errors]
        return row


def _string(row: dict[str, Any], key: str, where: str) -> str:
    value = row.get(key)
    if value is None:
        raise DataError(f"{where}: missing field {key!r}")
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _errors(value: Any, where: str, rejected: str) -> tuple[ErrorSpan, ...]:
    if not isinstance(value, list):
        raise DataError(f"{where}: field 'errors' must be a list")
    spans = []
    for i, item in enumerate(value):
        if not (isinstance(item, dict) and isinstance(item.get("kind"), str)
                and _is_int(item.get("start")) and _is_int(item.get("end"))):
            raise DataError(f"{where}: errors[{i}] must be an object with a string 'kind' and "
                            "integer 'start' and 'end'")
        span = ErrorSpan(item["kind"], item["start"], item["end"])
        if not 0 <= span.start < span.end <= len(rejected):
            raise DataError(f"{where}: errors[{i}] span [{span.start}, {span.end}) is outside "
                            f"the rejected response (length {len(rejected)})")
        spans.append(span)
    return tuple(spans)


_JSON_TYPES = {"dict": "an object", "list": "an array", "NoneType": "null", "bool": "a boolean",
               "int": "a number", "float": "a number", "str": "a string"}


def json_type(value: object) -> str:
    """What a parsed JSON value is, in JSON's words ("an array", "null")."""
    return _JSON_TYPES.get(type(value).__name__, type(value).__name__)


def json_object(line: str, where: str) -> dict[str, Any]:
    """One JSONL line that must hold an object; `where` (file:line) prefixes the error."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {json_type(row)}")
    return row


def parse_pair(line: str, where: str) -> Pair:
    """Parse one JSONL line; `where` (file:line) prefixes every error message."""
    row = json_object(line, where)
    if "edited" in row and "chosen" in row:
        raise DataError(f"{where}: give 'edited' or its alias 'chosen', not both")
    edited_key = "chosen" if "chosen" in row else "edited"
    rejected = _string(row, "rejected", where)
    pair_id = row.get("id")
    if pair_id is not None and not (isinstance(pair_id, str) or _is_int(pair_id)):
        raise DataError(f"{where}: field 'id' must be a string or an integer")
    return Pair(
        prompt=_string(row, "prompt", where),
        rejected=rejected,
        edited=_string(row, edited_key, where),
        id=None if pair_id is None else str(pair_id),
        errors=_errors(row["errors"], where, rejected) if "errors" in row else (),
    )


def iter_pairs(path: str | Path) -> Iterator[Pair]:
    """Yield the pairs of a JSONL file; blank lines are skipped, anything else malformed raises."""
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                yield parse_pair(line, f"{path}:{lineno}")


def load_pairs(path: str | Path) -> list[Pair]:
    """Read every pair of a JSONL file; an empty file is an error, not an empty data set."""
    try:
        pairs = list(iter_pairs(path))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not pairs:
        raise DataError(f"{path}: no pairs (the file is empty)")
    return pairs


def write_pairs(path: str | Path, pairs: Iterable[Pair]) -> int:
    """Write pairs as JSONL; returns how many were written."""
    n = 0
    with Path(path).open("w", encoding="utf-8") as f:
        for pair in pairs:
            f.write(json.dumps(pair.to_json(), ensure_ascii=False) + "\n")
            n += 1
    return n
