"""One connection budget per endpoint across proxy replicas (issue 9 item 4): derived
from the compute's max_connections, shared through Redis by real `pgwake proxy`
processes, and a compute's own 53300 at login is waited out, not passed on."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest

from pgwake.up import Up
from tests.helpers import running_up
from tests.integration.test_shared_state import (
    DEADLINE,
    start_proxy_process,
    stop_process,
)
from tests.servers import RedisServer, raise_open_file_limit
from wakeup.api import CreatedEndpoint

# Computes in this module admit 20 connections, 3 of them reserved for superusers:
# a budget of 17 that no proxy setting mentions.
MAX_CONNECTIONS = 20
BUDGET = MAX_CONNECTIONS - 3


@pytest.fixture(scope="module")
async def small_stack(pg_bin: Path, redis_server: RedisServer) -> AsyncIterator[Up]:
    raise_open_file_limit()
    base = 50000 + (os.getpid() % 200) * 50
    async with running_up(
        "pgwake-budget-", pg_bin, redis_url=redis_server.url, port_range=(base, base + 49),
        compute_settings=(("max_connections", str(MAX_CONNECTIONS)),),
    ) as up:
        yield up


def kwargs(port: int, ep: CreatedEndpoint) -> dict[str, object]:
    return {
        "host": "127.0.0.1", "port": port, "user": ep.user, "password": ep.password,
        "dbname": ep.database, "sslmode": "require", "options": f"endpoint={ep.id}",
        "connect_timeout": 30,
    }


async def test_herd_over_two_proxies_shares_the_computes_budget(small_stack: Up) -> None:
    """50 clients (more than max_connections) through two `pgwake proxy` processes with
    default settings, each holding its session until the budget is in use at once:
    nobody fails, the compute never sees more than the budget, and all of it is used."""
    assert small_stack.client is not None
    ep = await small_stack.client.create_endpoint()
    redis_url = small_stack.settings.redis_url or ""
    procs = [await start_proxy_process(small_stack, redis_url) for _ in range(2)]
    try:
        async with await psycopg.AsyncConnection.connect(**kwargs(procs[0][1], ep)):
            pass  # both proxies know the endpoint; the compute is awake
        await small_stack.client.suspend(ep.id)
        clients = 50
        held = {"connected": 0, "finished": 0, "peak": 0}
        seen: list[int] = []
        turn = asyncio.Condition()

        def enough_together() -> bool:
            return held["connected"] >= min(BUDGET, clients - held["finished"])

        async def one(port: int) -> None:
            async with await psycopg.AsyncConnection.connect(**kwargs(port, ep)) as conn:
                cur = await conn.execute(
                    "select count(*) from pg_stat_activity where usename = %s", (ep.user,))
                row = await cur.fetchone()
                assert row is not None
                seen.append(int(row[0]))
                async with turn:
                    held["connected"] += 1
                    held["peak"] = max(held["peak"], held["connected"])
                    turn.notify_all()
                    await turn.wait_for(enough_together)
            async with turn:
                held["connected"] -= 1
                held["finished"] += 1
                turn.notify_all()

        async with asyncio.timeout(DEADLINE * 2):
            results = await asyncio.gather(
                *(one(procs[i % 2][1]) for i in range(clients)), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        assert not failed, f"{len(failed)} of {clients} failed, first: {failed[0]!r}"
        assert max(seen) <= BUDGET  # the compute never held more client sessions
        assert held["peak"] >= BUDGET  # and the proxies let the whole budget in
    finally:
        for proc, _ in procs:
            await stop_process(proc)


async def test_compute_full_at_login_is_waited_out(small_stack: Up) -> None:
    """Direct clients fill the compute behind the proxy's back: a client of the proxy
    waits (no 53300) and gets in as soon as one of them leaves."""
    assert small_stack.client is not None and small_stack.proxy is not None
    ep = await small_stack.client.create_endpoint()
    guards = small_stack.proxy.state.guards
    async with await psycopg.AsyncConnection.connect(**kwargs(small_stack.proxy_port, ep)):
        pass  # awake
    address = (await small_stack.client.get_endpoint(ep.id)).address
    assert address is not None
    host, _, port = address.rpartition(":")
    direct = [
        await psycopg.AsyncConnection.connect(
            host=host, port=int(port), user=ep.user, password=ep.password,
            dbname=ep.database, sslmode="disable")
        for _ in range(BUDGET)
    ]
    try:
        full_before = guards.compute_full_total
        proxied = asyncio.create_task(
            psycopg.AsyncConnection.connect(**kwargs(small_stack.proxy_port, ep)))
        async with asyncio.timeout(DEADLINE):
            while guards.compute_full_total == full_before:  # the compute said 53300
                assert not proxied.done(), proxied.exception()
                await asyncio.sleep(0.01)
        retries = small_stack.proxy.state.metrics.registry.get_sample_value(
            "pgwake_compute_full_retries_total")
        assert retries is not None and retries > full_before
        await direct.pop().close()
        async with asyncio.timeout(DEADLINE):
            conn = await proxied
        async with conn:
            cur = await conn.execute("select 1")
            assert await cur.fetchone() == (1,)
    finally:
        for conn in direct:
            await conn.close()


async def test_a_dead_replicas_slots_come_back(small_stack: Up) -> None:
    """A `pgwake proxy` holding the whole budget is SIGKILLed: its leases stop being
    renewed and lapse, and the other replica's clients get in (after 53300s meanwhile,
    never another error)."""
    assert small_stack.client is not None and small_stack.proxy is not None
    ep = await small_stack.client.create_endpoint()
    proc, port = await start_proxy_process(small_stack, small_stack.settings.redis_url or "")
    held = []
    try:
        for _ in range(BUDGET):
            held.append(await psycopg.AsyncConnection.connect(**kwargs(port, ep)))
        proc.kill()
        await proc.wait()
    finally:
        await stop_process(proc)
    refused = 0
    async with asyncio.timeout(DEADLINE):
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(**kwargs(small_stack.proxy_port, ep))
            except psycopg.OperationalError as exc:
                # Queued to the deadline, then told why (libpq hides the SQLSTATE at connect).
                assert "too many connections" in str(exc), exc
                refused += 1
                continue
            break
    async with conn:
        cur = await conn.execute("select 1")
        assert await cur.fetchone() == (1,)
    for dead in held:
        with contextlib.suppress(psycopg.Error):
            await dead.close()
