"""The wake path: the "waking" NOTICE only for a real start; stale addresses while the control
plane is down; the reason in an error is the real one."""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg
import psycopg
import pytest

from pgwake.up import Up
from proxy.app import ProxyServer
from tests.helpers import run
from tests.integration.test_shared_state import Relay, side_proxy
from wakeup.api import ControlClient, CreatedEndpoint


def api_key(up: Up) -> str:
    return (up.settings.data_dir / "api_key").read_text().strip()


async def notices_on_connect(port: int, ep: CreatedEndpoint) -> list[str]:
    seen: list[str] = []
    conn = await psycopg.AsyncConnection.connect(
        host="127.0.0.1", port=port, user=ep.user, password=ep.password, dbname=ep.database,
        sslmode="require", options=f"endpoint={ep.id}",
    )
    try:
        conn.add_notice_handler(lambda d: seen.append(d.message_primary or ""))
        cur = await conn.execute("select 1")
        assert await cur.fetchone() == (1,)
    finally:
        await conn.close()
    return seen


async def notices_during_login(port: int, ep: CreatedEndpoint) -> list[str]:
    """What psql prints for the connection: NOTICEs (before ReadyForQuery too) on stderr."""
    conninfo = (f"host=127.0.0.1 port={port} user={ep.user} password={ep.password} "
                f"dbname={ep.database} sslmode=require options=endpoint={ep.id}")
    code, out, err = await run("psql", conninfo, "-Atc", "select 1")
    assert (code, out.strip()) == (0, "1"), err
    return [line for line in err.splitlines() if "NOTICE" in line]


class SlowWakeRelay(Relay):
    """The real control API behind a relay that holds each wake request for `delay`
    seconds: a control plane slow under load, for an endpoint that is already active."""

    delay = 0.6

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers.add(up_writer)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, hold: bool) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    if hold and b"/wake " in data:
                        await asyncio.sleep(self.delay)  # the slowness under test
                    dst.write(data)
                    await dst.drain()
            dst.close()

        try:
            await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))
        finally:
            self.writers.discard(writer)
            self.writers.discard(up_writer)


@pytest.fixture
async def eager_notice_proxy(stack: Up) -> ProxyServer:
    """Its own proxy (empty caches) whose control API is slow to answer wakes."""
    assert stack.control is not None
    relay = SlowWakeRelay(stack.control.api_port)
    await relay.start()
    control = ControlClient(f"http://127.0.0.1:{relay.port}", api_key(stack))
    proxy = await side_proxy(stack, control)
    try:
        yield proxy  # type: ignore[misc]
    finally:
        await proxy.drain(timeout=2.0)
        await control.aclose()
        await relay.stop()


async def test_no_waking_notice_for_an_active_endpoint(
    stack: Up, eager_notice_proxy: ProxyServer
) -> None:
    assert stack.client is not None
    ep = await stack.client.create_endpoint()  # active; this proxy has no address yet
    notices = await notices_during_login(eager_notice_proxy.port, ep)
    assert not any("waking" in n for n in notices), notices


async def test_waking_notice_when_a_compute_starts(
    stack: Up, eager_notice_proxy: ProxyServer
) -> None:
    assert stack.client is not None
    ep = await stack.client.create_endpoint()
    await stack.client.suspend(ep.id)
    notices = await notices_during_login(eager_notice_proxy.port, ep)
    assert any("waking" in n for n in notices), notices


async def test_control_plane_down_serves_last_known_address(stack: Up) -> None:
    assert stack.client is not None and stack.control is not None
    relay = Relay(stack.control.api_port)
    await relay.start()
    control = ControlClient(f"http://127.0.0.1:{relay.port}", api_key(stack), timeout=2.0)
    # Addresses expire almost at once: every connect below is past its TTL.
    proxy = await side_proxy(stack, control, address_cache_ttl=0.001, negative_cache_ttl=0.05)
    try:
        ep = await stack.client.create_endpoint()
        gone = await stack.client.create_endpoint()
        await notices_on_connect(proxy.port, ep)
        await notices_on_connect(proxy.port, gone)
        await stack.client.suspend(gone.id)
        await proxy.state.wake.invalidate(gone.id)  # as the suspend's invalidation does
        await relay.stop()
        for _ in range(3):
            await notices_on_connect(proxy.port, ep)  # stale, but the compute is there
        assert proxy.state.wake.stale_served >= 3
        # An invalidated address is not served stale; the error says why.
        with pytest.raises(asyncpg.PostgresError) as failed:
            conn = await asyncpg.connect(
                host="127.0.0.1", port=proxy.port, user=gone.user, password=gone.password,
                database=gone.database, ssl="require",
                server_settings={"options": f"endpoint={gone.id}"},
            )
            await conn.close()
        assert failed.value.sqlstate == "57P03"
        assert "control plane unavailable" in str(failed.value)
        served = proxy.state.wake.stale_served
        await relay.start()
        async with asyncio.timeout(30):
            while True:  # the short negative-cache entry may still answer once
                with contextlib.suppress(psycopg.OperationalError):
                    await notices_on_connect(proxy.port, gone)
                    break
        await notices_on_connect(proxy.port, ep)
        assert proxy.state.wake.stale_served <= served + 1  # back: fresh answers again
    finally:
        await proxy.drain(timeout=2.0)
        await control.aclose()
        with contextlib.suppress(Exception):
            await relay.stop()


async def test_busy_endpoints_address_is_refreshed_before_it_expires(stack: Up) -> None:
    assert stack.client is not None and stack.control is not None
    control = ControlClient(stack.control.api_url, api_key(stack))
    ttl = 2.0
    proxy = await side_proxy(stack, control, address_cache_ttl=ttl)
    try:
        ep = await stack.client.create_endpoint()
        url = (f"host=127.0.0.1 port={proxy.port} user={ep.user} password={ep.password} "
               f"dbname={ep.database} sslmode=require "
               f"options='endpoint={ep.id} pgwake_timing=on'")
        seen: list[str | None] = []
        loop = asyncio.get_running_loop()
        until = loop.time() + 3 * ttl
        while loop.time() < until:  # a busy endpoint: a connect every 0.1 s
            async with await psycopg.AsyncConnection.connect(url) as conn:
                seen.append(conn.info.parameter_status("pgwake.cold_start"))
            await asyncio.sleep(0.1)
        # The first connect asked the control plane; every later one found the
        # address cached, because it was renewed in the background before expiring.
        assert seen[0] == "warm" and set(seen[1:]) == {"cached"}, seen
        assert proxy.state.wake.refreshes >= 1
    finally:
        await proxy.drain(timeout=2.0)
        await control.aclose()
