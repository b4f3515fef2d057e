"""The warm pool: ready, unassigned computes per tier and size class, kept full in the background.

Pool items are rows in the control DB (computes with no endpoint), so a restarted
pgwake finds them again: running ones are adopted, dead or half-started ones are
removed and replaced. A claim is one SQL statement (see `Store.claim_pool_compute`)
followed by `configure_claimed`, one multi-statement query on the compute that
renames the placeholder role and database and installs the endpoint's verifiers.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from wakeup.computeconfig import PLACEHOLDER, admin_connect, claim_sql, prepare_placeholders
from wakeup.metrics import ControlMetrics
from wakeup.provisioners.base import AdminTarget, Provisioner, ProvisionerError, Tier
from wakeup.secrets import generate_id, generate_password, scram_verifier
from wakeup.sizes import DEFAULT_SIZE, size_class_of
from wakeup.store import PoolItem, Store

log = logging.getLogger(__name__)

DEFAULT_SIZE_CLASS: str = DEFAULT_SIZE


@dataclass(frozen=True)
class PoolKey:
    tier: Tier
    size_class: str = DEFAULT_SIZE_CLASS


@dataclass(frozen=True)
class PoolSettings:
    sizes: Mapping[PoolKey, int] = field(default_factory=dict)
    max_age: float = 3600.0  # pooled computes older than this are recycled
    concurrency: int = 2  # computes being filled at once
    check_interval: float = 2.0  # how often pooled computes are checked for death and age
    fill_retry: float = 5.0  # after a failed fill, wait this long before the next one
    # A claim's refill (a copy, a postgres start, a database) waits this long, so it
    # does not compete for the CPU with the new endpoint's first connection.
    refill_delay: float = 0.25

    @property
    def enabled(self) -> bool:
        return any(n > 0 for n in self.sizes.values())


@dataclass
class PoolStats:
    hits: int = 0
    misses: int = 0
    filled: int = 0
    recycled: int = 0
    died: int = 0
    fill_failures: int = 0


class PoolManager:
    def __init__(
        self,
        store: Store,
        provisioner: Provisioner,
        settings: PoolSettings,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        metrics: ControlMetrics | None = None,
    ):
        self.metrics = metrics
        self.store = store
        self.provisioner = provisioner
        self.settings = settings
        self.clock = clock
        self.stats = PoolStats()
        self.ready: dict[str, PoolKey] = {}  # pooled computes believed alive, by id
        self._filling: dict[str, PoolKey] = {}
        self._admin: dict[str, asyncpg.Connection] = {}  # kept open: a claim costs one query
        self._passwords: dict[str, str] = {}  # never stored: shown once, at the claim
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(max(1, settings.concurrency))
        self._kick = asyncio.Event()
        self._changed = asyncio.Condition()
        self._retry_after: dt.datetime | None = None
        self._claimed_since_check: set[str] = set()
        self._kick_later: asyncio.TimerHandle | None = None
        self._checked_once = False

    # -- what the control plane calls ----------------------------------------------

    def size(self, key: PoolKey) -> int:
        return self.settings.sizes.get(key, 0)

    def ready_count(self, key: PoolKey) -> int:
        return sum(1 for k in self.ready.values() if k == key)

    def notify(self, delay: float = 0.0) -> None:
        """Something was taken or found missing: refill soon, not at the next check."""
        if delay <= 0:
            self._kick.set()
        elif self._kick_later is None or self._kick_later.cancelled():
            self._kick_later = asyncio.get_running_loop().call_later(delay, self._kick.set)

    def claimed(self, compute_id: str) -> str | None:
        """A claim took this compute: count it, refill, and hand over the password
        generated when it was pooled (kept in memory only: None after a restart,
        and the claim installs a new one)."""
        self.ready.pop(compute_id, None)
        self._publish()
        self._claimed_since_check.add(compute_id)
        self.stats.hits += 1
        self.notify(self.settings.refill_delay)
        return self._passwords.pop(compute_id, None)

    async def forget(self, compute_id: str) -> None:
        """A claimed compute turned out unusable (the caller destroys it)."""
        await self._close_admin(compute_id)

    def missed(self) -> None:
        self.stats.misses += 1
        self.notify(self.settings.refill_delay)

    async def configure_claimed(
        self, compute_id: str, target: AdminTarget, *, database: str, owner: str,
        passwords: Mapping[str, str],
    ) -> None:
        """Rename the placeholders (and set `passwords`): one round trip."""
        sql = claim_sql(database=database, owner=owner, passwords=passwords)
        conn = self._admin.pop(compute_id, None)
        if conn is None or conn.is_closed():
            conn = await admin_connect(target)
        try:
            await conn.execute(sql, timeout=10.0)
        finally:
            # Closing waits for the server; the caller need not.
            self._spawn(conn.close(timeout=5.0), f"pool-close:{compute_id}")

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _publish(self) -> None:
        if self.metrics is not None:
            self.metrics.pool_ready.set(len(self.ready))

    async def wait_until(self, predicate: Callable[[], bool], timeout: float) -> None:
        """Wait (on pool changes, not a timer) until `predicate()` holds; TimeoutError after."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(predicate)

    # -- the background loop ----------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                self._kick.clear()
                if self._kick_later is not None:
                    self._kick_later.cancel()
                    self._kick_later = None
                try:
                    await self.reconcile()
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                    log.warning("warm pool check failed: %s", exc)
                except Exception:
                    log.exception("warm pool check failed")
                kicked = asyncio.ensure_future(self._kick.wait())
                try:
                    await asyncio.wait(
                        {stopping, kicked},
                        timeout=self.settings.check_interval,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                finally:
                    kicked.cancel()
        finally:
            stopping.cancel()
            await self.close()

    async def reconcile(self) -> None:
        """Drop dead, old and half-started items; start fills for what is missing."""
        now = self.clock()
        filling_before = set(self._filling)
        self._claimed_since_check.clear()
        alive: dict[str, PoolKey] = {}
        for item in await self.store.pool_items():
            if item.id in self._filling:
                continue
            key = PoolKey(Tier(item.tier), item.size_class)
            if item.state != "pooled":
                # Left half-started by an earlier pgwake process.
                await self._retire(item, "it was never finished")
                continue
            if (now - item.created_at).total_seconds() > self.settings.max_age:
                self.stats.recycled += 1
                await self._retire(item, "it reached the maximum age")
                continue
            if await self.provisioner.status(item.id, key.tier) is None:
                # Stopped with the previous pgwake process (a clean shutdown): its
                # storage is ready, a start is all it needs. Later, not running
                # means it died: replace it.
                if not self._checked_once and await self._restart(item, key):
                    alive[item.id] = key
                    continue
                self.stats.died += 1
                await self._retire(item, "it is not running any more")
                continue
            alive[item.id] = key
        # Fills that finished and claims that happened while we looked.
        for compute_id, key in self.ready.items():
            if compute_id in filling_before:
                alive[compute_id] = key
        for compute_id in self._claimed_since_check:
            alive.pop(compute_id, None)
        async with self._changed:
            self.ready = alive
            self._publish()
            self._changed.notify_all()
        self._checked_once = True
        if self._retry_after is not None and now < self._retry_after:
            return
        for key, want in self.settings.sizes.items():
            have = self.ready_count(key) + sum(1 for k in self._filling.values() if k == key)
            for _ in range(want - have):
                compute_id = generate_id("c-")
                self._filling[compute_id] = key
                self._spawn(self._fill(compute_id, key), f"pool-fill:{compute_id}")

    async def _restart(self, item: PoolItem, key: PoolKey) -> bool:
        try:
            address = await self.provisioner.start(
                item.id, key.tier, size=size_class_of(key.size_class)
            )
        except (OSError, ProvisionerError) as exc:
            log.warning("warm pool: compute %s does not start again: %s", item.id, exc)
            return False
        return await self.store.set_pool_address(item.id, str(address))

    async def _retire(self, item: PoolItem, why: str) -> None:
        if not await self.store.retire_pool_compute(item.id):
            return  # claimed in the meantime: it is an endpoint's compute now
        log.info("warm pool: removing compute %s: %s", item.id, why)
        await self._close_admin(item.id)
        await self.provisioner.destroy(item.id, Tier(item.tier))

    async def _fill(self, compute_id: str, key: PoolKey) -> None:
        conn: asyncpg.Connection | None = None
        try:
            async with self._slots:
                await self.store.insert_pool_compute(compute_id, key.tier.value, key.size_class)
                await self.provisioner.create(compute_id, key.tier)
                # A pooled compute runs with its class's settings: a claim for
                # another size never gets it (claims match tier and size class).
                address = await self.provisioner.start(
                    compute_id, key.tier, size=size_class_of(key.size_class)
                )
                target = self.provisioner.admin_target(compute_id, key.tier)
                conn = await admin_connect(target)
                password = generate_password()
                verifier = scram_verifier(password)
                await prepare_placeholders(conn, verifier)
                await _warm_database(target)
                self._passwords[compute_id] = password
                if not await self.store.mark_pooled(compute_id, str(address), verifier):
                    raise ProvisionerError("the pool item was removed while it started")
            self._admin[compute_id] = conn
            conn = None
            self.stats.filled += 1
            self._retry_after = None
            async with self._changed:
                self.ready[compute_id] = key
                self._publish()
                self._changed.notify_all()
            log.debug("warm pool: compute %s ready at %s", compute_id, address)
        except (OSError, ProvisionerError, asyncpg.PostgresError, asyncpg.InterfaceError,
                TimeoutError) as exc:
            self.stats.fill_failures += 1
            self._retry_after = self.clock() + dt.timedelta(seconds=self.settings.fill_retry)
            log.error("warm pool: could not prepare compute %s: %s", compute_id, exc)
            await self._discard(compute_id, key, conn)
        except BaseException:
            await self._discard(compute_id, key, conn)
            raise
        finally:
            self._filling.pop(compute_id, None)
            if compute_id not in self._admin:
                self._passwords.pop(compute_id, None)

    async def _discard(
        self, compute_id: str, key: PoolKey, conn: asyncpg.Connection | None
    ) -> None:
        with contextlib.suppress(Exception):
            if conn is not None:
                conn.terminate()
            await self.store.retire_pool_compute(compute_id)
            await self.provisioner.destroy(compute_id, key.tier)

    async def _close_admin(self, compute_id: str) -> None:
        self._passwords.pop(compute_id, None)
        conn = self._admin.pop(compute_id, None)
        if conn is not None:
            conn.terminate()

    async def close(self) -> None:
        """Stop filling; pooled computes stay in the control DB (stopped with the rest)."""
        if self._kick_later is not None:
            self._kick_later.cancel()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for compute_id in list(self._admin):
            await self._close_admin(compute_id)


async def _warm_database(target: AdminTarget) -> None:
    """Connect once to the placeholder database: its relation cache file is built now,
    not on the first client's connection (a rename keeps the file, it is per OID)."""
    conn = await asyncpg.connect(
        host=target.host, port=target.port, user=target.user, password=target.password,
        database=PLACEHOLDER,
        timeout=10.0,
    )
    try:
        await conn.fetchval("select count(*) from pg_class")
    finally:
        await conn.close(timeout=5.0)
