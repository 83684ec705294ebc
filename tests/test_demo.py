"""The demo model's cache: built once per recipe, rebuilt when the recipe changes."""

import dataclasses
import json
from pathlib import Path

import pytest

from tokenrm.training import demo
from tokenrm.training.presets import PRESETS


def test_built_once_then_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    builds = []
    real_build = demo.build_checkpoint

    def counting_build(out: Path, preset, progress: bool = True, **options: object) -> None:
        builds.append(out)
        real_build(out, preset, False, **options)

    monkeypatch.setattr(demo, "build_checkpoint", counting_build)
    first = demo.demo_checkpoint(tmp_path, "tiny")
    second = demo.demo_checkpoint(tmp_path, "tiny")
    assert first == second and len(builds) == 1
    assert (first / "config.json").exists() and (first / "tokenizer.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == [first.name]


def test_a_failed_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_build(out: Path, preset, progress: bool = True, **options: object) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(demo, "build_checkpoint", failing_build)
    with pytest.raises(RuntimeError, match="disk full"):
        demo.demo_checkpoint(tmp_path, "tiny")
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]


def test_the_key_follows_the_recipe(monkeypatch: pytest.MonkeyPatch) -> None:
    key = demo.recipe_key(PRESETS["demo"])
    assert demo.recipe_key(dataclasses.replace(PRESETS["demo"], lr=0.5)) != key
    monkeypatch.setattr(demo, "RECIPE", demo.RECIPE + "-next")
    assert demo.recipe_key(PRESETS["demo"]) != key


def test_a_weak_build_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    with caplog.at_level("WARNING", logger="tokenrm.training.demo"):
        monkeypatch.setattr(demo, "WARN_BELOW_PAIRWISE", -1.0)  # nothing is below: quiet
        demo.build_checkpoint(tmp_path / "a", PRESETS["tiny"], progress=False)
        assert "trained poorly" not in caplog.text
        monkeypatch.setattr(demo, "WARN_BELOW_PAIRWISE", 1.01)  # nothing reaches it: a warning
        demo.build_checkpoint(tmp_path / "b", PRESETS["tiny"], progress=False)
    assert "trained poorly" in caplog.text


def test_a_failed_build_trains_again_from_the_next_seed(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    seeds = []
    real_train = demo.train_rm

    def recording_train(data: Path, out: Path, preset, options):  # type: ignore[no-untyped-def]
        seeds.append(options.seed)
        return real_train(data, out, preset, options)

    monkeypatch.setattr(demo, "train_rm", recording_train)
    monkeypatch.setattr(demo, "WARN_BELOW_PAIRWISE", -1.0)  # the first build passes: no restart
    demo.build_checkpoint(tmp_path / "a", PRESETS["tiny"], progress=False, seed=3, restarts=2)
    assert seeds == [3]
    monkeypatch.setattr(demo, "WARN_BELOW_PAIRWISE", 1.01)  # none passes: every restart, then
    with caplog.at_level("WARNING", logger="tokenrm.training.demo"):  # the warning
        demo.build_checkpoint(tmp_path / "b", PRESETS["tiny"], progress=False, seed=3,
                              restarts=1)
    assert seeds == [3, 3, 1003]
    assert "seed 3 trained poorly" in caplog.text and "training again from seed 1003" in caplog.text
    assert "the model trained poorly here" in caplog.text
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["seed"] == 1003


def test_the_shipped_models_belong_to_the_current_recipe() -> None:
    for name, key in demo.shipped_keys().items():
        assert demo.shipped_recipe(name) == key, (
            f"the recipe of {name} changed: run `tokenrm demo --rebuild` and commit demo/")


def test_the_shipped_sequence_rm_and_policy_are_what_the_experiment_uses() -> None:
    from tokenrm import demo as shipped

    assert demo.demo_checkpoint(objective="pairwise") == shipped.checkpoint(shipped.SEQ_NAME)
    assert demo.demo_policy() == shipped.checkpoint(shipped.POLICY_NAME)
    token_rm, policy = demo.demo_checkpoint(), demo.demo_policy()
    assert (policy / "tokenizer.json").read_text() == (token_rm / "tokenizer.json").read_text()


def test_the_shipped_demo_meets_its_floors_on_pairs_of_an_unseen_seed() -> None:
    """500 pairs of a world the recipe never saw (it trains on seed 1, evaluates on seed 2)."""
    from tokenrm import demo as shipped
    from tokenrm.server.model import RewardModel
    from tokenrm.training import synth
    from tokenrm.training.evaluate import evaluate

    model = RewardModel.load(shipped.checkpoint(), trace=False)
    got = evaluate(model.score_texts, list(synth.generate(20261201, 500)))
    assert got["token_auroc"] >= 0.95 and got["pairwise_accuracy"] >= 0.95, got
    assert got["localisation_f1"] >= 0.80, got
