"""A CancelRequest flood against a Redis-backed proxy (issue 9 item 12): it is paced per
source address before it reaches Redis, it cannot take the wake path's Redis connections,
and it never makes the proxy fall back to per-replica state."""

from __future__ import annotations

import asyncio
import os
import secrets
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest
import redis.asyncio as aioredis

from pgwake.up import Up
from proxy.shared import CANCEL_POOL_SIZE, RedisShared
from tests.helpers import running_up
from tests.integration.test_shared_state import (
    DEADLINE,
    select_one,
)
from tests.servers import RedisServer, raise_open_file_limit

FLOOD = 5000
CANCEL_CODE = 80877102


@pytest.fixture(scope="module")
async def rstack(pg_bin: Path, redis_server: RedisServer) -> AsyncIterator[Up]:
    raise_open_file_limit()
    base = 40000 + (os.getpid() % 200) * 50
    async with running_up(
        "pgwake-flood-", pg_bin, redis_url=redis_server.url, port_range=(base, base + 49)
    ) as up:
        yield up


async def redis_gets(url: str) -> int:
    """GET commands Redis has served so far: what a cancel lookup costs it."""
    client = aioredis.from_url(url)
    try:
        stats = await client.info("commandstats")
    finally:
        await client.aclose()
    return int(stats.get("cmdstat_get", {}).get("calls", 0))


async def redis_clients(url: str) -> dict[str, int]:
    """Connections Redis has open, by client name (each proxy pool names its own)."""
    client = aioredis.from_url(url)
    try:
        listing = await client.client_list()
    finally:
        await client.aclose()
    counts: dict[str, int] = {}
    for entry in listing:
        counts[entry.get("name", "")] = counts.get(entry.get("name", ""), 0) + 1
    return counts


async def send_cancel(port: int, source: str, pid: int, secret: int) -> None:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, local_addr=(source, 0))
    try:
        writer.write(struct.pack("!iiIi", 16, CANCEL_CODE, pid, secret))
        await writer.drain()
        await reader.read()  # the proxy closes when it is done with the request
    finally:
        writer.close()


async def flood(port: int, sources: list[str], count: int) -> None:
    """`count` CancelRequests with random keys, spread over `sources`, 400 in flight."""
    gate = asyncio.Semaphore(400)

    async def one(i: int) -> None:
        async with gate:
            await send_cancel(port, sources[i % len(sources)], secrets.randbelow(2**32),
                              secrets.randbelow(2**32) - 2**31)

    async with asyncio.timeout(DEADLINE * 2):
        await asyncio.gather(*(one(i) for i in range(count)))


def outcomes(up: Up, outcome: str) -> float:
    assert up.proxy is not None
    value = up.proxy.state.metrics.registry.get_sample_value(
        "pgwake_connections_total", {"outcome": outcome})
    return value or 0.0


def shared_of(up: Up) -> RedisShared:
    assert up.proxy is not None
    shared = up.proxy.shared
    assert isinstance(shared, RedisShared)
    return shared


async def test_flood_from_one_source_is_paced_before_redis(
    rstack: Up, redis_server: RedisServer
) -> None:
    assert rstack.client is not None and rstack.proxy is not None
    ep = await rstack.client.create_endpoint()
    shared = shared_of(rstack)
    errors_before = shared.errors
    internal_before = outcomes(rstack, "internal")
    gets_before = await redis_gets(redis_server.url)
    flooding = asyncio.create_task(flood(rstack.proxy_port, ["127.0.0.2"], FLOOD))
    # Meanwhile a real client from another address cancels its own query.
    async with await psycopg.AsyncConnection.connect(
        host="127.0.0.1", port=rstack.proxy_port, user=ep.user, password=ep.password,
        dbname=ep.database, sslmode="require", options=f"endpoint={ep.id}", connect_timeout=30,
    ) as conn:
        query = asyncio.create_task(conn.execute("select pg_sleep(60)"))
        async with await psycopg.AsyncConnection.connect(
            host="127.0.0.1", port=rstack.proxy_port, user=ep.user, password=ep.password,
            dbname=ep.database, sslmode="require", options=f"endpoint={ep.id}",
            autocommit=True,
        ) as watcher:
            async with asyncio.timeout(DEADLINE):
                while True:
                    cur = await watcher.execute(
                        "select 1 from pg_stat_activity where state = 'active'"
                        " and query = 'select pg_sleep(60)'")
                    if await cur.fetchone() is not None:
                        break
                    await asyncio.sleep(0.01)
        await conn.cancel_safe()
        with pytest.raises(psycopg.errors.QueryCanceled):
            await asyncio.wait_for(query, DEADLINE)
    await flooding
    lookups = await redis_gets(redis_server.url) - gets_before
    # One source's burst reaches Redis, not five thousand made-up keys.
    assert lookups < 200, f"{lookups} Redis lookups for a {FLOOD}-request flood"
    dropped = rstack.proxy.state.metrics.registry.get_sample_value(
        "pgwake_cancel_requests_dropped_total")
    assert dropped is not None and dropped >= FLOOD - 200
    assert shared.errors == errors_before and not shared.degraded
    assert outcomes(rstack, "internal") == internal_before  # any 32-bit PID is just a miss
    assert outcomes(rstack, "cancel_request") >= FLOOD


async def test_flood_from_many_sources_does_not_starve_the_wake_path(
    rstack: Up, redis_server: RedisServer
) -> None:
    """5 000 made-up keys from 250 addresses (each under its own pace) while 100
    clients wake a suspended endpoint: Redis stays in use, every client gets in."""
    assert rstack.client is not None and rstack.proxy is not None
    ep = await rstack.client.create_endpoint()
    await select_one(rstack.proxy_port, ep)
    await rstack.client.suspend(ep.id)
    shared = shared_of(rstack)
    errors_before = shared.errors
    sources = [f"127.0.{1 + i // 250}.{1 + i % 250}" for i in range(250)]
    # On its own, the flood uses the proxy's small cancel pool and nothing else.
    wake_pool_before = (await redis_clients(redis_server.url)).get("pgwake-proxy", 0)
    await flood(rstack.proxy_port, sources, FLOOD)
    clients = await redis_clients(redis_server.url)
    assert 1 <= clients.get("pgwake-proxy-cancel", 0) <= CANCEL_POOL_SIZE, clients
    assert clients.get("pgwake-proxy", 0) == wake_pool_before, clients
    # And next to a herd of wakes.
    flooding = asyncio.create_task(flood(rstack.proxy_port, sources, FLOOD))
    results = await asyncio.gather(*(select_one(rstack.proxy_port, ep) for _ in range(100)),
                                   return_exceptions=True)
    await flooding
    failed = [r for r in results if isinstance(r, BaseException)]
    assert not failed, f"{len(failed)} connects failed, first: {failed[0]!r}"
    assert shared.errors == errors_before and not shared.degraded
