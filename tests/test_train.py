"""Training a tiny token reward model end to end: loss falls, the checkpoint round-trips."""

import json
import logging
from pathlib import Path

import numpy as np
from transformers import AutoModelForTokenClassification, AutoTokenizer

from tokenrm.core.scoring import score_texts
from tokenrm.training import synth
from tokenrm.training.labels import IGNORE, NEGATIVE, POSITIVE
from tokenrm.training.train import Trained, make_examples


def test_loss_falls(tiny_trained: Trained) -> None:
    train = tiny_trained.metrics["train"]
    assert train["eval_loss_by_epoch"][-1] < train["eval_loss_before"]
    assert train["loss_last"] < train["loss_first"]


def test_checkpoint_is_a_hf_directory_with_metrics(tiny_checkpoint: Path) -> None:
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["tokenrm"]["reward"] == "pos_minus_neg"
    assert config["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
    assert (tiny_checkpoint / "model.safetensors").exists()
    assert not (tiny_checkpoint / ".trainer").exists()
    metrics = json.loads((tiny_checkpoint / "metrics.json").read_text())
    assert set(metrics["eval"]) >= {"token_auroc", "pairwise_accuracy", "localisation_f1"}


def test_rewards_are_identical_after_reload(tiny_trained: Trained) -> None:
    items = [(p.prompt, r) for p in synth.generate(8, 10) for r in (p.rejected, p.edited)]
    before = score_texts(tiny_trained.model, tiny_trained.tokenizer, items, max_len=192)
    model = AutoModelForTokenClassification.from_pretrained(tiny_trained.path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_trained.path)
    after = score_texts(model, tokenizer, items, max_len=192)
    for a, b in zip(before, after, strict=True):
        assert a.token_ids == b.token_ids
        np.testing.assert_array_equal(a.rewards, b.rewards)


def test_batching_does_not_change_rewards(tiny_trained: Trained) -> None:
    items = [(p.prompt, p.rejected) for p in synth.generate(9, 6)]
    batched = score_texts(tiny_trained.model, tiny_trained.tokenizer, items, 192, batch_size=6)
    alone = [score_texts(tiny_trained.model, tiny_trained.tokenizer, [it], 192)[0]
             for it in items]
    for a, b in zip(batched, alone, strict=True):
        np.testing.assert_allclose(a.rewards, b.rewards, atol=1e-5)


def test_examples_label_only_response_tokens(tokenizer) -> None:
    pair = next(synth.generate(4, 1))
    examples, cut = make_examples(tokenizer, [pair], max_len=512)
    assert cut == 0 and len(examples) == 2
    rejected, edited = examples
    n_prompt = len(tokenizer(pair.prompt)["input_ids"])
    assert rejected["labels"][:n_prompt] == [IGNORE] * n_prompt
    assert NEGATIVE in rejected["labels"] and POSITIVE not in rejected["labels"]
    assert NEGATIVE not in edited["labels"]
    assert len(rejected["labels"]) == len(rejected["input_ids"])


def test_too_long_responses_are_cut_with_a_warning_and_counted(tokenizer, caplog) -> None:
    pairs = list(synth.generate(4, 3))
    with caplog.at_level(logging.WARNING):
        examples, cut = make_examples(tokenizer, pairs, max_len=12)
    assert cut == 6
    assert all(len(e["input_ids"]) == 12 == len(e["labels"]) for e in examples)
    assert "6 responses are longer than max_len=12" in caplog.text


def test_identical_pair_trains_as_all_neutral(tokenizer) -> None:
    pair = next(synth.generate(4, 1))
    same = type(pair)(pair.prompt, pair.edited, pair.edited)
    examples, _ = make_examples(tokenizer, [same], max_len=512)
    labels = [lab for e in examples for lab in e["labels"] if lab != IGNORE]
    assert labels and set(labels) == {1}


def test_a_local_causal_lm_checkpoint_serves_as_the_base(tokenizer, data_dir: Path,
                                                         tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from tokenrm.training.presets import PRESETS
    from tokenrm.training.train import TrainOptions, train_rm

    base = tmp_path / "base-lm"
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=64,
                         max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    trained = train_rm(data_dir, tmp_path / "rm", PRESETS["tiny"],
                       TrainOptions(base=base, progress=False))
    assert trained.model.config.num_labels == 3
    assert trained.model.config.tokenrm["max_len"] == 192  # the preset's, within the base's 256
    assert (tmp_path / "rm" / "tokenizer.json").exists()
