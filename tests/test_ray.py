"""`tokenrm serve --ray`: two replicas of the tiny model on a local Ray (started and stopped by
the test, 127.0.0.1 only), HTTP and gRPC through Ray Serve's proxies."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.ray_serving import ray_serving
from tokenrm.proto import reward_pb2 as pb
from tokenrm.proto import reward_pb2_grpc as pb_grpc
from tokenrm.server.launcher import Running, free_port, serve

KEY = {"authorization": "Bearer k1"}        # the servers below take API keys
GRPC_KEY = tuple(KEY.items())
ITEMS = [{"prompt": "Facts: Ana lives in Lima. Question: Who is Ana?",
          "response": "Ana lives in Oslo.", "spans": [[0, 3], [3, 9], [9, 18]]},
         {"prompt_ids": [1, 57, 80], "response_ids": [311, 279, 12, 9]},
         {"prompt": "Where?", "response": "Köln, not Łódź."}]


@pytest.fixture(scope="module")
def ray_server(tiny_checkpoint: Path) -> Iterator[tuple[Running, int]]:
    metrics_port = free_port()
    with ray_serving(tiny_checkpoint, "--replicas", "2", "--replica-cpus", "0.5",
                     "--ray-metrics-port", str(metrics_port), env={"TOKENRM_API_KEYS": "k1"},
                     headers=KEY) as running:
        yield running, metrics_port


@pytest.fixture(scope="module")
def single(tiny_checkpoint: Path) -> Iterator[Running]:
    with serve(tiny_checkpoint) as running:
        yield running


def scored(url: str, headers: dict[str, str] | None = None) -> list[dict]:
    r = httpx.post(f"{url}/score", json={"items": ITEMS, "return_tokens": True},
                   headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["results"]


def test_answers_equal_the_single_process_server(ray_server: tuple[Running, int],
                                                 single: Running) -> None:
    server, _ = ray_server
    want = scored(single.url)
    for got in (scored(server.url, KEY) for _ in range(4)):  # whichever replica answers
        for g, w in zip(got, want, strict=True):
            assert (g["token_ids"], g["tokens"], g["offsets"]) == \
                (w["token_ids"], w["tokens"], w["offsets"])
            np.testing.assert_allclose(g["rewards"], w["rewards"], atol=1e-5)
            np.testing.assert_allclose(g["span_rewards"] or [], w["span_rewards"] or [],
                                       atol=1e-5)
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = pb_grpc.RewardServiceStub(channel)
        answer = stub.Score(pb.ScoreRequest(items=[pb.Item(prompt_ids=ITEMS[1]["prompt_ids"],
                                                           response_ids=ITEMS[1]["response_ids"])]),
                            timeout=60, metadata=GRPC_KEY)
        np.testing.assert_allclose(answer.results[0].rewards, want[1]["rewards"], atol=1e-5)
        assert stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=60,
                                 metadata=GRPC_KEY).name == "rm"
        assert health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=60).status == \
            health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as refused:
            stub.Score(pb.ScoreRequest(items=[pb.Item(prompt="x", response="")]), timeout=60,
                       metadata=GRPC_KEY)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        trailers = dict(refused.value.trailing_metadata() or ())
        assert (trailers["tokenrm-item"], trailers["tokenrm-field"]) == ("0", "response")
        stream = list(stub.ScoreStream(iter([pb.ScoreRequest(items=[pb.Item(
            prompt_ids=[1, 5], response_ids=[7, 8])])] * 3), timeout=60, metadata=GRPC_KEY))
        assert [len(a.results[0].rewards) for a in stream] == [2, 2, 2]


def test_both_replicas_serve_requests(ray_server: tuple[Running, int]) -> None:
    """Rounds of 16 requests until Ray's exported counters show both replicas served some (the
    second replica may still be starting, and Ray exports metrics every few seconds)."""
    server, metrics_port = ray_server
    deadline = time.monotonic() + 90
    served: dict[str, float] = {}
    while len(served) < 2:
        assert time.monotonic() < deadline, served
        with ThreadPoolExecutor(8) as pool:
            assert all(len(r) == 3 for r in pool.map(lambda _: scored(server.url, KEY),
                                                     range(16)))
        time.sleep(2)
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        served = {m.group(1): float(m.group(2)) for m in re.finditer(
            r'^ray_serve_deployment_request_counter_total\{[^}]*replica="([^"]+)"[^}]*\} (\S+)',
            text, re.M) if float(m.group(2)) > 0}


def test_deployment_options_come_from_the_flags() -> None:
    from tokenrm.cli.main import _parser
    from tokenrm.cli.serve import ray_options

    fixed = ray_options(_parser().parse_args(["serve", "--ray", "--replicas", "3",
                                              "--replica-cpus", "2", "--replica-gpus", "1"]))
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 2.0, "num_gpus": 1.0}
    auto = ray_options(_parser().parse_args(["serve", "--ray", "--autoscale", "1:4",
                                             "--target-ongoing", "8"]))
    assert auto["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4,
                                          "target_ongoing_requests": 8.0}
    assert "num_replicas" not in auto
    with pytest.raises(SystemExit, match="--autoscale '4:1': give MIN:MAX"):
        ray_options(_parser().parse_args(["serve", "--ray", "--autoscale", "4:1"]))


def test_api_keys_are_enforced_through_the_proxies(ray_server: tuple[Running, int]) -> None:
    server, _ = ray_server
    assert httpx.get(f"{server.url}/healthz", timeout=30).status_code == 200
    for method, path in (("GET", "/readyz"), ("GET", "/v1/model"), ("GET", "/metrics"),
                         ("POST", "/score"), ("POST", "/get_reward")):
        for headers in ({}, {"authorization": "Bearer wrong"}):
            r = httpx.request(method, f"{server.url}{path}", headers=headers, json={},
                              timeout=30)
            assert r.status_code == 401, (method, path, r.status_code)
            assert r.json()["error"]["code"] == "unauthenticated"
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = pb_grpc.RewardServiceStub(channel)
        for call, request in ((stub.Score, pb.ScoreRequest(items=[pb.Item(
                prompt_ids=[1], response_ids=[2])])), (stub.GetModelInfo,
                                                       pb.GetModelInfoRequest())):
            with pytest.raises(grpc.RpcError) as refused:
                call(request, timeout=30, metadata=(("authorization", "Bearer wrong"),))
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("flag, value", [("--replicas", "0"), ("--replica-cpus", "-1"),
                                         ("--max-ongoing", "x"), ("--target-ongoing", "0")])
def test_a_wrong_ray_flag_is_one_line_before_ray_starts(flag: str, value: str,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    from tokenrm.cli.main import _parser

    with pytest.raises(SystemExit):
        _parser().parse_args(["serve", "--ray", flag, value])
    assert f"argument {flag}: " in capsys.readouterr().err


def test_the_printed_serve_config_is_what_ray_deploys(tiny_checkpoint: Path) -> None:
    """`tokenrm serve --ray --print-config`: a Serve config Ray accepts, whose import path
    builds the app with the checkpoint as user_config, and no API key in it."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from tokenrm.cli.main import _parser
    from tokenrm.cli.serve import ray_options
    from tokenrm.server.ray_app import app
    from tokenrm.server.ray_deploy import config_file
    from tokenrm.server.settings import Settings

    args = _parser().parse_args(["serve", "--ray", "--replicas", "3", "--print-config"])
    text = config_file(Settings(model=tiny_checkpoint, model_version="v9", api_keys="secret",
                                grpc_port=50077), ray_options(args))
    assert "secret" not in text and text.startswith("# tokenrm on Ray Serve")
    config = ServeDeploySchema.model_validate(yaml.safe_load(text))
    [application] = config.applications
    [deployment] = application.deployments
    assert (deployment.num_replicas, deployment.user_config) == (
        3, {"model": str(tiny_checkpoint), "model_version": "v9"})
    assert config.grpc_options.port == 50077
    assert application.import_path == "tokenrm.server.ray_app:app"
    built = app(application.args)
    assert built._bound_deployment.user_config == deployment.user_config


def test_print_config_without_ray_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from tokenrm.cli.main import main

    with pytest.raises(SystemExit, match="--print-config prints a Ray Serve config: add --ray"):
        main(["serve", "--print-config"])
    assert capsys.readouterr().out == ""  # nothing served, nothing printed
