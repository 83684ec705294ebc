"""`tokenrm score`: the pure rendering, then the command against a real server."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console
from rich.style import Style
from rich.text import Text

from tokenrm.cli.score_view import (
    most_negative,
    render_response,
    render_table,
    reward_style,
)
from tokenrm.server.process import free_port, serve

RESPONSE = "Ana lives in Lima."
OFFSETS = [[0, 3], [3, 9], [9, 12], [12, 17], [17, 18]]
REWARDS = [0.02, -0.91, 0.30, -0.20, 0.75]


def _style_at(text: Text, index: int) -> Style | None:
    """The style rich applies to character `index` (None: plain)."""
    styles = [s.style for s in text.spans if s.start <= index < s.end]
    assert len(styles) <= 1
    return styles[0] if styles else None  # type: ignore[return-value]


def _rgb(style: Style | None) -> tuple[int, int, int]:
    assert style is not None and style.color is not None
    return tuple(style.color.get_truecolor())  # type: ignore[return-value]


# --- rendering, no server ------------------------------------------------------------------


def test_colours_follow_the_sign_and_near_zero_is_plain() -> None:
    text = render_response(RESPONSE, OFFSETS, REWARDS)
    assert _style_at(text, 0) is None                    # "Ana": 0.02, neutral
    red, green, _ = _rgb(_style_at(text, 4))            # " lives": negative
    assert red > green
    red, green, _ = _rgb(_style_at(text, 10))           # " in": positive
    assert green > red
    red, green, _ = _rgb(_style_at(text, 17))           # ".": positive
    assert green > red


def test_intensity_grows_with_magnitude() -> None:
    weak, strong = _rgb(reward_style(-0.2)), _rgb(reward_style(-0.9))
    assert strong[1] < weak[1] and strong[2] < weak[2]   # less green and blue: deeper red
    weak, strong = _rgb(reward_style(0.2)), _rgb(reward_style(0.9))
    assert strong[0] < weak[0] and strong[2] < weak[2]
    assert reward_style(0.01) is None and reward_style(-0.01) is None
    assert reward_style(float("nan")) is None


def test_a_logit_head_is_scaled_to_its_largest_reward() -> None:
    text = render_response("ab", [[0, 1], [1, 2]], [-8.0, 0.1])
    assert _style_at(text, 0) == reward_style(-1.0)   # the largest is full intensity
    assert _style_at(text, 1) is None                 # 0.1 of 8 is near zero


@pytest.mark.parametrize(("response", "offsets", "rewards"), [
    (RESPONSE, OFFSETS, REWARDS),
    # Gaps the tokenizer does not cover (spaces, a trailing newline) are shown plain.
    ("Ana lives\tin Lima.\n", [[0, 3], [4, 9], [10, 12], [13, 18]], [-0.5, 0.5, -0.1, 0.2]),
    # Several byte-level tokens of one character, a zero-width token, overlaps.
    ("Łódź ok", [[0, 1], [0, 1], [1, 4], [4, 4], [3, 7]], [0.1, -0.6, 0.2, 0.3, -0.9]),
    # Multi-line text; offsets past the end are clamped.
    ("one\ntwo\n", [[0, 3], [3, 7], [7, 99]], [1.0, -1.0, 0.0]),
    ("x", [], []),
])
def test_every_character_appears_once_in_order(response: str, offsets: list[list[int]],
                                                rewards: list[float]) -> None:
    text = render_response(response, offsets, rewards)
    assert text.plain == response
    covered = sorted((s.start, s.end) for s in text.spans)
    for (_, end), (start, _) in itertools.pairwise(covered):
        assert end <= start                          # no character styled twice


def test_tokens_sharing_a_character_pool_their_reward() -> None:
    # Two byte-level tokens of "Ł": the character shows their sum, -0.5, as red.
    text = render_response("Łx", [[0, 1], [0, 1], [1, 2]], [0.1, -0.6, 0.0])
    assert _style_at(text, 0) == reward_style(-0.5)


def test_a_zero_width_token_colours_the_next_token() -> None:
    # A lone space token whose offsets the tokenizer trimmed to [3, 3): it belongs with "O".
    offsets = [[0, 2], [3, 3], [3, 4], [4, 7]]
    text = render_response("in Oslo", offsets, [0.0, -0.6, 0.0, 0.0])
    assert _style_at(text, 0) is None
    assert _style_at(text, 3) == reward_style(-0.6)
    rows = most_negative("in Oslo", offsets, [0.0, -0.6, 0.0, 0.0], 1,
                         tokens=["in", "Ġ", "O", "slo"])
    assert (rows[0].text, rows[0].start, rows[0].end) == ("Ġ", 3, 3)


def test_mismatched_offsets_and_rewards_are_refused() -> None:
    with pytest.raises(ValueError, match="2 offsets but 1 rewards"):
        render_response("ab", [[0, 1], [1, 2]], [0.5])


def test_most_negative_is_sorted_and_has_k_entries() -> None:
    for k in (1, 3, 5):
        rows = most_negative(RESPONSE, OFFSETS, REWARDS, k)
        assert len(rows) == k
        assert [r.reward for r in rows] == sorted(REWARDS)[:k]
    rows = most_negative(RESPONSE, OFFSETS, REWARDS, 2)
    assert (rows[0].index, rows[0].text, rows[0].start, rows[0].end) == (1, " lives", 3, 9)
    assert (rows[1].index, rows[1].text) == (3, " Lima")
    assert len(most_negative(RESPONSE, OFFSETS, REWARDS, 50)) == len(REWARDS)
    assert most_negative(RESPONSE, OFFSETS, REWARDS, 0) == []


def test_table_shows_text_offsets_and_reward_without_reading_markup() -> None:
    rows = most_negative("[b]x", [[0, 3], [3, 4]], [-0.7, 0.1], 2)
    console = Console(width=80, record=True, color_system=None)
    console.print(render_table(rows))
    out = console.export_text()
    assert "'[b]'" in out and "[0, 3)" in out and "-0.700" in out
    assert out.index("-0.700") < out.index("+0.100")


# --- the command against a real server -----------------------------------------------------


def _score(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tokenrm.cli.main", "score", *args],
                          input=stdin, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def server_url(tiny_checkpoint: Path) -> Iterator[str]:
    with serve(tiny_checkpoint) as server:
        yield server.url


def test_score_prints_the_coloured_response_a_table_and_the_total(server_url: str) -> None:
    run = _score("--url", server_url, "--prompt", "Where does Ana live?",
                 "--response", RESPONSE, "--top", "3")
    assert run.returncode == 0, run.stderr
    for word in ("Ana", "lives", "in", "Lima."):
        assert word in run.stdout
    assert "most negative tokens" in run.stdout
    assert "total" in run.stdout
    assert "Traceback" not in run.stderr


def test_score_json_reads_stdin_and_prints_the_raw_answer(server_url: str) -> None:
    run = _score("--url", server_url, "--prompt", "Where does Ana live?",
                 "--response-file", "-", "--json", stdin=RESPONSE)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)["results"][0]
    assert len(result["rewards"]) == len(result["offsets"]) == len(result["tokens"]) > 0
    assert result["offsets"][-1][1] == len(RESPONSE)


def test_a_server_error_is_one_line_on_stderr_with_exit_2(server_url: str) -> None:
    run = _score("--url", server_url, "--prompt", "Where does Ana live?", "--response", "")
    assert run.returncode == 2
    assert "items[0].response: empty" in run.stderr
    assert "invalid_input" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    assert "Traceback" not in run.stderr
    assert run.stdout == ""


def test_an_unreachable_url_is_named_with_exit_2() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    run = _score("--url", url, "--prompt", "p", "--response", "r")
    assert run.returncode == 2
    assert f"could not reach {url}" in run.stderr
    assert "Traceback" not in run.stderr


def test_an_unreadable_response_file_is_a_clear_error(tmp_path: Path) -> None:
    run = _score("--prompt", "p", "--response-file", str(tmp_path / "missing.txt"))
    assert run.returncode == 2
    assert f"cannot read {tmp_path / 'missing.txt'}" in run.stderr
    assert "Traceback" not in run.stderr
