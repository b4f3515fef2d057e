"""Idle sessions make room (proxy/evict.py): a login or re-attach that finds its
endpoint's connection budget in use parks the longest-idle movable session on this
proxy instead of waiting for 53300. Real computes with a small max_connections,
real asyncpg and psycopg clients through `pgwake up`."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import psycopg
import pytest

from pgwake.up import Up
from tests.helpers import running_up
from tests.servers import raise_open_file_limit
from wakeup.api import CreatedEndpoint

# max_connections 10, 3 reserved for superusers: a budget of 7 backends.
MAX_CONNECTIONS = 10
BUDGET = MAX_CONNECTIONS - 3
CLIENTS = BUDGET + 20
DEADLINE = 60.0


@pytest.fixture(scope="module")
async def small(pg_bin: Path) -> AsyncIterator[Up]:
    raise_open_file_limit()
    base = 40000 + (os.getpid() % 200) * 50
    async with running_up(
        "pgwake-evict-", pg_bin, port_range=(base, base + 49),
        compute_settings=(("max_connections", str(MAX_CONNECTIONS)),),
    ) as up:
        yield up


def apg_kwargs(stack: Up, ep: CreatedEndpoint) -> dict[str, object]:
    return {
        "host": "127.0.0.1", "port": stack.proxy_port, "user": ep.user,
        "password": ep.password, "database": ep.database, "ssl": "require",
        "server_settings": {"options": f"endpoint={ep.id}"}, "timeout": DEADLINE,
    }


def pg3_kwargs(stack: Up, ep: CreatedEndpoint) -> dict[str, object]:
    return {
        "host": "127.0.0.1", "port": stack.proxy_port, "user": ep.user,
        "password": ep.password, "dbname": ep.database, "sslmode": "require",
        "options": f"endpoint={ep.id}", "connect_timeout": int(DEADLINE),
        "autocommit": True, "prepare_threshold": 0,
    }


def evicted(stack: Up) -> float:
    assert stack.proxy is not None
    return stack.proxy.state.metrics.sessions_evicted_total._value.get()


async def backends(stack: Up, ep: CreatedEndpoint) -> int:
    """Client backends the compute has for the endpoint's role (its own view)."""
    assert stack.control is not None and stack.control.control is not None
    conn = await asyncpg.connect(**apg_kwargs(stack, ep))  # type: ignore[arg-type]
    try:
        return int(await conn.fetchval(
            "select count(*) from pg_stat_activity where usename = current_user"))
    finally:
        await conn.close()


async def test_more_idle_clients_than_the_budget_all_log_in_and_keep_their_state(
    small: Up,
) -> None:
    """BUDGET + 20 asyncpg and psycopg clients log in at once and stay idle: every
    login succeeds (idle sessions park to make room), and afterwards every one of
    them runs its prepared statement and sees its own SET value."""
    assert small.client is not None
    ep = await small.client.create_endpoint()
    before = evicted(small)

    async def asyncpg_client(i: int) -> tuple[object, object]:
        conn = await asyncpg.connect(**apg_kwargs(small, ep))  # type: ignore[arg-type]
        await conn.execute(f"set application_name = 'evict-{i}'")
        statement = await conn.prepare("select $1::int * 2")
        # asyncpg's prepare ends with Flush, not Sync: until its next message the
        # session is mid-exchange (pinned), as an application's would be.
        assert await statement.fetchval(-1) == -2
        return conn, statement

    async def psycopg_client(i: int) -> tuple[object, object]:
        conn = await psycopg.AsyncConnection.connect(**pg3_kwargs(small, ep))  # type: ignore[arg-type]
        await conn.execute(f"set application_name = 'evict-{i}'")
        await conn.execute("prepare twice(int) as select $1 * 2")
        # With prepare_threshold=0 psycopg prepares this at the protocol level now,
        # and later runs the statement it prepared (named _pg3_…) on whatever backend.
        cur = await conn.execute("show application_name")
        assert await cur.fetchone() == (f"evict-{i}",)
        return conn, None

    async with asyncio.timeout(DEADLINE * 2):
        results = await asyncio.gather(*(
            (asyncpg_client if i % 2 else psycopg_client)(i) for i in range(CLIENTS)
        ), return_exceptions=True)
    clients = [r for r in results if not isinstance(r, BaseException)]
    try:
        assert [r for r in results if isinstance(r, BaseException)] == []
        assert evicted(small) - before >= CLIENTS - BUDGET
        # The budget came with the new endpoint's announced address, before any wake.
        assert small.proxy is not None
        assert small.proxy.state.guards.budget(ep.id) == BUDGET
        # Only the budget's worth of them holds a backend; the rest are parked.
        assert await backends(small, ep) <= BUDGET
        for i, (conn, statement) in enumerate(clients):
            if isinstance(conn, asyncpg.Connection):
                assert await conn.fetchval("show application_name") == f"evict-{i}"
                assert await statement.fetchval(i) == 2 * i  # type: ignore[attr-defined]
            else:
                assert isinstance(conn, psycopg.AsyncConnection)
                cur = await conn.execute("show application_name")
                assert await cur.fetchone() == (f"evict-{i}",)
                cur = await conn.execute(f"execute twice({i})")
                assert await cur.fetchone() == (2 * i,)
    finally:
        for conn, _ in clients:
            await conn.close()  # type: ignore[attr-defined]


async def test_pinned_sessions_are_never_evicted(small: Up) -> None:
    """A session in an open transaction and one holding a temp table keep their
    backends through a herd of BUDGET + 20 logins; their state is all there after."""
    assert small.client is not None
    ep = await small.client.create_endpoint()
    in_tx = await asyncpg.connect(**apg_kwargs(small, ep))  # type: ignore[arg-type]
    temp = await asyncpg.connect(**apg_kwargs(small, ep))  # type: ignore[arg-type]
    herd: list[asyncpg.Connection] = []
    try:
        await in_tx.execute("create table pinned (id int)")
        tx_pid = await in_tx.fetchval("select pg_backend_pid()")
        transaction = in_tx.transaction()
        await transaction.start()
        await in_tx.execute("insert into pinned values (1)")
        xid = await in_tx.fetchval("select txid_current()")
        await temp.execute("create temp table mine (v int); insert into mine values (7)")
        temp_pid = await temp.fetchval("select pg_backend_pid()")
        before = evicted(small)

        async def login() -> asyncpg.Connection:
            conn = await asyncpg.connect(**apg_kwargs(small, ep))  # type: ignore[arg-type]
            assert await conn.fetchval("select 1") == 1
            return conn

        async with asyncio.timeout(DEADLINE * 2):
            results = await asyncio.gather(*(login() for _ in range(CLIENTS)),
                                           return_exceptions=True)
        herd = [r for r in results if not isinstance(r, BaseException)]
        assert [r for r in results if isinstance(r, BaseException)] == []
        assert evicted(small) - before >= CLIENTS - (BUDGET - 2)
        # Both pinned sessions still run on their first backend, with their state.
        real_pids = await in_tx.fetch(
            "select pid from pg_stat_activity where pid = any($1::int[])", [tx_pid, temp_pid])
        assert {row["pid"] for row in real_pids} == {tx_pid, temp_pid}
        assert await in_tx.fetchval("select txid_current()") == xid
        await transaction.commit()
        assert await temp.fetchval("select v from mine") == 7
        assert await in_tx.fetchval("select count(*) from pinned") == 1
    finally:
        for conn in (*herd, in_tx, temp):
            await conn.close()


async def test_eviction_never_costs_an_acknowledged_commit(small: Up) -> None:
    """Writers commit row after row while waves of logins make the proxy park idle
    sessions, the writers' among them: no writer sees an error and every commit
    it saw acknowledged is there afterwards."""
    assert small.client is not None
    ep = await small.client.create_endpoint()
    setup = await asyncpg.connect(**apg_kwargs(small, ep))  # type: ignore[arg-type]
    await setup.execute("create table log (writer int, n int, primary key (writer, n))")
    await setup.close()
    acknowledged: dict[int, int] = {}
    moved: set[int] = set()  # writers whose session was parked and re-attached
    stop = asyncio.Event()

    async def writer(w: int) -> None:
        conn = await asyncpg.connect(**apg_kwargs(small, ep))  # type: ignore[arg-type]
        insert = await conn.prepare(
            "insert into log values ($1, $2) returning pg_catalog.pg_backend_pid()")
        first = await conn.fetchval("select pg_catalog.pg_backend_pid()")
        n = 0
        try:
            while not stop.is_set():
                pid = await insert.fetchval(w, n)
                acknowledged[w] = n
                n += 1
                if pid != first:  # the compute's own PID: the session moved
                    moved.add(w)
                # Pacing, so that a writer's session is sometimes the longest idle.
                await asyncio.sleep(0.005)
        finally:
            await conn.close()

    async def waves() -> None:
        while not stop.is_set():
            conns = await asyncio.gather(*(
                asyncpg.connect(**apg_kwargs(small, ep))  # type: ignore[arg-type]
                for _ in range(BUDGET + 5)
            ))
            for conn in conns:
                await conn.close()

    writers = 3
    async with asyncio.timeout(DEADLINE * 2):
        tasks = [asyncio.create_task(writer(w)) for w in range(writers)]
        tasks.append(asyncio.create_task(waves()))
        try:
            while len(moved) < writers and not any(t.done() for t in tasks):  # noqa: ASYNC110
                await asyncio.sleep(0.05)  # a set has nothing to await
        finally:
            stop.set()
            await asyncio.gather(*tasks)
    assert len(moved) == writers
    check = await asyncpg.connect(**apg_kwargs(small, ep))  # type: ignore[arg-type]
    try:
        for w, last in acknowledged.items():
            rows = await check.fetchval(
                "select count(*) from log where writer = $1 and n <= $2", w, last)
            assert rows == last + 1
    finally:
        await check.close()
