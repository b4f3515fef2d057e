"""Idle computes suspend on their own; a wake that cannot finish in time is a clean 57P03."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import psycopg
import pytest

from pgwake.up import Up
from proxy.app import ProxyServer
from tests.helpers import proxy_settings, running_up
from wakeup.api import ControlClient


@pytest.fixture(scope="module")
async def idle_stack(pg_bin: Path) -> AsyncIterator[Up]:
    async with running_up("pgwake-idle-", pg_bin, idle_timeout=1.0) as up:
        yield up


async def wait_for_state(
    client: ControlClient, endpoint_id: str, state: str, within: float
) -> None:
    # The janitor's decision is only visible through the API, as it is to a user:
    # poll it, with a deadline.
    async with asyncio.timeout(within):
        while (await client.get_endpoint(endpoint_id)).state != state:  # noqa: ASYNC110
            await asyncio.sleep(0.1)


async def test_idle_endpoint_suspends_and_keeps_its_data(idle_stack: Up) -> None:
    client = idle_stack.client
    assert client is not None
    ep = await client.create_endpoint()
    async with await psycopg.AsyncConnection.connect(ep.url_no_sni) as conn:
        await conn.execute("create table kept (v int)")
        await conn.execute("insert into kept values (7)")
        await conn.commit()
    await wait_for_state(client, ep.id, "suspended", within=15)
    async with await psycopg.AsyncConnection.connect(ep.url_no_sni) as conn:
        cur = await conn.execute("select v from kept")
        assert await cur.fetchone() == (7,)
    assert (await client.get_endpoint(ep.id)).wakes == 2


async def test_idle_clients_do_not_keep_the_compute_up(idle_stack: Up) -> None:
    """An application's pool holding idle connections: idle means no queries, not no
    connections. The compute suspends under them; their next query wakes it and finds
    the session as it was (issue 10)."""
    client = idle_stack.client
    assert client is not None
    ep = await client.create_endpoint()
    pool = await asyncpg.create_pool(
        host="127.0.0.1", port=idle_stack.proxy_port, user=ep.user, password=ep.password,
        database=ep.database, ssl="require", min_size=3, max_size=3,
        server_settings={"options": f"endpoint={ep.id}", "application_name": "idle-pool"},
    )
    try:
        await pool.execute("create table t (v int)")
        wakes = (await client.get_endpoint(ep.id)).wakes
        await wait_for_state(client, ep.id, "suspended", within=30)
        # The proxy's next activity report shows them parked: no backend, no slot.
        async with asyncio.timeout(30):
            while True:
                shown = await client.get_endpoint(ep.id)
                if (shown.parked, shown.connections) == (3, 0):
                    break
                await asyncio.sleep(0.1)  # reports come once a second: poll the API
        # Every pooled connection still works, on a woken compute, with its settings.
        for value in range(6):
            async with pool.acquire() as conn:
                await conn.execute("insert into t values ($1)", value)
                assert await conn.fetchval("show application_name") == "idle-pool"
        assert await pool.fetchval("select count(*) from t") == 6
        assert (await client.get_endpoint(ep.id)).wakes == wakes + 1
    finally:
        await pool.close()


async def test_a_pinned_session_keeps_the_compute_up(idle_stack: Up) -> None:
    """A session holding what cannot move (here: an open transaction) keeps the
    compute awake however long it idles, while an idle one next to it would not."""
    client = idle_stack.client
    assert client is not None and idle_stack.control is not None
    ep = await client.create_endpoint()
    janitor = idle_stack.control.janitor
    assert janitor is not None
    async with await psycopg.AsyncConnection.connect(ep.url_no_sni) as pinned:
        await pinned.execute("create table t (v int)")
        await pinned.execute("insert into t values (1)")  # a transaction left open
        # Several janitor passes, each past the idle timeout, see it busy.
        ticks = janitor.ticks
        async with asyncio.timeout(60):
            while janitor.ticks < ticks + 4:  # noqa: ASYNC110
                await asyncio.sleep(0.1)  # the janitor's count has nothing to await
        shown = await client.get_endpoint(ep.id)
        assert shown.state == "active" and shown.pinned == 1
        await pinned.commit()
    await wait_for_state(client, ep.id, "suspended", within=30)


async def test_wake_timeout_is_57P03(stack: Up) -> None:
    """A proxy whose wake budget is shorter than any start answers 57P03, not a hang."""
    assert stack.client is not None and stack.control is not None and stack.proxy is not None
    ep = await stack.client.create_endpoint()
    await stack.client.suspend(ep.id)
    impatient = ProxyServer(
        proxy_settings(listen_host="127.0.0.1", listen_port=0, wake_timeout=0.001),
        control=stack.client,
        server_tls=stack.proxy.state.server_tls,
    )
    await impatient.start()
    try:
        with pytest.raises(asyncpg.PostgresError) as info:
            await asyncpg.connect(
                host="127.0.0.1", port=impatient.port, user=ep.user, password=ep.password,
                database=ep.database, ssl="require",
                server_settings={"options": f"endpoint={ep.id}"},
            )
        assert info.value.sqlstate == "57P03"
        assert ep.id in str(info.value) and "did not wake" in str(info.value)
    finally:
        await impatient.drain(timeout=1)
    # The wake itself went on in the control plane; a patient client is served.
    async with await psycopg.AsyncConnection.connect(ep.url_no_sni) as conn:
        assert await (await conn.execute("select 1")).fetchone() == (1,)
