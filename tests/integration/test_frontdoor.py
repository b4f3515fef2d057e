"""The front door with real clients: every way libpq 18, libpq 15 and asyncpg open a
connection, the password form, protocol negotiation, limits, certificate rotation."""

from __future__ import annotations

import asyncio
import os
import shutil
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pgwake.up import Up
from proxy.app import ProxyServer
from proxy.pgwire import messages
from proxy.ratelimit import LimitSettings
from tests.helpers import make_data_dir, run
from tests.wire import (
    client_tls_context,
    raw_connection,
    read_reply,
    ssl_request_upgrade,
    start_frontdoor,
    startup,
)
from tls.certs import CertPair
from tls.devca import ensure_dev_ca, ensure_server_certificate
from wakeup.api import CreatedEndpoint

PSQL = shutil.which("psql") or "psql"
DOMAIN = "pgwake.localhost"


@pytest.fixture
async def endpoint(stack: Up) -> CreatedEndpoint:
    assert stack.client is not None
    return await stack.client.create_endpoint()


def libpq_kwargs(port: int, ca: Path, ep: CreatedEndpoint) -> dict[str, object]:
    return {
        "host": f"{ep.id}.{DOMAIN}",
        "hostaddr": "127.0.0.1",
        "port": port,
        "user": ep.user,
        "password": ep.password,
        "dbname": ep.database,
        "sslmode": "verify-full",
        "sslrootcert": str(ca),
    }


def conninfo(values: dict[str, object]) -> str:
    return " ".join(f"{k}='{v}'" for k, v in values.items())


def stack_ca(stack: Up) -> Path:
    assert stack.certs is not None
    return stack.certs.ca.cert


# -- libpq 18 (psycopg 3) --------------------------------------------------------------


async def test_psycopg_direct_tls_channel_binding_verify_full(
    stack: Up, endpoint: CreatedEndpoint
) -> None:
    kwargs = libpq_kwargs(stack.proxy_port, stack_ca(stack), endpoint) | {
        "sslnegotiation": "direct",
        "channel_binding": "require",
    }
    async with await psycopg.AsyncConnection.connect(**kwargs) as conn:
        cur = await conn.execute("select current_user, current_database(), 6 * 7")
        assert await cur.fetchone() == (endpoint.user, endpoint.database, 42)
        assert conn.info.pgconn.ssl_in_use


async def test_psycopg_protocol_32_long_cancel_keys(stack: Up, endpoint: CreatedEndpoint) -> None:
    kwargs = libpq_kwargs(stack.proxy_port, stack_ca(stack), endpoint) | {
        "max_protocol_version": "3.2",
        "channel_binding": "require",
    }
    async with await psycopg.AsyncConnection.connect(**kwargs) as conn:
        assert conn.info.pgconn.full_protocol_version == 30002
        query = asyncio.create_task(conn.execute("select pg_sleep(30)"))
        await asyncio.sleep(0.2)  # let the query reach the compute
        await conn.cancel_safe()  # carries the 32-byte secret the proxy issued
        with pytest.raises(psycopg.errors.QueryCanceled):
            await asyncio.wait_for(query, 10)
        await conn.rollback()
        cur = await conn.execute("select 'after cancel'")
        assert await cur.fetchone() == ("after cancel",)


async def test_psycopg_protocol_30_by_default(stack: Up, endpoint: CreatedEndpoint) -> None:
    kwargs = libpq_kwargs(stack.proxy_port, stack_ca(stack), endpoint)
    async with await psycopg.AsyncConnection.connect(**kwargs) as conn:
        assert conn.info.pgconn.full_protocol_version == 30000


async def test_channel_binding_require_fails_without_tls(stack: Up) -> None:
    proxy = await start_frontdoor(stack, allow_plaintext=True)
    try:
        assert stack.client is not None
        ep = await stack.client.create_endpoint()
        kwargs = libpq_kwargs(proxy.port, stack_ca(stack), ep) | {
            "sslmode": "disable", "channel_binding": "require", "host": "127.0.0.1",
            "options": f"endpoint={ep.id}",
        }
        with pytest.raises(psycopg.OperationalError, match="channel binding"):
            await psycopg.AsyncConnection.connect(**kwargs)
        # Plaintext SCRAM (no binding possible) still works where allowed.
        kwargs["channel_binding"] = "prefer"
        async with await psycopg.AsyncConnection.connect(**kwargs) as conn:
            assert not conn.info.pgconn.ssl_in_use
            assert await (await conn.execute("select 1")).fetchone() == (1,)
    finally:
        await proxy.drain(timeout=1)


# -- libpq 15 (system psql) and asyncpg: the classic path ------------------------------


async def test_psql_15_verify_full_sni_and_channel_binding(
    stack: Up, endpoint: CreatedEndpoint
) -> None:
    values = libpq_kwargs(stack.proxy_port, stack_ca(stack), endpoint) | {
        "channel_binding": "require",
    }
    code, out, err = await run(PSQL, conninfo(values), "-X", "-Atqc", "select 'psql15 ok'")
    assert code == 0, err
    assert out.strip() == "psql15 ok"


async def test_psql_15_password_form(stack: Up, endpoint: CreatedEndpoint) -> None:
    values: dict[str, object] = {
        "host": "127.0.0.1", "port": stack.proxy_port, "user": endpoint.user,
        "dbname": endpoint.database, "sslmode": "require",
        "password": f"endpoint={endpoint.id};{endpoint.password}",
    }
    code, out, err = await run(PSQL, conninfo(values), "-X", "-Atqc", "select current_user")
    assert code == 0, err
    assert out.strip() == endpoint.user


async def test_asyncpg_password_form_and_verify_full_options(
    stack: Up, endpoint: CreatedEndpoint
) -> None:
    ctx = ssl.create_default_context(cafile=str(stack_ca(stack)))
    ctx.check_hostname = False  # asyncpg cannot send a host name apart from the address
    conn = await asyncpg.connect(
        host="127.0.0.1", port=stack.proxy_port, user=endpoint.user,
        password=f"endpoint={endpoint.id};{endpoint.password}",
        database=endpoint.database, ssl=ctx,
    )
    try:
        assert await conn.fetchval("select 40 + 2") == 42
    finally:
        await conn.close()
    # A wrong password in the form fails like any wrong password.
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(
            host="127.0.0.1", port=stack.proxy_port, user=endpoint.user,
            password=f"endpoint={endpoint.id};wrong", database=endpoint.database, ssl=ctx,
        )
    # A password that is not the form: the error explains how to name an endpoint.
    with pytest.raises(asyncpg.PostgresError) as info:
        await asyncpg.connect(
            host="127.0.0.1", port=stack.proxy_port, user=endpoint.user,
            password=endpoint.password, database=endpoint.database, ssl=ctx,
        )
    assert info.value.sqlstate == "08P01"
    assert "no endpoint given" in str(info.value)
    assert "endpoint=<endpoint>;<password>" in (info.value.hint or "")


# -- protocol negotiation at the socket ------------------------------------------------


async def test_negotiate_protocol_version_for_newer_minor_and_unknown_options(
    stack: Up, endpoint: CreatedEndpoint
) -> None:
    async with raw_connection(stack.proxy_port) as (reader, writer):
        sni = f"{endpoint.id}.{DOMAIN}"
        await ssl_request_upgrade(reader, writer, client_tls_context(None), sni)
        writer.write(startup({"user": "app", "_pq_.frobnicate": "on"}, (3, 9999)))
        reply = await read_reply(reader, 5, until=lambda r: b"R" in r.types)
    assert reply.types[:2] == b"vR", reply
    newest, unknown = messages.parse_negotiate_protocol_version(reply.messages[0][1])
    assert (newest, unknown) == (2, ["_pq_.frobnicate"])
    code, rest = messages.parse_authentication(reply.messages[1][1])
    assert code == 10 and b"SCRAM-SHA-256-PLUS" in rest


async def test_protocol_4_is_refused_with_0A000(stack: Up) -> None:
    async with raw_connection(stack.proxy_port) as (reader, writer):
        await ssl_request_upgrade(reader, writer, client_tls_context(None), None)
        writer.write(startup({"user": "app"}, (4, 0)))
        reply = await read_reply(reader, 5)
    assert reply.sqlstate == "0A000" and reply.closed


# -- limits --------------------------------------------------------------------------


@pytest.fixture
async def strict_proxy(stack: Up) -> AsyncIterator[ProxyServer]:
    proxy = await start_frontdoor(
        stack,
        limits=LimitSettings(
            auth_failure_burst=2, auth_failure_rate=0.01, connect_burst=6, connect_rate=0.01
        ),
        max_handshakes=3,
        startup_timeout=30.0,
    )
    yield proxy
    await proxy.drain(timeout=1)


async def test_brute_force_is_refused_per_client_and_endpoint(
    stack: Up, strict_proxy: ProxyServer
) -> None:
    assert stack.client is not None
    target, other = await stack.client.create_endpoint(), await stack.client.create_endpoint()
    ca = stack_ca(stack)

    async def attempt(ep: CreatedEndpoint, password: str) -> str:
        kwargs = libpq_kwargs(strict_proxy.port, ca, ep) | {"password": password}
        try:
            async with await psycopg.AsyncConnection.connect(**kwargs):
                return "ok"
        except psycopg.OperationalError as exc:
            return str(exc)

    assert "password authentication failed" in await attempt(target, "guess-1")
    assert "password authentication failed" in await attempt(target, "guess-2")
    refused = await attempt(target, "guess-3")
    assert "too many failed authentication attempts; retry in" in refused
    # Even the right password waits: the attacker cannot tell when they hit it.
    assert "too many failed authentication attempts" in await attempt(target, target.password)
    # Another endpoint from the same client is not affected.
    assert await attempt(other, other.password) == "ok"


async def test_connection_attempts_per_endpoint_are_limited(
    stack: Up, strict_proxy: ProxyServer
) -> None:
    assert stack.client is not None
    ep = await stack.client.create_endpoint()
    kwargs = libpq_kwargs(strict_proxy.port, stack_ca(stack), ep)
    outcomes = []
    for _ in range(8):
        try:
            async with await psycopg.AsyncConnection.connect(**kwargs):
                outcomes.append("ok")
        except psycopg.OperationalError as exc:
            outcomes.append(str(exc))
    assert outcomes[:6] == ["ok"] * 6
    assert all(f'too many connection attempts to endpoint "{ep.id}"' in o for o in outcomes[6:])


async def test_handshake_cap_refuses_fast_with_53300(stack: Up, strict_proxy: ProxyServer) -> None:
    # Accepted in order, so their sessions have started before the fourth one's does.
    async with IdleConnections(strict_proxy.port, 3) as idle:
        async with raw_connection(strict_proxy.port) as (reader, _writer):
            reply = await read_reply(reader, 5)
        assert reply.sqlstate == "53300" and reply.closed
        assert "too many connections in the startup phase" in (reply.error or {}).get("M", "")
        assert len(idle) == 3


class IdleConnections:
    """`count` idle raw connections held open for the block."""

    def __init__(self, port: int, count: int) -> None:
        self.port, self.count = port, count
        self.writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> list[asyncio.StreamWriter]:
        for _ in range(self.count):
            _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            self.writers.append(writer)
        return self.writers

    async def __aexit__(self, *exc: object) -> None:
        for writer in self.writers:
            writer.transport.abort()


# -- certificates: several pairs, rotation under a live session ------------------------


def _issue(directory: Path, names: list[str]) -> tuple[CertPair, CertPair]:
    ca = ensure_dev_ca(directory)
    return ca, ensure_server_certificate(directory, ca, names)


def _leaf_der(pair: CertPair) -> bytes:
    leaf = x509.load_pem_x509_certificate(pair.cert.read_bytes())
    return leaf.public_bytes(serialization.Encoding.DER)


async def _served_certificate(port: int, server_name: str) -> bytes:
    async with raw_connection(port) as (reader, writer):
        await ssl_request_upgrade(reader, writer, client_tls_context(None), server_name)
        ssl_object = writer.get_extra_info("ssl_object")
        der: bytes = ssl_object.getpeercert(binary_form=True)
        return der


async def test_several_pairs_and_rotation_keep_live_sessions(stack: Up) -> None:
    assert stack.client is not None
    root = make_data_dir("pgwake-certs-")
    try:
        ca1, main_pair = await asyncio.to_thread(_issue, root / "one", [f"*.{DOMAIN}", DOMAIN])
        _, extra_pair = await asyncio.to_thread(_issue, root / "extra", ["db.example.test"])
        ca2, renewed = await asyncio.to_thread(_issue, root / "two", [f"*.{DOMAIN}", DOMAIN])
        proxy = await start_frontdoor(stack, [main_pair, extra_pair], cert_reload_interval=0)
        try:
            ep = await stack.client.create_endpoint()
            before = await _served_certificate(proxy.port, f"{ep.id}.{DOMAIN}")
            assert before == _leaf_der(main_pair)
            assert await _served_certificate(proxy.port, "db.example.test") == _leaf_der(
                extra_pair
            )
            # No SNI, or a name no certificate covers: the first pair is the default.
            assert await _served_certificate(proxy.port, "other.example") == before

            old_kwargs = libpq_kwargs(proxy.port, ca1.cert, ep) | {"channel_binding": "require"}
            async with await psycopg.AsyncConnection.connect(**old_kwargs) as live:
                assert await (await live.execute("select 1")).fetchone() == (1,)
                # Rotate in place, the way a certificate manager does: new files, renamed in.
                for source, target in ((renewed.cert, main_pair.cert),
                                       (renewed.key, main_pair.key)):
                    staged = target.with_suffix(".new")
                    shutil.copyfile(source, staged)
                    os.replace(staged, target)
                assert proxy.reload_certificates()
                assert not proxy.reload_certificates()  # nothing changed since

                # The open session carries on over the old certificate.
                cur = await live.execute("select 'still here'")
                assert await cur.fetchone() == ("still here",)
                # New connections get the new certificate (and bind to it).
                after = await _served_certificate(proxy.port, f"{ep.id}.{DOMAIN}")
                assert after == _leaf_der(renewed) != before
                with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
                    await psycopg.AsyncConnection.connect(**old_kwargs)
                new_kwargs = libpq_kwargs(proxy.port, ca2.cert, ep) | {
                    "channel_binding": "require"
                }
                async with await psycopg.AsyncConnection.connect(**new_kwargs) as fresh:
                    assert await (await fresh.execute("select 2")).fetchone() == (2,)
                cur = await live.execute("select 'and still'")
                assert await cur.fetchone() == ("and still",)
        finally:
            await proxy.drain(timeout=1)
    finally:
        shutil.rmtree(root, ignore_errors=True)
