"""How sessions end (issue 9 items 2 and 3): no error after Terminate, 57P01 on drain
at a message boundary, clean errors when a compute vanishes, queries cancelled
when their client or the proxy goes away. Real computes, real clients."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal

import asyncpg
import psycopg
import pytest

from pgwake.up import Up
from proxy.pgwire import messages
from proxy.pgwire.codec import frame
from tests.wire import (
    client_tls_context,
    raw_connection,
    read_reply,
    ssl_request_upgrade,
    start_frontdoor,
)
from wakeup.api import CreatedEndpoint

DEADLINE = 30.0


@pytest.fixture
async def endpoint(stack: Up) -> CreatedEndpoint:
    assert stack.client is not None
    return await stack.client.create_endpoint()


def proxied(port: int, ep: CreatedEndpoint) -> dict[str, object]:
    return {
        "host": "127.0.0.1", "port": port, "user": ep.user, "password": ep.password,
        "database": ep.database, "ssl": "require",
        "server_settings": {"options": f"endpoint={ep.id}"},
    }


async def direct(stack: Up, ep: CreatedEndpoint) -> asyncpg.Connection:
    """A connection straight to the compute (the verifier is installed there too)."""
    assert stack.client is not None
    host, _, port = (await stack.client.wake(ep.id)).address.rpartition(":")
    return await asyncpg.connect(
        host=host, port=int(port), user=ep.user, password=ep.password, database=ep.database,
        ssl=False,
    )


async def wait_until_no_sleeper(stack: Up, ep: CreatedEndpoint) -> None:
    """pg_stat_activity on the compute itself: the cancelled pg_sleep is gone."""
    conn = await direct(stack, ep)
    try:
        async with asyncio.timeout(DEADLINE):
            while await conn.fetchval(  # noqa: ASYNC110 (the compute only answers when asked)
                "select count(*) from pg_stat_activity where query like 'select pg_sleep(%'"
                " and state = 'active' and pid <> pg_backend_pid()"
            ):
                await asyncio.sleep(0.05)
    finally:
        await conn.close()


def conninfo(port: int, ep: CreatedEndpoint) -> dict[str, object]:
    return {
        "host": "127.0.0.1", "port": port, "user": ep.user, "password": ep.password,
        "dbname": ep.database, "sslmode": "require", "options": f"endpoint={ep.id}",
    }


async def start_sleeper(
    stack: Up, ep: CreatedEndpoint, port: int
) -> tuple[psycopg.AsyncConnection[object], asyncio.Task[object]]:
    """A psycopg session (it reports the server's SQLSTATE as is; asyncpg turns a
    FATAL mid-query into 08003, even directly) running pg_sleep on the compute."""
    conn = await psycopg.AsyncConnection.connect(**conninfo(port, ep))  # type: ignore[arg-type]
    sleeper = asyncio.create_task(conn.execute("select pg_sleep(300)"))
    await wait_for_sleeper(stack, ep)
    return conn, sleeper


async def wait_for_sleeper(stack: Up, ep: CreatedEndpoint) -> None:
    watcher = await direct(stack, ep)
    try:
        async with asyncio.timeout(DEADLINE):
            while not await watcher.fetchval(  # noqa: ASYNC110
                "select count(*) from pg_stat_activity where query = 'select pg_sleep(300)'"
                " and state = 'active'"
            ):
                await asyncio.sleep(0.02)
    finally:
        await watcher.close()


async def raw_login(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ep: CreatedEndpoint
) -> None:
    """The password form (no SNI, no options) keeps a raw client short: the proxy
    asks for a cleartext password `endpoint=<id>;<password>` (over TLS)."""
    writer.write(messages.startup_message({"user": ep.user, "database": ep.database}))
    await read_reply(reader, DEADLINE, until=lambda r: b"R" in r.types)
    writer.write(messages.password_message(f"endpoint={ep.id};{ep.password}"))
    hello = await read_reply(reader, DEADLINE, until=lambda r: b"Z" in r.types)
    assert hello.sqlstate is None and hello.types.endswith(b"Z"), hello.error


async def test_no_error_is_sent_after_the_clients_terminate(
    stack: Up, endpoint: CreatedEndpoint
) -> None:
    """A raw client reads on after Terminate: it must see the close and nothing else."""
    assert stack.certs is not None
    context = client_tls_context(stack.certs.ca.cert)
    injected, before = 0, errors_08006(stack)
    for _ in range(40):
        async with raw_connection(stack.proxy_port) as (reader, writer):
            await ssl_request_upgrade(reader, writer, context, None)
            await raw_login(reader, writer, endpoint)
            # A query first: the compute's last bytes before the close are then a
            # ReadyForQuery, which is what made the proxy add its 08006.
            writer.write(frame(b"Q", b"select 1\x00"))
            answer = await read_reply(reader, DEADLINE, until=lambda r: b"Z" in r.types)
            assert answer.types == b"TDCZ", answer
            writer.write(messages.terminate())
            bye = await read_reply(reader, DEADLINE)
            assert bye.closed
            injected += len(bye.messages)
    assert injected == 0
    assert errors_08006(stack) == before


def errors_08006(stack: Up) -> float:
    """The proxy's count of 08006 it sent (what a Node driver turned into crashes)."""
    assert stack.proxy is not None
    value: float = stack.proxy.state.metrics.errors_total.labels("08006")._value.get()
    return value


async def test_a_driver_disconnecting_100_times_sees_no_error(
    stack: Up, endpoint: CreatedEndpoint
) -> None:
    errors_before = errors_08006(stack)
    for _ in range(100):
        async with await psycopg.AsyncConnection.connect(endpoint.url_no_sni) as conn:
            await conn.execute("select 1")
    errors_after = errors_08006(stack)
    assert errors_after == errors_before


async def test_drain_ends_sessions_with_57P01_and_cancels_the_running_query(
    stack: Up, endpoint: CreatedEndpoint
) -> None:
    proxy = await start_frontdoor(stack)
    stopped = False
    try:
        idle = await asyncpg.connect(**proxied(proxy.port, endpoint))  # type: ignore[arg-type]
        assert await idle.fetchval("select 1") == 1
        busy, sleeper = await start_sleeper(stack, endpoint, proxy.port)
        await proxy.drain(timeout=0.2)
        stopped = True
        with pytest.raises(psycopg.OperationalError) as info:
            await asyncio.wait_for(sleeper, DEADLINE)
        assert info.value.sqlstate == "57P01"
        assert "proxy is shutting down" in str(info.value)
        # The idle session got its 57P01 when the drain began (what it reads is
        # checked byte for byte by the raw client below); asyncpg, as with a server
        # shutdown, marks the connection closed.
        assert idle.is_closed()
        await wait_until_no_sleeper(stack, endpoint)
        idle.terminate()
        await busy.close()
    finally:
        if not stopped:
            await proxy.drain(timeout=1)


async def test_an_idle_session_gets_57P01_on_drain_with_a_raw_client(
    stack: Up, endpoint: CreatedEndpoint
) -> None:
    """The idle client reads the ErrorResponse itself, whole, then the close."""
    assert stack.certs is not None
    proxy = await start_frontdoor(stack)
    try:
        async with raw_connection(proxy.port) as (reader, writer):
            await ssl_request_upgrade(reader, writer, client_tls_context(stack.certs.ca.cert), None)
            await raw_login(reader, writer, endpoint)
            drained = asyncio.create_task(proxy.drain(timeout=5))
            bye = await read_reply(reader, DEADLINE)
            await drained
        assert bye.closed and bye.types == b"E"
        assert bye.sqlstate == "57P01" and bye.error is not None
        assert bye.error["S"] == "FATAL"
    finally:
        await proxy.drain(timeout=1)


async def test_a_client_that_vanishes_mid_query_gets_it_cancelled(
    stack: Up, endpoint: CreatedEndpoint
) -> None:
    """psql is SIGKILLed while its query runs: its socket closes, no Terminate sent."""
    psql = await asyncio.create_subprocess_exec(
        shutil.which("psql") or "psql", endpoint.url_no_sni, "-X", "-c", "select pg_sleep(300)",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await wait_for_sleeper(stack, endpoint)
    finally:
        psql.kill()
        await psql.wait()
    await wait_until_no_sleeper(stack, endpoint)


async def test_a_compute_killed_mid_query_gives_08006(stack: Up, endpoint: CreatedEndpoint) -> None:
    conn, sleeper = await start_sleeper(stack, endpoint, stack.proxy_port)
    watcher = await direct(stack, endpoint)
    pid = await watcher.fetchval(
        "select pid from pg_stat_activity where query = 'select pg_sleep(300)'"
    )
    await watcher.close()
    os.kill(pid, signal.SIGKILL)  # the backend dies; the postmaster restarts the rest
    with pytest.raises(psycopg.OperationalError) as info:
        await asyncio.wait_for(sleeper, DEADLINE)
    assert info.value.sqlstate in ("08006", "57P01")
    await conn.close()


async def test_proxy_drain_of_a_session_in_a_transaction_waits_for_its_commit(
    stack: Up, endpoint: CreatedEndpoint
) -> None:
    proxy = await start_frontdoor(stack)
    try:
        conn = await asyncpg.connect(**proxied(proxy.port, endpoint))  # type: ignore[arg-type]
        await conn.execute("create table if not exists drained (v int)")
        tx = conn.transaction()
        await tx.start()
        await conn.execute("insert into drained values (1)")
        drained = asyncio.create_task(proxy.drain(timeout=DEADLINE))
        await asyncio.sleep(0)
        await tx.commit()  # the open transaction is allowed to finish…
        await drained  # …and the session then ends at its idle point
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError)):
            await conn.fetchval("select 1")
        conn.terminate()
    finally:
        await proxy.drain(timeout=1)
    check = await direct(stack, endpoint)
    assert await check.fetchval("select count(*) from drained") == 1
    await check.close()


