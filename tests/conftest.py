"""Shared fixtures: a tokenizer and a tiny trained checkpoint, built once per session; a gRPC
channel and stub to the `server` fixture of the module that asks for them.

Servers in the tests (in process and the `tokenrm serve` processes they start) serve float32:
the tests compare rewards with float32 forwards at 1e-5, on every machine alike, whether or not
its CPU runs bf16 natively. dtype auto has its own tests (test_precision.py), which ask for it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tokenrm.proto import reward_pb2_grpc as pb_grpc
from tokenrm.training import synth
from tokenrm.training.data import write_pairs
from tokenrm.training.pairwise import train_pairwise_rm
from tokenrm.training.ppo.sft import SFT_RECIPES, train_sft
from tokenrm.training.presets import PRESETS
from tokenrm.training.tokenizer import train_tokenizer
from tokenrm.training.train import Trained, TrainOptions, train_rm

os.environ["TOKENRM_DTYPE"] = "float32"


@pytest.fixture(scope="session")
def tokenizer():
    texts = [t for p in synth.generate(3, 300) for t in (p.prompt, p.rejected, p.edited)]
    return train_tokenizer([*texts, "Ana lives in Lima. Oslo. Köln Łódź"], vocab_size=400)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data")
    write_pairs(path / "train.jsonl", synth.generate(5, 200))
    write_pairs(path / "eval.jsonl", synth.generate(6, 40))
    return path


@pytest.fixture(scope="session")
def tiny_trained(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Trained:
    """A tiny model trained for a few steps; its checkpoint is `tiny_checkpoint`."""
    out = tmp_path_factory.mktemp("ckpt") / "rm"
    return train_rm(data_dir, out, PRESETS["tiny"], TrainOptions(seed=0, progress=False))


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_trained: Trained) -> Path:
    return tiny_trained.path


@pytest.fixture(scope="session")
def other_checkpoint(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another checkpoint of the tiny model (every weight 10% larger): other rewards, another
    version, the same tokenizer."""
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("other") / "rm"
    shutil.copytree(tiny_checkpoint, out)
    weights = load_file(out / "model.safetensors")
    save_file({k: (v * 1.1).contiguous() for k, v in weights.items()},
              out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def channel(server) -> Iterator[grpc.Channel]:  # `server`: the requesting module's fixture
    with grpc.insecure_channel(server.grpc_target) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pb_grpc.RewardServiceStub:
    return pb_grpc.RewardServiceStub(channel)


@pytest.fixture(scope="session")
def pairwise_checkpoint(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny sequence-level (Bradley-Terry) reward model on the same pairs as `tiny_checkpoint`."""
    out = tmp_path_factory.mktemp("pairwise") / "rm"
    train_pairwise_rm(data_dir, out, PRESETS["tiny"], TrainOptions(seed=0, progress=False))
    return out


@pytest.fixture(scope="session")
def policy_dir(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SFT policy on the tiny reward model's tokenizer (trains in seconds)."""
    out = tmp_path_factory.mktemp("sft") / "policy"
    train_sft(tiny_checkpoint, SFT_RECIPES["tiny"], out)
    return out
