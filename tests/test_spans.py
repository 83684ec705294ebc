"""span_rewards: each RM token's reward goes wholly to the span holding its last character."""

import itertools

import numpy as np
import pytest

from tokenrm.core.spans import span_rewards


def _r(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def test_one_token_per_span_maps_one_to_one() -> None:
    out = span_rewards([(0, 3), (3, 9), (9, 12)], _r(0.5, -1.0, 2.0),
                       [(0, 3), (3, 9), (9, 12)])
    np.testing.assert_allclose(out, [0.5, -1.0, 2.0], atol=1e-6)


def test_several_tokens_in_one_span_are_summed() -> None:
    out = span_rewards([(0, 2), (2, 4), (4, 6), (6, 9)], _r(1.0, 2.0, 3.0, 4.0),
                       [(0, 6), (6, 9)])
    np.testing.assert_allclose(out, [6.0, 4.0], atol=1e-6)


def test_token_across_two_spans_goes_wholly_to_the_span_of_its_last_character() -> None:
    # Token [2, 6) covers chars 2..5: starts in span [0, 4), ends in span [4, 8).
    out = span_rewards([(0, 2), (2, 6), (6, 8)], _r(1.0, 10.0, 100.0), [(0, 4), (4, 8)])
    np.testing.assert_allclose(out, [1.0, 110.0], atol=1e-6)


def test_span_receiving_no_token_gets_zero() -> None:
    # One RM token [0, 6) covers three caller spans; only the last (holding char 5) gets it.
    out = span_rewards([(0, 6)], _r(3.0), [(0, 2), (2, 4), (4, 6)])
    np.testing.assert_allclose(out, [0.0, 0.0, 3.0], atol=1e-6)


def test_token_ending_in_a_gap_goes_to_the_nearest_span() -> None:
    spans = [(0, 2), (10, 12)]  # gap: chars 2..9
    near_left = span_rewards([(2, 4)], _r(1.0), spans)    # last char 3: 2 from span 0, 7 from 1
    near_right = span_rewards([(2, 9)], _r(1.0), spans)   # last char 8: 7 from span 0, 2 from 1
    np.testing.assert_allclose(near_left, [1.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(near_right, [0.0, 1.0], atol=1e-6)


def test_token_before_the_first_or_after_the_last_span_goes_to_that_span() -> None:
    out = span_rewards([(0, 2), (20, 25)], _r(1.0, 2.0), [(5, 8), (10, 12)])
    np.testing.assert_allclose(out, [1.0, 2.0], atol=1e-6)


def test_zero_width_offsets_count_as_the_character_before_them() -> None:
    # Byte-level BPE trims whitespace from offsets: in "x   y" the lone-space tokens come back as
    # (2, 2) and (3, 3) for the spaces at 1 and 2 (as the demo tokenizer does). Each reward must
    # land on the caller's token for that space, not on the next one.
    offsets = [(0, 1), (2, 2), (3, 3), (4, 5)]
    out = span_rewards(offsets, _r(1.0, 2.0, 4.0, 8.0), [(0, 1), (1, 2), (2, 3), (3, 5)])
    np.testing.assert_allclose(out, [1.0, 2.0, 4.0, 8.0], atol=1e-6)


def test_total_is_conserved_in_a_hand_case() -> None:
    rewards = _r(0.25, -0.5, 1.5, -2.0, 0.75)
    offsets = [(0, 1), (1, 5), (5, 6), (6, 14), (14, 15)]
    out = span_rewards(offsets, rewards, [(0, 2), (3, 7), (9, 10)])
    assert out.sum() == pytest.approx(float(rewards.sum()), abs=1e-5)


def test_total_is_conserved_over_random_offsets_and_spans() -> None:
    rng = np.random.default_rng(1234)
    for _ in range(300):
        length = int(rng.integers(1, 60))
        cuts = np.sort(rng.choice(np.arange(1, length + 1), size=min(length, int(
            rng.integers(1, 12))), replace=False))
        bounds = [0, *cuts.tolist()]
        offsets = list(itertools.pairwise(bounds))
        # Some zero-width pieces, as byte-level tokenizers give.
        offsets += [(a, a) for a in rng.integers(0, length, size=int(rng.integers(0, 3)))]
        offsets.sort()
        points = np.sort(rng.choice(np.arange(0, length + 8), size=2 * int(rng.integers(
            1, 5)), replace=False)).tolist()
        spans = [(points[i], points[i + 1]) for i in range(0, len(points), 2)]
        rewards = rng.normal(size=len(offsets)).astype(np.float32)
        out = span_rewards(offsets, rewards, spans)
        assert out.shape == (len(spans),)
        assert float(out.sum()) == pytest.approx(float(rewards.sum()), abs=1e-5)


def test_empty_spans_give_an_empty_array() -> None:
    out = span_rewards([(0, 3)], _r(1.0), [])
    assert isinstance(out, np.ndarray)
    assert out.shape == (0,)
