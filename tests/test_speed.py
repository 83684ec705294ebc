"""How late work really finishes against the speed model (server/speed.py Lateness): the factor
admission multiplies its expected wait by, on hand-made observations."""

import numpy as np
import pytest

from tokenrm.server.speed import Lateness


def test_the_factor_is_one_until_enough_is_seen_then_a_high_quantile_of_the_ratios() -> None:
    late = Lateness(window=100, quantile=0.9, min_samples=5)
    for ratio in (1.5, 2.0, 3.0, 1.2):
        late.observe(1.0, ratio)
    assert late.factor == 1.0  # 4 samples: not yet
    late.observe(1.0, 2.5)
    assert late.factor == pytest.approx(np.quantile([1.5, 2.0, 3.0, 1.2, 2.5], 0.9))


def test_never_below_one_and_short_predictions_are_ignored() -> None:
    late = Lateness(min_samples=1, min_predicted_s=0.05)
    late.observe(1.0, 0.5)          # finished early: the model was pessimistic
    assert late.factor == 1.0
    late.observe(0.01, 5.0)         # mostly fixed costs: ignored
    assert late.factor == 1.0


def test_the_window_forgets_old_load() -> None:
    late = Lateness(window=10, quantile=0.95, min_samples=1)
    for _ in range(10):
        late.observe(1.0, 4.0)      # a busy spell
    assert late.factor == pytest.approx(4.0)
    for _ in range(10):
        late.observe(1.0, 1.1)      # it passed
    assert late.factor == pytest.approx(1.1)
