"""The experiment's markdown report and plot, from its results.json."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np

from tokenrm.training.ppo.experiment import ARMS

PAPER_GAIN = 5.1  # Xu et al. (2024): fine-grained over sequence-level PPO, win-rate points
RESAMPLES = 2000  # bootstrap resamples of (seeds, prompts)


def _by_arm(result: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {}
    for run in result["runs"]:
        runs.setdefault(run["arm"], []).append(run)
    return runs


def _spread(values: list[float]) -> str:
    a = np.array(values)
    return f"{a.mean():.3f} ± {a.std(ddof=1) if len(a) > 1 else 0.0:.3f}"


def interval(prefs: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of the mean of (seeds, prompts) preferences, resampling seeds
    and prompts (the same prompts for every seed drawn)."""
    rng = np.random.default_rng(seed)
    s = rng.integers(0, prefs.shape[0], (RESAMPLES, prefs.shape[0]))
    p = rng.integers(0, prefs.shape[1], (RESAMPLES, prefs.shape[1]))
    means = prefs[s[:, :, None], p[:, None, :]].mean(axis=(1, 2))
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def at_kl(curve: list[dict[str, Any]], kl: float) -> float:
    """The win rate where the curve first reaches `kl` (linear between evaluations)."""
    for before, point in itertools.pairwise(curve):
        if point["kl"] >= kl:
            share = (kl - before["kl"]) / max(point["kl"] - before["kl"], 1e-9)
            return float(before["win_rate"] + share * (point["win_rate"] - before["win_rate"]))
    return float(curve[-1]["win_rate"])


def equal_kl(runs: dict[str, list[dict[str, Any]]]) -> float:
    """The largest held-out KL every run reached: where all arms can be compared."""
    return min(max(p["kl"] for p in run["curve"]) for arm in runs.values() for run in arm)


def _prefs(arm_runs: list[dict[str, Any]]) -> np.ndarray:
    return np.array([run["final"]["preferences"] for run in arm_runs], dtype=float)


def _verdict(gain: float, lo: float, hi: float) -> str:
    if lo <= 0 <= hi:
        return "no difference this experiment can tell apart from noise"
    if gain < 0:
        return "the opposite direction to the paper's"
    size = "at least as large as" if gain >= PAPER_GAIN else "smaller than"
    return f"the paper's direction, {size} its gain"


def table(result: dict[str, Any]) -> str:
    runs = _by_arm(result)
    ppo, ref = result["config"]["ppo"], result["reference"]
    budget = ppo["iterations"] * ppo["prompts_per_iteration"] * ppo["samples_per_prompt"]
    kl_star = equal_kl(runs)
    lines = [
        "# Fine-grained vs sequence-level PPO",
        "",
        f"Each run: up to {budget} rollouts ({ppo['iterations']} iterations x "
        f"{ppo['prompts_per_iteration']} prompts x {ppo['samples_per_prompt']} samples), "
        f"seeds {result['config']['seeds']}, lr {ppo['lr']}, beta from {ppo['beta']} adapted "
        f"towards a KL of {ppo['kl_target']} per response, KL budget {ppo['kl_budget']} (a run "
        "past it goes back to its last policy within it and stops). Sequence-level scores are "
        "normalised by their running mean and std (TRL's use_score_scaling + use_score_norm)"
        f"{'' if ppo['score_norm'] else ' (off in this run)'}. Win rate: against the SFT "
        f"policy on {result['config']['eval_prompts']} held-out prompts, by the task's oracle: "
        "a response that states a correct fact about the person beats one that does not; "
        "otherwise fewer errors wins; ties count half. The SFT policy makes "
        f"{ref['errors']:.2f} errors per response, states {ref['facts']:.2f} correct facts, "
        f"answers {ref['answered']:.0%} of prompts ({ref['tokens']:.1f} tokens). A policy that "
        f"said nothing would score {ref['silent_win_rate']:.3f}. KL: held out, the mean over "
        "responses of the sum of log pi - log pi_SFT over their tokens.",
        "",
        "| arm | final win rate (mean ± sd over seeds) | 95% interval (seeds x prompts) "
        "| per seed | win rate at equal KL "
        f"({kl_star:.1f}) | errors per response | correct facts | answered | tokens "
        "| KL | stopped on the budget |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, arm_runs in runs.items():
        finals = [r["final"] for r in arm_runs]
        lo, hi = interval(_prefs(arm_runs))
        lines.append(
            f"| {ARMS[arm].name} | {_spread([f['win_rate'] for f in finals])} | "
            f"{lo:.3f} to {hi:.3f} | "
            + ", ".join(f"{f['win_rate']:.3f}" for f in finals)
            + f" | {_spread([at_kl(r['curve'], kl_star) for r in arm_runs])} | "
            f"{_spread([f['errors'] for f in finals])} | "
            f"{_spread([f['facts'] for f in finals])} | "
            f"{np.mean([f['answered'] for f in finals]):.0%} | "
            f"{np.mean([f['tokens'] for f in finals]):.1f} | "
            f"{_spread([f['kl'] for f in finals])} | "
            f"{sum(bool(f['stopped']) for f in finals)} of {len(finals)} |")
    lines += ["", *_comparisons(runs, kl_star), "", *_floors(result, runs),
              "", f"Wall time: {result['seconds'] / 60:.1f} min.", ""]
    return "\n".join(lines)


def _comparisons(runs: dict[str, list[dict[str, Any]]], kl_star: float) -> list[str]:
    out = []
    for other in ("seq", "seq-total"):
        if not {"fine", other} <= runs.keys():
            continue
        diff = _prefs(runs["fine"]) - _prefs(runs[other])  # paired by seed and prompt
        gain = 100 * float(diff.mean())
        lo, hi = (100 * x for x in interval(diff))
        at = 100 * float(np.mean([at_kl(f["curve"], kl_star) - at_kl(s["curve"], kl_star)
                                  for f, s in zip(runs["fine"], runs[other], strict=True)]))
        out.append(f"- Fine-grained minus {ARMS[other].name}: {gain:+.1f} points at the final "
                   f"checkpoints (95% interval {lo:+.1f} to {hi:+.1f}), {at:+.1f} at equal KL. "
                   + (f"The paper reports +{PAPER_GAIN} over its sequence-level baseline: "
                      f"{_verdict(gain, lo, hi)} here." if other == "seq" else
                      "The same reward model with coarse credit: "
                      + ("no difference this experiment can tell apart from noise." if lo <= 0 <= hi
                         else f"per-token credit {'helps' if gain > 0 else 'hurts'} here.")))
    return out


def _floors(result: dict[str, Any], runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The runs that ended with more oracle errors than the SFT policy, or past the KL budget
    (held out)."""
    budget = result["config"]["ppo"]["kl_budget"]
    finals = [(f"{arm} seed {r['seed']}", r["final"]) for arm, arm_runs in runs.items()
              for r in arm_runs]
    worse = [name for name, f in finals if f["errors"] > result["reference"]["errors"]]
    past = [name for name, f in finals if budget is not None and f["kl"] > budget]
    return [f"Runs ending with more oracle errors than the SFT policy: "
            f"{', '.join(worse) if worse else 'none'}. Runs ending past the KL budget: "
            f"{', '.join(past) if past else 'none'}."]


def plot(result: dict[str, Any], path: Path) -> None:
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4))
    for arm, arm_runs in _by_arm(result).items():
        for i, run in enumerate(arm_runs):
            xs = [p["rollouts"] for p in run["curve"]]
            wins = [p["win_rate"] for p in run["curve"]]
            kls = [p["kl"] for p in run["curve"]]
            color = f"C{list(ARMS).index(arm)}"
            label = ARMS[arm].name if i == 0 else None
            left.plot(xs, wins, marker="o", markersize=3, color=color, label=label, alpha=0.8)
            middle.plot(xs, kls, marker="o", markersize=3, color=color, label=label, alpha=0.8)
            right.plot(kls, wins, marker="o", markersize=3, color=color, label=label, alpha=0.8)
    left.set(xlabel="rollouts", ylabel="win rate vs SFT", title="Oracle win rate (held out)")
    middle.set(xlabel="rollouts", ylabel="KL from SFT per response", title="KL (held out)")
    right.set(xlabel="KL from SFT per response", ylabel="win rate vs SFT",
              title="Win rate against KL")
    for ax in (left, right):
        ax.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
    for ax in (left, middle, right):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
