"""The reward rule for 1-, 2- and 3-label heads."""

import math

import pytest
import torch

from tokenrm.core.reward_rule import token_rewards
from tokenrm.training.model import ID2LABEL


def test_three_labels_is_p_pos_minus_p_neg() -> None:
    logits = torch.tensor([[[0.0, 0.0, math.log(2.0)]]])  # probs 1/4, 1/4, 1/2
    assert token_rewards(logits, ID2LABEL).item() == pytest.approx(0.5 - 0.25)


def test_three_labels_follow_the_names_not_the_order() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    swapped = {0: "POSITIVE", 1: "neutral", 2: "NEGATIVE"}
    probs = logits.softmax(-1)[0]
    assert token_rewards(logits, swapped).item() == pytest.approx((probs[0] - probs[2]).item())


def test_unnamed_three_labels_assume_negative_neutral_positive() -> None:
    logits = torch.tensor([[3.0, 0.0, 0.0]])
    unnamed = {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    assert token_rewards(logits, unnamed).item() < -0.8


def test_one_label_is_the_logit() -> None:
    assert token_rewards(torch.tensor([[[-1.5]]]), {0: "LABEL_0"}).item() == -1.5


def test_two_labels_is_p_positive() -> None:
    logits = torch.tensor([[0.0, math.log(3.0)]])
    assert token_rewards(logits, {0: "LABEL_0", 1: "LABEL_1"}).item() == pytest.approx(0.75)
    named = {0: "positive", 1: "negative"}
    assert token_rewards(logits, named).item() == pytest.approx(0.25)


def test_other_label_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="1, 2 or 3 labels"):
        token_rewards(torch.zeros(1, 4), {i: f"LABEL_{i}" for i in range(4)})


def test_ambiguous_names_are_refused() -> None:
    with pytest.raises(ValueError, match="'pos'"):
        token_rewards(torch.zeros(1, 3), {0: "negative", 1: "positive", 2: "positive_2"})
