"""The PPO trainer's wiring checked against quantities the tests compute themselves (not against
another run of the same trainer): each response token's log-prob is the previous position's
next-token distribution, unchanged by padding; KL is exactly 0 against an identical reference,
which never trains; one trainer step on a hand-sized case takes the gradients of the losses
rebuilt here with plain torch (r_t = rm_t - beta KL_t, GAE, whitening, clipped surrogate and
value loss); and a real `--mode seq` run against a tiny server gives PPO the normalised totals on
the last token only while the adaptive beta follows Ziegler et al.'s rule from the logged KL."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.testing import assert_close
from transformers import PreTrainedTokenizerBase

from tokenrm.server.launcher import Running, serve
from tokenrm.training.ppo import maths
from tokenrm.training.ppo import trainer as trainer_module
from tokenrm.training.ppo.policy import Policy, new_lm
from tokenrm.training.ppo.rewards import RewardSource
from tokenrm.training.ppo.rollout import Batch, Sampling, response_outputs
from tokenrm.training.ppo.run import Connection, run_ppo
from tokenrm.training.ppo.trainer import LOG, PPOConfig, Trainer

T = 0.7  # a sampling temperature other than 1, so that a missing scale shows
PROMPTS = ("Where does Ana live?", "What is 2 + 3?", "Tell me about Oslo.", "Say hi.")


def tiny_policy(tokenizer: PreTrainedTokenizerBase, seed: int) -> Policy:
    """A random 2-layer policy with spread-out logits and a non-zero value head."""
    torch.manual_seed(seed)
    policy = Policy(new_lm(tokenizer, hidden_size=32, layers=2, heads=2, max_len=64), tokenizer)
    with torch.no_grad():
        for p in policy.lm.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
        policy.value_head.weight.normal_(0.0, 0.5)
        policy.value_head.bias.fill_(0.3)
    return policy.eval()


def plain(policy: Policy, prompt: Sequence[int], response: Sequence[int], shift: int = 1
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log-probs, values, logits / T) of the response tokens from one unpadded forward of
    prompt + response: token p + t is predicted at position p + t - shift."""
    ids = torch.tensor([[*prompt, *response]])
    hidden = policy.lm.model(input_ids=ids).last_hidden_state[0]        # (L, C)
    before = torch.arange(len(prompt) - shift, len(prompt) + len(response) - shift)
    logits = policy.lm.lm_head(hidden[before]) / T                      # (n, V)
    logprobs = torch.log_softmax(logits, dim=-1)[torch.arange(len(response)),
                                                 torch.tensor(response)]
    return logprobs, policy.value_head(hidden[before]).squeeze(-1), logits


class Prompts:
    """A prompt source over PROMPTS."""

    def prompts(self, iteration: int, n: int) -> list[str]:
        return [PROMPTS[(iteration * n + i) % len(PROMPTS)] for i in range(n)]

    def spec(self) -> dict[str, Any]:
        return {"kind": "test"}


class StubRewards(RewardSource):
    """Answers at once with `reward(response)`, no server; keeps what it was sent."""

    def __init__(self, reward: Callable[[list[int]], np.ndarray]) -> None:
        self.reward = reward
        self.sent: list[tuple[list[int], list[int]]] = []

    def submit(self, prompts: Sequence[str], prompt_ids: Sequence[Sequence[int]],
               responses: Sequence[Sequence[int]]) -> Future[list[np.ndarray]]:
        self.sent += [(list(p), list(r)) for p, r in zip(prompt_ids, responses, strict=True)]
        done: Future[list[np.ndarray]] = Future()
        done.set_result([self.reward(list(r)) for r in responses])
        return done


# ---------------------------------------------------------------- 1. the one-token shift


def test_response_logprobs_are_the_previous_positions_next_token_distribution(
        tokenizer: PreTrainedTokenizerBase) -> None:
    policy, pad, eos = tiny_policy(tokenizer, 0), tokenizer.pad_token_id, tokenizer.eos_token_id
    bos = tokenizer.bos_token_id
    short = ([bos, 40, 41], [50, 51, 52])                       # padded on both sides below
    long = ([bos, 42, 43, 44, 45, 46], [53, 54, 55, 56, eos])
    with torch.no_grad():
        both = response_outputs(policy, Batch.of([short[0], long[0]], [short[1], long[1]], pad),
                                T)
        alone = response_outputs(policy, Batch.of([short[0]], [short[1]], pad), T)
        for row, (prompt, response) in enumerate((short, long)):
            n = len(response)
            logprobs, values, logits = plain(policy, prompt, response)
            assert_close(both[0][row, :n], logprobs, atol=2e-5, rtol=0)
            assert_close(both[1][row, :n], values, atol=2e-5, rtol=0)
            assert_close(both[2][row, :n], logits, atol=2e-5, rtol=0)
            # Not vacuous: every token read at its own position (no shift) is far off.
            assert (plain(policy, prompt, response, shift=0)[0] - logprobs).abs().min() > 1e-2
        assert_close(alone[0][0], both[0][0, :3], atol=2e-5, rtol=0)  # padding changes nothing
        assert_close(alone[1][0], both[1][0, :3], atol=2e-5, rtol=0)
        assert (both[0][0, 3:] != 0).all()  # padded slots hold junk: the mask must hide them
        at_one = response_outputs(policy, Batch.of([short[0]], [short[1]], pad), 1.0)[0]
        assert (at_one - alone[0]).abs().min() > 1e-2  # the temperature is really applied


# ---------------------------------------------------------------- 2. KL against the reference


def test_kl_is_exactly_zero_at_the_first_iteration_and_the_reference_never_trains(
        tokenizer: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    policy = tiny_policy(tokenizer, 1)
    reference = policy.frozen_copy()
    frozen = copy.deepcopy(reference.state_dict())
    rewards = StubRewards(lambda r: np.linspace(-1.0, 1.0, len(r), dtype=np.float32))
    config = PPOConfig(iterations=3, prompts_per_iteration=2, samples_per_prompt=2,
                       generation_batch=2, sampling=Sampling(temperature=T, max_new_tokens=5),
                       epochs=2, minibatch=4, lr=1e-2, kl_target=None, kl_budget=None)
    trainer = Trainer(policy, reference, rewards, config, tmp_path, Prompts())
    records = []
    for _ in range(config.iterations):
        sampler = copy.deepcopy(policy)  # the policy that samples this iteration
        records.append(trainer.step())
        with torch.no_grad():
            kl = [float((plain(sampler, p, r)[0] - plain(reference, p, r)[0]).sum())
                  for p, r in rewards.sent[-config.rollouts_per_iteration:]]
        assert records[-1]["kl"] == pytest.approx(np.mean(kl), abs=1e-4)  # log pi - log pi_ref
        for name, weight in reference.state_dict().items():
            assert torch.equal(weight, frozen[name]), name
    assert records[0]["kl"] == 0.0  # exactly: the same weights on the same batch
    assert all(r["kl"] > 0.01 for r in records[1:]), [r["kl"] for r in records]
    assert not any(p.requires_grad for p in reference.parameters())


# ---------------------------------------------------------------- 3. one hand-sized step


RESPONSES = ([60, 61, 62], [63, 64])
RM = (np.array([0.5, -1.0, 2.0], np.float32), np.array([1.0, -0.5], np.float32))


def gae_by_hand(r: list[float], v: list[float], gamma: float, lam: float) -> list[float]:
    advantages, next_a, next_v = [0.0] * len(r), 0.0, 0.0
    for t in reversed(range(len(r))):
        next_a = r[t] + gamma * next_v - v[t] + gamma * lam * next_a
        advantages[t], next_v = next_a, v[t]
    return advantages


def test_one_step_takes_the_gradient_of_the_losses_computed_by_hand(
        tokenizer: PreTrainedTokenizerBase, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    c = PPOConfig(iterations=1, prompts_per_iteration=2, samples_per_prompt=1,
                  generation_batch=2, sampling=Sampling(temperature=T, max_new_tokens=3),
                  beta=0.3, gamma=0.9, lam=0.8, clip=0.2, value_clip=0.2, value_coef=0.1,
                  epochs=2, minibatch=2, lr=0.05, max_grad_norm=1e9, kl_target=None,
                  kl_budget=None)
    policy = tiny_policy(tokenizer, 2)
    start = copy.deepcopy(policy)
    reference = policy.frozen_copy()
    with torch.no_grad():  # another reference, so that KL is not 0
        for p in reference.lm.parameters():
            p.add_(0.1 * torch.randn_like(p))
    monkeypatch.setattr(trainer_module, "sample",
                        lambda policy, prompts, sampling: [list(r) for r in RESPONSES])
    rewards = StubRewards(lambda r: RM[RESPONSES.index(r)])
    trainer = Trainer(policy, reference, rewards, c, tmp_path, Prompts())
    grads: list[dict[str, torch.Tensor]] = []
    states: list[Policy] = []

    def before_step(*_: Any) -> None:
        grads.append({n: p.grad.clone() for n, p in policy.named_parameters()})
        states.append(copy.deepcopy(policy))

    trainer.optimizer.register_step_pre_hook(before_step)
    record = trainer.step()
    assert len(grads) == c.epochs  # one minibatch of both rows per epoch

    # Everything the update needs, from the start policy, one unpadded row at a time.
    rows = rewards.sent
    with torch.no_grad():
        old = [plain(start, p, r) for p, r in rows]
        ref = [plain(reference, p, r)[0] for p, r in rows]
    kl = [o[0] - f for o, f in zip(old, ref, strict=True)]
    raw = [gae_by_hand((torch.from_numpy(rm) - c.beta * k).tolist(), o[1].tolist(), c.gamma,
                       c.lam) for rm, k, o in zip(RM, kl, old, strict=True)]
    a = torch.tensor([x for row in raw for x in row])                   # (5,) all tokens
    old_lp, old_v = torch.cat([o[0] for o in old]), torch.cat([o[1] for o in old])
    returns = a + old_v
    adv = (a - a.mean()) / torch.sqrt(((a - a.mean()) ** 2).mean() + 1e-8)
    assert record["kl"] == pytest.approx(float(np.mean([float(k.sum()) for k in kl])), abs=1e-5)
    assert abs(record["kl"]) > 0.05 and record["rm_reward"] == pytest.approx(1.0)

    def losses(model: Policy) -> dict[str, Any]:
        out = [plain(model, p, r) for p, r in rows]
        lp, v = torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])
        ratio = torch.exp(lp - old_lp)
        pl = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - c.clip, 1 + c.clip)).mean()
        v_clipped = old_v + (v - old_v).clamp(-c.value_clip, c.value_clip)
        vl = 0.5 * torch.maximum((v - returns) ** 2, (v_clipped - returns) ** 2).mean()
        probs = torch.cat([torch.softmax(o[2], -1) for o in out]).detach()
        return {"policy_loss": pl, "value_loss": vl,
                "clip_fraction": float(((ratio - ratio.clamp(1 - c.clip, 1 + c.clip)) * adv > 0)
                                       .float().mean()),
                "entropy": float(-(probs * probs.log()).sum(-1).mean()),
                "value_moved": float((v - old_v).abs().max().detach())}

    expected = []
    for model, got in zip(states, grads, strict=True):
        x = losses(model)
        want = torch.autograd.grad(x["policy_loss"] + c.value_coef * x["value_loss"],
                                   list(model.parameters()))
        for (name, _), g in zip(model.named_parameters(), want, strict=True):
            assert_close(got[name], g, atol=1e-5, rtol=1e-3, msg=name)
        expected.append({k: float(v.detach()) if torch.is_tensor(v) else v for k, v in x.items()})
    first, second = expected
    assert first["policy_loss"] == pytest.approx(0.0, abs=1e-6)  # ratio 1, whitened: mean -A = 0
    assert first["value_loss"] == pytest.approx(0.5 * float((a ** 2).mean()), rel=1e-5)  # V-R=-A
    # Not vacuous: the second epoch moved the policy past both clips somewhere.
    assert second["clip_fraction"] > 0 and second["value_moved"] > c.value_clip
    for key in ("policy_loss", "value_loss", "clip_fraction", "entropy"):
        assert record[key] == pytest.approx((first[key] + second[key]) / 2, rel=1e-4, abs=1e-6), \
            key
    # Adam's first step moves each weight by lr against the sign of its gradient.
    for (name, p0), p1 in zip(start.named_parameters(), states[1].parameters(), strict=True):
        g = grads[0][name]
        assert_close(p1 - p0, -c.lr * g / (g.abs() + 1e-8), atol=1e-6, rtol=1e-4, msg=name)


# ---------------------------------------------------------------- 4. --mode seq, adaptive beta


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path) -> Iterator[Running]:
    with serve(tiny_checkpoint) as running:
        yield running


TARGET = 1e-6  # far below any KL but 0: beta moves by the clipped factor every iteration


def test_seq_mode_sees_normalised_totals_on_the_last_token_and_beta_adapts(
        server: Running, policy_dir: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    config = PPOConfig(mode="seq", iterations=3, prompts_per_iteration=4, samples_per_prompt=2,
                       generation_batch=4, sampling=Sampling(max_new_tokens=24), epochs=1,
                       minibatch=8, lr=1e-2, beta=0.05, kl_target=TARGET, kl_horizon=16,
                       kl_budget=None)  # lr: a policy that moves, so KL > 0 after the start
    futures: list[Future[list[np.ndarray]]] = []
    seen: list[tuple[torch.Tensor, torch.Tensor, float]] = []  # (rm, mask, beta) PPO used
    submit, kl_penalized = RewardSource.submit, maths.kl_penalized

    def spy_submit(self: RewardSource, *args: Any) -> Future[list[np.ndarray]]:
        futures.append(submit(self, *args))
        return futures[-1]

    def spy_kl(rm: torch.Tensor, lp: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor,
               beta: float) -> tuple[torch.Tensor, torch.Tensor]:
        seen.append((rm.clone(), mask.clone(), beta))
        return kl_penalized(rm, lp, ref, mask, beta)

    monkeypatch.setattr(RewardSource, "submit", spy_submit)
    monkeypatch.setattr(maths, "kl_penalized", spy_kl)
    trainer = run_ppo(tmp_path / "run", config,
                      Connection([f"grpc://{server.grpc_target}"], timeout_s=120.0), policy_dir,
                      progress=False)
    records = [json.loads(line)
               for line in (tmp_path / "run" / LOG).read_text().splitlines()]
    assert len(records) == len(seen) == config.iterations and len(futures) == 2 * len(seen)

    totals: list[float] = []
    for i, (rm, mask, beta) in enumerate(seen):
        raw = [a for f in futures[2 * i:2 * i + 2] for a in f.result()]
        lengths = mask.sum(dim=1).long()
        assert [len(a) for a in raw] == lengths.tolist()
        assert any(np.abs(a[:-1]).max() > 0 for a in raw)  # per-token rewards were there
        totals += [float(a.sum()) for a in raw]
        mean, std = np.mean(totals), np.std(totals)  # every score seen so far
        want = torch.zeros_like(rm)
        for row, (a, n) in enumerate(zip(raw, lengths.tolist(), strict=True)):
            want[row, n - 1] = (float(a.sum()) - mean) / std
        assert_close(rm, want, atol=1e-5, rtol=1e-5)  # the normalised total, last token only
        if i == 0:
            scores = rm.sum(dim=1)
            assert float(scores.mean()) == pytest.approx(0.0, abs=1e-6)
            assert float(scores.std(unbiased=False)) == pytest.approx(1.0, abs=1e-5)
        assert beta == records[i]["beta"]
    assert records[-1]["rm_reward"] == pytest.approx(np.mean(totals[-8:]), abs=1e-5)

    # beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * rollouts / horizon, from the logged KL.
    assert records[0]["beta"] == config.beta and records[0]["kl"] == 0.0
    betas = [r["beta"] for r in records] + [trainer.kl.beta]
    for r, after in zip(records, betas[1:], strict=True):
        error = min(max(r["kl"] / TARGET - 1.0, -0.2), 0.2)
        share = config.rollouts_per_iteration / config.kl_horizon  # 8 / 16
        assert after == pytest.approx(r["beta"] * (1 + error * share), rel=1e-12)
    assert betas[1] == pytest.approx(0.05 * 0.9)  # KL 0: beta falls
    assert all(r["kl"] > 1.2 * TARGET for r in records[1:]), [r["kl"] for r in records]
    assert betas[2:] == pytest.approx([0.05 * 0.9 * 1.1 ** k for k in (1, 2)])  # then rises
