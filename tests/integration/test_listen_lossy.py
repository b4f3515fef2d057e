"""LISTEN pins a session by default; `options=pgwake_listen=lossy` lets it move, with
its LISTEN re-issued on the new backend (notifications sent in the gap are lost)."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from pgwake.up import Up
from tests.integration.test_reattach import parked_sessions, suspend

DEADLINE = 30.0


async def test_a_lossy_listen_session_moves_and_keeps_listening(stack: Up) -> None:
    assert stack.client is not None and stack.proxy is not None
    registry, metrics = stack.proxy.state.registry, stack.proxy.state.metrics
    ep = await stack.client.create_endpoint()
    lossy = await psycopg.AsyncConnection.connect(
        ep.url_no_sni, autocommit=True, options=f"endpoint={ep.id} pgwake_listen=lossy")
    pinned = await psycopg.AsyncConnection.connect(ep.url_no_sni, autocommit=True)
    try:
        await lossy.execute('listen jobs; listen "Mixed ""Case"""')
        await pinned.execute("listen jobs")
        reasons = await registry.survey(ep.id, timeout=DEADLINE)
        assert sorted(reasons.values()) == [[], ["listen"]]  # the default pins
        await pinned.close()

        parked = metrics.sessions_parked_total._value.get()
        await suspend(stack, ep)
        await parked_sessions(stack, parked + 1)
        # The next message re-attaches it; its LISTENs are there again.
        cur = await lossy.execute("select pg_listening_channels() order by 1")
        assert [row[0] for row in await cur.fetchall()] == ["Mixed \"Case\"", "jobs"]
        async with await psycopg.AsyncConnection.connect(
            ep.url_no_sni, autocommit=True
        ) as sender:
            await sender.execute("notify jobs, 'after the move'")
        async with asyncio.timeout(DEADLINE):
            async for notify in lossy.notifies():
                assert (notify.channel, notify.payload) == ("jobs", "after the move")
                break
    finally:
        await lossy.close()
        await pinned.close()


async def test_an_unknown_listen_policy_is_refused(stack: Up) -> None:
    assert stack.client is not None
    ep = await stack.client.create_endpoint()
    with pytest.raises(psycopg.OperationalError) as info:
        await psycopg.AsyncConnection.connect(
            ep.url_no_sni, options=f"endpoint={ep.id} pgwake_listen=sometimes")
    assert 'invalid value for pgwake_listen: "sometimes"' in str(info.value)
