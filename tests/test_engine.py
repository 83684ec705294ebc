"""The ScoringEngine with a fake model: order, batching, back-pressure, deadlines, shutdown."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from typing import cast

import numpy as np
import pytest

from tokenrm.server.batching import padded_tokens
from tokenrm.server.engine import EngineLimits, Row, ScoringEngine
from tokenrm.server.errors import DeadlineExceeded, Overloaded, Unavailable
from tokenrm.server.metrics import EngineMetrics
from tokenrm.server.model import RewardModel

Ids = tuple[int, ...]


def expected(ids: Sequence[int], n: int) -> np.ndarray:
    """What the fake model returns for a row: 0..n-1 shifted by the sum of the ids."""
    return np.arange(n, dtype=np.float32) + np.float32(sum(ids))


class ForwardError(RuntimeError):
    """Raised by the fake model for a batch holding a poisoned row."""


POISON = -7  # an id that makes the fake model fail the whole batch


class FakeModel:
    """Records every batch; blocks on `gate` until released; fails a batch holding POISON.
    `finished`: forward passes that have returned (or raised)."""

    def __init__(self, *, held: bool = False) -> None:
        self.batches: list[list[tuple[Ids, int]]] = []
        self.finished = 0
        self.gate = threading.Event()
        if not held:
            self.gate.set()

    def release(self) -> None:
        self.gate.set()

    def score(self, rows: Sequence[tuple[Sequence[int], int]], reuse: object = None
              ) -> list[np.ndarray]:
        batch = [(tuple(ids), n) for ids, n in rows]
        self.batches.append(batch)
        try:
            if not self.gate.wait(timeout=10):
                raise RuntimeError("the test never released the fake model")
            if any(POISON in ids for ids, _ in batch):
                raise ForwardError("forward pass failed")
            return [expected(ids, n) for ids, n in batch]
        finally:
            self.finished += 1

    def scored_ids(self) -> list[Ids]:
        return [ids for batch in self.batches for ids, _ in batch]


def make_row(tag: int, length: int, n: int | None = None) -> Row:
    """A row with ids unique to `tag`, so its batch entry and its rewards are recognisable."""
    ids = [tag * 1000 + j for j in range(length)]
    return Row(ids, length if n is None else n)


def limits(**overrides: float) -> EngineLimits:
    base: dict[str, float] = dict(max_batch_tokens=4096, max_batch_size=8, max_wait_ms=0,
                                  max_queue_items=1000)
    base.update(overrides)
    return EngineLimits(**base)  # type: ignore[arg-type]


def make_engine(model: FakeModel, lim: EngineLimits | None = None,
                metrics: EngineMetrics | None = None) -> ScoringEngine:
    return ScoringEngine(cast(RewardModel, model), lim or limits(), metrics or EngineMetrics())


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll (every 2 ms) until `condition()` holds; `timeout` only catches a hang."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.002)


async def hold_worker(engine: ScoringEngine, model: FakeModel, tag: int = 999
                      ) -> asyncio.Task[list[np.ndarray]]:
    """Start a one-row call and wait until its batch is inside the (held) model."""
    first = asyncio.create_task(engine.score([make_row(tag, 4)], timeout_s=10))
    await until(lambda: len(model.batches) == 1)
    assert engine.queued == 0
    return first


def assert_rewards(got: list[np.ndarray], rows: Sequence[Row]) -> None:
    assert len(got) == len(rows)
    for reward, row in zip(got, rows, strict=True):
        assert reward.dtype == np.float32
        np.testing.assert_array_equal(reward, expected(row.input_ids, row.n_response))


def test_concurrent_callers_each_get_their_own_rewards_in_order() -> None:
    async def main() -> None:
        model = FakeModel()
        requests = [[make_row(c * 10 + i, 2 + (c * 7 + i * 3) % 13, n=1 + (c + i) % 2)
                     for i in range(1 + c % 4)] for c in range(12)]
        async with make_engine(model, limits(max_batch_size=5, max_wait_ms=2)) as engine:
            results = await asyncio.gather(*(engine.score(rows, timeout_s=10)
                                              for rows in requests))
        for got, rows in zip(results, requests, strict=True):
            assert_rewards(got, rows)
        assert sorted(model.scored_ids()) == sorted(tuple(r.input_ids)
                                                   for rows in requests for r in rows)

    asyncio.run(main())


def test_rows_queued_while_the_worker_is_busy_run_together_within_limits() -> None:
    async def main() -> None:
        model = FakeModel(held=True)
        lim = limits(max_batch_size=3, max_batch_tokens=24, max_wait_ms=1)
        lengths = [5, 8, 6, 7, 5, 8, 4, 30, 6]          # 30 is over the token budget alone
        rows = [make_row(i + 1, length) for i, length in enumerate(lengths)]
        async with make_engine(model, lim) as engine:
            first = await hold_worker(engine, model)
            later = [asyncio.create_task(engine.score([r], timeout_s=10)) for r in rows]
            await until(lambda: engine.queued == len(rows))
            assert len(model.batches) == 1              # nothing runs while the worker is busy
            model.release()
            await first
            results = await asyncio.gather(*later)
        for got, row in zip(results, rows, strict=True):
            assert_rewards(got, [row])
        assert len(model.batches[0]) == 1
        rest = model.batches[1:]
        assert len(rest) < len(rows)                    # queued rows were batched together
        assert max(len(b) for b in rest) > 1
        for batch in model.batches:
            assert len(batch) <= lim.max_batch_size
            if len(batch) > 1:
                assert padded_tokens([len(ids) for ids, _ in batch]) <= lim.max_batch_tokens
        assert [(tuple(make_row(8, 30).input_ids), 30)] in rest   # the oversized row, alone
        assert sorted(model.scored_ids()[1:]) == sorted(tuple(r.input_ids) for r in rows)

    asyncio.run(main())


def test_call_over_queue_limit_is_refused_at_once_with_retry_hint() -> None:
    async def main() -> None:
        model = FakeModel(held=True)
        metrics = EngineMetrics()
        async with make_engine(model, limits(max_queue_items=3), metrics) as engine:
            first = await hold_worker(engine, model)
            queued = asyncio.create_task(engine.score([make_row(1, 3), make_row(2, 3)], 10))
            await until(lambda: engine.queued == 2)
            # At once: the model is still held, so nothing could have made room; a call that
            # waited instead would time out here (5 s) or end with DeadlineExceeded (10 s).
            with pytest.raises(Overloaded) as refused:
                await asyncio.wait_for(engine.score([make_row(3, 3), make_row(4, 3)], 10), 5)
            assert not model.gate.is_set() and len(model.batches) == 1
            assert refused.value.retry_after_s is not None and refused.value.retry_after_s > 0
            assert metrics.registry.get_sample_value("tokenrm_refused_total") == 1
            assert engine.queued == 2                   # the refused rows were not queued
            model.release()
            await asyncio.gather(first, queued)
        assert (3000, 3001, 3002) not in model.scored_ids()

    asyncio.run(main())


class SlowModel(FakeModel):
    """Takes 1 ms per padded token, like a model whose speed the engine can measure."""

    def score(self, rows: Sequence[tuple[Sequence[int], int]], reuse: object = None
              ) -> list[np.ndarray]:
        time.sleep(0.001 * padded_tokens([len(ids) for ids, _ in rows]))
        return super().score(rows, reuse)


def test_work_that_cannot_finish_before_its_deadline_is_refused_at_once() -> None:
    async def main() -> None:
        model = SlowModel()
        metrics = EngineMetrics()
        async with make_engine(model, limits(max_batch_size=2), metrics) as engine:
            assert engine.expected_wait_s() == 0.0  # nothing measured yet: nothing refused
            warm = [make_row(1, 50)]
            assert_rewards(await engine.score(warm, 10), warm)  # measures ~1 ms per token
            backlog = [make_row(10 + i, 100) for i in range(8)]  # ~0.8 s of work
            queued = asyncio.create_task(engine.score(backlog, 10))
            await until(lambda: len(model.batches) == 2)  # its first batch is in the model
            # ~0.8 s of sleeps ahead: never less (a sleep is never shorter), and not wildly
            # more (10x) even when a loaded machine stretches the measured batch.
            assert 0.3 < engine.expected_wait_s() < 8.0
            with pytest.raises(Overloaded, match="s of work") as refused:
                engine.admit(timeout_s=0.3)  # what the service asks before reading a request
            assert refused.value.retry_after_s is not None and refused.value.retry_after_s > 0
            assert metrics.registry.get_sample_value("tokenrm_refused_total") == 1
            patient = [make_row(3, 5)]
            assert_rewards(await engine.score(patient, timeout_s=10), patient)
            assert_rewards(await queued, backlog)
        assert (2000, 2001, 2002, 2003, 2004) not in model.scored_ids()

    asyncio.run(main())


def test_call_exactly_filling_the_queue_is_accepted() -> None:
    async def main() -> None:
        model = FakeModel(held=True)
        metrics = EngineMetrics()
        async with make_engine(model, limits(max_queue_items=3), metrics) as engine:
            first = await hold_worker(engine, model)
            rows = [make_row(1, 3), make_row(2, 3), make_row(3, 3)]
            call = asyncio.create_task(engine.score(rows, 10))
            await until(lambda: engine.queued == 3)
            model.release()
            await first
            assert_rewards(await call, rows)
        assert metrics.registry.get_sample_value("tokenrm_refused_total") == 0

    asyncio.run(main())



async def release_and_check_skipped(engine: ScoringEngine, model: FakeModel,
                                    first: asyncio.Future, dropped: list[Row]) -> None:
    """Free the worker; a later call is served and the dropped rows never reach the model."""
    model.release()
    await first
    after = [make_row(3, 5)]
    assert_rewards(await engine.score(after, timeout_s=10), after)
    scored = set(model.scored_ids())
    assert tuple(after[0].input_ids) in scored
    assert not {tuple(r.input_ids) for r in dropped} & scored

def test_deadline_passed_while_queued_raises_and_rows_are_never_computed() -> None:
    async def main() -> None:
        model = FakeModel(held=True)
        late = [make_row(1, 5), make_row(2, 6)]
        async with make_engine(model) as engine:
            first = await hold_worker(engine, model)
            with pytest.raises(DeadlineExceeded):
                await engine.score(late, timeout_s=0.02)
            await release_and_check_skipped(engine, model, first, late)

    asyncio.run(main())


def test_cancelled_caller_rows_are_skipped() -> None:
    async def main() -> None:
        model = FakeModel(held=True)
        gone = [make_row(1, 5), make_row(2, 5)]
        async with make_engine(model) as engine:
            first = await hold_worker(engine, model)
            task = asyncio.create_task(engine.score(gone, timeout_s=10))
            await until(lambda: engine.queued == 2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await release_and_check_skipped(engine, model, first, gone)

    asyncio.run(main())


def test_model_error_fails_every_caller_in_that_batch() -> None:
    async def main() -> None:
        model = FakeModel(held=True)
        poisoned = Row([POISON, 1, 2, 3], 2)
        async with make_engine(model, limits(max_wait_ms=1)) as engine:
            first = await hold_worker(engine, model)
            a = asyncio.create_task(engine.score([poisoned], timeout_s=10))
            b = asyncio.create_task(engine.score([make_row(1, 4)], timeout_s=10))
            await until(lambda: engine.queued == 2)
            model.release()
            await first
            outcomes = await asyncio.gather(a, b, return_exceptions=True)
        assert len(model.batches) == 2 and len(model.batches[1]) == 2   # one shared batch
        assert all(isinstance(o, ForwardError) for o in outcomes)

    asyncio.run(main())


def test_engine_keeps_serving_after_a_model_error() -> None:
    async def main() -> None:
        model = FakeModel()
        async with make_engine(model) as engine:
            with pytest.raises(ForwardError):
                await engine.score([Row([POISON, 5], 1)], timeout_s=5)
            rows = [make_row(1, 3), make_row(2, 6, n=2)]
            assert_rewards(await engine.score(rows, timeout_s=5), rows)
            assert engine.ready

    asyncio.run(main())


def test_score_before_start_and_after_exit_raises_unavailable() -> None:
    async def main() -> None:
        model = FakeModel()
        engine = make_engine(model)
        with pytest.raises(Unavailable):
            await engine.score([make_row(1, 3)], timeout_s=5)
        async with engine:
            assert engine.ready
            assert_rewards(await engine.score([make_row(2, 3)], 5), [make_row(2, 3)])
        assert not engine.ready
        with pytest.raises(Unavailable) as exc:
            await engine.score([make_row(3, 3)], timeout_s=5)
        assert exc.value.retry_after_s is not None and exc.value.retry_after_s > 0
        assert model.scored_ids() == [tuple(make_row(2, 3).input_ids)]

    asyncio.run(main())


def test_queued_callers_get_unavailable_when_the_engine_shuts_down() -> None:
    async def main() -> None:
        model = FakeModel()
        # A long max_wait_ms keeps a part-full batch waiting, so the row is still queued.
        async with make_engine(model, limits(max_wait_ms=60_000)) as engine:
            queued = asyncio.create_task(engine.score([make_row(1, 4)], timeout_s=10))
            await until(lambda: engine.queued == 1)
        with pytest.raises(Unavailable):
            await asyncio.wait_for(queued, 2)
        assert model.batches == []

    asyncio.run(main())


def test_callers_in_the_model_and_queued_are_answered_while_the_engine_drains() -> None:
    """stop_accepting (the server's first signal): new calls get Unavailable; the batch in the
    model and the rows queued behind it still get their rewards."""
    async def main() -> None:
        model = FakeModel(held=True)
        async with make_engine(model) as engine:
            first = await hold_worker(engine, model)
            queued_rows = [make_row(1, 4), make_row(2, 6)]
            queued = asyncio.create_task(engine.score(queued_rows, timeout_s=10))
            await until(lambda: engine.queued == 2)
            engine.stop_accepting()
            assert not engine.ready
            with pytest.raises(Unavailable):
                await engine.score([make_row(3, 3)], timeout_s=10)
            model.release()
            assert_rewards(await first, [make_row(999, 4)])
            assert_rewards(await queued, queued_rows)
        assert (3000, 3001, 3002) not in model.scored_ids()

    asyncio.run(main())


def test_abandoning_the_queue_refuses_queued_callers_not_the_batch_in_the_model() -> None:
    """abandon_waiting (the end of the grace period, or a second Ctrl-C): queued callers get
    Unavailable at once and their rows are never computed; the batch already in the model
    still gets its rewards."""
    async def main() -> None:
        model = FakeModel(held=True)
        async with make_engine(model) as engine:
            first = await hold_worker(engine, model)
            dropped = [make_row(1, 4), make_row(2, 6)]
            queued = asyncio.create_task(engine.score(dropped, timeout_s=10))
            await until(lambda: engine.queued == 2)
            engine.stop_accepting()
            engine.abandon_waiting()
            with pytest.raises(Unavailable) as refused:
                await asyncio.wait_for(queued, 5)  # while the model is still held
            assert refused.value.retry_after_s is not None and refused.value.retry_after_s > 0
            assert not model.gate.is_set()
            model.release()
            assert_rewards(await first, [make_row(999, 4)])
        assert not {tuple(r.input_ids) for r in dropped} & set(model.scored_ids())

    asyncio.run(main())


def test_exit_refuses_the_caller_in_the_model_and_waits_for_its_forward_pass() -> None:
    """Leaving the engine's context (after the server's drain) fails a caller whose batch is
    still in the model with Unavailable at once, not with a hang; the exit itself returns only
    once that forward pass has ended, so nothing is torn down under a running pass."""
    async def main() -> None:
        model = FakeModel(held=True)
        engine = make_engine(model)
        await engine.__aenter__()
        first = await hold_worker(engine, model)
        leaving = asyncio.create_task(engine.__aexit__(None, None, None))
        with pytest.raises(Unavailable):
            await asyncio.wait_for(first, 5)  # while the model is still held
        # The forward pass is held, so a correct exit cannot have returned; 0.2 s gives a
        # wrong one (not waiting for the pass) time to return and be caught.
        await asyncio.wait({leaving}, timeout=0.2)
        assert not leaving.done(), "the engine exited while a forward pass was running"
        assert model.finished == 0
        model.release()
        await asyncio.wait_for(leaving, 10)
        assert model.finished == 1
        assert not engine.ready

    asyncio.run(main())


def test_tokens_metric_counts_real_tokens_of_every_batch() -> None:
    async def main() -> None:
        model = FakeModel()
        metrics = EngineMetrics()
        requests = [[make_row(1, 3), make_row(2, 9)], [make_row(3, 5, n=1)],
                    [make_row(4, 12), make_row(5, 2), make_row(6, 7)]]
        async with make_engine(model, limits(max_batch_size=2), metrics) as engine:
            for rows in requests:
                await engine.score(rows, timeout_s=5)
        total = sum(len(r.input_ids) for rows in requests for r in rows)
        assert metrics.registry.get_sample_value("tokenrm_tokens_total") == total
        assert metrics.registry.get_sample_value("tokenrm_batch_size_count") == len(model.batches)
        assert len(model.batches) >= 4                  # max_batch_size=2 forced several batches

    asyncio.run(main())


class ShortModel(FakeModel):
    """Returns one reward too few for a batch of several rows: a broken model contract."""

    def score(self, rows: Sequence[tuple[Sequence[int], int]], reuse: object = None
              ) -> list[np.ndarray]:
        rewards = super().score(rows, reuse)
        return rewards[:-1] if len(rows) > 1 else rewards


def test_engine_keeps_serving_after_a_model_returns_the_wrong_number_of_rewards() -> None:
    async def main() -> None:
        model = ShortModel()
        async with make_engine(model) as engine:
            with pytest.raises(Exception) as failed:  # 5 s: only a hang reaches it
                await engine.score([make_row(1, 3), make_row(2, 3)], timeout_s=5)
            assert not isinstance(failed.value, DeadlineExceeded)   # failed, not hung
            assert "2 rows" in str(failed.value)
            after = [make_row(3, 3)]
            assert_rewards(await engine.score(after, timeout_s=5), after)

    asyncio.run(main())
