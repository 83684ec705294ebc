"""`tokenrm score`: the pure rendering, then the command against real servers (HTTP and gRPC,
API keys, errors as one line, --json in /score's shape)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from rich.console import Console
from rich.style import Style
from rich.text import Text

from tests.test_segments import COVERAGE_CASES
from tokenrm.cli.score_view import (
    ScoreCliError,
    most_negative,
    render_response,
    render_table,
    reward_style,
    show,
)
from tokenrm.client import ItemScore
from tokenrm.server import launcher
from tokenrm.server.launcher import Running, free_port, serve

SCHEMES = ["http", "grpc"]

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


@pytest.mark.parametrize(("response", "offsets", "rewards"), COVERAGE_CASES)
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




def test_show_prints_the_model_the_coloured_response_the_table_and_the_total() -> None:
    score = ItemScore(np.array(REWARDS, np.float32), np.arange(5), np.array(OFFSETS),
                      ["Ana", "Ġlives", "Ġin", "ĠLima", "."], None, float(sum(REWARDS)))
    console = Console(width=80, record=True, color_system=None)
    show(console, RESPONSE, score, "tiny-rm", 2)
    out = console.export_text()
    assert out.startswith("model tiny-rm · 5 response tokens\nAna lives in Lima.\n")
    assert "' lives'" in out and "' Lima'" in out and "' in'" not in out  # the 2 lowest
    assert "total -0.040" in out
    with pytest.raises(ScoreCliError, match="no token offsets"):
        show(console, RESPONSE, ItemScore(score.rewards, score.token_ids, None, None, None, 0.0),
             "tiny-rm", 2)


# --- the command against a real server -----------------------------------------------------


def _score(*args: str, stdin: str | None = None, env: dict[str, str] | None = None
           ) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != "TOKENRM_API_KEY"}
    return subprocess.run([sys.executable, "-m", "tokenrm.cli.main", "score", *args],
                          input=stdin, capture_output=True, text=True, timeout=120, check=False,
                          env={**environment, **(env or {})})


def _assert_one_line_error(run: subprocess.CompletedProcess[str]) -> None:
    assert run.returncode == 2, (run.returncode, run.stdout, run.stderr)
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert run.stderr.startswith("tokenrm score: ")
    assert "Traceback" not in run.stderr
    assert run.stdout == ""


@pytest.fixture(scope="module")
def servers(tiny_checkpoint: Path) -> Iterator[dict[str, Running]]:
    """An open server and one that wants the API key "k1", started at once."""
    contexts = {"open": serve(tiny_checkpoint), "guarded": serve(
        tiny_checkpoint, env={"TOKENRM_API_KEYS": "k1"})}
    with ThreadPoolExecutor(len(contexts)) as pool:
        entered = {name: pool.submit(cm.__enter__) for name, cm in contexts.items()}
    try:
        yield {name: f.result() for name, f in entered.items()}
    finally:
        for name, f in entered.items():
            if f.exception() is None:
                contexts[name].__exit__(None, None, None)


@pytest.fixture(scope="module")
def server(servers: dict[str, Running]) -> Running:
    return servers["open"]


def url_of(server: Running, scheme: str) -> str:
    return server.url if scheme == "http" else f"grpc://{server.grpc_target}"


def _direct(server: Running, prompt: str, response: str) -> dict[str, Any]:
    """The server's own answer to POST /score with return_tokens."""
    answer = httpx.post(f"{server.url}/score", timeout=30, json={
        "items": [{"prompt": prompt, "response": response}], "return_tokens": True})
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


@pytest.mark.parametrize("scheme", SCHEMES)
def test_score_prints_the_coloured_response_a_table_and_the_total(server: Running,
                                                                  scheme: str) -> None:
    run = _score("--url", url_of(server, scheme), "--prompt", "Where does Ana live?",
                 "--response", RESPONSE, "--top", "3")
    assert run.returncode == 0, run.stderr
    model = _direct(server, "Where does Ana live?", RESPONSE)["model"]
    assert run.stdout.startswith(f"model {model} · ")
    for word in ("Ana", "lives", "in", "Lima."):
        assert word in run.stdout
    assert "most negative tokens" in run.stdout
    assert "total" in run.stdout
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize(("scheme", "path"), [("http", ""), ("http", "/score"), ("grpc", "")])
def test_score_json_reads_stdin_and_prints_the_answer_in_score_shape(server: Running,
                                                                     scheme: str,
                                                                     path: str) -> None:
    run = _score("--url", url_of(server, scheme) + path, "--prompt", "Where does Ana live?",
                 "--response-file", "-", "--json", stdin=RESPONSE)
    assert run.returncode == 0, run.stderr
    printed = json.loads(run.stdout)
    want = _direct(server, "Where does Ana live?", RESPONSE)
    del want["usage"]  # the client does not report it
    assert printed == want  # same keys, same values, bit for bit
    result = printed["results"][0]
    assert len(result["rewards"]) == len(result["offsets"]) == len(result["tokens"]) > 0
    assert result["offsets"][-1][1] == len(RESPONSE)
    assert result["span_rewards"] is None


@pytest.mark.parametrize(("scheme", "code"), [("http", "invalid_input"),
                                              ("grpc", "INVALID_ARGUMENT")])
def test_a_server_error_is_one_line_on_stderr_with_exit_2(server: Running, scheme: str,
                                                          code: str) -> None:
    run = _score("--url", url_of(server, scheme), "--prompt", "Where does Ana live?",
                 "--response", "")
    _assert_one_line_error(run)
    assert "items[0].response: empty" in run.stderr
    assert code in run.stderr


@pytest.mark.parametrize("scheme", SCHEMES)
def test_api_keys(servers: dict[str, Running], scheme: str) -> None:
    url = url_of(servers["guarded"], scheme)
    for key in ((), ("--api-key", "nope")):
        started = time.monotonic()
        run = _score("--url", url, "--prompt", "p", "--response", RESPONSE, *key)
        _assert_one_line_error(run)
        assert "--api-key" in run.stderr
        assert time.monotonic() - started < 30  # refused at once, not retried for 60 s
    for key, env in ((("--api-key", "k1"), {}), ((), {"TOKENRM_API_KEY": "k1"})):
        run = _score("--url", url, "--prompt", "p", "--response", RESPONSE, *key, "--json",
                     env=env)
        assert run.returncode == 0, run.stderr
        assert len(json.loads(run.stdout)["results"][0]["rewards"]) > 0


@pytest.mark.parametrize("scheme", SCHEMES)
def test_an_unreachable_url_is_named_with_exit_2_within_the_timeout(scheme: str) -> None:
    url = f"{scheme}://127.0.0.1:{free_port()}"
    started = time.monotonic()
    run = _score("--url", url, "--prompt", "p", "--response", "r", "--timeout", "3")
    elapsed = time.monotonic() - started
    _assert_one_line_error(run)
    assert f"no answer from {url} within 3 s" in run.stderr
    assert "every endpoint is down" in run.stderr  # and why: refused connections
    assert elapsed < 3 + 15, elapsed  # the timeout, and the interpreter's start on a busy box


def test_a_url_the_client_does_not_speak_is_a_clear_error() -> None:
    run = _score("--url", "ftp://127.0.0.1:1", "--prompt", "p", "--response", "r")
    _assert_one_line_error(run)
    assert "http://, https://, grpc:// or grpcs://" in run.stderr


def test_an_unreadable_response_file_is_a_clear_error(tmp_path: Path) -> None:
    run = _score("--prompt", "p", "--response-file", str(tmp_path / "missing.txt"))
    assert run.returncode == 2
    assert f"cannot read {tmp_path / 'missing.txt'}" in run.stderr
    assert "Traceback" not in run.stderr


def test_at_a_terminal_a_long_wait_is_explained_then_it_answers_when_the_server_comes(
        tiny_checkpoint: Path) -> None:
    """Started before its server (at a terminal: stderr a pty): after FIRST_WAIT_S one line
    says it has no answer yet and keeps trying; the server comes up within --timeout, and the
    score is printed."""
    port = free_port()
    primary, secondary = os.openpty()
    try:
        command = subprocess.Popen(
            [sys.executable, "-m", "tokenrm.cli.main", "score", "--url",
             f"http://127.0.0.1:{port}", "--prompt", "p", "--response", RESPONSE, "--json",
             "--timeout", "150"],
            stdout=subprocess.PIPE, stderr=secondary, text=True)
        os.close(secondary)
        said = b""
        while b"trying until" not in said:  # the pty's end: read as it comes
            chunk = os.read(primary, 4096)
            assert chunk, said
            said += chunk
        assert said.decode().startswith(
            f"tokenrm score: no answer from http://127.0.0.1:{port} yet"), said
        server = launcher.start(tiny_checkpoint, port, free_port(), timeout_s=120)
        try:
            out, _ = command.communicate(timeout=150)
        finally:
            server.terminate()
            server.wait(timeout=60)
        assert command.returncode == 0
        assert len(json.loads(out)["results"][0]["rewards"]) > 0
    finally:
        os.close(primary)
