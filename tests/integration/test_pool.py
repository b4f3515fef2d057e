"""Instant databases: the warm pool, config applied only when changed, ephemeral expiry."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import shutil
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest

from pgwake.up import Up
from tests.helpers import make_data_dir, running_up, up_settings
from wakeup.api import ControlAPIError, ControlClient, CreatedEndpoint
from wakeup.control import ControlPlane
from wakeup.pool import PoolKey, PoolManager
from wakeup.provisioners.base import Tier
from wakeup.provisioners.process import read_postmaster_pid

POOL_SIZE = 2
DURABLE = PoolKey(Tier.DURABLE)


@pytest.fixture(scope="module")
async def pool_stack(pg_bin: Path) -> AsyncIterator[Up]:
    base = 40000 + (os.getpid() % 200) * 50  # apart from the session stack
    async with running_up(
        "pgwake-pool-", pg_bin, pool_size=POOL_SIZE, pool_check_interval=0.2,
        ephemeral_ttl=2.0, port_range=(base, base + 24),
    ) as up:
        yield up


def parts(up: Up) -> tuple[ControlClient, ControlPlane, PoolManager]:
    assert up.client is not None and up.control is not None
    assert up.control.control is not None and up.control.pool is not None
    return up.client, up.control.control, up.control.pool


async def full(pool: PoolManager, timeout: float = 60.0) -> None:
    await pool.wait_until(lambda: pool.ready_count(DURABLE) == POOL_SIZE, timeout)


async def first_row(ep: CreatedEndpoint, password: str | None = None) -> tuple[str, str]:
    url = ep.url_no_sni if password is None else ep.url_no_sni.replace(ep.password, password)
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute("select current_user, current_database()")
        row = await cur.fetchone()
        assert row is not None
        return str(row[0]), str(row[1])


async def test_pool_hit_works_and_the_pool_refills(pool_stack: Up) -> None:
    client, control, pool = parts(pool_stack)
    await full(pool)
    ready_before = set(pool.ready)
    hits = pool.stats.hits
    ep = await client.create_endpoint()
    assert ep.cold_start == "pool_hit"
    assert ep.create_seconds > 0
    assert pool.stats.hits == hits + 1
    row = await control.store.get_endpoint(ep.id)
    assert row is not None and row.compute_id in ready_before
    assert await first_row(ep) == ("app", "main")
    # The owner really owns its database: it can create objects in it.
    async with await psycopg.AsyncConnection.connect(ep.url) as conn:
        await conn.execute("create table t (v int)")
        await conn.execute("insert into t values (1)")
        cur = await conn.execute("select count(*) from t")
        assert await cur.fetchone() == (1,)
    await full(pool)
    assert row.compute_id not in pool.ready
    # What `pgwake status` shows: the pool back at its target, the hit counted.
    answer = await client.pool()
    assert [(c.tier, c.ready, c.target) for c in answer.classes] == [
        ("durable", POOL_SIZE, POOL_SIZE)
    ]
    assert answer.hits == pool.stats.hits


async def test_burst_of_creates_claims_each_compute_once(pool_stack: Up) -> None:
    client, control, pool = parts(pool_stack)
    await full(pool)
    hits, misses = pool.stats.hits, pool.stats.misses
    created = await asyncio.gather(*(client.create_endpoint() for _ in range(3 * POOL_SIZE)))
    kinds = [ep.cold_start for ep in created]
    assert set(kinds) <= {"pool_hit", "pool_miss"}
    assert kinds.count("pool_hit") >= POOL_SIZE - 1  # a refill may even add hits
    assert kinds.count("pool_miss") >= 1
    assert pool.stats.hits - hits == kinds.count("pool_hit")
    assert pool.stats.misses - misses == kinds.count("pool_miss")
    computes = []
    for ep in created:
        row = await control.store.get_endpoint(ep.id)
        assert row is not None and row.compute_id is not None
        compute = await control.store.get_compute(row.compute_id)
        assert compute is not None and compute.endpoint_id == ep.id
        computes.append(row.compute_id)
    assert len(set(computes)) == len(created)
    rows = await asyncio.gather(*(first_row(ep) for ep in created))
    assert rows == [("app", "main")] * len(created)
    await full(pool)


async def test_pooled_computes_are_recycled_for_age(pool_stack: Up) -> None:
    _, _, pool = parts(pool_stack)
    await full(pool)
    old = set(pool.ready)
    recycled = pool.stats.recycled
    real_clock = pool.clock
    # Let the pool believe two hours have passed (max age is one hour).
    pool.clock = lambda: real_clock() + dt.timedelta(hours=2)
    try:
        pool.notify()
        await pool.wait_until(lambda: not (old & set(pool.ready)), 30)
    finally:
        pool.clock = real_clock
    assert pool.stats.recycled >= recycled + len(old)
    await full(pool)
    assert not old & set(pool.ready)
    for compute_id in old:
        assert not pool_stack.control.provisioner.compute_dir(compute_id, Tier.DURABLE).exists()  # type: ignore[union-attr]


async def test_a_compute_that_dies_in_the_pool_is_replaced(pool_stack: Up) -> None:
    client, _, pool = parts(pool_stack)
    await full(pool)
    victim = next(iter(pool.ready))
    assert pool_stack.control is not None
    pgdata = pool_stack.control.provisioner.compute_dir(victim, Tier.DURABLE) / "pgdata"
    info = read_postmaster_pid(pgdata)
    assert info is not None
    died = pool.stats.died
    os.kill(info.pid, signal.SIGKILL)
    await pool.wait_until(
        lambda: victim not in pool.ready and pool.ready_count(DURABLE) == POOL_SIZE, 30
    )
    assert pool.stats.died == died + 1
    # Nobody gets the dead one: every create still works.
    for _ in range(POOL_SIZE):
        ep = await client.create_endpoint()
        assert await first_row(ep) == ("app", "main")


async def test_unchanged_endpoint_wakes_without_config_sql(pool_stack: Up) -> None:
    client, control, _ = parts(pool_stack)
    ep = await client.create_endpoint()
    assert await first_row(ep) == ("app", "main")
    await client.suspend(ep.id)
    applies = control.config_applies
    assert (await client.wake(ep.id)).cold_start == "resumed"
    assert await first_row(ep) == ("app", "main")
    await client.suspend(ep.id)
    assert await first_row(ep) == ("app", "main")  # woken by the connection itself
    assert control.config_applies == applies


async def test_config_change_on_a_suspended_endpoint_is_applied_at_wake(pool_stack: Up) -> None:
    client, control, _ = parts(pool_stack)
    # No connection before the change: the proxy has not cached the old verifier.
    ep = await client.create_endpoint()
    await client.suspend(ep.id)
    applies = control.config_applies
    await client.set_password(ep.id, "app", "a-new-password-for-app")
    assert control.config_applies == applies  # suspended: nothing to apply it to yet
    # The proxy logs in to the compute with keys derived from the new password,
    # so this works only if the wake installed the new verifier on the compute.
    assert await first_row(ep, "a-new-password-for-app") == ("app", "main")
    assert control.config_applies == applies + 1
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        await first_row(ep)
    # Applied once: the next wake finds the versions equal.
    await client.suspend(ep.id)
    assert await first_row(ep, "a-new-password-for-app") == ("app", "main")
    assert control.config_applies == applies + 1


async def test_ephemeral_endpoint_expires_with_its_data_and_sessions(pool_stack: Up) -> None:
    client, control, _ = parts(pool_stack)
    assert pool_stack.control is not None
    ep = await client.create_endpoint(tier="ephemeral")
    assert ep.tier == "ephemeral" and ep.expires_at is not None
    row = await control.store.get_endpoint(ep.id)
    assert row is not None and row.compute_id is not None
    storage = pool_stack.control.provisioner.compute_dir(row.compute_id, Tier.EPHEMERAL)
    assert storage.exists()
    async with await psycopg.AsyncConnection.connect(ep.url_no_sni) as conn:
        # The session is busy when the TTL runs out; deleting the endpoint ends it.
        with pytest.raises(psycopg.errors.AdminShutdown) as info:
            async with asyncio.timeout(30):
                await conn.execute("select pg_sleep(60)")
    assert info.value.sqlstate == "57P01"
    # The session ended while the janitor stopped the compute; its storage goes next.
    async with asyncio.timeout(10):
        await control.settled(ep.id)
    assert not storage.exists()
    assert await control.store.get_endpoint(ep.id) is None
    with pytest.raises(ControlAPIError) as gone:
        await client.get_endpoint(ep.id)
    assert gone.value.code == "endpoint_not_found"


async def test_the_pool_survives_a_restart_of_pgwake(pg_bin: Path) -> None:
    """Pool items are control DB rows: a new pgwake process starts them again."""
    directory = make_data_dir("pgwake-pool-restart-")
    base = 40000 + (os.getpid() % 200) * 50 + 25
    settings = up_settings(
        directory, pg_bin, pool_size=1, pool_check_interval=0.2, port_range=(base, base + 24)
    )
    key = PoolKey(Tier.DURABLE)
    try:
        first = Up(settings)
        await first.start()
        try:
            _, _, pool = parts(first)
            await pool.wait_until(lambda: pool.ready_count(key) == 1, 60)
            pooled = set(pool.ready)
        finally:
            await first.stop()
        second = Up(settings)
        await second.start()
        try:
            client, _, pool = parts(second)
            await pool.wait_until(lambda: pool.ready_count(key) == 1, 60)
            assert set(pool.ready) == pooled
            assert pool.stats.filled == 0 and pool.stats.died == 0
            # Its pooled password was in the old process's memory only: the claim
            # installs a new one, and the endpoint works with it.
            ep = await client.create_endpoint()
            assert ep.cold_start == "pool_hit"
            assert await first_row(ep) == ("app", "main")
        finally:
            await second.stop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
