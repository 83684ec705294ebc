"""The README's first example stays true on the shipped demo model: its curl body, sent to
`tokenrm serve` (no --model: the demo), marks the wrong fact's tokens the most negative, and the
totals it quotes are the ones the server answers; `tokenrm score --json` gives the same rewards."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tokenrm.server.launcher import Running, free_port, launch, stop

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_example() -> tuple[dict, list[float]]:
    """The body of the README's first curl to /score, and the totals its text quotes."""
    text = README.read_text()
    body = re.search(r"curl -s localhost:8000/score .*? -d '(.*?)'\n```", text, re.S)
    assert body is not None, "the README's /score example is gone"
    quoted = re.search(r"\*\*([−+-][0-9.]+)\*\* for the first\s+response, \*\*([−+-][0-9.]+)\*\*",
                       text)
    assert quoted is not None, "the README no longer quotes the two totals"
    totals = [float(t.replace("−", "-")) for t in quoted.groups()]
    return json.loads(body.group(1)), totals


@pytest.fixture(scope="module")
def demo_server() -> Iterator[Running]:
    port, grpc_port = free_port(), free_port()
    proc = launch([sys.executable, "-m", "tokenrm.cli.main", "serve", "--port", str(port),
                   "--grpc-port", str(grpc_port)], f"http://127.0.0.1:{port}/readyz",
                  name="tokenrm serve (demo)", timeout_s=120)
    try:
        yield Running(f"http://127.0.0.1:{port}", f"127.0.0.1:{grpc_port}", proc)
    finally:
        stop(proc)


def test_the_readme_example_says_what_the_demo_model_answers(demo_server: Running) -> None:
    body, quoted_totals = readme_example()
    answer = httpx.post(f"{demo_server.url}/score", json=body, timeout=60).json()
    wrong, right = answer["results"]
    wrong_response = body["items"][0]["response"]
    start = wrong_response.index("gardener")
    on_the_wrong_fact = [i for i, (a, b) in enumerate(wrong["offsets"])
                         if a < start + len("gardener") and b > start]
    most_negative = np.argsort(wrong["rewards"])[:len(on_the_wrong_fact)]
    assert sorted(most_negative.tolist()) == on_the_wrong_fact
    assert max(wrong["rewards"][i] for i in on_the_wrong_fact) < -0.9
    assert right["total"] > wrong["total"]
    np.testing.assert_allclose([wrong["total"], right["total"]], quoted_totals, atol=0.05)


def test_tokenrm_score_shows_the_same(demo_server: Running) -> None:
    body, _ = readme_example()
    item = body["items"][0]
    shown = subprocess.run(
        [sys.executable, "-m", "tokenrm.cli.main", "score", "--url", demo_server.url,
         "--prompt", item["prompt"], "--response", item["response"], "--json"],
        capture_output=True, text=True, timeout=60, check=True)
    answer = httpx.post(f"{demo_server.url}/score", json={"items": [item]}, timeout=60).json()
    np.testing.assert_allclose(json.loads(shown.stdout)["results"][0]["rewards"],
                               answer["results"][0]["rewards"], atol=1e-6)
