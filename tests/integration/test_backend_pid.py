"""The backend PID a client is told is the compute's real one (issue 9 P1), and its
cancel key still works through either proxy replica, with short and long secrets."""

from __future__ import annotations

import asyncio
import ssl
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import psycopg
import pytest

from pgwake.up import Up
from proxy.cancel import CancelMap, CancelTarget
from proxy.shared import LocalShared, RedisShared
from tests.helpers import running_up
from tests.integration.test_shared_state import (
    DEADLINE,
    Relay,
    start_proxy_process,
    stop_process,
)
from tests.servers import RedisServer, raise_open_file_limit
from wakeup.api import ComputeAddress, CreatedEndpoint


@pytest.fixture(scope="module")
async def replicas(pg_bin: Path, redis_server: RedisServer) -> AsyncIterator[tuple[Up, int]]:
    """`pgwake up --redis` (replica A, in process) and a `pgwake proxy` process (replica B)."""
    raise_open_file_limit()
    async with running_up("pgwake-pid-", pg_bin, redis_url=redis_server.url) as up:
        proc, port = await start_proxy_process(up, redis_server.url)
        try:
            yield up, port
        finally:
            await stop_process(proc)


@pytest.fixture
async def endpoint(replicas: tuple[Up, int]) -> CreatedEndpoint:
    up, _ = replicas
    assert up.client is not None
    return await up.client.create_endpoint()


def kwargs(port: int, ep: CreatedEndpoint, **extra: object) -> dict[str, object]:
    return {
        "host": "127.0.0.1", "port": port, "user": ep.user, "password": ep.password,
        "dbname": ep.database, "sslmode": "require", "options": f"endpoint={ep.id}",
        "connect_timeout": 30, **extra,
    }


async def running_query(watcher: psycopg.AsyncConnection[tuple[object, ...]], pid: int) -> None:
    """Wait until the compute shows the backend `pid` running its query."""
    async with asyncio.timeout(DEADLINE):
        while True:
            cur = await watcher.execute(
                "select 1 from pg_stat_activity where pid = %s and state = 'active'"
                " and query like 'select pg_sleep%%'", (pid,))
            if await cur.fetchone() is not None:
                return
            await asyncio.sleep(0.01)


async def test_psycopg_reported_pid_is_the_backends(
    replicas: tuple[Up, int], endpoint: CreatedEndpoint
) -> None:
    up, _ = replicas
    async with await psycopg.AsyncConnection.connect(**kwargs(up.proxy_port, endpoint)) as conn:
        cur = await conn.execute("select pg_backend_pid()")
        assert await cur.fetchone() == (conn.info.backend_pid,)
        cur = await conn.execute(
            "select count(*) from pg_stat_activity where pid = %s", (conn.info.backend_pid,))
        assert await cur.fetchone() == (1,)


async def test_asyncpg_server_pid_is_the_backends(
    replicas: tuple[Up, int], endpoint: CreatedEndpoint
) -> None:
    up, _ = replicas
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    conn = await asyncpg.connect(
        host="127.0.0.1", port=up.proxy_port, user=endpoint.user, password=endpoint.password,
        database=endpoint.database, ssl=ctx,
        server_settings={"options": f"endpoint={endpoint.id}"}, timeout=30,
    )
    try:
        assert await conn.fetchval("select pg_backend_pid()") == conn.get_server_pid()
    finally:
        await conn.close()


async def test_notification_to_self_carries_the_reported_pid(
    replicas: tuple[Up, int], endpoint: CreatedEndpoint
) -> None:
    up, _ = replicas
    conn = await psycopg.AsyncConnection.connect(
        **kwargs(up.proxy_port, endpoint), autocommit=True)
    async with conn:
        await conn.execute("listen pgwake_self")
        await conn.execute("notify pgwake_self, 'hello'")
        async with asyncio.timeout(DEADLINE):
            async for notify in conn.notifies():
                assert notify.payload == "hello"
                # How applications skip their own notifications.
                assert notify.pid == conn.info.backend_pid
                break


async def test_pg_cancel_backend_with_the_reported_pid(
    replicas: tuple[Up, int], endpoint: CreatedEndpoint
) -> None:
    up, _ = replicas
    info = kwargs(up.proxy_port, endpoint)
    async with (
        await psycopg.AsyncConnection.connect(**info) as victim,
        await psycopg.AsyncConnection.connect(**info, autocommit=True) as other,
    ):
        query = asyncio.create_task(victim.execute("select pg_sleep(60)"))
        await running_query(other, victim.info.backend_pid)
        cur = await other.execute("select pg_cancel_backend(%s)", (victim.info.backend_pid,))
        assert await cur.fetchone() == (True,)
        with pytest.raises(psycopg.errors.QueryCanceled):
            await asyncio.wait_for(query, DEADLINE)


@pytest.mark.parametrize("protocol", ["3.0", "3.2"])
async def test_cancel_through_either_replica(
    replicas: tuple[Up, int], endpoint: CreatedEndpoint, protocol: str
) -> None:
    """libpq's own cancel (PQcancelCreate: the key it holds, 4 or 32 bytes of secret)
    through the proxy that holds the session, then through the other replica: a
    relay sends the client's connection to A and its CancelRequest to B."""
    up, other_port = replicas
    relay = Relay(up.proxy_port)
    await relay.start()
    try:
        info = kwargs(relay.port, endpoint, max_protocol_version=protocol)
        async with (
            await psycopg.AsyncConnection.connect(**info) as conn,
            await psycopg.AsyncConnection.connect(
                **kwargs(up.proxy_port, endpoint), autocommit=True) as watcher,
        ):
            assert conn.info.backend_pid > 0
            for target in (up.proxy_port, other_port):
                relay.target_port = target
                query = asyncio.create_task(conn.execute("select pg_sleep(60)"))
                await running_query(watcher, conn.info.backend_pid)
                await conn.cancel_safe()
                with pytest.raises(psycopg.errors.QueryCanceled):
                    await asyncio.wait_for(query, DEADLINE)
                await conn.rollback()
    finally:
        await relay.stop()


async def test_raw_cancel_request_with_the_reported_pid_via_other_replica(
    replicas: tuple[Up, int], endpoint: CreatedEndpoint
) -> None:
    up, other_port = replicas
    info = kwargs(up.proxy_port, endpoint)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    conn = await asyncpg.connect(
        host="127.0.0.1", port=up.proxy_port, user=endpoint.user, password=endpoint.password,
        database=endpoint.database, ssl=ctx,
        server_settings={"options": f"endpoint={endpoint.id}"}, timeout=30,
    )
    try:
        pid, secret = conn._protocol.backend_pid, conn._protocol.backend_secret
        assert pid == conn.get_server_pid()
        async with await psycopg.AsyncConnection.connect(**info, autocommit=True) as watcher:
            # A wrong secret with the right PID cancels nothing.
            query = asyncio.create_task(conn.execute("select pg_sleep(60)"))
            await running_query(watcher, pid)
            for key in (secret ^ 1, secret):
                reader, writer = await asyncio.open_connection("127.0.0.1", other_port)
                writer.write(struct.pack("!iiii", 16, 80877102, pid, key))
                await writer.drain()
                # The proxy closes once it has handled (or dropped) the request.
                assert await asyncio.wait_for(reader.read(), DEADLINE) == b""
                writer.close()
                if key != secret:
                    assert not query.done()
            with pytest.raises(asyncpg.QueryCanceledError):
                await asyncio.wait_for(query, DEADLINE)
    finally:
        await conn.close()


@pytest.mark.parametrize("backend", ["local", "redis"])
async def test_equal_pids_on_two_computes_do_not_collide(
    redis_server: RedisServer, backend: str
) -> None:
    shared = LocalShared() if backend == "local" else RedisShared(redis_server.url)
    await shared.start()
    try:
        issuer, reader = CancelMap(shared), CancelMap(shared)  # two replicas
        a = CancelTarget(ComputeAddress("127.0.0.1", 1001), 4242, b"aaaa")
        b = CancelTarget(ComputeAddress("127.0.0.1", 1002), 4242, b"bbbb")
        key_a = await issuer.issue(a, long_secret=False)
        key_b = await issuer.issue(b, long_secret=True)
        assert key_a.pid == key_b.pid == 4242
        assert len(key_a.secret) == 4 and len(key_b.secret) == 32
        for cancels in (issuer, reader):
            assert await cancels.lookup(4242, key_a.secret) == a
            assert await cancels.lookup(4242, key_b.secret) == b
            assert await cancels.lookup(4242, b"aaaa") is None  # the compute's own secret
        await issuer.release(key_a)
        assert await reader.lookup(4242, key_a.secret) is None
        assert await reader.lookup(4242, key_b.secret) == b
        await issuer.release(key_b)
    finally:
        await shared.close()
