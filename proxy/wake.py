"""The wake path: address cache → one wake per endpoint → control API → cache.

Reads like Neon's: look in the cache; if absent, join the endpoint's in-flight
wake or start one; on success cache the address (TTL with jitter so many
endpoints do not expire together).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from proxy.errors import ClientError, Kind
from wakeup.api import ComputeAddress, ControlAPIError, ControlClient

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Woken:
    address: ComputeAddress
    cold_start: str  # warm | resumed | pool_hit | pool_miss | cached
    generation: int


@dataclass
class _Entry:
    value: Woken
    expires: float


class AddressCache:
    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic):
        self.ttl = ttl
        self.clock = clock
        self._entries: dict[str, _Entry] = {}

    def get(self, endpoint_id: str) -> Woken | None:
        entry = self._entries.get(endpoint_id)
        if entry is None:
            return None
        if entry.expires <= self.clock():
            del self._entries[endpoint_id]
            return None
        return entry.value

    def put(self, endpoint_id: str, value: Woken) -> None:
        jitter = random.uniform(0.9, 1.1)
        self._entries[endpoint_id] = _Entry(value, self.clock() + self.ttl * jitter)

    def invalidate(self, endpoint_id: str) -> None:
        self._entries.pop(endpoint_id, None)


class WakeClient:
    def __init__(self, control: ControlClient, cache: AddressCache):
        self.control = control
        self.cache = cache
        self._inflight: dict[str, asyncio.Task[Woken]] = {}
        self.wake_calls = 0

    async def address(self, endpoint_id: str, *, timeout: float) -> Woken:
        cached = self.cache.get(endpoint_id)
        if cached is not None:
            return Woken(cached.address, "cached", cached.generation)
        task = self._inflight.get(endpoint_id)
        if task is None:
            task = asyncio.create_task(self._wake(endpoint_id, timeout), name=f"wake:{endpoint_id}")
            self._inflight[endpoint_id] = task
            task.add_done_callback(lambda _t: self._inflight.pop(endpoint_id, None))
        try:
            # Shielded: one client giving up must not cancel the wake others wait on.
            async with asyncio.timeout(timeout):
                return await asyncio.shield(task)
        except TimeoutError:
            raise ClientError(
                Kind.WAKE,
                f'endpoint "{endpoint_id}" did not wake within {timeout:g} s',
                hint="The database is starting; retry the connection.",
            ) from None

    async def _wake(self, endpoint_id: str, timeout: float) -> Woken:
        self.wake_calls += 1
        try:
            answer = await self.control.wake(endpoint_id, timeout=timeout)
        except ControlAPIError as exc:
            raise control_error(endpoint_id, exc) from exc
        woken = Woken(ComputeAddress.parse(answer.address), answer.cold_start, answer.generation)
        self.cache.put(endpoint_id, woken)
        return woken

    def invalidate(self, endpoint_id: str) -> None:
        self.cache.invalidate(endpoint_id)

    async def close(self) -> None:
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def control_error(endpoint_id: str, exc: ControlAPIError) -> ClientError:
    """Translate a control API answer into what the client should see."""
    if exc.code == "endpoint_not_found":
        return ClientError(Kind.UNKNOWN_ENDPOINT, f'endpoint "{endpoint_id}" does not exist')
    if exc.unavailable:
        log.warning("control API error for %s: %s", endpoint_id, exc)
        return ClientError(
            Kind.CONTROL_PLANE,
            f'could not wake endpoint "{endpoint_id}": the control plane is unavailable',
            hint="This is temporary; retry the connection.",
        )
    log.error("unexpected control API answer for %s: %s", endpoint_id, exc)
    return ClientError(Kind.INTERNAL, f'could not look up endpoint "{endpoint_id}"')
