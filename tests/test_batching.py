"""pick_batch and padded_tokens: the oldest row goes first, similar lengths batch together."""

import random

from tokenrm.server.batching import padded_tokens, pick_batch


def test_padded_tokens_is_rows_times_longest() -> None:
    assert padded_tokens([3, 7, 5]) == 21
    assert padded_tokens([]) == 0


def test_empty_input_gives_no_batch() -> None:
    assert pick_batch([], max_tokens=100, max_rows=8) == []


def test_oldest_row_is_chosen_even_when_longer_than_the_budget() -> None:
    assert pick_batch([500, 10, 10], max_tokens=100, max_rows=8) == [0]


def test_rows_closest_in_length_to_the_oldest_join_first() -> None:
    # Budget for 2 rows of width <= 50: the 48 (nearest to 50) joins, not the 10 or the 30.
    assert pick_batch([50, 10, 30, 48], max_tokens=100, max_rows=8) == [0, 3]


def test_padded_cost_stays_within_the_budget() -> None:
    lengths = [20, 25, 22, 40, 19, 21]
    chosen = pick_batch(lengths, max_tokens=100, max_rows=8)
    assert padded_tokens([lengths[i] for i in chosen]) <= 100
    assert chosen == [0, 2, 4, 5]


def test_max_rows_is_respected() -> None:
    assert len(pick_batch([5] * 10, max_tokens=1000, max_rows=3)) == 3
    assert pick_batch([5] * 10, max_tokens=1000, max_rows=1) == [0]


def test_returned_indices_are_sorted() -> None:
    chosen = pick_batch([10, 30, 12, 11, 9], max_tokens=1000, max_rows=8)
    assert chosen == sorted(chosen)
    assert chosen == [0, 1, 2, 3, 4]


def test_short_oldest_row_batches_with_short_rows_leaving_long_ones() -> None:
    lengths = [10, 200, 12, 190, 9, 11, 205]
    chosen = pick_batch(lengths, max_tokens=400, max_rows=8)
    assert chosen == [0, 2, 4, 5]
    picked = [lengths[i] for i in chosen]
    assert padded_tokens(picked) - sum(picked) <= 8  # low padding


def test_invariants_over_random_inputs() -> None:
    rng = random.Random(7)
    for _ in range(2000):
        lengths = [rng.randint(1, 300) for _ in range(rng.randint(0, 20))]
        max_tokens, max_rows = rng.randint(1, 1200), rng.randint(1, 10)
        chosen = pick_batch(lengths, max_tokens, max_rows)
        if not lengths:
            assert chosen == []
            continue
        assert chosen[0] == 0
        assert chosen == sorted(set(chosen))
        assert all(0 <= i < len(lengths) for i in chosen)
        assert len(chosen) <= max_rows
        if chosen != [0]:
            assert padded_tokens([lengths[i] for i in chosen]) <= max_tokens


def test_with_a_small_overhead_long_unlike_rows_are_not_padded_together() -> None:
    # A forward's fixed cost of 8 tokens: padding 100 up to 400 costs far more, padding 395 up
    # to 400 costs less (795 / 808 >= 400 / 408), padding 390 up costs more (790 / 808).
    assert pick_batch([400, 100, 395], max_tokens=10_000, max_rows=8, overhead_tokens=8) == [0, 2]
    assert pick_batch([400, 100, 390], max_tokens=10_000, max_rows=8, overhead_tokens=8) == [0]


def test_with_a_large_overhead_short_rows_batch_despite_padding() -> None:
    assert pick_batch([30, 10, 20, 12], max_tokens=10_000, max_rows=8,
                      overhead_tokens=200) == [0, 1, 2, 3]


def test_a_shorter_row_joins_when_it_fills_the_batch_well_enough() -> None:
    # Batch [100, 98]: 198 real tokens for 200 padded + 20 overhead = 0.9. A row of 89 fills
    # 89% of its slot and would lower that: it stays out; a row of 99 joins.
    assert pick_batch([100, 98, 89], max_tokens=10_000, max_rows=8, overhead_tokens=20) == [0, 1]
    assert pick_batch([100, 98, 99], max_tokens=10_000, max_rows=8,
                      overhead_tokens=20) == [0, 1, 2]


def test_the_chosen_batch_is_never_less_efficient_than_the_oldest_row_alone() -> None:
    rng = random.Random(3)
    for _ in range(1000):
        lengths = [rng.randint(1, 500) for _ in range(rng.randint(1, 30))]
        overhead = rng.choice([1, 16, 64, 256])
        chosen = [lengths[i] for i in pick_batch(lengths, 100_000, 64, overhead)]
        alone = lengths[0] / (overhead + lengths[0])
        assert sum(chosen) / (overhead + padded_tokens(chosen)) >= alone - 1e-12
