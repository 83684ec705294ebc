"""Several endpoints: least-outstanding-requests choice; a failing endpoint leaves the rotation
and comes back once its health check passes."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from tokenrm.client.errors import CertificateError
from tokenrm.client.retry import Retryable, RetryPolicy
from tokenrm.client.types import Item, ItemScore, ModelInfo

HEALTH_TIMEOUT_S = 2.0


class Transport(Protocol):
    async def model_info(self, timeout_s: float) -> ModelInfo: ...

    async def score(self, items: Sequence[Item], return_tokens: bool,
                    timeout_s: float) -> list[ItemScore]: ...

    async def healthy(self, timeout_s: float) -> bool: ...

    async def close(self) -> None: ...


class Endpoint:
    def __init__(self, name: str, transport: Transport) -> None:
        self.name, self.transport = name, transport
        self.outstanding = 0
        self.up = True
        self.last_error = ""     # why it left the rotation, said when every endpoint is down
        self.untrusted = False   # it left because its TLS certificate failed verification
        self._probe: asyncio.Task[None] | None = None


class Pool:
    def __init__(self, endpoints: Sequence[Endpoint], probe_policy: RetryPolicy) -> None:
        self.endpoints = list(endpoints)
        self._probe_policy = probe_policy
        self._changed = asyncio.Event()  # set when an endpoint comes back

    @contextlib.asynccontextmanager
    async def use(self) -> AsyncIterator[Endpoint]:
        """The live endpoint with the fewest requests in flight, for one request. A Retryable
        failure inside takes it out of the rotation until its health check passes."""
        live = [e for e in self.endpoints if e.up]
        if not live and all(e.untrusted for e in self.endpoints):  # no try can succeed
            raise CertificateError("; ".join(e.last_error for e in self.endpoints))
        if not live:
            raise Retryable("every endpoint is down: "
                            + "; ".join(e.last_error or e.name for e in self.endpoints))
        endpoint = min(live, key=lambda e: e.outstanding)
        endpoint.outstanding += 1
        try:
            yield endpoint
        except Retryable as exc:
            if exc.endpoint_down:
                endpoint.last_error = exc.message
                self._take_down(endpoint)
            raise
        except CertificateError as exc:
            # Another try meets the same certificate: the endpoint leaves the rotation, and the
            # call fails at once only when every endpoint has failed on its certificate.
            endpoint.last_error, endpoint.untrusted = str(exc), True
            self._take_down(endpoint)
            if all(e.untrusted for e in self.endpoints):
                raise
            raise Retryable(str(exc), endpoint_down=True) from exc
        finally:
            endpoint.outstanding -= 1

    async def wait_for_change(self, timeout_s: float) -> None:
        """Until an endpoint comes back or `timeout_s` passes."""
        self._changed.clear()
        with contextlib.suppress(TimeoutError, asyncio.TimeoutError):  # distinct before 3.11
            await asyncio.wait_for(self._changed.wait(), timeout_s)

    async def close(self) -> None:
        probes = [e._probe for e in self.endpoints if e._probe is not None]
        for task in probes:
            task.cancel()
        await asyncio.gather(*probes, return_exceptions=True)
        for e in self.endpoints:
            await e.transport.close()

    def _take_down(self, endpoint: Endpoint) -> None:
        if not endpoint.up:
            return
        endpoint.up = False
        endpoint._probe = asyncio.create_task(self._probe_until_up(endpoint))

    async def _probe_until_up(self, endpoint: Endpoint) -> None:
        for attempt in itertools.count():
            await asyncio.sleep(self._probe_policy.delay_s(attempt))
            if await endpoint.transport.healthy(HEALTH_TIMEOUT_S):
                endpoint.up, endpoint.untrusted, endpoint._probe = True, False, None
                self._changed.set()
                return
