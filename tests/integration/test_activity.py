"""Idle means no activity: short connections, API wakes and client traffic move the idle clock."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest

from pgwake.up import Up
from tests.helpers import running_up
from wakeup.api import ControlClient

IDLE_TIMEOUT = 3.0


@pytest.fixture(scope="module")
async def idle_stack(pg_bin: Path) -> AsyncIterator[Up]:
    # Reports every 0.2 s: a session is "open now" in a report for a far shorter time
    # than the janitor's period, as with any real connect rate against a long timeout.
    async with running_up(
        "pgwake-activity-", pg_bin, idle_timeout=IDLE_TIMEOUT,
        proxy_overrides=(("activity_interval", 0.2),),
    ) as up:
        yield up


async def first_row(url: str) -> None:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute("select 1")
        assert await cur.fetchone() == (1,)


async def wait_for_state(client: ControlClient, endpoint_id: str, state: str) -> None:
    # The janitor's decision is only visible through the API, as it is to a user.
    async with asyncio.timeout(60):
        while (await client.get_endpoint(endpoint_id)).state != state:  # noqa: ASYNC110
            await asyncio.sleep(0.1)


async def test_short_connections_every_third_of_idle_timeout_keep_it_awake(
    idle_stack: Up,
) -> None:
    client = idle_stack.client
    assert client is not None
    ep = await client.create_endpoint()
    await first_row(ep.url_no_sni)
    wakes = (await client.get_endpoint(ep.id)).wakes
    # Each connection lasts milliseconds; none is open when the janitor looks. The
    # schedule is the user's (a cron-like client), so it is paced by time.
    loop = asyncio.get_running_loop()
    until = loop.time() + 5 * IDLE_TIMEOUT
    while loop.time() < until:
        await first_row(ep.url_no_sni)
        await asyncio.sleep(IDLE_TIMEOUT / 3)
    shown = await client.get_endpoint(ep.id)
    assert (shown.state, shown.wakes) == ("active", wakes), "suspended while in use"
    # And once the connections stop, it does suspend: the janitor is not just off.
    await wait_for_state(client, ep.id, "suspended")


async def test_api_wake_moves_the_idle_clock(stack: Up) -> None:
    client = stack.client
    assert client is not None
    ep = await client.create_endpoint()
    before = (await client.get_endpoint(ep.id)).last_active
    woken = await client.wake(ep.id)
    assert woken.cold_start == "warm"
    after = (await client.get_endpoint(ep.id)).last_active
    assert after > before


async def test_client_traffic_on_a_live_session_is_activity(stack: Up) -> None:
    client = stack.client
    assert client is not None and stack.proxy is not None
    tracker = stack.proxy.state.activity
    ep = await client.create_endpoint()
    async with await psycopg.AsyncConnection.connect(ep.url_no_sni) as conn:
        tracker.snapshot()  # forget the session's start
        before = time.time()
        await conn.execute("select 1")
        snap = tracker.snapshot()
        assert snap.last_active.get(ep.id, 0.0) >= before - 0.001
        assert snap.started == {}
        # No traffic since: the live session alone reports no new activity time
        # that is later than the query's.
        again = tracker.snapshot()
        assert again.last_active.get(ep.id, 0.0) <= snap.last_active[ep.id] + 0.001
