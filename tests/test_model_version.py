"""Every answer names the model's version: a hash of the checkpoint's config and weights (another
checkpoint, another version) or TOKENRM_MODEL_VERSION; the same over HTTP and gRPC."""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import httpx
from fastapi.testclient import TestClient

from tokenrm.proto import reward_pb2 as pb
from tokenrm.proto import reward_pb2_grpc as pb_grpc
from tokenrm.server.app import create_app
from tokenrm.server.launcher import serve
from tokenrm.server.model import checkpoint_version
from tokenrm.server.settings import Settings

ITEM = {"prompt": "Where does Ana live?", "response": "Ana lives in Lima."}
QUERY = {"query": ["Where does Ana live? Ana lives in Lima."], "prompts": ["Where does Ana live?"]}


def versions(settings: Settings) -> tuple[str, str, str]:
    with TestClient(create_app(settings)) as client:
        return (client.get("/v1/model").json()["version"],
                client.post("/score", json={"items": [ITEM]}).json()["model_version"],
                client.post("/get_reward", json=QUERY).json()["model_version"])


def test_the_version_is_the_checkpoints_hash_or_the_one_given(tiny_checkpoint: Path,
                                                              tmp_path: Path) -> None:
    info, scored, rewarded = versions(Settings(model=tiny_checkpoint))
    assert info == scored == rewarded == checkpoint_version(tiny_checkpoint)
    assert len(info) == 12
    assert versions(Settings(model=tiny_checkpoint, model_version="v7")) == ("v7",) * 3
    copy = tmp_path / "copy"
    shutil.copytree(tiny_checkpoint, copy)
    assert checkpoint_version(copy) == info  # the same files: the same version
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    assert checkpoint_version(copy) != info


def test_grpc_answers_name_the_version_too(tiny_checkpoint: Path) -> None:
    with serve(tiny_checkpoint, env={"TOKENRM_MODEL_VERSION": "2026-12-01"}) as running, \
            grpc.insecure_channel(running.grpc_target) as channel:
        stub = pb_grpc.RewardServiceStub(channel)
        request = pb.ScoreRequest(items=[pb.Item(**ITEM)])
        assert stub.Score(request, timeout=30).model_version == "2026-12-01"
        assert stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30).version == "2026-12-01"
        [streamed] = stub.ScoreStream(iter([request]), timeout=30)
        assert streamed.model_version == "2026-12-01"
        assert httpx.get(f"{running.url}/v1/model", timeout=30).json()["version"] == \
            "2026-12-01"
