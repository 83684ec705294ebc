"""The serving dtype (server/precision.py): "auto" takes bf16 only on hardware that runs it
natively and only if its rewards stay within 0.02 of float32's; int8 is checked the same way."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import ValidationError
from transformers import LlamaConfig, LlamaForTokenClassification

from tokenrm.server import precision
from tokenrm.server.app import create_app
from tokenrm.server.model import ModelLoadError, RewardModel, pad_id
from tokenrm.server.settings import Settings

THREE = {0: "negative", 1: "neutral", 2: "positive"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("precision") / "rm"
    LlamaForTokenClassification(LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=64, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
        num_labels=3, id2label=THREE)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _shifted(model: torch.nn.Module, _dtype: str) -> torch.nn.Module:
    """A 'lower precision' copy whose head is off by enough to move rewards past 0.02."""
    worse = copy.deepcopy(model)
    with torch.no_grad():
        worse.score.weight.add_(0.5 * torch.randn_like(worse.score.weight))
    return worse


def test_auto_is_float32_without_native_bf16(checkpoint: Path, monkeypatch) -> None:
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    rm = RewardModel.load(checkpoint, dtype="auto")
    assert (rm.info.dtype, rm.info.dtype_delta) == ("float32", None)
    assert next(rm.model.parameters()).dtype == torch.float32


def test_a_lower_precision_past_the_tolerance_is_refused_with_one_log_line(
        checkpoint: Path, monkeypatch, caplog) -> None:
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    monkeypatch.setattr(precision, "convert", _shifted)
    reference = RewardModel.load(checkpoint, dtype="float32")
    with caplog.at_level(logging.INFO, logger="tokenrm.server.precision"):
        for requested in ("auto", "int8"):
            rm = RewardModel.load(checkpoint, dtype=requested)
            assert (rm.info.dtype, rm.info.dtype_delta) == ("float32", None)
            rows = [(list(range(5, 40)), 20)]
            np.testing.assert_array_equal(rm.score(rows)[0], reference.score(rows)[0])
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in lines] == [logging.INFO, logging.WARNING]  # auto, int8
    assert all("serving float32" in m and "limit 0.02" in m for _, m in lines)


@pytest.mark.skipif(not precision.native_bf16("cpu"), reason="no native bf16 on this CPU")
def test_auto_serves_bf16_on_this_cpu_when_it_passes_the_check(checkpoint: Path) -> None:
    rm = RewardModel.load(checkpoint, dtype="auto")
    reference = RewardModel.load(checkpoint, dtype="float32")
    delta = precision.max_delta(reference.model, precision.convert(reference.model, "bfloat16"),
                                pad_id(rm.tokenizer), rm.info.vocab_size)
    if delta > precision.TOLERANCE:
        assert rm.info.dtype == "float32"
        return
    assert rm.info.dtype == "bfloat16" and rm.info.dtype_delta == pytest.approx(delta)
    assert next(rm.model.parameters()).dtype == torch.bfloat16
    rows = [(list(range(5, 70)), 30), (list(range(9, 20)), 4)]
    for got, want in zip(rm.score(rows), reference.score(rows), strict=True):
        assert got.dtype == np.float32
        assert np.abs(got - want).max() <= precision.TOLERANCE


def test_int8_passes_or_falls_back_by_its_measured_difference(checkpoint: Path) -> None:
    rm = RewardModel.load(checkpoint, dtype="int8")
    reference = RewardModel.load(checkpoint, dtype="float32")
    delta = precision.max_delta(reference.model, precision.convert(reference.model, "int8"),
                                pad_id(rm.tokenizer), rm.info.vocab_size)
    assert rm.info.dtype == ("int8" if delta <= precision.TOLERANCE else "float32")


def test_int8_off_the_cpu_is_refused_before_loading(checkpoint: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"int8.*runs on the CPU, not cuda"):
        RewardModel.load(checkpoint, dtype="int8", device="cuda")


def test_the_chosen_dtype_is_reported_and_a_wrong_one_named(checkpoint: Path,
                                                            monkeypatch) -> None:
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    monkeypatch.setattr(precision, "convert", lambda model, dtype: copy.deepcopy(model))
    with TestClient(create_app(Settings(model=checkpoint, dtype="auto", grpc_port=0))) as client:
        info = client.get("/v1/model").json()
    assert (info["dtype"], info["dtype_delta"]) == ("bfloat16", 0.0)
    monkeypatch.delenv("TOKENRM_DTYPE")
    assert Settings().dtype == "auto"                       # the default
    monkeypatch.setenv("TOKENRM_DTYPE", "fp8")
    with pytest.raises(ValidationError, match="dtype"):
        Settings()


def test_native_bf16_is_asked_of_the_device(monkeypatch) -> None:
    """The CUDA branch runs here with torch.cuda's answers given; the CPU branch with its
    instruction-set checks given."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert precision.native_bf16("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert not precision.native_bf16("cuda")          # e.g. a V100 or T4: auto is float32
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not precision.native_bf16("cpu")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert precision.native_bf16("cpu")
    assert not precision.native_bf16("mps")
