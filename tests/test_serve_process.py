"""`tokenrm serve` as a real process on 127.0.0.1: rewards equal the direct forward, under load."""

from __future__ import annotations

import asyncio
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from transformers import AutoModelForTokenClassification, AutoTokenizer

from tokenrm.core.encoding import encode
from tokenrm.core.reward_rule import token_rewards
from tokenrm.server.launcher import free_port, serve
from tokenrm.training import synth


def _direct(model, ids: list[int], n: int) -> np.ndarray:
    """One unbatched, unpadded forward: the reference."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits
    return token_rewards(logits, model.config.id2label)[0, -n:].numpy()


def test_rewards_equal_the_direct_forward_under_concurrent_mixed_load(
        tiny_checkpoint: Path) -> None:
    model = AutoModelForTokenClassification.from_pretrained(tiny_checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    rng = random.Random(0)
    items, expected = [], []
    for pair in synth.generate(21, 12):
        for response in (pair.rejected, pair.edited):
            items.append({"prompt": pair.prompt, "response": response})
            enc = encode(tokenizer, pair.prompt, response)
            expected.append(_direct(model, enc.input_ids, len(enc.response_ids)))
    for _ in range(24):  # token items from 1 to 150 response tokens
        prompt = [rng.randrange(3, 400) for _ in range(rng.randint(0, 40))]
        response = [rng.randrange(3, 400) for _ in range(rng.randint(1, 150))]
        items.append({"prompt_ids": prompt, "response_ids": response})
        expected.append(_direct(model, prompt + response, len(response)))
    order = list(range(len(items)))
    rng.shuffle(order)
    requests = [order[i:i + 3] for i in range(0, len(order), 3)]

    async def run(url: str) -> dict[int, list[float]]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            async def one(indices: list[int]) -> list[list[float]]:
                r = await client.post("/score", json={"items": [items[i] for i in indices]})
                assert r.status_code == 200, r.text
                return [res["rewards"] for res in r.json()["results"]]

            answers = await asyncio.gather(*(one(ix) for ix in requests * 2))
        got: dict[int, list[float]] = {}
        for indices, rewards in zip(requests * 2, answers, strict=True):
            for i, r in zip(indices, rewards, strict=True):
                if i in got:
                    # the same answer both times, up to float rounding in other batch shapes
                    np.testing.assert_allclose(got[i], r, atol=1e-6, rtol=0)
                got[i] = r
        return got

    with serve(tiny_checkpoint, env={"TOKENRM_MAX_WAIT_MS": "20"}) as server:
        url = server.url
        got = asyncio.run(run(url))
        metrics = httpx.get(f"{url}/metrics").text
    for i, want in enumerate(expected):
        assert len(got[i]) == len(want)
        np.testing.assert_allclose(got[i], want, atol=1e-5, rtol=0)
    # The load really was batched: some forward pass held more than one row.
    assert 'tokenrm_batch_size_bucket{le="1.0"}' in metrics
    counts = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
              if line.startswith("tokenrm_batch_size_")}
    assert counts['tokenrm_batch_size_bucket{le="1.0"}'] < counts["tokenrm_batch_size_count"]


def test_the_start_up_log_is_tokenrms_and_uvicorns_only(tmp_path: Path) -> None:
    """No third-party chatter (transformers' loading progress bar, its note on a config field a
    reward model does not use) between start and the first answer, nor at SIGTERM. The line
    that says what serves names the settings that shape its speed, as they took effect."""
    port = free_port()
    log_path = tmp_path / "log.txt"
    env = {**os.environ, "TOKENRM_WORKERS": "1", "TOKENRM_THREADS": "2", "TOKENRM_TRACE": "0",
           "TOKENRM_DTYPE": "float32", "TOKENRM_MAX_ITEMS": "3"}
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "tokenrm.cli.main", "serve", "--port",
                                 str(port), "--grpc-port", str(free_port())],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 120
            while not _ready(f"http://127.0.0.1:{port}/readyz"):
                assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.2)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    lines = [line for line in log_path.read_text().splitlines() if line.strip()]
    assert any("tokenrm.server.app: serving demo-token-rm (token rewards, max 640 tokens) on "
               "cpu: float32, forward workers 1, torch threads per worker 2, eager forward, "
               "prefix reuse on" in line for line in lines), lines
    assert any(line.startswith("WARNING tokenrm.server.serve: TOKENRM_MAX_ITEMS is not a setting")
               for line in lines), lines  # a misspelt setting is said, not silently ignored
    strangers = [line for line in lines if not re.match(r"(INFO|WARNING|ERROR):? ", line)
                 or not re.match(r"\w+:\s{2,}|\w+ tokenrm\.", line)]
    assert strangers == [], strangers


def _ready(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.TransportError:
        return False
