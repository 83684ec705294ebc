"""The experiment's markdown table and plot, from its results.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np

PAPER_GAIN = 5.1  # Xu et al. (2024): fine-grained over sequence-level PPO, win-rate points
NAMES = {"fine": "fine-grained", "seq": "sequence-level"}


def _by_mode(result: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {}
    for run in result["runs"]:
        runs.setdefault(run["mode"], []).append(run)
    return runs


def _spread(values: list[float]) -> str:
    a = np.array(values)
    return f"{a.mean():.3f} ± {a.std(ddof=1) if len(a) > 1 else 0.0:.3f}"


def table(result: dict[str, Any]) -> str:
    runs = _by_mode(result)
    ppo, ref = result["config"]["ppo"], result["reference"]
    budget = ppo["iterations"] * ppo["prompts_per_iteration"] * ppo["samples_per_prompt"]
    lines = [
        "# Fine-grained vs sequence-level PPO",
        "",
        f"Each run: {budget} rollouts ({ppo['iterations']} iterations x "
        f"{ppo['prompts_per_iteration']} prompts x {ppo['samples_per_prompt']} samples), "
        f"seeds {result['config']['seeds']}, beta {ppo['beta']}, lr {ppo['lr']}. "
        f"Win rate: against the SFT policy on {result['config']['eval_prompts']} held-out "
        "prompts, by the task's oracle: a response that states a correct fact about the person "
        "beats one that does not; otherwise fewer errors wins; ties count half. The SFT policy "
        f"makes {ref['errors']:.2f} errors per response, states {ref['facts']:.2f} correct "
        f"facts, answers {ref['answered']:.0%} of prompts ({ref['tokens']:.1f} tokens). A policy "
        f"that said nothing would score {ref['silent_win_rate']:.3f}.",
        "",
        "| mode | win rate (mean ± sd over seeds) | per seed | errors per response "
        "| correct facts per response | answered | response tokens | final KL "
        "| final RM reward |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, mode_runs in runs.items():
        finals = [r["final"] for r in mode_runs]
        lines.append(
            f"| {NAMES[mode]} | {_spread([f['win_rate'] for f in finals])} | "
            + ", ".join(f"{f['win_rate']:.3f}" for f in finals)
            + f" | {_spread([f['errors'] for f in finals])} | "
            f"{_spread([f['facts'] for f in finals])} | "
            f"{np.mean([f['answered'] for f in finals]):.0%} | "
            f"{np.mean([f['tokens'] for f in finals]):.1f} | "
            f"{np.mean([f['kl'] for f in finals]):.2f} | "
            f"{np.mean([f['rm_reward'] for f in finals]):+.3f} |")
    if {"fine", "seq"} <= runs.keys():
        gains = [100 * (f["final"]["win_rate"] - s["final"]["win_rate"])
                 for f, s in zip(runs["fine"], runs["seq"], strict=True)]
        gain = float(np.mean(gains))
        verdict = ("neither its direction nor its size reproduces" if gain <= 0 else
                   "its direction reproduces, and the gain is at least as large"
                   if gain >= PAPER_GAIN else "its direction reproduces, its size does not")
        lines += ["", f"Fine-grained minus sequence-level win rate: {gain:+.1f} points (per "
                  f"seed: {', '.join(f'{g:+.1f}' for g in gains)}); the paper reports "
                  f"+{PAPER_GAIN}: {verdict} here."]
    lines += ["", f"Wall time: {result['seconds'] / 60:.1f} min.", ""]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for mode, mode_runs in _by_mode(result).items():
        rewards = np.array([[r for _, r in run["rewards"]] for run in mode_runs])
        x = [n for n, _ in mode_runs[0]["rewards"]]
        left.plot(x, rewards.mean(axis=0), label=NAMES[mode])
        left.fill_between(x, rewards.min(axis=0), rewards.max(axis=0), alpha=0.2)
        wins = np.array([[p["win_rate"] for p in run["curve"]] for run in mode_runs])
        xs = [p["rollouts"] for p in mode_runs[0]["curve"]]
        right.plot(xs, wins.mean(axis=0), marker="o", label=NAMES[mode])
        right.fill_between(xs, wins.min(axis=0), wins.max(axis=0), alpha=0.2)
    left.set(xlabel="rollouts", ylabel="RM reward per response (mean)",
             title="Reward during training")
    right.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
    right.set(xlabel="rollouts", ylabel="win rate vs SFT", title="Oracle win rate (held out)")
    for ax in (left, right):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
