"""Parked sessions across two proxy replicas sharing a real Redis: sessions parked on
both re-attach together through one wake of the endpoint."""

from __future__ import annotations

import asyncio
import resource
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest

from pgwake.up import Up
from tests.helpers import running_up
from tests.integration.test_shared_state import (
    DEADLINE,
    RedisServer,
    conninfo,
    free_port,
    start_proxy_process,
    stop_process,
)
from wakeup.api import ControlClient


@pytest.fixture(scope="module")
async def replicas(pg_bin: Path) -> AsyncIterator[tuple[Up, int]]:
    """`pgwake up --redis` (replica A, in process) and a `pgwake proxy` process (B)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    redis = RedisServer(free_port())
    await redis.start()
    try:
        async with running_up("pgwake-parked-", pg_bin, redis_url=redis.url) as up:
            proc, port = await start_proxy_process(up, redis.url)
            try:
                yield up, port
            finally:
                await stop_process(proc)
    finally:
        await redis.stop()


async def until(check: object, client: ControlClient, endpoint_id: str) -> None:
    """Poll the control API (the only view of replica B's sessions) until `check`
    holds for the endpoint, with a deadline."""
    assert callable(check)
    async with asyncio.timeout(DEADLINE):
        while not check(await client.get_endpoint(endpoint_id)):  # noqa: ASYNC110
            await asyncio.sleep(0.05)


async def test_sessions_parked_on_both_replicas_share_one_wake(
    replicas: tuple[Up, int],
) -> None:
    up, port_b = replicas
    assert up.client is not None and up.control is not None and up.control.control is not None
    client, plane = up.client, up.control.control
    ep = await client.create_endpoint()
    sessions = []
    for port in (up.proxy_port, port_b, up.proxy_port, port_b):
        conn = await psycopg.AsyncConnection.connect(
            **conninfo(port, ep), autocommit=True, prepare_threshold=0
        )
        sessions.append(conn)
    try:
        for i, conn in enumerate(sessions):
            await conn.execute(f"set application_name = 'replica-session-{i}'")
            await conn.execute("create table if not exists hits (session int)")
            await conn.execute("insert into hits values (%s)", (i,))
        # Both replicas have asked the compute about their idle sessions and told the
        # control plane that each can move.
        async with asyncio.timeout(DEADLINE):
            while plane.reported_unmovable(ep.id, since=0.0) != 0:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        await plane.suspend(ep.id, grace=1.0)
        await until(lambda shown: shown.parked == 4 and shown.state == "suspended",
                    client, ep.id)
        wakes = (await client.get_endpoint(ep.id)).wakes

        async def next_query(i: int, conn: psycopg.AsyncConnection[tuple[object, ...]]
                             ) -> tuple[object, ...] | None:
            await conn.execute("insert into hits values (%s)", (i,))
            cur = await conn.execute("show application_name")
            return await cur.fetchone()

        answers = await asyncio.gather(*(next_query(i, c) for i, c in enumerate(sessions)))
        assert answers == [(f"replica-session-{i}",) for i in range(4)]
        shown = await client.get_endpoint(ep.id)
        assert shown.wakes == wakes + 1  # one wake served the sessions of both replicas
        cur = await sessions[0].execute("select session from hits order by session")
        assert [row[0] for row in await cur.fetchall()] == [0, 0, 1, 1, 2, 2, 3, 3]
        await until(lambda shown: shown.parked == 0 and shown.connections == 4, client, ep.id)
    finally:
        for conn in sessions:
            await conn.close()
