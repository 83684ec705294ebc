"""The reward rule: per-token rewards from a token-classification head's logits."""

from __future__ import annotations

import torch

POS_MINUS_NEG = "pos_minus_neg"


def label_index(id2label: dict[int, str], prefix: str) -> int:
    """The index of the label whose name starts with `prefix` ("pos", "neg")."""
    found = [i for i, name in id2label.items() if str(name).lower().startswith(prefix)]
    if len(found) != 1:
        raise ValueError(f"cannot find one {prefix!r} label among {sorted(id2label.values())}")
    return int(found[0])


def token_rewards(logits: torch.Tensor, id2label: dict[int, str]) -> torch.Tensor:
    """(..., num_labels) logits -> (...) rewards.

    1 label: the logit is the reward; 2 labels: P(positive); 3 labels: P(positive) - P(negative).
    """
    num_labels = logits.shape[-1]
    if num_labels == 1:
        return logits[..., 0].float()
    probs = logits.float().softmax(dim=-1)
    if num_labels == 2:
        return probs[..., label_index(id2label, "pos") if _named(id2label) else 1]
    if num_labels == 3:
        pos, neg = ((label_index(id2label, "pos"), label_index(id2label, "neg"))
                    if _named(id2label) else (2, 0))
        return probs[..., pos] - probs[..., neg]
    raise ValueError(f"a reward head has 1, 2 or 3 labels, this one has {num_labels}")


def _named(id2label: dict[int, str]) -> bool:
    """Whether the labels carry names (not HF's default LABEL_0, LABEL_1 ...)."""
    return any(str(n).lower().startswith(("pos", "neg")) for n in id2label.values())
