"""Connection-storm guards: a per-endpoint client cap with a queue, a per-compute connect gate.

The cap keeps client sessions of one endpoint below the compute's
`max_connections`: past it, new sessions queue (first come, first served) up
to a deadline and then get 53300. The gate bounds concurrent connect+login
attempts to one compute, so a herd of 500 clients does not make postgres fork
500 backends at once. The live counts double as the activity report.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator

from proxy.errors import ClientError, Kind
from wakeup.api import ComputeAddress


class ConnectionGuards:
    def __init__(
        self, *, endpoint_cap: int = 90, queue_timeout: float = 5.0, connect_concurrency: int = 32
    ):
        self.endpoint_cap = endpoint_cap
        self.queue_timeout = queue_timeout
        self.connect_concurrency = connect_concurrency
        self._live: dict[str, int] = {}
        self._queues: dict[str, collections.deque[asyncio.Future[None]]] = {}
        self._gates: dict[ComputeAddress, asyncio.Semaphore] = {}
        self.queued_total = 0
        self.refused_total = 0
        # Set when an endpoint goes from no sessions to one: report it right away.
        self.became_busy = asyncio.Event()

    def counts(self) -> dict[str, int]:
        return dict(self._live)

    def live(self, endpoint_id: str) -> int:
        return self._live.get(endpoint_id, 0)

    async def acquire(self, endpoint_id: str) -> None:
        """Take a session slot for the endpoint, queueing up to the deadline."""
        if self._live.get(endpoint_id, 0) < self.endpoint_cap and not self._queues.get(
            endpoint_id
        ):
            self._take(endpoint_id)
            return
        self.queued_total += 1
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = self._queues.setdefault(endpoint_id, collections.deque())
        queue.append(waiter)
        try:
            async with asyncio.timeout(self.queue_timeout):
                await waiter  # release() hands the slot over (already counted)
        except TimeoutError:
            if waiter.done() and not waiter.cancelled():
                return  # the slot arrived just as the deadline did
            self.refused_total += 1
            raise ClientError(
                Kind.TOO_MANY,
                f'too many connections to endpoint "{endpoint_id}" '
                f"(limit {self.endpoint_cap} per proxy)",
                hint="Close idle connections or use a connection pool.",
            ) from None
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release(endpoint_id)  # handed over just as we gave up: pass it on
            raise
        finally:
            with contextlib.suppress(ValueError):
                queue.remove(waiter)
            if not queue:
                self._queues.pop(endpoint_id, None)

    def try_acquire(self, endpoint_id: str) -> bool:
        """Take a slot only if one is free right now (no queue): for work done early."""
        if self._live.get(endpoint_id, 0) < self.endpoint_cap and not self._queues.get(
            endpoint_id
        ):
            self._take(endpoint_id)
            return True
        return False

    def _take(self, endpoint_id: str) -> None:
        count = self._live.get(endpoint_id, 0)
        self._live[endpoint_id] = count + 1
        if count == 0:
            self.became_busy.set()

    def release(self, endpoint_id: str) -> None:
        queue = self._queues.get(endpoint_id)
        while queue:
            waiter = queue.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes on; the count stays
                return
        count = self._live.get(endpoint_id, 0) - 1
        if count > 0:
            self._live[endpoint_id] = count
        else:
            self._live.pop(endpoint_id, None)

    @contextlib.asynccontextmanager
    async def connecting(self, address: ComputeAddress) -> AsyncIterator[None]:
        """Bound concurrent connect+login attempts to one compute."""
        gate = self._gates.get(address)
        if gate is None:
            gate = self._gates[address] = asyncio.Semaphore(self.connect_concurrency)
        # Gates are kept: there are as many as compute addresses (a bounded port range).
        async with gate:
            yield
