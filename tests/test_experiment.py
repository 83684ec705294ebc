"""`tokenrm experiment fine-vs-seq`: the CI smoke of its three arms through the CLI (which builds
the tiny demo models and starts their servers itself), the sequence-level reward model it compares
with, the KL budget that keeps a run from ending on a reward-hacked policy, and the report's
statistics on hand-computed cases."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tokenrm.server.launcher import Running, serve
from tokenrm.server.model import RewardModel
from tokenrm.training.data import load_pairs
from tokenrm.training.ppo.experiment import ARMS
from tokenrm.training.ppo.policy import Policy
from tokenrm.training.ppo.report import at_kl, equal_kl, interval
from tokenrm.training.ppo.rollout import Sampling
from tokenrm.training.ppo.run import Connection, run_ppo
from tokenrm.training.ppo.trainer import CHECKPOINT, LOG, STOPPED, PPOConfig

TIMEOUT = 300.0  # generous: the machine may be busy with other work
SMALL = PPOConfig(iterations=2, prompts_per_iteration=4, samples_per_prompt=2, generation_batch=4,
                  sampling=Sampling(max_new_tokens=24), epochs=1, minibatch=4, save_every=1)


def test_the_cli_runs_every_arm_and_reports_them(tmp_path: Path) -> None:
    """No --server: the command builds the tiny token RM, sequence RM and policy into its cache
    and serves the two RMs itself."""
    out = tmp_path / "exp"
    done = subprocess.run(
        [sys.executable, "-m", "tokenrm.cli.main", "experiment", "fine-vs-seq", "--out",
         str(out), "--policy-recipe", "tiny", "--seeds", "0", "--iterations", "2", "--prompts",
         "4", "--samples", "2", "--generation-batch", "4", "--max-new-tokens", "24", "--epochs",
         "1", "--minibatch", "4", "--eval-every", "1", "--eval-prompts", "16"],
        capture_output=True, text=True, timeout=TIMEOUT, check=False,
        env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads((out / "results.json").read_text())
    assert [r["arm"] for r in result["runs"]] == list(ARMS)
    assert [r["mode"] for r in result["runs"]] == ["fine", "seq", "seq"]
    for run in result["runs"]:
        start, *rest = run["curve"]
        # The SFT policy against itself: the same samples, a tie on every prompt, KL 0.
        assert (start["win_rate"], start["kl"]) == (0.5, 0.0)
        assert [p["iteration"] for p in rest] == [1, 2]
        assert len(run["final"]["preferences"]) == 16
        assert run["final"]["win_rate"] == pytest.approx(np.mean(run["final"]["preferences"]))
        assert (out / f"{run['arm']}-seed0" / LOG).exists()
    report = (out / "fine-vs-seq.md").read_text()
    assert report in done.stdout
    for arm in ARMS.values():
        assert f"| {arm.name} |" in report
    assert "Fine-grained minus sequence-level (Bradley-Terry RM)" in report
    assert (out / "fine-vs-seq.png").stat().st_size > 0
    built = sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "cache" / "tokenrm").iterdir()
                   if p.is_dir())
    assert built == ["policy-tiny", "tiny", "tiny-pairwise"], built


def test_a_pairwise_rm_is_served_with_one_score_on_the_last_token(
        pairwise_checkpoint: Path, data_dir: Path) -> None:
    metrics = json.loads((pairwise_checkpoint / "metrics.json").read_text())
    assert metrics["objective"] == "pairwise"
    assert metrics["eval"]["loss"] < metrics["train"]["eval_before"]["loss"]  # it learned
    model = RewardModel.load(pairwise_checkpoint, trace=False)
    assert model.info.kind == "sequence" and model.info.labels == ("score",)
    pair = load_pairs(data_dir / "eval.jsonl")[0]
    rejected, edited = model.score_texts([(pair.prompt, pair.rejected), (pair.prompt, pair.edited)])
    for scored in (rejected, edited):
        assert not scored.rewards[:-1].any() and scored.rewards[-1] != 0


def test_eval_rm_reports_pairwise_accuracy_alone_for_a_sequence_model(
        pairwise_checkpoint: Path, data_dir: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "tokenrm.cli.main", "eval-rm", "--model",
                           str(pairwise_checkpoint), "--data", str(data_dir / "eval.jsonl")],
                          capture_output=True, text=True, timeout=TIMEOUT, check=True)
    got = json.loads(done.stdout)
    trained = json.loads((pairwise_checkpoint / "metrics.json").read_text())["eval"]
    assert got == {"pairs": 40, "pairwise_accuracy": pytest.approx(trained["pairwise_accuracy"])}


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path) -> Iterator[Running]:
    with serve(tiny_checkpoint) as running:
        yield running


def _weights(policy: Policy) -> list[torch.Tensor]:
    return [p.detach() for p in policy.parameters()]


def test_a_run_past_its_kl_budget_keeps_its_last_policy_within_it_and_stops(
        server: Running, policy_dir: Path, tmp_path: Path) -> None:
    """Iteration i's KL is that of the policy it samples from (the one after i - 1 updates).
    With a budget between iterations 2's and 3's, iteration 3 finds its policy past it: the
    run goes back to the policy iteration 2 sampled from, what a one-iteration run ends with."""
    connection = Connection([f"grpc://{server.grpc_target}"], timeout_s=TIMEOUT)
    # One request per iteration (the same rewards in every run); a learning rate that moves the
    # policy well away from the SFT one (KL estimates of a small move can be below 0).
    small = replace(SMALL, generation_batch=8, lr=5e-3, kl_budget=None)

    def run(name: str, **changes: object) -> tuple[Any, list[dict[str, Any]]]:
        trainer = run_ppo(tmp_path / name, replace(small, **changes), connection, policy_dir,
                          progress=False)
        log = (tmp_path / name / LOG).read_text().splitlines()
        return trainer, [json.loads(line) for line in log]

    _, free = run("free", iterations=3)
    kls = [r["kl"] for r in free]
    assert kls[0] == 0.0 and 0.0 < kls[1] < kls[2], kls
    one, _ = run("one", iterations=1)
    stopped, records = run("budget", iterations=6, kl_budget=(kls[1] + kls[2]) / 2)
    assert [r["iteration"] for r in records] == [1, 2, 3]
    assert [r.get("stopped") for r in records] == [None, None, STOPPED]
    assert [r["kl"] for r in records] == pytest.approx(kls)
    assert stopped.stopped and stopped.iteration == 3
    saved = Policy.load(tmp_path / "budget" / CHECKPOINT)
    for got, want in zip(_weights(saved), _weights(one.policy), strict=True):
        assert torch.equal(got, want)
    resumed = run_ppo(tmp_path / "budget", replace(small, iterations=6), connection, None,
                      resume=True, progress=False)
    assert resumed.iteration == 3  # a stopped run stays stopped


def test_the_interval_covers_the_mean_and_narrows_with_more_prompts() -> None:
    rng = np.random.default_rng(1)
    small = rng.choice([0.0, 0.5, 1.0], size=(3, 30))
    large = rng.choice([0.0, 0.5, 1.0], size=(3, 3000))
    lo, hi = interval(small)
    assert lo < small.mean() < hi
    lo2, hi2 = interval(large)
    assert lo2 < large.mean() < hi2 and hi2 - lo2 < (hi - lo) / 4
    assert interval(np.full((3, 10), 0.5)) == (0.5, 0.5)


def test_win_rate_at_equal_kl_interpolates_where_each_curve_first_reaches_it() -> None:
    curve = [{"kl": 0.0, "win_rate": 0.5}, {"kl": 2.0, "win_rate": 0.7},
             {"kl": 6.0, "win_rate": 0.9}, {"kl": 4.0, "win_rate": 0.2}]
    assert at_kl(curve, 1.0) == pytest.approx(0.6)
    assert at_kl(curve, 5.0) == pytest.approx(0.85)
    assert at_kl(curve, 9.0) == 0.2  # never reached: the final checkpoint's
    runs = {"a": [{"curve": curve}], "b": [{"curve": [{"kl": 0.0}, {"kl": 3.5}]}]}
    assert equal_kl(runs) == 3.5
