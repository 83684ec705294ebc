"""The PPO update's maths as pure functions over (batch, response tokens) tensors.

B is the batch (rollouts), T the response tokens (padded), V the vocabulary. `mask` (B, T)
marks real response tokens (1) and padding (0); padded positions never leak into a result.
Every per-token argument must have the mask's shape (asserted, naming the argument). Rewards
follow the fine-grained PPO of Xu et al. (2024): r_t = rm_t - beta * KL_t.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _same_shape(fn: str, mask: torch.Tensor, **tensors: torch.Tensor) -> None:
    """The mask is (B, T) and every named tensor has its shape."""
    assert mask.dim() == 2, f"{fn}: mask must be (B, T), got shape {tuple(mask.shape)}"
    for name, x in tensors.items():
        assert x.shape == mask.shape, \
            f"{fn}: {name} has shape {tuple(x.shape)}, but mask has {tuple(mask.shape)}"


def masked_mean(x: torch.Tensor,      # (B, T)
                mask: torch.Tensor,   # (B, T)
                ) -> torch.Tensor:    # ()
    _same_shape("masked_mean", mask, x=x)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor,           # (B, T)
           mask: torch.Tensor,        # (B, T)
           eps: float = 1e-8) -> torch.Tensor:  # (B, T)
    """Zero mean, unit variance over the masked positions; padding stays 0."""
    _same_shape("whiten", mask, x=x)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def kl_penalized(rm: torch.Tensor,              # (B, T) the RM's reward per token
                 logprobs: torch.Tensor,        # (B, T) log pi(a_t)
                 ref_logprobs: torch.Tensor,    # (B, T) log pi_ref(a_t)
                 mask: torch.Tensor,            # (B, T)
                 beta: float) -> tuple[torch.Tensor, torch.Tensor]:  # (B, T), (B, T)
    """(r_t = rm_t - beta * KL_t, KL_t), with KL_t = log pi(a_t) - log pi_ref(a_t)."""
    _same_shape("kl_penalized", mask, rm=rm, logprobs=logprobs, ref_logprobs=ref_logprobs)
    kl = (logprobs - ref_logprobs) * mask
    return (rm - beta * kl) * mask, kl


def on_last_token(scores: torch.Tensor,    # (B,) one score per row
                  mask: torch.Tensor,      # (B, T)
                  ) -> torch.Tensor:       # (B, T)
    """The traditional PPO reward: each row's score placed on its last real token."""
    assert scores.shape == mask.shape[:1], \
        f"on_last_token: scores has shape {tuple(scores.shape)}, mask has {tuple(mask.shape)}"
    out = torch.zeros_like(mask, dtype=scores.dtype)
    lengths = mask.sum(dim=1).long()                 # (B,)
    rows = torch.nonzero(lengths > 0).squeeze(1)     # (R,) rows with a real token
    out[rows, lengths[rows] - 1] = scores[rows]
    return out


@dataclass
class RunningMoments:
    """Mean and standard deviation of every score seen so far (Chan et al.'s parallel update),
    to normalise sequence-level scores as TRL's PPO does with use_score_scaling and
    use_score_norm: (score - mean) / std."""

    mean: float = 0.0
    var: float = 1.0
    count: float = 0.0

    def normalize(self, scores: torch.Tensor) -> torch.Tensor:  # (B,) -> (B,)
        """Update the moments with `scores`, then return them normalised."""
        n = float(len(scores))
        batch_mean, batch_var = float(scores.mean()), float(scores.var(unbiased=False))
        total = self.count + n
        delta = batch_mean - self.mean
        self.var = (self.var * self.count + batch_var * n
                    + delta * delta * self.count * n / total) / total
        self.mean += delta * n / total
        self.count = total
        return (scores - self.mean) / max(self.var, 1e-8) ** 0.5


def gae(rewards: torch.Tensor,     # (B, T)
        values: torch.Tensor,      # (B, T)
        mask: torch.Tensor,        # (B, T)
        gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:  # (B, T), (B, T)
    """Generalised advantage estimates and returns (advantages + values).

    delta_t = r_t + gamma * V_{t+1} - V_t and A_t = delta_t + gamma * lam * A_{t+1}, where the
    value and advantage after a row's last token are 0 (the episode ends there).
    """
    _same_shape("gae", mask, rewards=rewards, values=values)
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])       # (B,)
    next_advantage = torch.zeros_like(rewards[:, 0])   # (B,)
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]                                 # (B,)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = (delta + gamma * lam * next_advantage) * m
        advantages[:, t] = advantage
        next_value = values[:, t] * m
        next_advantage = advantage
    return advantages, (advantages + values) * mask


@dataclass(frozen=True)
class PolicyLoss:
    loss: torch.Tensor
    clip_fraction: float    # share of tokens whose ratio the clip held back
    approx_kl: float        # mean of old - new log-probabilities


def policy_loss(logprobs: torch.Tensor,       # (B, T) under the policy being trained
                old_logprobs: torch.Tensor,   # (B, T) when the rollouts were sampled
                advantages: torch.Tensor,     # (B, T)
                mask: torch.Tensor,           # (B, T)
                clip: float) -> PolicyLoss:
    """PPO's clipped surrogate: mean over tokens of max(-A r, -A clip(r, 1-c, 1+c))."""
    _same_shape("policy_loss", mask, logprobs=logprobs, old_logprobs=old_logprobs,
                advantages=advantages)
    ratio = torch.exp(logprobs - old_logprobs)        # (B, T)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = masked_mean(old_logprobs - logprobs.detach(), mask)
    return PolicyLoss(loss, float(clip_fraction), float(approx_kl))


def value_loss(values: torch.Tensor,       # (B, T)
               old_values: torch.Tensor,   # (B, T)
               returns: torch.Tensor,      # (B, T)
               mask: torch.Tensor,         # (B, T)
               clip: float) -> torch.Tensor:  # ()
    """Clipped value loss: 0.5 * mean of max((V - R)^2, (V_old + clip(V - V_old) - R)^2)."""
    _same_shape("value_loss", mask, values=values, old_values=old_values, returns=returns)
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2),
                             mask)


def entropy(logits: torch.Tensor,   # (B, T, V)
            mask: torch.Tensor,     # (B, T)
            ) -> torch.Tensor:      # ()
    """Mean entropy of the next-token distributions at the masked positions."""
    assert logits.dim() == 3 and logits.shape[:2] == mask.shape, \
        f"entropy: logits has shape {tuple(logits.shape)}, but mask has {tuple(mask.shape)}"
    logp = torch.log_softmax(logits, dim=-1)          # (B, T, V)
    return masked_mean(-(logp.exp() * logp).sum(dim=-1), mask)


@dataclass
class KLController:
    """beta: fixed, or adapted towards a target KL per sequence (Ziegler et al., 2019):
    beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * rollouts / horizon."""

    beta: float
    target: float | None = None     # None: beta stays fixed
    horizon: int = 10000            # rollouts over which beta may change by e^(+-0.2)

    def update(self, kl_per_sequence: float, rollouts: int) -> None:
        if self.target is None:
            return
        error = min(max(kl_per_sequence / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + error * rollouts / self.horizon
