"""The control plane's operations: create, wake, suspend, delete endpoints; recover at start."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import asyncpg
from prometheus_client import CollectorRegistry

from wakeup.computeconfig import apply_config, count_client_connections
from wakeup.handoff import GenerationHandoff, HandoffResult
from wakeup.metrics import ControlMetrics
from wakeup.pool import DEFAULT_SIZE_CLASS, PoolKey, PoolManager
from wakeup.provisioners.base import ComputeAddress, Provisioner, ProvisionerError, Tier
from wakeup.secrets import generate_id, generate_password, scram_verifier
from wakeup.sizes import SizeClass, size_class_of
from wakeup.state import ColdStart, State
from wakeup.store import EndpointRow, Store

log = logging.getLogger(__name__)

DEFAULT_ROLE = "app"
DEFAULT_DATABASE = "main"


class EndpointNotFound(LookupError):
    def __init__(self, endpoint_id: str):
        super().__init__(f"endpoint {endpoint_id} not found")
        self.endpoint_id = endpoint_id


class WakeFailed(RuntimeError):
    """The compute could not be started; retryable from the client's point of view."""


@dataclass(frozen=True)
class WakeResult:
    address: ComputeAddress
    generation: int
    cold_start: ColdStart
    duration: float
    connection_budget: int | None = None  # client sessions the compute admits


@dataclass(frozen=True)
class Created:
    endpoint: EndpointRow
    role: str
    password: str
    cold_start: ColdStart
    duration: float


@dataclass(frozen=True)
class EndpointReady:
    """What a proxy needs to let a client in without asking the control API: pushed
    to the proxies' caches when an endpoint is created (or its pooled compute claimed)."""

    endpoint_id: str
    role: str
    verifier: str
    address: ComputeAddress
    generation: int
    # Client sessions the compute admits: a new endpoint's first sessions keep to the
    # budget as those after a wake answer do.
    connection_budget: int | None = None


@dataclass(frozen=True)
class EndpointWoken:
    """A compute a start has just made ready (config applied): pushed to the proxies while
    the control DB records the start, so the proxy waiting on the wake lets its client in
    without waiting for that record and for the control API's answer to travel back."""

    endpoint_id: str
    address: ComputeAddress
    generation: int
    budget: int  # client sessions the compute admits, as in the wake answer


@dataclass(frozen=True)
class ControlSettings:
    idle_timeout: float = 300.0
    ephemeral_ttl: float = 24 * 3600.0
    suspend_grace: float = 5.0  # smart shutdown this long on suspend, then fast
    # A resize waits this long for pinned sessions before the old generation's fast
    # shutdown ends them (57P01). Below the proxies' wake budget (20 s by default),
    # so connects queued behind the handoff are served, not timed out.
    drain_timeout: float = 10.0


class ControlPlane:
    def __init__(
        self,
        store: Store,
        provisioner: Provisioner,
        settings: ControlSettings,
        clock: Callable[[], float] = time.monotonic,
        metrics: ControlMetrics | None = None,
    ):
        self.metrics = metrics or ControlMetrics(CollectorRegistry())
        self.store = store
        self.provisioner = provisioner
        self.settings = settings
        self.clock = clock
        # One lifecycle operation per endpoint at a time: a wake that arrives
        # while a suspend runs waits for it and then starts the compute again.
        self._locks: dict[str, asyncio.Lock] = {}
        self.config_applies = 0  # how often config SQL ran on a compute (tests, metrics)
        self.pool: PoolManager | None = None  # the warm pool, when one is configured
        # Proxies' activity reports: proxy id → (expires, live sessions per endpoint).
        self._activity: dict[str, tuple[float, dict[str, int]]] = {}
        # Proxies' pinned-session reports: proxy id → (expires, received, pinned per
        # endpoint). Only proxies that track pinning send them (Activity.pinned).
        self._pinned: dict[str, tuple[float, float, dict[str, int]]] = {}
        # proxy id → (expires, parked per endpoint, parkable per endpoint).
        self._movable: dict[str, tuple[float, dict[str, int], dict[str, int]]] = {}
        # Per proxy that says so: sessions with a backend that cannot move yet.
        self._unmovable: dict[str, tuple[float, dict[str, int]]] = {}
        self._activity_event = asyncio.Event()
        # Endpoints whose handoff has begun: no wake hands out their address, even
        # before the control DB says `handoff` (see wakeup/handoff.py, freeze).
        self.frozen: set[str] = set()
        # Endpoints in a generation handoff, from freeze to unfreeze: proxies learn it
        # from their activity answers and tell the sessions a resize ends why.
        self.resizing: set[str] = set()
        # proxy id → (expires, its report interval): how late news of activity can be.
        self._report_lag: dict[str, tuple[float, float]] = {}
        # Called with an endpoint id when its address stops being valid (suspend,
        # delete): the Redis publisher that tells every proxy to drop its cache.
        self.invalidation_listeners: list[Callable[[str], Awaitable[None]]] = []
        # Called when a new endpoint can take connections: the in-process proxy's
        # caches (`pgwake up`) and the shared state (Redis) are primed from it, so a
        # new endpoint's first connect makes no control-API call.
        self.ready_listeners: list[Callable[[EndpointReady], Awaitable[None]]] = []
        # Called when a start has made an endpoint's compute ready, before the control DB
        # records it: the in-process proxy's cache (`pgwake up`), Redis for the others.
        self.woken_listeners: list[Callable[[EndpointWoken], Awaitable[None]]] = []
        # Called with (endpoint, role, verifier) when a password changes: a proxy that
        # was handed the old verifier at creation must not keep checking against it.
        self.verifier_listeners: list[Callable[[str, str, str], Awaitable[None]]] = []
        # Recent invalidations (clock, endpoint), told to each proxy in the answer to its
        # next activity report: how a proxy without Redis learns of suspends.
        self._invalidated: collections.deque[tuple[float, str]] = collections.deque(
            maxlen=10_000
        )
        self._reported_at: dict[str, float] = {}  # proxy id → its previous report

    def _lock(self, endpoint_id: str) -> asyncio.Lock:
        lock = self._locks.get(endpoint_id)
        if lock is None:
            lock = self._locks[endpoint_id] = asyncio.Lock()
        return lock

    async def _endpoint(self, endpoint_id: str) -> EndpointRow:
        ep = await self.store.get_endpoint(endpoint_id)
        if ep is None:
            raise EndpointNotFound(endpoint_id)
        return ep

    # -- startup -------------------------------------------------------------------

    async def recover(self) -> None:
        """After a restart (clean or a crash): adopt live computes, settle the rest."""
        known = await self.store.all_compute_ids()
        for compute in await self.store.running_computes():
            tier = Tier(compute.tier)
            address = await self.provisioner.status(compute.id, tier)
            if address is None and compute.endpoint_id is not None:
                log.info("compute %s is not running any more; endpoint suspended", compute.id)
                # One still starting or shutting down (no one's any more) must not
                # outlive this: the next wake starts a postmaster on its storage.
                await self.provisioner.stop_orphan(compute.id, tier)
                await self.store.mark_suspended(compute.endpoint_id, compute.id)
        for endpoint in await self.store.list_endpoints():
            if endpoint.state is State.HANDOFF and endpoint.compute_id is not None:
                # A handoff was cut short: whichever generation runs (the old one in
                # its smart shutdown, or a new one never recorded) is stopped, and
                # the next wake starts the endpoint at its recorded size.
                await self.provisioner.stop(endpoint.compute_id)
                # Not adopted if it was shutting down: stopped through its postmaster.pid.
                await self.provisioner.stop_orphan(endpoint.compute_id, Tier(endpoint.tier))
                await self.store.mark_suspended(endpoint.id, endpoint.compute_id)
                continue
            if endpoint.state in (State.STARTING, State.SUSPENDING, State.HANDOFF):
                running = endpoint.compute_id is not None and (
                    await self.provisioner.status(endpoint.compute_id, Tier(endpoint.tier))
                )
                if not running:
                    await self.store.mark_suspended(endpoint.id, endpoint.compute_id)
        for tier in Tier:
            for compute_id in self.provisioner.known_computes(tier):
                if compute_id not in known:
                    await self.provisioner.stop_orphan(compute_id, tier)

    # -- operations ----------------------------------------------------------------

    async def create_endpoint(
        self, name: str | None, tier: Tier, size_class: str = DEFAULT_SIZE_CLASS
    ) -> Created:
        started = self.clock()
        endpoint_id = generate_id("ep-")
        compute_id = generate_id("c-")
        password = generate_password()
        expires = (
            dt.datetime.now(dt.UTC) + dt.timedelta(seconds=self.settings.ephemeral_ttl)
            if tier is Tier.EPHEMERAL
            else None
        )
        pool = self.pool
        if pool is not None and pool.size(PoolKey(tier, size_class)) > 0:
            claimed = await self._create_from_pool(
                endpoint_id, name or endpoint_id, tier, size_class, expires
            )
            if claimed is not None:
                self.metrics.pool_claims.labels(ColdStart.POOL_HIT.value).inc()
                endpoint, pooled_password = claimed
                await self._announce(endpoint)
                return Created(
                    endpoint, DEFAULT_ROLE, pooled_password, ColdStart.POOL_HIT,
                    self.clock() - started,
                )
            pool.missed()
            self.metrics.pool_claims.labels(ColdStart.POOL_MISS.value).inc()
        await self.store.insert_endpoint(
            endpoint_id=endpoint_id,
            name=name or endpoint_id,
            tier=tier.value,
            database=DEFAULT_DATABASE,
            role=DEFAULT_ROLE,
            verifier=scram_verifier(password),
            compute_id=compute_id,
            expires_at=expires,
            size=size_class,
        )
        async with self._lock(endpoint_id):
            try:
                await self.provisioner.create(compute_id, tier)
                endpoint = await self._start(await self._endpoint(endpoint_id), counted=True)
            except BaseException:
                await self.store.mark_deleted(endpoint_id)
                await self.provisioner.destroy(compute_id, tier)
                raise
        await self._announce(endpoint)
        return Created(
            endpoint, DEFAULT_ROLE, password, ColdStart.POOL_MISS, self.clock() - started
        )

    async def _create_from_pool(
        self,
        endpoint_id: str,
        name: str,
        tier: Tier,
        size_class: str,
        expires: dt.datetime | None,
    ) -> tuple[EndpointRow, str] | None:
        """Claim a pooled compute (one statement) and give it the endpoint's config.

        Returns the endpoint and its owner's password; None when the pool is empty
        or the claimed compute turned out broken (it is removed), and the caller
        then creates on demand.
        """
        assert self.pool is not None
        # Held from before the endpoint row exists: a wake that finds the new row
        # waits until the compute has its config.
        async with self._lock(endpoint_id):
            compute = await self.store.claim_pool_compute(
                endpoint_id=endpoint_id,
                name=name,
                tier=tier.value,
                size_class=size_class,
                database=DEFAULT_DATABASE,
                role=DEFAULT_ROLE,
                expires_at=expires,
            )
            if compute is None:
                return None
            password = self.pool.claimed(compute.id)
            passwords: dict[str, str] = {}
            try:
                if password is None:
                    # Pooled before a restart of pgwake: its password is not known.
                    password = generate_password()
                    passwords[DEFAULT_ROLE] = scram_verifier(password)
                    await self.store.replace_verifier(
                        endpoint_id, DEFAULT_ROLE, passwords[DEFAULT_ROLE]
                    )
                await self.pool.configure_claimed(
                    compute.id,
                    self.provisioner.admin_target(compute.id, tier),
                    database=DEFAULT_DATABASE,
                    owner=DEFAULT_ROLE,
                    passwords=passwords,
                )
                self.config_applies += 1
                endpoint = await self.store.finish_claim(
                    # A new endpoint is at config version 1 (the column default).
                    endpoint_id, compute.id, compute.address, config_version=1
                )
                return endpoint, password
            except (ProvisionerError, OSError, TimeoutError, asyncpg.PostgresError,
                    asyncpg.InterfaceError) as exc:
                log.error("claimed pool compute %s is unusable: %s", compute.id, exc)
                await self._discard_claim(endpoint_id, compute.id, tier)
                return None
            except BaseException:
                await self._discard_claim(endpoint_id, compute.id, tier)
                raise

    async def _discard_claim(self, endpoint_id: str, compute_id: str, tier: Tier) -> None:
        assert self.pool is not None
        await self.pool.forget(compute_id)
        await self.store.mark_deleted(endpoint_id)
        await self.provisioner.destroy(compute_id, tier)

    async def get(self, endpoint_id: str) -> EndpointRow:
        return await self._endpoint(endpoint_id)

    async def settled(self, endpoint_id: str) -> None:
        """Wait until the lifecycle operation running on the endpoint (if any) is over."""
        async with self._lock(endpoint_id):
            pass

    async def list(self) -> list[EndpointRow]:
        return await self.store.list_endpoints()

    async def verifier(self, endpoint_id: str, role: str) -> str | None:
        await self._endpoint(endpoint_id)
        return await self.store.get_verifier(endpoint_id, role)

    async def set_password(self, endpoint_id: str, role: str, password: str) -> int:
        async with self._lock(endpoint_id):
            endpoint = await self._endpoint(endpoint_id)
            verifier = scram_verifier(password)
            version = await self.store.set_verifier(endpoint_id, role, verifier)
            for listener in self.verifier_listeners:
                try:
                    await listener(endpoint_id, role, verifier)
                except Exception as exc:  # the proxy still refetches after a failed login
                    log.warning("new verifier of %s not pushed: %r", endpoint_id, exc)
            if endpoint.state is State.ACTIVE:
                await self._apply_config_if_changed(await self._endpoint(endpoint_id))
            return version

    async def wake(self, endpoint_id: str) -> WakeResult:
        started = self.clock()
        endpoint = await self._endpoint(endpoint_id)
        warm = await self._warm_address(endpoint)
        if warm is not None:
            # A wake asked for is activity: the idle clock starts again.
            await self.store.touch(endpoint_id)
            return WakeResult(warm, endpoint.generation, ColdStart.WARM, self.clock() - started,
                              self._budget(endpoint))
        async with self._lock(endpoint_id):
            endpoint = await self._endpoint(endpoint_id)
            warm = await self._warm_address(endpoint)
            if warm is not None:
                # Someone else's wake finished while we queued for the lock.
                await self.store.touch(endpoint_id)
                return WakeResult(
                    warm, endpoint.generation, ColdStart.WARM, self.clock() - started,
                    self._budget(endpoint),
                )
            endpoint = await self._start(endpoint, counted=True)
            assert endpoint.address is not None
            duration = self.clock() - started
            self.metrics.wake_duration.labels(ColdStart.RESUMED.value).observe(duration)
            return WakeResult(
                ComputeAddress.parse(endpoint.address),
                endpoint.generation,
                ColdStart.RESUMED,
                duration,
                self._budget(endpoint),
            )

    def _budget(self, endpoint: EndpointRow) -> int:
        return self.provisioner.connection_budget(size_class_of(endpoint.size))

    async def _warm_address(self, endpoint: EndpointRow) -> ComputeAddress | None:
        if endpoint.state is not State.ACTIVE or endpoint.compute_id is None:
            return None
        if endpoint.id in self.frozen:
            return None  # a handoff is freezing it: wait for the new generation
        return await self.provisioner.status(endpoint.compute_id, Tier(endpoint.tier))

    async def _start(self, endpoint: EndpointRow, *, counted: bool) -> EndpointRow:
        """Start the endpoint's compute; the caller holds the endpoint's lock.

        Most of a wake is the postmaster booting, with nothing for the control plane
        to do, so the control DB's share that needs no postmaster (STARTING, the
        config version the compute has applied) runs meanwhile; only the record of
        the address waits for it to be ready.
        """
        assert endpoint.compute_id is not None
        compute_id = endpoint.compute_id
        phase = self.metrics.wake_phase
        preparing = asyncio.ensure_future(self._prepare_start(endpoint))
        starting = asyncio.ensure_future(self.provisioner.start(
            compute_id, Tier(endpoint.tier), size=size_class_of(endpoint.size)
        ))
        try:
            with phase.labels("start").time():
                address, applied = await asyncio.gather(starting, preparing)
            with phase.labels("config").time():
                if applied != endpoint.config_version:
                    await self._apply_config(endpoint)
        except (ProvisionerError, OSError, asyncpg.PostgresError) as exc:
            log.error("starting compute for %s failed: %s", endpoint.id, exc)
            # Both settled first: STARTING lands before the failure's record, and a compute
            # that went on starting (the control DB failed) is stopped, not left running.
            await asyncio.wait({preparing, starting})
            await self.provisioner.stop(compute_id)
            await self.store.mark_suspended(endpoint.id, compute_id)
            raise WakeFailed(f"could not start the compute of endpoint {endpoint.id}") from exc
        woken = EndpointWoken(endpoint.id, address, endpoint.generation, self._budget(endpoint))
        with phase.labels("record").time():
            # The lock stays held until the record is in, so whatever comes next for the
            # endpoint (a suspend, another wake) sees it active.
            recorded, _ = await asyncio.gather(
                self.store.mark_started(endpoint.id, compute_id, str(address), counted=counted),
                self._tell_woken(woken),
            )
        return recorded

    async def _tell_woken(self, woken: EndpointWoken) -> None:
        for listener in self.woken_listeners:
            try:
                await listener(woken)
            except Exception as exc:  # the proxy that asked still gets the API's answer
                log.warning("wake of %s not pushed to proxies: %r", woken.endpoint_id, exc)

    async def _prepare_start(self, endpoint: EndpointRow) -> int | None:
        """What a start records and reads before it needs the postmaster: the STARTING
        state, and the config version the compute has applied (None: none)."""
        assert endpoint.compute_id is not None
        await self.store.set_state(endpoint.id, State.STARTING)
        compute = await self.store.get_compute(endpoint.compute_id)
        return None if compute is None else compute.applied_config_version

    async def apply_config_if_changed(self, endpoint: EndpointRow) -> None:
        await self._apply_config_if_changed(endpoint)

    async def _apply_config_if_changed(self, endpoint: EndpointRow) -> None:
        assert endpoint.compute_id is not None
        compute = await self.store.get_compute(endpoint.compute_id)
        if compute is not None and compute.applied_config_version == endpoint.config_version:
            return
        await self._apply_config(endpoint)

    async def _apply_config(self, endpoint: EndpointRow) -> None:
        assert endpoint.compute_id is not None
        await apply_config(
            self.provisioner.admin_target(endpoint.compute_id, Tier(endpoint.tier)),
            database=endpoint.database,
            owner=endpoint.owner_role,
            roles=await self.store.list_roles(endpoint.id),
        )
        self.config_applies += 1
        await self.store.set_applied_config(endpoint.compute_id, endpoint.config_version)

    async def suspend(
        self, endpoint_id: str, *, only_if_idle_since: float | None = None,
        grace: float | None = None,
    ) -> bool:
        """Stop the compute; storage stays. False if there was nothing to do.

        For `grace` seconds (default `suspend_grace`) the shutdown is *smart*:
        running sessions finish their work while new connects get 57P03, which
        proxies answer by waking again (queued behind this lock); then fast.
        """
        grace = self.settings.suspend_grace if grace is None else grace
        async with self._lock(endpoint_id):
            endpoint = await self._endpoint(endpoint_id)
            if endpoint.state is not State.ACTIVE or endpoint.compute_id is None:
                return False
            if only_if_idle_since is not None and (
                endpoint.last_active.timestamp() > only_if_idle_since
            ):
                return False  # a wake or a session arrived since the idle check
            if only_if_idle_since is not None:
                # Sessions the proxies can park do not hold the compute (see the janitor).
                parkable = self.reported_parkable(endpoint_id)
                if self.reported_connections(endpoint_id) > parkable or (
                    (await self.connection_count(endpoint) or 0) > parkable
                ):
                    return False
            await self.store.set_state(endpoint_id, State.SUSPENDING)
            await self._invalidate(endpoint_id)
            try:
                await self.provisioner.stop(endpoint.compute_id, smart=grace)
            finally:
                await self.store.mark_suspended(endpoint_id, endpoint.compute_id)
            log.info("endpoint %s suspended", endpoint_id)
            return True

    async def resize(
        self, endpoint_id: str, size: SizeClass, *, drain_timeout: float | None = None
    ) -> HandoffResult:
        """Move the endpoint to another size class by a generation handoff.

        An active endpoint goes through freeze, drain, stop, start, unfreeze (see
        wakeup/handoff.py) under its lifecycle lock, so wakes, suspends and deletes
        wait for it and there is never a second postmaster on its storage. A
        suspended endpoint only records the size: its next wake starts it so.
        """
        drain = self.settings.drain_timeout if drain_timeout is None else drain_timeout
        started = self.clock()
        async with self._lock(endpoint_id):
            endpoint = await self._endpoint(endpoint_id)
            if endpoint.size == size.name:
                # Already there: nothing to hand off, no new generation.
                return HandoffResult(endpoint, endpoint.size, {}, self.clock() - started, 0)
            if endpoint.state is State.ACTIVE and endpoint.compute_id is not None:
                handoff = GenerationHandoff(self, endpoint, size, drain)
                self.resizing.add(endpoint_id)
                try:
                    return await handoff.run()
                finally:
                    self.resizing.discard(endpoint_id)
            # Not running (suspended, or a start that failed): no session to move.
            previous = endpoint.size
            endpoint = await self.store.commit_generation(endpoint_id, size.name)
            return HandoffResult(endpoint, previous, {}, self.clock() - started, 0)

    async def delete(self, endpoint_id: str) -> None:
        async with self._lock(endpoint_id):
            endpoint = await self._endpoint(endpoint_id)
            await self.store.mark_deleted(endpoint_id)
            await self._invalidate(endpoint_id)
            if endpoint.compute_id is not None:
                await self.provisioner.destroy(endpoint.compute_id, Tier(endpoint.tier))
        self._locks.pop(endpoint_id, None)

    async def invalidate(self, endpoint_id: str) -> None:
        await self._invalidate(endpoint_id)

    async def _announce(self, endpoint: EndpointRow) -> None:
        if not self.ready_listeners or endpoint.address is None:
            return
        verifier = await self.store.get_verifier(endpoint.id, endpoint.owner_role)
        if verifier is None:
            return
        ready = EndpointReady(
            endpoint.id, endpoint.owner_role, verifier,
            ComputeAddress.parse(endpoint.address), endpoint.generation,
            self._budget(endpoint),
        )
        for listener in self.ready_listeners:
            try:
                await listener(ready)
            except Exception as exc:  # a missed announcement only costs one API call
                log.warning("endpoint %s not announced to proxies: %r", endpoint.id, exc)

    async def _invalidate(self, endpoint_id: str) -> None:
        self._invalidated.append((self.clock(), endpoint_id))
        for listener in self.invalidation_listeners:
            try:
                await listener(endpoint_id)
            except Exception as exc:  # a missed invalidation only costs a retry
                log.warning("invalidation of %s not published: %r", endpoint_id, exc)

    async def record_activity(
        self, proxy_id: str, connections: dict[str, int], ttl: float,
        *, last_active: dict[str, float] | None = None, interval: float = 0.0,
        pinned: dict[str, int] | None = None, parked: dict[str, int] | None = None,
        parkable: dict[str, int] | None = None, unmovable: dict[str, int] | None = None,
    ) -> dict[str, float]:
        """Record a proxy's report; answer with the endpoints whose addresses became
        invalid since its previous one (endpoint → seconds ago)."""
        now = self.clock()
        since = self._reported_at.get(proxy_id)
        invalidated: dict[str, float] = {}
        if since is not None:
            for at, endpoint_id in reversed(self._invalidated):
                if at < since - 1.0:  # a second of overlap: a report may cross a suspend
                    break
                invalidated.setdefault(endpoint_id, now - at)
        expires = now + max(0.0, min(ttl, 60.0))
        self._activity = {k: v for k, v in self._activity.items() if v[0] > now}
        self._activity[proxy_id] = (expires, dict(connections))
        self._report_lag = {k: v for k, v in self._report_lag.items() if v[0] > now}
        self._report_lag[proxy_id] = (expires, max(0.0, min(interval, 60.0)))
        self._reported_at = {k: v for k, v in self._reported_at.items() if v > now - 60.0}
        self._reported_at[proxy_id] = now
        self._pinned = {k: v for k, v in self._pinned.items() if v[0] > now}
        if pinned is not None:
            self._pinned[proxy_id] = (expires, now, dict(pinned))
        self._movable = {k: v for k, v in self._movable.items() if v[0] > now}
        self._movable[proxy_id] = (expires, dict(parked or {}), dict(parkable or {}))
        self._unmovable = {k: v for k, v in self._unmovable.items() if v[0] > now}
        if unmovable is not None:
            self._unmovable[proxy_id] = (expires, dict(unmovable))
        else:
            self._unmovable.pop(proxy_id, None)
        # Wake a handoff's drain that waits for pinned sessions to go.
        self._activity_event.set()
        self._activity_event = asyncio.Event()
        # Sessions that came and went between two reports still moved the idle clock.
        await self.store.touch_many(last_active or {})
        return invalidated

    async def activity_changed(self, timeout: float) -> None:
        """Wait for the next activity report, at most `timeout` seconds."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._activity_event.wait()

    def reported_parked(self, endpoint_id: str) -> int:
        """Sessions the proxies hold for the endpoint without a backend."""
        now = self.clock()
        return sum(p.get(endpoint_id, 0) for exp, p, _ in self._movable.values() if exp > now)

    def reported_parkable(self, endpoint_id: str) -> int:
        """Of the reported connections, idle sessions the proxies can move: an idle
        suspend parks them, so they do not keep the compute awake."""
        now = self.clock()
        return sum(p.get(endpoint_id, 0) for exp, _, p in self._movable.values() if exp > now)

    def pinned_sessions(self, endpoint_id: str) -> int:
        """Pinned sessions on the endpoint, summed over proxies' unexpired reports."""
        now = self.clock()
        return sum(
            pinned.get(endpoint_id, 0)
            for expires, _, pinned in self._pinned.values()
            if expires > now
        )

    def reported_unmovable(self, endpoint_id: str, *, since: float) -> int:
        """Sessions on the endpoint that cannot move to another backend yet, according
        to the proxies that track them: pinned ones, and attached ones the proxy does
        not (yet) know to be parkable (busy, or not yet asked of the compute). A
        handoff's drain waits for this to reach 0: then stopping the old generation
        parks every session, and each re-attaches on its next message.

        A proxy whose last report predates `since` (the freeze) and that had sessions
        on the endpoint counts as at least one: it has not yet said what they hold now.
        """
        now = self.clock()
        total = 0
        for proxy_id, (expires, received, pinned) in self._pinned.items():
            if expires <= now:
                continue
            activity = self._activity.get(proxy_id)
            connections = activity[1].get(endpoint_id, 0) if activity is not None else 0
            movable = self._movable.get(proxy_id)
            parkable = movable[2].get(endpoint_id, 0) if movable is not None else 0
            said = self._unmovable.get(proxy_id)
            if said is not None:
                # Counted by the proxy over sessions with a backend: one still in its
                # connect path (waiting for the frozen endpoint's wake) has nothing
                # on the old generation to move.
                count = max(pinned.get(endpoint_id, 0), said[1].get(endpoint_id, 0))
            else:
                count = max(pinned.get(endpoint_id, 0), connections - parkable)
            if received < since:
                if connections > 0:
                    count = max(count, 1)
            total += count
        return total

    def activity_lag(self) -> float:
        """How long a proxy may sit on news of activity (its report interval)."""
        now = self.clock()
        return max((lag for expires, lag in self._report_lag.values() if expires > now),
                   default=0.0)

    def reported_connections(self, endpoint_id: str) -> int:
        """Live client sessions for the endpoint, summed over proxies' unexpired reports."""
        now = self.clock()
        return sum(
            counts.get(endpoint_id, 0)
            for expires, counts in self._activity.values()
            if expires > now
        )

    async def connection_count(self, endpoint: EndpointRow) -> int | None:
        if endpoint.compute_id is None or not self.provisioner.is_running(endpoint.compute_id):
            return None
        try:
            return await count_client_connections(
                self.provisioner.admin_target(endpoint.compute_id, Tier(endpoint.tier))
            )
        except (TimeoutError, OSError, ProvisionerError, asyncpg.PostgresError) as exc:
            log.warning("cannot count connections of %s: %s", endpoint.id, exc)
            return None

    async def close(self) -> None:
        if self.provisioner.outlives_control_plane:
            # Pods keep serving their sessions; the next control plane adopts them.
            await self.provisioner.close()
            return
        for endpoint in await self.store.list_endpoints():
            if endpoint.state is State.ACTIVE and endpoint.compute_id is not None:
                await self.suspend(endpoint.id, grace=0.0)  # shutting down: fast
        await self.provisioner.close()
