"""Two replicas of the tiny model on a local Ray, under load from 6 callers (HTTP and gRPC):
a replica's actor killed (the client retries the proxy's 500 / INTERNAL on the live one, Ray
restarts the dead one), and a model update (`tokenrm ray-update`: replicas switch one by one,
each loading the new checkpoint beside the old): no request fails."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest

from tests.ray_serving import on_ray, ray_serving
from tokenrm.client import Item, RewardClient
from tokenrm.proto import reward_pb2 as pb
from tokenrm.proto import reward_pb2_grpc as pb_grpc
from tokenrm.server.launcher import Running, serve
from tokenrm.server.model import checkpoint_version

ITEMS = [Item.tokens([1, 57, 80], [311, 279, 12, 9]), Item.text("Where?", "Köln, not Łódź.")]
JSON_ITEMS = [{"prompt_ids": [1, 57, 80], "response_ids": [311, 279, 12, 9]}]


@pytest.fixture(scope="module")
def ray_server(tiny_checkpoint: Path) -> Iterator[Running]:
    with ray_serving(tiny_checkpoint, "--replicas", "2", "--replica-cpus", "0.5") as running:
        yield running


class Load:
    """`callers` threads each calling `call()` until stopped; the answers and failures."""

    def __init__(self, calls: list[Callable[[], Any]]) -> None:
        self.answers: list[tuple[float, Any]] = []   # (when it started, answer)
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(c,)) for c in calls]

    def _run(self, call: Callable[[], Any]) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.answers.append((started, call()))
            except Exception as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)


def replicas() -> list[str]:
    listed = on_ray("tests/ray_replicas.py")
    assert listed.returncode == 0, listed.stderr[-2000:]
    return listed.stdout.split()


def test_a_killed_replica_costs_no_request(ray_server: Running, tiny_checkpoint: Path) -> None:
    with serve(tiny_checkpoint) as single, RewardClient(single.url) as client:
        want = [r.rewards for r in client.score(ITEMS)]
    clients = [RewardClient(ray_server.url) for _ in range(4)] + \
        [RewardClient(f"grpc://{ray_server.grpc_target}") for _ in range(2)]
    try:
        with Load([lambda c=c: c.score(ITEMS) for c in clients]) as load:
            time.sleep(2)
            killed = on_ray("tests/ray_replicas.py", "--kill")
            assert killed.returncode == 0, killed.stderr[-2000:]
            before = killed.stdout.split()
            deadline = time.monotonic() + 90
            while set(now := replicas()) & set(before[:1]) or len(now) < 2:  # Ray restarts it
                assert time.monotonic() < deadline, now
                time.sleep(1)
            time.sleep(2)  # and the new replica takes requests
    finally:
        for c in clients:
            c.close()
    assert load.failures == [], load.failures[:3]
    assert len(load.answers) > 50
    for _, answer in load.answers:
        for got, w in zip(answer, want, strict=True):
            np.testing.assert_allclose(got.rewards, w, atol=1e-5)


def test_a_model_update_under_load_fails_no_request_and_switches_versions(
        ray_server: Running, tiny_checkpoint: Path, other_checkpoint: Path) -> None:
    old = checkpoint_version(tiny_checkpoint)
    new = other_checkpoint
    http, channel = httpx.Client(base_url=ray_server.url), grpc.insecure_channel(
        ray_server.grpc_target)
    stub = pb_grpc.RewardServiceStub(channel)

    def over_http() -> tuple[str, list[float]]:
        r = http.post("/score", json={"items": JSON_ITEMS}, timeout=60)
        assert r.status_code == 200, r.text  # no retries here: not one refusal
        return r.json()["model_version"], r.json()["results"][0]["rewards"]

    def over_grpc() -> tuple[str, list[float]]:
        r = stub.Score(pb.ScoreRequest(items=[pb.Item(**JSON_ITEMS[0])]), timeout=60)
        return r.model_version, list(r.results[0].rewards)

    try:
        with Load([over_http] * 4 + [over_grpc] * 2) as load:
            time.sleep(2)
            updated = on_ray("-m", "tokenrm.cli.main", "ray-update", "--model", str(new),
                             "--model-version", "v2")
            done = time.monotonic()
            time.sleep(2)
        assert updated.returncode == 0, updated.stderr[-2000:]
        assert load.failures == [], load.failures[:3]
        by_version: dict[str, list[list[float]]] = {}
        for _, (version, rewards) in load.answers:
            by_version.setdefault(version, []).append(rewards)
        assert set(by_version) == {old, "v2"}, set(by_version)
        assert {v for started, (v, _) in load.answers if started > done} == {"v2"}
        for rewards in by_version.values():  # each version answers as its own checkpoint
            np.testing.assert_allclose(rewards, [rewards[0]] * len(rewards), atol=1e-5)
        assert not np.allclose(by_version[old][0], by_version["v2"][0], atol=1e-3)
    finally:
        http.close()
        channel.close()
        back = on_ray("-m", "tokenrm.cli.main", "ray-update", "--model", str(tiny_checkpoint))
        assert back.returncode == 0, back.stderr[-2000:]


def test_an_update_to_a_checkpoint_that_is_not_one_is_one_line(
        ray_server: Running, tiny_checkpoint: Path, tmp_path: Path) -> None:
    refused = on_ray("-m", "tokenrm.cli.main", "ray-update", "--model", str(tmp_path))
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        f"tokenrm ray-update: error: argument --model: {tmp_path}: not a checkpoint directory "
        "(no config.json)"]
    assert httpx.get(f"{ray_server.url}/v1/model", timeout=30).json()["version"] == \
        checkpoint_version(tiny_checkpoint)  # still serving
