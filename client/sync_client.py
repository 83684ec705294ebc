"""RewardClient: the AsyncRewardClient, driven from synchronous code.

It runs its own event loop on a daemon thread, so it works the same from scripts, training
loops and notebooks (which already run a loop of their own)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Mapping, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

from tokenrm.client.async_client import AsyncRewardClient
from tokenrm.client.retry import RetryPolicy
from tokenrm.client.types import Item, ItemScore, ModelInfo, as_item

T = TypeVar("T")


class RewardClient:
    """Same arguments and behaviour as AsyncRewardClient; methods block until done."""

    def __init__(self, url: str | Sequence[str], *, api_key: str | None = None,
                 timeout_s: float = 60.0, max_in_flight: int = 4,
                 items_per_request: int | None = None, retry: RetryPolicy | None = None,
                 root_certificates: bytes | None = None) -> None:
        # Connections open on first use, on the loop below, so the client is made here.
        self._client = AsyncRewardClient(url, api_key=api_key, timeout_s=timeout_s,
                                         max_in_flight=max_in_flight,
                                         items_per_request=items_per_request, retry=retry,
                                         root_certificates=root_certificates)
        self._closed = False
        self._pending: set[Future[Any]] = set()   # submitted calls not done yet
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="tokenrm-client")
        self._thread.start()

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def score(self, items: Sequence[Item | Mapping[str, Any]], *, return_tokens: bool = False,
              timeout_s: float | None = None) -> list[ItemScore]:
        """See AsyncRewardClient.score."""
        return self.submit(items, return_tokens=return_tokens, timeout_s=timeout_s).result()

    def submit(self, items: Sequence[Item | Mapping[str, Any]], *, return_tokens: bool = False,
               timeout_s: float | None = None) -> Future[list[ItemScore]]:
        """Start scoring `items` and return at once (e.g. to generate the next batch meanwhile);
        the future's result() gives what `score` would return, or raises what it would raise
        (an item of another kind: TypeError at once)."""
        checked = [as_item(i, item) for i, item in enumerate(items)]
        return self._submit(self._client.score(checked, return_tokens=return_tokens,
                                               timeout_s=timeout_s))

    def model_info(self, timeout_s: float | None = None) -> ModelInfo:
        return self._run(self._client.model_info(timeout_s))

    def close(self) -> None:
        """Cancel the calls still running (their futures end cancelled), then disconnect."""
        if self._closed:
            return
        with self._lock:
            running = list(self._pending)
        for future in running:
            future.cancel()
        self._run(self._client.close())
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self._submit(coroutine).result()

    def _submit(self, coroutine: Coroutine[Any, Any, T]) -> Future[T]:
        if self._closed:
            coroutine.close()
            raise RuntimeError("this RewardClient is closed")
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(self._forget)
        return future

    def _forget(self, future: Future[Any]) -> None:
        with self._lock:
            self._pending.discard(future)
