"""RewardModel.load and .score on tiny random token- and sequence-classification checkpoints."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification, LlamaForTokenClassification

from tokenrm.server.model import ModelLoadError, RewardModel

THREE = {0: "negative", 1: "neutral", 2: "positive"}


def _build(path: Path, tokenizer, num_labels: int = 1, cls=LlamaForTokenClassification,
           **extra) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64,
                         vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         num_labels=num_labels, **extra)
    cls(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _direct_logits(path: Path, ids: list[int], cls=LlamaForTokenClassification) -> torch.Tensor:
    model = cls.from_pretrained(path).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


@pytest.mark.parametrize(("num_labels", "extra", "rule", "labels"), [
    (1, {}, "logit", ("LABEL_0",)),
    (2, {}, "p_positive", ("LABEL_0", "LABEL_1")),
    (3, {"id2label": THREE, "label2id": {v: k for k, v in THREE.items()}}, "pos_minus_neg",
     ("negative", "neutral", "positive")),
])
def test_token_head_rewards_follow_the_rule(tmp_path: Path, tokenizer, num_labels: int,
                                            extra: dict, rule: str, labels: tuple) -> None:
    path = _build(tmp_path / "rm", tokenizer, num_labels, **extra)
    rm = RewardModel.load(path)
    ids = _ids(tokenizer, "Where does Ana live? Ana lives in Lima.")
    n = 5
    rewards = rm.score([(ids, n)])[0]
    logits = _direct_logits(path, ids)
    if num_labels == 1:
        expected = logits[:, 0]
    elif num_labels == 2:
        expected = logits.softmax(-1)[:, 1]
    else:
        probs = logits.softmax(-1)
        expected = probs[:, 2] - probs[:, 0]
    assert rewards.shape == (n,)
    np.testing.assert_allclose(rewards, expected[-n:].numpy(), atol=1e-5)
    assert rm.info.kind == "token"
    assert rm.info.reward_rule == rule
    assert rm.info.labels == labels


def test_max_len_comes_from_max_position_embeddings(tmp_path: Path, tokenizer) -> None:
    rm = RewardModel.load(_build(tmp_path / "rm", tokenizer, max_position_embeddings=96))
    assert rm.info.max_len == 96


def test_sequence_head_puts_its_score_on_the_last_token(tmp_path: Path, tokenizer) -> None:
    path = _build(tmp_path / "rm", tokenizer, cls=LlamaForSequenceClassification)
    rm = RewardModel.load(path)
    short = _ids(tokenizer, "Ana lives in Lima.")
    long = _ids(tokenizer, "Where does Ana live? She lives in Lima, not in Oslo or in Köln.")
    assert len(long) > len(short) + 3
    rewards = rm.score([(short, 4), (long, 6)])  # batched: the short row is padded
    direct = _direct_logits(path, short, LlamaForSequenceClassification)[0].item()
    assert rm.info.kind == "sequence"
    assert rewards[0].shape == (4,)
    np.testing.assert_array_equal(rewards[0][:-1], np.zeros(3, dtype=np.float32))
    assert rewards[0][-1] == pytest.approx(direct, abs=1e-5)


def test_batching_does_not_change_rewards(tmp_path: Path, tokenizer) -> None:
    rm = RewardModel.load(_build(tmp_path / "rm", tokenizer, 3, id2label=THREE))
    rows = [(_ids(tokenizer, "Ana."), 2),
            (_ids(tokenizer, "Where does Ana live? Ana lives in Lima. Oslo. Köln Łódź. "
                             "Ana lives in Lima, and Ana lives in Oslo too."), 20),
            (_ids(tokenizer, "Ana lives in Lima."), 4)]
    together = rm.score(rows)
    for row, batched in zip(rows, together, strict=True):
        np.testing.assert_allclose(batched, rm.score([row])[0], atol=1e-5)


def test_missing_directory_raises(tmp_path: Path) -> None:
    path = tmp_path / "nowhere"
    with pytest.raises(ModelLoadError, match=re.escape(str(path))):
        RewardModel.load(path)


def test_directory_without_config_raises(tmp_path: Path, tokenizer) -> None:
    path = tmp_path / "no_config"
    tokenizer.save_pretrained(path)
    with pytest.raises(ModelLoadError, match=re.escape(str(path))):
        RewardModel.load(path)


def test_garbage_weights_raise(tmp_path: Path, tokenizer) -> None:
    path = _build(tmp_path / "rm", tokenizer)
    (path / "model.safetensors").write_bytes(b"\x00\x13garbage, not a safetensors file" * 8)
    with pytest.raises(ModelLoadError, match=re.escape(str(path))):
        RewardModel.load(path)


def test_four_label_head_raises(tmp_path: Path, tokenizer) -> None:
    path = _build(tmp_path / "rm", tokenizer, num_labels=4)
    with pytest.raises(ModelLoadError, match="1, 2 or 3 labels"):
        RewardModel.load(path)


def test_bfloat16_returns_float32_rewards(tmp_path: Path, tokenizer) -> None:
    rm = RewardModel.load(_build(tmp_path / "rm", tokenizer, 3, id2label=THREE),
                          dtype="bfloat16")
    assert next(rm.model.parameters()).dtype == torch.bfloat16
    rewards = rm.score([(_ids(tokenizer, "Ana lives in Lima."), 3)])[0]
    assert rewards.dtype == np.float32
    assert rewards.shape == (3,)
    assert np.all(np.isfinite(rewards))


def _mixed_rows(tokenizer) -> list[tuple[list[int], int]]:
    texts = ["Ana lives in Lima.", "Where does Ana live? Ana lives in Lima, by the sea.", "A"]
    return [(_ids(tokenizer, t), min(3, len(_ids(tokenizer, t)))) for t in texts]


@pytest.mark.parametrize("cls", [LlamaForTokenClassification, LlamaForSequenceClassification])
def test_the_traced_forward_equals_the_eager_one(tmp_path: Path, tokenizer, cls) -> None:
    path = _build(tmp_path / "rm", tokenizer, 3, cls=cls, id2label=THREE)
    traced, eager = RewardModel.load(path), RewardModel.load(path, trace=False)
    assert traced.info.traced and not eager.info.traced
    rows = _mixed_rows(tokenizer)
    for got, want in zip(traced.score(rows), eager.score(rows), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_a_model_that_cannot_be_traced_serves_eagerly(tmp_path: Path, tokenizer, monkeypatch,
                                                      caplog) -> None:
    def refuse(*args, **kwargs):
        raise RuntimeError("unsupported op")

    monkeypatch.setattr(torch.jit, "trace", refuse)
    path = _build(tmp_path / "rm", tokenizer, 3, id2label=THREE)
    rm = RewardModel.load(path)
    assert not rm.info.traced
    assert "cannot trace the model (RuntimeError: unsupported op)" in caplog.text
    rows = _mixed_rows(tokenizer)
    for got, want in zip(rm.score(rows), RewardModel.load(path, trace=False).score(rows),
                         strict=True):
        np.testing.assert_array_equal(got, want)


def test_a_trace_that_differs_from_the_model_is_not_used(tmp_path: Path, tokenizer, monkeypatch,
                                                         caplog) -> None:
    real_trace = torch.jit.trace

    def shifted(module, example, **kwargs):  # a trace that is wrong on other shapes
        traced = real_trace(module, example, **kwargs)
        return lambda ids, mask: traced(ids, mask) + (ids.shape[1] != example[0].shape[1])

    monkeypatch.setattr(torch.jit, "trace", shifted)
    rm = RewardModel.load(_build(tmp_path / "rm", tokenizer, 3, id2label=THREE))
    assert not rm.info.traced
    assert "differs from the eager one" in caplog.text
