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
from proxy.settings import ProxySettings
from tests.helpers import running_up
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
        # While a client is connected the compute stays up, however long it idles.
        await asyncio.sleep(2.5)
        assert (await client.get_endpoint(ep.id)).state == "active"
    await wait_for_state(client, ep.id, "suspended", within=15)
    async with await psycopg.AsyncConnection.connect(ep.url_no_sni) as conn:
        cur = await conn.execute("select v from kept")
        assert await cur.fetchone() == (7,)
    assert (await client.get_endpoint(ep.id)).wakes == 2


async def test_wake_timeout_is_57P03(stack: Up) -> None:
    """A proxy whose wake budget is shorter than any start answers 57P03, not a hang."""
    assert stack.client is not None and stack.control is not None and stack.proxy is not None
    ep = await stack.client.create_endpoint()
    await stack.client.suspend(ep.id)
    impatient = ProxyServer(
        ProxySettings(listen_host="127.0.0.1", listen_port=0, wake_timeout=0.001),
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
