"""Sessions outlive their compute: idle, movable sessions park when the compute goes
away (suspend, kill -9) and re-attach on their next message, with their SET values
and prepared statements; pinned ones get a clean error. Real computes, real clients."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import psycopg
import pytest

from pgwake.up import Up
from proxy.sessionstate import SessionCounts
from tests.integration.test_session_end import raw_login
from tests.integration.test_shared_state import kill_process_tree
from tests.wire import (
    client_tls_context,
    raw_connection,
    read_reply,
    ssl_request_upgrade,
    start_frontdoor,
)
from wakeup.api import CreatedEndpoint

DEADLINE = 30.0


def proxied(stack: Up, ep: CreatedEndpoint) -> dict[str, object]:
    return {
        "host": "127.0.0.1", "port": stack.proxy_port, "user": ep.user,
        "password": ep.password, "database": ep.database, "ssl": "require",
        "server_settings": {"options": f"endpoint={ep.id}"},
    }


async def all_movable(stack: Up, ep: CreatedEndpoint, sessions: int) -> None:
    """Wait until the proxy has asked the compute about every idle session and found
    each movable (the survey runs on its own once a session is idle)."""
    assert stack.proxy is not None
    registry = stack.proxy.state.registry
    async with asyncio.timeout(DEADLINE):
        while True:
            splices = list(registry._by_endpoint.get(ep.id, ()))
            if len(splices) == sessions and all(registry.movable(s) for s in splices):
                return
            await asyncio.sleep(0.05)  # the survey's own cadence: nothing to await


async def suspend(stack: Up, ep: CreatedEndpoint) -> None:
    """What the janitor does (smart shutdown for a grace period, then fast), called
    in-process: on a loaded machine it can outlast the HTTP client's timeout."""
    assert stack.control is not None and stack.control.control is not None
    await stack.control.control.suspend(ep.id, grace=1.0)


async def parked_sessions(stack: Up, count: float) -> None:
    assert stack.proxy is not None
    metric = stack.proxy.state.metrics.sessions_parked_total
    async with asyncio.timeout(DEADLINE):
        while metric._value.get() < count:  # noqa: ASYNC110
            await asyncio.sleep(0.02)  # a counter has nothing to await


def postmaster_of(backend_pid: int) -> int:
    fields = Path(f"/proc/{backend_pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[1])


@pytest.mark.parametrize("how", ["suspend", "kill"])
async def test_idle_sessions_survive_their_compute(stack: Up, how: str) -> None:
    assert stack.client is not None and stack.proxy is not None
    ep = await stack.client.create_endpoint()
    apg = await asyncpg.connect(**proxied(stack, ep))  # type: ignore[arg-type]
    pg3 = await psycopg.AsyncConnection.connect(
        ep.url_no_sni, autocommit=True, prepare_threshold=0
    )
    try:
        await apg.execute("create table log (id int primary key, body text)")
        await apg.execute("set work_mem = '7MB'")
        insert = await apg.prepare("insert into log values ($1, $2)")
        await insert.fetch(1, "before")
        await pg3.execute("set application_name = 'reattach-test'")
        await pg3.execute("prepare twice(int) as select $1 * 2")
        cur = await pg3.execute("select %s::int + 1", (1,))
        assert await cur.fetchone() == (2,)
        backend = await apg.fetchval("select pg_backend_pid()")
        parked_before = stack.proxy.state.metrics.sessions_parked_total._value.get()

        for cycle in range(3):
            await all_movable(stack, ep, 2)
            if how == "suspend":
                await suspend(stack, ep)
            else:
                kill_process_tree(postmaster_of(backend))
                # A message sent before the proxy saw the compute go would meet the
                # dying backend (as it would without a proxy): wait for the parking.
                await parked_sessions(stack, parked_before + 2 * (cycle + 1))
            # The next message wakes the endpoint and finds its session as it was.
            await insert.fetch(cycle + 2, f"after {how} {cycle}")
            assert await apg.fetchval("show work_mem") == "7MB"
            cur = await pg3.execute("execute twice(21)")
            assert await cur.fetchone() == (42,)
            cur = await pg3.execute("select %s::int + 1", (41,))
            assert await cur.fetchone() == (42,)
            cur = await pg3.execute("show application_name")
            assert await cur.fetchone() == ("reattach-test",)
            backend = await apg.fetchval("select pg_backend_pid()")
        rows = await apg.fetch("select id from log order by id")
        assert [r["id"] for r in rows] == [1, 2, 3, 4]
        parked = stack.proxy.state.metrics.sessions_parked_total._value.get() - parked_before
        assert parked == 6
    finally:
        await apg.close()
        await pg3.close()


async def test_a_pinned_session_gets_a_clean_error(stack: Up) -> None:
    assert stack.client is not None
    ep = await stack.client.create_endpoint()
    conn = await psycopg.AsyncConnection.connect(ep.url_no_sni, autocommit=True)
    try:
        await conn.execute("create temp table scratch (v int)")
        assert stack.proxy is not None
        registry = stack.proxy.state.registry
        reasons = await registry.survey(ep.id, timeout=DEADLINE)
        assert list(reasons.values()) == [["temp_tables"]]
        await suspend(stack, ep)
        with pytest.raises(psycopg.OperationalError) as info:
            await conn.execute("select 1")
        # The compute's own shutdown error (57P01), or the proxy's 08006.
        assert info.value.sqlstate in ("57P01", "08006")
    finally:
        await conn.close()


async def test_a_cancel_key_follows_the_session_to_its_new_backend(stack: Up) -> None:
    assert stack.client is not None
    ep = await stack.client.create_endpoint()
    conn = await psycopg.AsyncConnection.connect(ep.url_no_sni, autocommit=True)
    try:
        told_pid = conn.info.backend_pid
        await all_movable(stack, ep, 1)
        await suspend(stack, ep)
        await conn.execute("select 1")  # re-attached to a new backend
        sleeper = asyncio.create_task(conn.execute("select pg_sleep(300)"))
        watcher = await asyncpg.connect(**proxied(stack, ep))  # type: ignore[arg-type]
        async with asyncio.timeout(DEADLINE):
            while not await watcher.fetchval(  # noqa: ASYNC110
                "select count(*) from pg_stat_activity where query = 'select pg_sleep(300)'"
                " and state = 'active'"
            ):
                await asyncio.sleep(0.02)
        await watcher.close()
        await conn.cancel_safe()  # the key the client got at login, before the move
        with pytest.raises(psycopg.errors.QueryCanceled):
            await asyncio.wait_for(sleeper, DEADLINE)
        assert conn.info.backend_pid == told_pid  # what the client was told stays
    finally:
        await conn.close()


async def test_a_pool_of_ten_keeps_working_through_suspends_and_kills(stack: Up) -> None:
    """An app-like loop on a pool of 10 asyncpg connections, writing between cycles
    of suspend and kill -9 while idle: no error, no lost commit, prepared
    statements and SET values intact."""
    assert stack.client is not None
    ep = await stack.client.create_endpoint()
    # asyncpg's pool resets each connection (RESET ALL) on release, so a session
    # setting here comes with the startup packet, which a re-login sends again.
    settings = proxied(stack, ep)
    settings["server_settings"] = {"options": f"endpoint={ep.id}", "statement_timeout": "123s"}
    pool = await asyncpg.create_pool(**settings, min_size=10, max_size=10)  # type: ignore[arg-type]
    committed: list[int] = []
    try:
        async with pool.acquire() as conn:
            await conn.execute("create table orders (id int primary key)")

        async def app_round(base: int) -> None:
            async def one(i: int) -> None:
                async with pool.acquire() as conn:
                    stmt = await conn.prepare("insert into orders values ($1)")
                    await stmt.fetch(base + i)
                    committed.append(base + i)
                    assert await conn.fetchval("show statement_timeout") == "123s"

            await asyncio.gather(*(one(i) for i in range(20)))

        await app_round(0)
        for cycle in range(1, 7):
            await all_movable(stack, ep, 10)
            if cycle % 2:
                await suspend(stack, ep)
            else:
                async with pool.acquire() as conn:
                    backend = await conn.fetchval("select pg_backend_pid()")
                await all_movable(stack, ep, 10)
                parked = stack.proxy.state.metrics.sessions_parked_total._value.get()  # type: ignore[union-attr]
                kill_process_tree(postmaster_of(backend))
                await parked_sessions(stack, parked + 10)
            await app_round(cycle * 100)
        async with pool.acquire() as conn:
            rows = await conn.fetch("select id from orders order by id")
        assert [r["id"] for r in rows] == sorted(committed)
        assert len(committed) == 7 * 20
    finally:
        await pool.close()


async def test_a_parked_session_gets_57P01_when_the_proxy_drains(stack: Up) -> None:
    assert stack.client is not None and stack.certs is not None
    ep = await stack.client.create_endpoint()
    proxy = await start_frontdoor(stack)
    try:
        async with raw_connection(proxy.port) as (reader, writer):
            await ssl_request_upgrade(reader, writer, client_tls_context(stack.certs.ca.cert), None)
            await raw_login(reader, writer, ep)
            registry = proxy.state.registry
            async with asyncio.timeout(DEADLINE):
                while not (  # noqa: ASYNC110 (the survey's own cadence)
                    (splices := list(registry._by_endpoint.get(ep.id, ())))
                    and registry.movable(splices[0])
                ):
                    await asyncio.sleep(0.05)
            await suspend(stack, ep)
            async with asyncio.timeout(DEADLINE):
                while registry.counts().get(ep.id, SessionCounts()).parked != 1:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
            drained = asyncio.create_task(proxy.drain(timeout=5))
            bye = await read_reply(reader, DEADLINE)
            await drained
        # The suspend's own FATAL was held back (the session parked); the drain's is sent.
        assert bye.closed and bye.types == b"E" and bye.sqlstate == "57P01"
        assert bye.error is not None and "proxy is shutting down" in bye.error["M"]
    finally:
        await proxy.drain(timeout=1)
