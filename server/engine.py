"""The ScoringEngine: one bounded queue, a batching loop, and one worker thread for the model.

HTTP and gRPC hand it rows (model input ids and how many trailing tokens are the response) and
await rewards. The loop takes the oldest waiting row and the rows closest to it in length, up to
a padded-token budget, and runs them in one forward pass on the worker thread, so the event loop
never blocks. Rows whose caller went away or whose deadline passed are dropped, not computed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from tokenrm.server.batching import padded_tokens, pick_batch
from tokenrm.server.errors import DeadlineExceeded, Overloaded, Unavailable
from tokenrm.server.metrics import EngineMetrics
from tokenrm.server.model import RewardModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Row:
    """One item's exact model input; the last `n_response` tokens are scored."""

    input_ids: Sequence[int]
    n_response: int


@dataclass
class _Waiting:
    row: Row
    future: asyncio.Future[np.ndarray]
    deadline: float                       # time.monotonic() after which it is not computed
    queued_at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class EngineLimits:
    max_batch_tokens: int
    max_batch_size: int
    max_wait_ms: float
    max_queue_items: int


class ScoringEngine:
    """Owns the model and the queue. Use as `async with ScoringEngine(...) as engine`."""

    def __init__(self, model: RewardModel, limits: EngineLimits, metrics: EngineMetrics) -> None:
        self.model, self.limits, self.metrics = model, limits, metrics
        self._waiting: list[_Waiting] = []
        self._running: list[_Waiting] = []  # the batch in the model right now
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenrm-forward")
        self._loop_task: asyncio.Task[None] | None = None
        self._accepting = False
        self._forward_s_ewma = 0.05       # seconds per batch, for retry hints

    async def __aenter__(self) -> ScoringEngine:
        self._loop_task = asyncio.create_task(self._run(), name="tokenrm-batcher")
        self._accepting = True
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._accepting = False
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        for w in self._waiting + self._running:
            if not w.future.done():
                w.future.set_exception(Unavailable("the server is shutting down",
                                                   retry_after_s=1.0))
        self._waiting, self._running = [], []
        # The model may still be in a forward pass: wait for it off the event loop.
        await asyncio.to_thread(self._executor.shutdown, wait=True)

    @property
    def ready(self) -> bool:
        return self._accepting

    @property
    def queued(self) -> int:
        """Rows waiting whose caller still waits for them."""
        self._waiting = [w for w in self._waiting if not w.future.done()]
        return len(self._waiting)

    def retry_after_s(self) -> float:
        """A hint for refused callers: about how long the queue takes to empty."""
        batches = max(1.0, self.queued / self.limits.max_batch_size)
        return round(min(30.0, max(0.1, batches * self._forward_s_ewma)), 2)

    async def score(self, rows: Sequence[Row], timeout_s: float) -> list[np.ndarray]:
        """Rewards for each row's response tokens, in order. Raises Overloaded, Unavailable,
        DeadlineExceeded; nothing is computed for a caller that has gone away."""
        if not self._accepting:
            raise Unavailable("not accepting work (starting or shutting down)", retry_after_s=1.0)
        queued = self.queued
        if queued + len(rows) > self.limits.max_queue_items:
            self.metrics.refused.inc()
            raise Overloaded(f"queue full ({queued} items waiting, limit "
                             f"{self.limits.max_queue_items})", retry_after_s=self.retry_after_s())
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout_s
        waiting = [_Waiting(r, loop.create_future(), deadline) for r in rows]
        self._waiting.extend(waiting)
        self.metrics.queue_depth.set(len(self._waiting))
        self._wake.set()
        futures = [w.future for w in waiting]
        try:
            return list(await asyncio.wait_for(asyncio.gather(*futures), timeout_s))
        except TimeoutError:
            raise DeadlineExceeded(f"not scored within {timeout_s:g} s") from None
        finally:
            for f in futures:  # a caller that went away: its rows are skipped
                f.cancel()

    async def _run(self) -> None:
        while True:
            if not self._waiting:
                self._wake.clear()
                await self._wake.wait()
            await self._fill_or_wait()
            self._running = self._take_batch()
            if self._running:
                await self._compute(self._running)
            self._running = []

    async def _compute(self, batch: list[_Waiting]) -> None:
        """One forward pass; whatever goes wrong fails this batch's callers, not the loop."""
        started = time.perf_counter()
        try:
            rewards = await asyncio.get_running_loop().run_in_executor(
                self._executor, self.model.score,
                [(w.row.input_ids, w.row.n_response) for w in batch])
            if len(rewards) != len(batch):
                raise RuntimeError(f"the model returned {len(rewards)} results for "
                                   f"{len(batch)} rows")
        except Exception as exc:
            log.exception("forward pass failed for a batch of %d rows", len(batch))
            for w in batch:
                if not w.future.done():
                    w.future.set_exception(exc)
            return
        seconds = time.perf_counter() - started
        self._forward_s_ewma = 0.8 * self._forward_s_ewma + 0.2 * seconds
        lengths = [len(w.row.input_ids) for w in batch]
        self.metrics.observe_batch(len(batch), sum(lengths), padded_tokens(lengths), seconds)
        for w, r in zip(batch, rewards, strict=True):
            if not w.future.done():
                w.future.set_result(r)

    async def _fill_or_wait(self) -> None:
        """Give a batch that is not yet full up to max_wait_ms to fill."""
        if len(self._waiting) >= self.limits.max_batch_size or self.limits.max_wait_ms <= 0:
            return
        waited = time.monotonic() - self._waiting[0].queued_at
        remaining = self.limits.max_wait_ms / 1000 - waited
        if remaining > 0:
            await asyncio.sleep(remaining)

    def _take_batch(self) -> list[_Waiting]:
        now = time.monotonic()
        live = []
        for w in self._waiting:
            if w.future.done():
                continue  # the caller went away or timed out
            if now > w.deadline:
                w.future.set_exception(DeadlineExceeded("deadline passed while queued"))
                continue
            live.append(w)
        chosen = set(pick_batch([len(w.row.input_ids) for w in live],
                                self.limits.max_batch_tokens, self.limits.max_batch_size))
        batch = [w for i, w in enumerate(live) if i in chosen]
        self._waiting = [w for i, w in enumerate(live) if i not in chosen]
        self.metrics.queue_depth.set(self.queued)
        return batch
