"""The wake path: cache → per-endpoint lock → cache again → rate limit → control API → cache.

Busy endpoints' addresses are refreshed in the background before they expire,
so an active endpoint's connects never wait on the control API. While the
control API is unreachable, an endpoint's last known address is served stale
(up to `stale_address_max_age`, counted), and dropped by any invalidation.

Reads like Neon's. In this process one task per endpoint does the work and
every session of that endpoint awaits it; across replicas the shared state's
wake lock (with expiry, so a crashed holder does not block anyone) lets one
replica call the control plane while the others wait to be told the address
is cached. Control-plane outages are cached briefly (negative caching) so a
storm of connects does not become a storm of API calls, and every call to the
control plane takes a token from a rate bucket first.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from proxy.errors import ClientError, Kind, control_plane_unavailable
from proxy.settings import ProxySettings
from proxy.shared import CachedAddress, SharedState, jittered
from wakeup.api import ComputeAddress, ControlAPIError, ControlClient

log = logging.getLogger(__name__)

# Refresh-due times kept for at most this many endpoints' addresses (then pruned).
MAX_TRACKED = 10_000
# Waiting for another replica's wake: re-check this often in case its
# announcement was lost (Redis hiccup) or it crashed holding the lock.
WAIT_SLICE = 0.5


@dataclass(frozen=True)
class Woken:
    address: ComputeAddress
    cold_start: str  # warm | resumed | pool_hit | pool_miss | cached | stale
    generation: int
    budget: int | None = None  # client sessions the compute admits, if the control plane says


def _cached(value: CachedAddress) -> Woken:
    return Woken(value.address, "cached", value.generation, value.budget)


class WakeClient:
    def __init__(
        self,
        control: ControlClient,
        shared: SharedState,
        settings: ProxySettings,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.control = control
        self.shared = shared
        self.settings = settings
        self.clock = clock
        self._inflight: dict[str, asyncio.Task[Woken]] = {}
        self._negative: dict[str, tuple[float, ClientError]] = {}
        self._tokens = itertools.count(1)
        self._replica = secrets.token_hex(6)
        self.wake_calls = 0  # control API wake calls made by this replica
        self.rate_limited = 0  # times a wake waited for a rate-bucket token
        self.stale_served = 0  # addresses served past their TTL, control plane unreachable
        self.refreshes = 0  # background refreshes of busy endpoints' addresses
        # endpoint → when its cached address is due a background refresh (a busy
        # endpoint's entry is renewed before it expires, never waited for).
        self._refresh_at: dict[str, float] = {}
        self._refreshing: dict[str, asyncio.Task[None]] = {}

    async def address(self, endpoint_id: str, *, timeout: float) -> Woken:
        cached = await self.shared.get_address(endpoint_id)
        if cached is not None:
            self._maybe_refresh(endpoint_id)
            return _cached(cached)
        negative = self._negative.get(endpoint_id)
        if negative is not None:
            if negative[0] > self.clock():
                stale = self._stale(endpoint_id)
                if stale is not None:
                    return stale
                raise negative[1]
            del self._negative[endpoint_id]
        task = self._inflight.get(endpoint_id)
        if task is None:
            deadline = asyncio.get_running_loop().time() + timeout
            task = asyncio.create_task(
                self._wake(endpoint_id, deadline), name=f"wake:{endpoint_id}"
            )
            self._inflight[endpoint_id] = task
            task.add_done_callback(lambda t: self._wake_done(endpoint_id, t))
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

    def _wake_done(self, endpoint_id: str, task: asyncio.Task[Woken]) -> None:
        self._inflight.pop(endpoint_id, None)
        # Every waiter may have given up (deadline, client gone): read the outcome
        # here so a failed wake is not reported as "exception never retrieved".
        if not task.cancelled():
            task.exception()

    async def _wake(self, endpoint_id: str, deadline: float) -> Woken:
        loop = asyncio.get_running_loop()
        token = f"{self._replica}:{next(self._tokens)}"
        while True:
            woken_event = self.shared.waiter(endpoint_id)
            if await self.shared.try_lock(endpoint_id, token, self.settings.wake_lock_expiry):
                try:
                    cached = await self.shared.get_address(endpoint_id)
                    if cached is not None:
                        return _cached(cached)
                    await self._rate_limit(endpoint_id, deadline)
                    return await self._call_control(endpoint_id, deadline)
                finally:
                    await self.shared.unlock(endpoint_id, token)
            cached = await self.shared.get_address(endpoint_id)
            if cached is not None:
                return _cached(cached)
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError
            try:
                async with asyncio.timeout(min(remaining, WAIT_SLICE)):
                    await woken_event.wait()
            except TimeoutError:
                pass
            cached = await self.shared.get_address(endpoint_id)
            if cached is not None:
                return _cached(cached)

    async def _rate_limit(self, endpoint_id: str, deadline: float) -> None:
        """Pace control-plane calls: per endpoint, and for the whole fleet of proxies."""
        s = self.settings
        loop = asyncio.get_running_loop()
        buckets = (
            (f"wake:{endpoint_id}", s.wake_rate_per_endpoint, s.wake_burst_per_endpoint),
            ("control", s.control_rate, s.control_burst),
        )
        for bucket, rate, burst in buckets:
            while (wait := await self.shared.take_token(bucket, rate, burst)) > 0:
                self.rate_limited += 1
                if loop.time() + wait > deadline:
                    raise ClientError(
                        Kind.WAKE,
                        f'too many wake requests for endpoint "{endpoint_id}"',
                        hint="Retry the connection.",
                    )
                await asyncio.sleep(wait)  # pacing by design: the bucket refills with time

    async def _call_control(self, endpoint_id: str, deadline: float) -> Woken:
        self.wake_calls += 1
        remaining = max(0.001, deadline - asyncio.get_running_loop().time())
        try:
            answer = await self.control.wake(endpoint_id, timeout=remaining)
        except ControlAPIError as exc:
            error = control_error(endpoint_id, exc)
            if exc.unavailable and self.settings.negative_cache_ttl > 0:
                self._negative[endpoint_id] = (
                    self.clock() + self.settings.negative_cache_ttl, error
                )
            if error.kind is Kind.CONTROL_PLANE:
                stale = self._stale(endpoint_id)
                if stale is not None:
                    return stale
            raise error from exc
        woken = Woken(ComputeAddress.parse(answer.address), answer.cold_start, answer.generation,
                      answer.connection_budget)
        await self._put(endpoint_id, woken.address, woken.generation, woken.budget)
        return woken

    async def _put(
        self, endpoint_id: str, address: ComputeAddress, generation: int,
        budget: int | None = None,
    ) -> None:
        ttl = jittered(self.settings.address_cache_ttl)
        await self.shared.put_address(
            endpoint_id, CachedAddress(address, generation, budget), ttl
        )
        self._refresh_at[endpoint_id] = self.clock() + ttl * self.settings.address_refresh_after

    def _stale(self, endpoint_id: str) -> Woken | None:
        """The last address this proxy knew, when the control plane cannot be asked."""
        value = self.shared.stale_address(endpoint_id, self.settings.stale_address_max_age)
        if value is None:
            return None
        self.stale_served += 1
        log.warning("control plane unreachable: serving %s's last known address", endpoint_id)
        return Woken(value.address, "stale", value.generation, value.budget)

    def _maybe_refresh(self, endpoint_id: str) -> None:
        """Renew a busy endpoint's address in the background once it is due."""
        now = self.clock()
        due = self._refresh_at.get(endpoint_id)
        if due is None:
            # Cached by another replica: count its age from now.
            if len(self._refresh_at) > 4 * MAX_TRACKED:
                self._refresh_at = {k: v for k, v in self._refresh_at.items() if v > now}
            self._refresh_at[endpoint_id] = now + (
                self.settings.address_cache_ttl * self.settings.address_refresh_after
            )
            return
        if due > now or endpoint_id in self._refreshing or endpoint_id in self._inflight:
            return
        task = asyncio.create_task(self._refresh(endpoint_id), name=f"refresh:{endpoint_id}")
        self._refreshing[endpoint_id] = task
        task.add_done_callback(lambda _: self._refreshing.pop(endpoint_id, None))

    async def _refresh(self, endpoint_id: str) -> None:
        deadline = asyncio.get_running_loop().time() + self.settings.control_timeout
        try:
            await self._rate_limit(endpoint_id, deadline)
            self.refreshes += 1
            await self._call_control(endpoint_id, deadline)
        except (ClientError, TimeoutError) as exc:
            # The entry stays until its TTL; the next connect after that wakes as usual.
            log.info("refresh of %s's address failed: %s", endpoint_id, exc)

    async def prime(
        self, endpoint_id: str, address: ComputeAddress, generation: int,
        budget: int | None = None,
    ) -> None:
        """An address the control plane pushed (a new endpoint): no wake call on first
        connect."""
        await self._put(endpoint_id, address, generation, budget)

    async def invalidate(self, endpoint_id: str) -> None:
        self._refresh_at.pop(endpoint_id, None)
        await self.shared.invalidate(endpoint_id)

    async def starting(self, endpoint_id: str, timeout: float) -> bool:
        """Is a compute really being started for the endpoint (not a slow lookup of an
        active one)? Asked only when a wake is slow, to decide on the NOTICE."""
        try:
            endpoint = await self.control.get_endpoint(endpoint_id, timeout=timeout)
        except ControlAPIError:
            return False
        return endpoint.state in ("suspended", "suspending", "starting", "handoff")


    async def close(self) -> None:
        tasks = [*self._inflight.values(), *self._refreshing.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def control_error(endpoint_id: str, exc: ControlAPIError) -> ClientError:
    """Translate a control API answer into what the client should see."""
    if exc.code == "endpoint_not_found":
        return ClientError(Kind.UNKNOWN_ENDPOINT, f'endpoint "{endpoint_id}" does not exist')
    if exc.code in ("wake_failed", "provisioner_error"):
        # The control plane answered: it is the compute that did not start.
        log.warning("wake of %s failed: %s", endpoint_id, exc)
        return ClientError(
            Kind.WAKE,
            f'could not start the database of endpoint "{endpoint_id}"',
            hint="Retry the connection.",
        )
    if exc.unavailable:
        log.warning("control API error for %s: %s", endpoint_id, exc)
        return control_plane_unavailable(endpoint_id)
    log.error("unexpected control API answer for %s: %s", endpoint_id, exc)
    return ClientError(Kind.INTERNAL, f'could not look up endpoint "{endpoint_id}"')
