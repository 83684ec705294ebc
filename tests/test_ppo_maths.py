"""The PPO maths on tiny hand-computed (batch, tokens) cases."""

import math

import pytest
import torch
from torch.testing import assert_close

from tokenrm.training.ppo.maths import (
    KLController,
    RunningMoments,
    entropy,
    gae,
    kl_penalized,
    masked_mean,
    on_last_token,
    policy_loss,
    value_loss,
    whiten,
)


def t(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_masked_mean_ignores_padding_and_survives_an_empty_mask() -> None:
    assert masked_mean(t([1.0, 3.0, 100.0]), t([1, 1, 0])).item() == pytest.approx(2.0)
    assert masked_mean(t([1.0, 3.0]), t([0, 0])).item() == 0.0


def test_kl_penalized() -> None:
    rm, mask = t([1.0, 0.5, 9.0]), t([1, 1, 0])
    logprobs, ref_logprobs = t([-1.0, -2.0, -3.0]), t([-1.5, -1.0, -7.0])
    rewards, kl = kl_penalized(rm, logprobs, ref_logprobs, mask, beta=0.1)
    # kl = [-1 + 1.5, -2 + 1, pad] = [0.5, -1, 0]; r = [1 - 0.05, 0.5 + 0.1, 0]
    assert_close(kl, t([0.5, -1.0, 0.0]))
    assert_close(rewards, t([0.95, 0.6, 0.0]))


def test_on_last_token_puts_each_score_on_the_last_real_token() -> None:
    scores = torch.tensor([6.0, 1.0, 20.0, 5.0])
    mask = t([1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1])
    expected = t([0.0, 0.0, 6.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0] * 4, [0.0, 0.0, 0.0, 5.0])
    assert_close(on_last_token(scores, mask), expected)


def test_running_moments_normalise_by_everything_seen_so_far() -> None:
    moments = RunningMoments()
    first = moments.normalize(torch.tensor([1.0, 3.0]))      # mean 2, std 1
    assert_close(first, torch.tensor([-1.0, 1.0]))
    second = moments.normalize(torch.tensor([5.0, 7.0]))     # all four: mean 4, var 5
    assert (moments.mean, moments.count) == (4.0, 4.0)
    assert moments.var == pytest.approx(5.0)
    assert_close(second, torch.tensor([1.0, 3.0]) / math.sqrt(5.0))
    assert_close(RunningMoments().normalize(torch.tensor([2.0, 2.0])), torch.zeros(2))


def test_gae_undiscounted_is_reward_to_go_minus_value() -> None:
    rewards, values = t([1.0, 2.0, 3.0]), t([0.5, 1.0, 2.0])
    advantages, returns = gae(rewards, values, t([1, 1, 1]), gamma=1.0, lam=1.0)
    # reward-to-go = [6, 5, 3]
    assert_close(advantages, t([5.5, 4.0, 1.0]))
    assert_close(returns, t([6.0, 5.0, 3.0]))


def test_gae_discounted_by_hand() -> None:
    rewards, values = t([1.0, 0.0, 2.0]), t([0.5, 1.0, 1.5])
    advantages, returns = gae(rewards, values, t([1, 1, 1]), gamma=0.9, lam=0.5)
    # gamma * lam = 0.45
    # d2 = 2 + 0           - 1.5 = 0.5    A2 = 0.5
    # d1 = 0 + 0.9 * 1.5   - 1.0 = 0.35   A1 = 0.35 + 0.45 * 0.5   = 0.575
    # d0 = 1 + 0.9 * 1.0   - 0.5 = 1.4    A0 = 1.4  + 0.45 * 0.575 = 1.65875
    assert_close(advantages, t([1.65875, 0.575, 0.5]))
    assert_close(returns, t([2.15875, 1.575, 2.0]))


def test_gae_padding_does_not_leak() -> None:
    # The second row is the first without its padding; both must agree on the real tokens.
    rewards = t([1.0, 2.0, 100.0], [1.0, 2.0, 0.0])
    values = t([0.5, 1.0, 1000.0], [0.5, 1.0, 0.0])
    mask = t([1, 1, 0], [1, 1, 0])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # d1 = 2 - 1 = 1            A1 = 1
    # d0 = 1 + 0.9 * 1 - 0.5 = 1.4   A0 = 1.4 + 0.45 * 1 = 1.85
    assert_close(advantages, t([1.85, 1.0, 0.0], [1.85, 1.0, 0.0]))
    assert_close(returns, t([2.35, 2.0, 0.0], [2.35, 2.0, 0.0]))


def test_whiten_normalises_the_real_positions_only() -> None:
    x, mask = t([1.0, 2.0, 3.0, 0.0], [2.0, 0.0, 0.0, 0.0]), t([1, 1, 1, 0], [1, 0, 0, 0])
    out = whiten(x, mask)
    # real values 1, 2, 3, 2: mean 2, variance (1 + 0 + 1 + 0) / 4 = 0.5, so scale sqrt(2)
    r2 = math.sqrt(2.0)
    assert_close(out, t([-r2, 0.0, r2, 0.0], [0.0, 0.0, 0.0, 0.0]))
    real = out[mask.bool()]
    assert real.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert real.var(unbiased=False).item() == pytest.approx(1.0, rel=1e-5)
    padded = whiten(t([1.0, 2.0, 3.0, 1e3], [2.0, -7.0, 5.0, 1e4]), mask)
    assert_close(padded, out)


def one_token(logprob: float, advantage: float) -> tuple[torch.Tensor, ...]:
    """(logprobs requiring grad, old_logprobs = 0, advantages, mask) for a single token."""
    return t([logprob]).requires_grad_(), t([0.0]), t([advantage]), t([1])


def test_policy_loss_at_ratio_one_is_minus_the_mean_advantage() -> None:
    logprobs = t([-1.0, -2.0, -3.0])
    out = policy_loss(logprobs, logprobs.clone(), t([1.0, -3.0, 100.0]), t([1, 1, 0]), clip=0.2)
    assert out.loss.item() == pytest.approx(1.0)  # -(1 - 3) / 2
    assert out.clip_fraction == 0.0
    assert out.approx_kl == 0.0


def test_policy_loss_clips_a_high_ratio_with_positive_advantage() -> None:
    logprobs, old, advantages, mask = one_token(math.log(1.5), 2.0)
    out = policy_loss(logprobs, old, advantages, mask, clip=0.2)
    # max(-2 * 1.5, -2 * 1.2) = -2.4
    assert out.loss.item() == pytest.approx(-2.4)
    assert out.clip_fraction == 1.0
    assert out.approx_kl == pytest.approx(-math.log(1.5))
    out.loss.backward()
    assert logprobs.grad is not None and logprobs.grad.item() == 0.0


def test_policy_loss_clips_a_low_ratio_with_negative_advantage() -> None:
    logprobs, old, advantages, mask = one_token(math.log(0.5), -2.0)
    out = policy_loss(logprobs, old, advantages, mask, clip=0.2)
    # max(2 * 0.5, 2 * 0.8) = 1.6
    assert out.loss.item() == pytest.approx(1.6)
    assert out.clip_fraction == 1.0
    out.loss.backward()
    assert logprobs.grad is not None and logprobs.grad.item() == 0.0


def test_policy_loss_keeps_a_high_ratio_with_negative_advantage() -> None:
    logprobs, old, advantages, mask = one_token(math.log(1.5), -2.0)
    out = policy_loss(logprobs, old, advantages, mask, clip=0.2)
    # max(2 * 1.5, 2 * 1.2) = 3: the pessimistic bound keeps the unclipped term
    assert out.loss.item() == pytest.approx(3.0)
    assert out.clip_fraction == 0.0
    out.loss.backward()
    # d/dlogp (2 * exp(logp)) = 2 * 1.5
    assert logprobs.grad is not None and logprobs.grad.item() == pytest.approx(3.0)


def test_value_loss_takes_the_larger_of_clipped_and_unclipped() -> None:
    old = t([0.0])

    def loss(value: float, ret: float) -> float:
        return value_loss(t([value]), old, t([ret]), t([1]), clip=0.2).item()

    # inside the clip: both terms (0.1 - 1)^2 = 0.81
    assert loss(0.1, 1.0) == pytest.approx(0.5 * 0.81)
    # clipped V = 0.2: max((2 - 2.5)^2, (0.2 - 2.5)^2) = max(0.25, 5.29)
    assert loss(2.0, 2.5) == pytest.approx(0.5 * 5.29)
    # clipped V = 0.2: max((2 - 0)^2, (0.2 - 0)^2) = max(4, 0.04)
    assert loss(2.0, 0.0) == pytest.approx(0.5 * 4.0)
    # masked: the two cases above plus a padded token with a huge error
    batch = value_loss(t([2.0, 2.0, 50.0]), t([0.0, 0.0, 0.0]), t([2.5, 0.0, -50.0]),
                       t([1, 1, 0]), clip=0.2)
    assert batch.item() == pytest.approx(0.5 * (5.29 + 4.0) / 2)


def test_entropy() -> None:
    vocab = 8
    uniform = torch.zeros(1, 2, vocab)
    assert entropy(uniform, t([1, 1])).item() == pytest.approx(math.log(vocab))
    peaked = torch.zeros(1, 2, vocab)
    peaked[..., 3] = 100.0
    assert entropy(peaked, t([1, 1])).item() == pytest.approx(0.0, abs=1e-6)
    # tokens: uniform (real), peaked (real), uniform (padding)
    mixed = torch.cat([uniform[:, :1], peaked[:, :1], uniform[:, :1]], dim=1)
    assert entropy(mixed, t([1, 1, 0])).item() == pytest.approx(math.log(vocab) / 2)


def test_kl_controller_fixed_beta_never_changes() -> None:
    ctl = KLController(beta=0.1)
    for kl in (0.0, 6.0, 1e3):
        ctl.update(kl, rollouts=512)
    assert ctl.beta == 0.1


@pytest.mark.parametrize(("kl", "beta"), [
    (6.6, 0.1 * (1 + 0.1 * 0.1)),   # error +0.1, n / horizon = 0.1
    (5.4, 0.1 * (1 - 0.1 * 0.1)),   # error -0.1
    (60.0, 0.1 * (1 + 0.2 * 0.1)),  # error +9, clipped to +0.2
    (0.0, 0.1 * (1 - 0.2 * 0.1)),   # error -1, clipped to -0.2
])
def test_kl_controller_adapts_towards_target(kl: float, beta: float) -> None:
    ctl = KLController(beta=0.1, target=6.0, horizon=10000)
    ctl.update(kl, rollouts=1000)
    assert ctl.beta == pytest.approx(beta)


def test_a_shape_mismatch_raises_naming_the_argument() -> None:
    rm, mask = t([1.0, 0.5, 9.0]), t([1, 1, 0])
    with pytest.raises(AssertionError, match=r"kl_penalized: ref_logprobs has shape \(1, 2\)"):
        kl_penalized(rm, t([-1.0, -2.0, -3.0]), t([-1.5, -1.0]), mask, beta=0.1)
    with pytest.raises(AssertionError, match=r"gae: values .* but mask has \(1, 3\)"):
        gae(rm, t([0.5, 1.0]), mask, gamma=1.0, lam=1.0)
    with pytest.raises(AssertionError, match="policy_loss: advantages"):
        policy_loss(rm, rm, t([1.0], [2.0]), mask, clip=0.2)
    with pytest.raises(AssertionError, match="value_loss: returns"):
        value_loss(rm, rm, torch.zeros(3), mask, clip=0.2)
    with pytest.raises(AssertionError, match="masked_mean: mask must be"):
        masked_mean(torch.zeros(3), torch.ones(3))
    with pytest.raises(AssertionError, match="entropy: logits"):
        entropy(torch.zeros(1, 2, 8), mask)
    with pytest.raises(AssertionError, match="on_last_token: scores"):
        on_last_token(torch.zeros(2), mask)
    with pytest.raises(AssertionError, match="whiten: x"):
        whiten(t([1.0, 2.0, 3.0, 4.0]), mask)
