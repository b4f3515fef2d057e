"""1000 connections stalled in the startup phase do not stop good clients, and each is
dropped at its deadline without leaving anything behind (timings: loadtests/frontdoor.py)."""

from __future__ import annotations

import psycopg

from loadtests.frontdoor import StalledCrowd
from pgwake.up import Up
from proxy.app import raise_open_file_limit
from tests.wire import start_frontdoor

DOMAIN = "pgwake.localhost"
STALLED = 1000
DEADLINE = 6.0


async def test_stalled_crowd_does_not_stop_good_clients(stack: Up) -> None:
    assert stack.client is not None and stack.certs is not None
    assert raise_open_file_limit() >= 3 * STALLED  # both ends of each connection, and more
    proxy = await start_frontdoor(
        stack, startup_timeout=DEADLINE, tls_timeout=DEADLINE, backlog=4096
    )
    try:
        ep = await stack.client.create_endpoint()
        good = {
            "host": f"{ep.id}.{DOMAIN}", "hostaddr": "127.0.0.1", "port": proxy.port,
            "user": ep.user, "password": ep.password, "dbname": ep.database,
            "sslmode": "verify-full", "sslrootcert": str(stack.certs.ca.cert),
        }
        async with StalledCrowd(proxy.port, STALLED, reconnect=False) as crowd:
            await crowd.wait_full(60)
            assert proxy.state.handshakes >= STALLED
            for _ in range(3):
                async with await psycopg.AsyncConnection.connect(**good) as conn:
                    row = await (await conn.execute("select 'served'")).fetchone()
                    assert row == ("served",)
            # Every stalled connection is dropped by its deadline, none is kept.
            await crowd.wait_all_dropped(DEADLINE * 4 + 10)
            assert crowd.dropped == STALLED and crowd.failed == 0
        assert proxy.state.handshakes == 0
    finally:
        await proxy.drain(timeout=1)
