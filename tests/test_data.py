"""The JSONL pair format: loading, writing and the errors a bad file raises."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tokenrm.training.data import DataError, ErrorSpan, Pair, load_pairs, parse_pair, write_pairs

GOOD = {"prompt": "Where does Ana live?", "rejected": "Ana lives in Oslo.",
        "edited": "Ana lives in Lima."}


def _write_lines(path: Path, rows: list[object]) -> Path:
    """One line per row: dicts and lists as JSON, strings written as they are."""
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _bad_line_error(tmp_path: Path, bad: object, lineno: int = 2) -> str:
    """Load a file whose line `lineno` is `bad` (the others good); return the error message."""
    rows: list[object] = [GOOD] * 3
    rows[lineno - 1] = bad
    path = _write_lines(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(DataError) as info:
        load_pairs(path)
    message = str(info.value)
    assert f"{path}:{lineno}" in message
    return message


def test_round_trip_keeps_id_and_error_spans(tmp_path: Path) -> None:
    pairs = [
        Pair("Where does Ana live?", "Ana lives in Oslo.", "Ana lives in Lima.", id="a-1",
             errors=(ErrorSpan("wrong_fact", 13, 17),)),
        Pair("Who is Bo?", "Bo is 30 years old. Try to keep up.", "Bo is 30 years old."),
    ]
    path = tmp_path / "pairs.jsonl"
    assert write_pairs(path, pairs) == 2
    assert load_pairs(path) == pairs


def test_round_trip_of_non_ascii_text(tmp_path: Path) -> None:
    pairs = [Pair("Wo wohnt Jürgen?", "Jürgen wohnt in Łódź.", "Jürgen wohnt in Köln.")]
    path = tmp_path / "pairs.jsonl"
    write_pairs(path, pairs)
    assert load_pairs(path) == pairs


def test_chosen_is_an_alias_of_edited(tmp_path: Path) -> None:
    row = {"prompt": "p", "rejected": "bad", "chosen": "good"}
    [pair] = load_pairs(_write_lines(tmp_path / "pairs.jsonl", [row]))
    assert pair.edited == "good"


def test_both_chosen_and_edited_is_an_error(tmp_path: Path) -> None:
    message = _bad_line_error(tmp_path, {**GOOD, "chosen": "other"})
    assert "chosen" in message and "edited" in message


def test_empty_file_has_no_pairs(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="no pairs"):
        load_pairs(path)


def test_file_of_blank_lines_has_no_pairs(tmp_path: Path) -> None:
    path = tmp_path / "blank.jsonl"
    path.write_text("\n  \n\t\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="no pairs"):
        load_pairs(path)


def test_blank_lines_are_skipped_but_counted(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + '{"prompt": 3}\n', encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{path}:3:")):
        load_pairs(path)


def test_missing_field_names_the_field_and_line(tmp_path: Path) -> None:
    row = {k: v for k, v in GOOD.items() if k != "rejected"}
    assert "rejected" in _bad_line_error(tmp_path, row)


def test_missing_edited_names_the_field_and_line(tmp_path: Path) -> None:
    row = {k: v for k, v in GOOD.items() if k != "edited"}
    assert "edited" in _bad_line_error(tmp_path, row, lineno=3)


def test_non_string_field_names_the_field_and_line(tmp_path: Path) -> None:
    assert "prompt" in _bad_line_error(tmp_path, {**GOOD, "prompt": 3})


def test_invalid_json_names_the_line(tmp_path: Path) -> None:
    message = _bad_line_error(tmp_path, '{"prompt": "p", "rejected": ', lineno=3)
    assert "JSON" in message


def test_json_array_instead_of_object_names_the_line(tmp_path: Path) -> None:
    message = _bad_line_error(tmp_path, ["p", "bad", "good"])
    assert "object" in message


def test_bad_id_type_names_the_field_and_line(tmp_path: Path) -> None:
    assert "id" in _bad_line_error(tmp_path, {**GOOD, "id": [1, 2]})


def test_error_span_out_of_range_names_the_field_and_line(tmp_path: Path) -> None:
    span = {"kind": "wrong_fact", "start": 13, "end": len(GOOD["rejected"]) + 1}
    assert "errors" in _bad_line_error(tmp_path, {**GOOD, "errors": [span]}, lineno=3)


def test_error_span_missing_end_names_the_field_and_line(tmp_path: Path) -> None:
    span = {"kind": "wrong_fact", "start": 13}
    assert "errors" in _bad_line_error(tmp_path, {**GOOD, "errors": [span]})


def test_pair_with_edited_equal_to_rejected_is_kept(tmp_path: Path) -> None:
    row = {"prompt": "p", "rejected": "same", "edited": "same"}
    assert load_pairs(_write_lines(tmp_path / "pairs.jsonl", [GOOD, row])) == [
        parse_pair(json.dumps(GOOD), "x:1"), Pair("p", "same", "same")]


def test_non_utf8_bytes_raise_data_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + '{"prompt": "Köln"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match="UTF-8") as info:
        load_pairs(path)
    assert not isinstance(info.value, UnicodeDecodeError)


def test_integer_id_becomes_a_string() -> None:
    pair = parse_pair(json.dumps({**GOOD, "id": 42}), "x:1")
    assert pair.id == "42"


def test_parse_pair_prefixes_errors_with_where() -> None:
    with pytest.raises(DataError, match=r"^file\.jsonl:7: .*prompt"):
        parse_pair(json.dumps({**GOOD, "prompt": None}), "file.jsonl:7")


@pytest.mark.parametrize("bad", [
    '"id": true',
    '"errors": [{"kind": "rude", "start": 1.7, "end": 3}]',
    '"errors": [{"kind": "rude", "start": "0", "end": 3}]',
    '"errors": [{"kind": null, "start": 0, "end": 3}]',
    '"errors": [5]',
])
def test_loose_types_are_refused(tmp_path: Path, bad: str) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "p", "rejected": "abcd", "edited": "abc", ' + bad + "}\n")
    with pytest.raises(DataError, match=f"{path}:1: "):
        load_pairs(path)
