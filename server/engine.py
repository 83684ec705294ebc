"""The ScoringEngine: one bounded queue, a batching loop, and one worker thread for the model.

HTTP and gRPC hand it rows (model input ids and how many trailing tokens are the response) and
await rewards. The loop takes the oldest waiting row and the rows closest to it in length, up to
a padded-token budget, and runs them in one forward pass on the worker thread, so the event loop
never blocks. Rows whose caller went away or whose deadline passed are dropped, not computed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from tokenrm.server.batching import padded_tokens, pick_batch, pick_shared_batch, plan_reuse
from tokenrm.server.errors import DeadlineExceeded, Overloaded, Unavailable
from tokenrm.server.metrics import EngineMetrics
from tokenrm.server.model import RewardModel
from tokenrm.server.speed import Lateness, Speed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Row:
    """One item's exact model input; the last `n_response` tokens are scored."""

    input_ids: Sequence[int]
    n_response: int


class _Request:
    """One caller's rows and its one future, resolved when its last row is scored."""

    __slots__ = ("future", "remaining", "results")

    def __init__(self, future: asyncio.Future[list[np.ndarray]], n: int) -> None:
        self.future, self.remaining = future, n
        self.results: list[np.ndarray] = [np.empty(0, np.float32)] * n

    def deliver(self, index: int, rewards: np.ndarray) -> None:
        self.results[index] = rewards
        self.remaining -= 1
        if self.remaining == 0 and not self.future.done():
            self.future.set_result(self.results)

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


@dataclass
class _Waiting:
    row: Row
    request: _Request
    index: int                            # of the row in its request
    deadline: float                       # time.monotonic() after which it is not computed
    prompt: int                           # a hash of its prompt ids: rows alike may batch
    queued_at: float = field(default_factory=time.monotonic)

    @property
    def gone(self) -> bool:
        """Its caller has its answer, an error, or went away: nothing to compute."""
        return self.request.future.done()


@dataclass(frozen=True)
class EngineLimits:
    max_batch_tokens: int
    max_batch_size: int
    max_wait_ms: float
    max_queue_items: int
    workers: int = 1                      # forward passes at once, each on its own thread
    overhead_tokens: float = math.inf     # a forward's fixed cost in tokens (see pick_batch)
    prefix_reuse: bool = False            # the model can compute a shared prompt once


# A request is refused when the queue ahead of it would take more than this share of its time.
ADMIT_SHARE = 0.5


class ScoringEngine:
    """Owns the model and the queue. Use as `async with ScoringEngine(...) as engine`."""

    def __init__(self, model: RewardModel, limits: EngineLimits, metrics: EngineMetrics) -> None:
        self.model, self.limits, self.metrics = model, limits, metrics
        self._waiting: list[_Waiting] = []
        self._running: dict[asyncio.Task[None], list[_Waiting]] = {}  # batches in the model
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=limits.workers,
                                            thread_name_prefix="tokenrm-forward")
        self._loop_task: asyncio.Task[None] | None = None
        self._accepting = False
        self.speed = Speed(limits.workers, limits.overhead_tokens, limits.max_batch_size,
                           limits.max_batch_tokens)
        self.lateness = Lateness()

    async def __aenter__(self) -> ScoringEngine:
        self._loop_task = asyncio.create_task(self._run(), name="tokenrm-batcher")
        self._accepting = True
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._accepting = False
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        running = [w for batch in self._running.values() for w in batch]
        for task in self._running:
            task.cancel()
        for w in self._waiting + running:
            w.request.fail(Unavailable("the server is shutting down", retry_after_s=1.0))
        self._waiting, self._running = [], {}
        # The model may still be in a forward pass: wait for it off the event loop.
        await asyncio.to_thread(self._executor.shutdown, wait=True)

    @property
    def ready(self) -> bool:
        return self._accepting

    def stop_accepting(self) -> None:
        """Refuse new work from now on (Unavailable); queued and running rows still complete."""
        self._accepting = False

    def abandon_waiting(self) -> None:
        """Fail the queued rows' callers with Unavailable (the server is going away); rows
        already in the model still complete."""
        for w in self._waiting:
            w.request.fail(Unavailable("the server is shutting down before this request "
                                       "could be scored", retry_after_s=1.0))
        self._waiting = []

    @property
    def queued(self) -> int:
        """Rows waiting whose caller still waits for them."""
        return sum(not w.gone for w in self._waiting)

    def expected_wait_s(self) -> float:
        """About how long until the work queued and running now is scored: the speed model's
        prediction times how late work has really been finishing against it here (see
        speed.Lateness). 0 until measured."""
        return self._predicted_wait_s() * self.lateness.factor

    def _predicted_wait_s(self) -> float:
        """The work queued and running now: its tokens plus each batch's fixed cost, at the
        measured speed of the forward threads."""
        ahead = [w for batch in self._running.values() for w in batch]  # counted whole
        return self.speed.seconds([len(w.row.input_ids) for w in ahead + self._waiting
                                   if not w.gone])

    def admit(self, timeout_s: float) -> None:
        """Raise Unavailable or Overloaded now, rather than accept a request that cannot be
        scored before its deadline: called once per request, before its body is read."""
        self._check_accepting()
        wait = self.expected_wait_s()
        if wait > ADMIT_SHARE * timeout_s:
            self.metrics.refused.inc()
            raise Overloaded(f"the queue holds about {wait:.1f} s of work, more than this "
                             f"request's {timeout_s:g} s allow",
                             retry_after_s=wait - timeout_s / 2)

    def _check_accepting(self) -> None:
        if not self._accepting:
            raise Unavailable("not accepting work (starting, or draining to shut down)",
                              retry_after_s=1.0)

    async def score(self, rows: Sequence[Row], timeout_s: float) -> list[np.ndarray]:
        """Rewards for each row's response tokens, in order. Raises Overloaded, Unavailable,
        DeadlineExceeded; nothing is computed for a caller that has gone away. The queue is
        bounded: rows that would overflow it are refused at once (Overloaded)."""
        self._check_accepting()
        queued = self.queued
        if queued + len(rows) > self.limits.max_queue_items:
            self.metrics.refused.inc()
            raise Overloaded(f"queue full ({queued} items waiting, limit "
                             f"{self.limits.max_queue_items})",
                             retry_after_s=self.expected_wait_s())
        request = _Request(asyncio.get_running_loop().create_future(), len(rows))
        reuse = self.limits.prefix_reuse
        queued_at = time.monotonic()
        predicted_s = self._predicted_wait_s() + self.speed.seconds([len(r.input_ids)
                                                                     for r in rows])
        self._waiting.extend(
            _Waiting(r, request, i, queued_at + timeout_s,
                     hash(tuple(r.input_ids[:len(r.input_ids) - r.n_response])) if reuse else 0)
            for i, r in enumerate(rows))
        self.metrics.queue_depth.set(len(self._waiting))
        self._wake.set()
        try:
            rewards = await asyncio.wait_for(request.future, timeout_s)
        except (TimeoutError, asyncio.TimeoutError, DeadlineExceeded):  # the first two are
            self.lateness.observe(predicted_s, timeout_s)  # distinct before Python 3.11
            raise DeadlineExceeded(f"not scored within {timeout_s:g} s",
                                   retry_after_s=self.expected_wait_s()) from None
        finally:
            request.future.cancel()  # a caller that went away: its rows are skipped
        self.lateness.observe(predicted_s, time.monotonic() - queued_at)
        return rewards

    async def _run(self) -> None:
        free = asyncio.Semaphore(self.limits.workers)
        while True:
            await free.acquire()
            if not self._waiting:
                self._wake.clear()
                await self._wake.wait()
            await self._fill_or_wait()
            batch = self._take_batch()
            if not batch:
                free.release()
                continue
            task = asyncio.create_task(self._compute(batch))
            self._running[task] = batch

            def done(task: asyncio.Task[None]) -> None:
                self._running.pop(task, None)
                free.release()

            task.add_done_callback(done)

    async def _compute(self, batch: list[_Waiting]) -> None:
        """One forward pass; whatever goes wrong fails this batch's callers, not the loop."""
        started_at = time.monotonic()
        rows = [(w.row.input_ids, w.row.n_response) for w in batch]

        def forward() -> tuple[list[np.ndarray], int]:  # planned on the worker thread too
            plan = (plan_reuse(rows, self.limits.overhead_tokens) if self.limits.prefix_reuse
                    else None)
            return self.model.score(rows, plan), plan.saved if plan else 0

        try:
            rewards, reused = await asyncio.get_running_loop().run_in_executor(
                self._executor, forward)
            if len(rewards) != len(batch):
                raise RuntimeError(f"the model returned {len(rewards)} results for "
                                   f"{len(batch)} rows")
        except Exception as exc:
            log.exception("forward pass failed for a batch of %d rows", len(batch))
            for w in batch:
                w.request.fail(exc)
            return
        lengths = [len(w.row.input_ids) for w in batch]
        padded = padded_tokens(lengths)
        self.speed.observe(started_at, padded, busy=len(self._running) > 1 or self.queued > 0)
        self.metrics.observe_batch(len(batch), sum(lengths), padded,
                                   time.monotonic() - started_at, reused)
        for w, r in zip(batch, rewards, strict=True):
            if not w.gone:
                w.request.deliver(w.index, r)

    async def _fill_or_wait(self) -> None:
        """Give a batch that is not yet full up to max_wait_ms, counted from its oldest row
        whose caller still waits, to fill; stop waiting as soon as it is full."""
        while True:
            self._waiting = [w for w in self._waiting if not w.gone]
            if not 0 < len(self._waiting) < self.limits.max_batch_size:
                return
            remaining = self.limits.max_wait_ms / 1000 - (time.monotonic()
                                                         - self._waiting[0].queued_at)
            if remaining <= 0:
                return
            self._wake.clear()
            with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), remaining)

    def _take_batch(self) -> list[_Waiting]:
        now = time.monotonic()
        live = []
        for w in self._waiting:
            if w.gone:
                continue  # the caller went away, timed out or already failed
            if now > w.deadline:
                w.request.fail(DeadlineExceeded("deadline passed while queued",
                                                retry_after_s=self.expected_wait_s()))
                continue
            live.append(w)
        lengths = [len(w.row.input_ids) for w in live]
        shared = (pick_shared_batch([w.prompt for w in live], lengths,
                                    self.limits.max_batch_tokens, self.limits.max_batch_size)
                  if self.limits.prefix_reuse else None)
        chosen = set(shared if shared is not None else pick_batch(
            lengths, self.limits.max_batch_tokens, self.limits.max_batch_size,
            self.limits.overhead_tokens))
        batch = [w for i, w in enumerate(live) if i in chosen]
        self._waiting = [w for i, w in enumerate(live) if i not in chosen]
        self.metrics.queue_depth.set(self.queued)
        return batch
