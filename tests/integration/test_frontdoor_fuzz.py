"""Socket-level fuzz of the front door: every hostile or malformed opening listed in the
front-door issue ends in an ErrorResponse or a close within its deadline, the proxy
never crashes, and a good client connecting during the run is served."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import psycopg
import pytest

from pgwake.up import Up
from proxy.app import ProxyServer
from proxy.pgwire import messages
from proxy.pgwire.codec import frame
from tests.wire import (
    Reply,
    client_tls_context,
    read_reply,
    ssl_request_upgrade,
    start_frontdoor,
    startup,
    untyped,
)
from wakeup.api import CreatedEndpoint

DOMAIN = "pgwake.localhost"
# Short deadlines, so a stalled case ends fast; the margin covers a loaded machine.
STARTUP_TIMEOUT = TLS_TIMEOUT = AUTH_STEP_TIMEOUT = 1.0
HANDSHAKE_TIMEOUT = 4.0
MARGIN = 3.0
CANCEL, SSL, GSS = 80877102, 80877103, 80877104


Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[Reply]]


@dataclass
class Case:
    name: str
    run: Script
    sqlstates: tuple[str, ...] = ()  # () → a close is enough (nothing to answer)


@pytest.fixture
async def fuzz_proxy(stack: Up) -> AsyncIterator[ProxyServer]:
    proxy = await start_frontdoor(
        stack,
        startup_timeout=STARTUP_TIMEOUT,
        tls_timeout=TLS_TIMEOUT,
        auth_step_timeout=AUTH_STEP_TIMEOUT,
        handshake_timeout=HANDSHAKE_TIMEOUT,
    )
    yield proxy
    await proxy.drain(timeout=1)


def _deadline() -> float:
    return HANDSHAKE_TIMEOUT + MARGIN


def send(*chunks: bytes) -> Script:
    async def go(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Reply:
        for chunk in chunks:
            writer.write(chunk)
        await writer.drain()
        return await read_reply(reader, _deadline())

    return go


async def gss_twice(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Reply:
    writer.write(untyped(GSS))
    assert await asyncio.wait_for(reader.readexactly(1), _deadline()) == b"N"
    writer.write(untyped(GSS))
    return await read_reply(reader, _deadline())


def over_tls(
    *chunks: bytes, sni: str | None = None, direct: bool = False,
    alpn: tuple[str, ...] | None = ("postgresql",),
) -> Script:
    async def go(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Reply:
        context = client_tls_context(None, alpn=alpn)
        if direct:
            await writer.start_tls(context, server_hostname=sni)
        else:
            await ssl_request_upgrade(reader, writer, context, sni)
        for chunk in chunks:
            writer.write(chunk)
        await writer.drain()
        return await read_reply(reader, _deadline())

    return go


def sasl_case(
    endpoint: str, respond: Callable[[bytes], list[bytes]], *, first: bytes | None = None
) -> Script:
    """TLS + StartupMessage for the endpoint, then `first` (or a valid client-first) and,
    once the server-first arrives, whatever `respond(server_first)` returns."""

    async def go(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Reply:
        await ssl_request_upgrade(reader, writer, client_tls_context(None), f"{endpoint}.{DOMAIN}")
        writer.write(startup({"user": "app", "database": "main"}))
        reply = await read_reply(reader, _deadline(), until=lambda r: b"R" in r.types)
        if reply.closed or b"R" not in reply.types:
            return reply
        nonce = base64.b64encode(os.urandom(18))
        writer.write(first or messages.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=" + nonce))
        more = await read_reply(
            reader, _deadline(), until=lambda r: r.types.count(b"R") >= 1 or b"E" in r.types
        )
        if b"E" in more.types and not more.closed:
            more.closed = (await read_reply(reader, _deadline())).closed
        if more.closed or b"E" in more.types:
            return more
        _, server_first = messages.parse_authentication(more.messages[-1][1])
        for chunk in respond(server_first):
            writer.write(chunk)
        await writer.drain()
        return await read_reply(reader, _deadline())

    return go


def _final(server_first: bytes, *, nonce: str | None = None, channel: str = "biws",
           proof: str | None = None) -> list[bytes]:
    attrs = dict(item.split("=", 1) for item in server_first.decode().split(","))
    proof = proof or base64.b64encode(b"\0" * 32).decode()
    body = f"c={channel},r={nonce or attrs['r']},p={proof}"
    return [messages.sasl_response(body.encode())]


def cases(ep: CreatedEndpoint) -> list[Case]:
    sni = f"{ep.id}.{DOMAIN}"
    user = {"user": "app"}
    out: list[Case] = []
    # Lengths: 0–7 and 10005, 2^31−1 are refused at once; 8 and 10004 are legal lengths.
    for length in [*range(8), 10005, 2**31 - 1]:
        out.append(Case(f"length {length}",
                        send(struct.pack("!II", length, 196608)), ("08P01",)))
    out.append(Case("length 8, no parameters", send(untyped(196608)), ("08P01",)))
    padding = "x" * (10004 - len(startup({"user": "app", "p": ""})))
    big = startup({"user": "app", "p": padding})
    assert len(big) == 10004
    out.append(Case("length 10004, plaintext", send(big), ("08P01",)))
    out.append(Case("length 10004 claimed, never sent", send(big[:100]), ("08006",)))
    for code in (0, 1234, 0xFFFFFFFF, SSL + 2, 0x00020000, 0x00040000):
        out.append(Case(f"code {code:#x}", send(untyped(code, b"user\0app\0\0")), ("0A000",)))
    # Versions over TLS: 3.1/3.2 are accepted (then the silent client times out in auth),
    # 3.9999 is negotiated down, 2.0 and 4.0 are refused.
    for version, states in (((2, 0), ("0A000",)), ((4, 0), ("0A000",)), ((3, 1), ("08006",)),
                            ((3, 2), ("08006",)), ((3, 9999), ("08006",))):
        out.append(Case(f"version {version}", over_tls(startup(user, version), sni=sni), states))
    out.append(Case("SSLRequest twice (inside TLS)", over_tls(messages.ssl_request()), ("08P01",)))
    out.append(Case("GSSENCRequest twice", gss_twice, ("0A000",)))
    out.append(Case("pipelined bytes after SSLRequest",
                    send(messages.ssl_request() + startup(user)), ("08P01",)))
    out.append(Case("direct TLS without ALPN", over_tls(direct=True, alpn=None), ("08P01",)))
    out.append(Case("direct TLS, wrong ALPN", over_tls(direct=True, alpn=("http/1.1",)),
                    ("08P01",)))
    out.append(Case("direct TLS, then silence", over_tls(direct=True, sni=sni), ("08006",)))
    out.append(Case("TLS ClientHello byte, then silence", send(b"\x16"), ()))
    out.append(Case("silence", send(), ()))
    out.append(Case("no SNI, no options: password not in the form",
                    over_tls(startup(user), messages.password_message("hunter2")), ("08P01",)))
    out.append(Case("no SNI: password form with a bad id",
                    over_tls(startup(user), messages.password_message("endpoint=EP;x")),
                    ("08P01",)))
    for odd in (f"a.b.{DOMAIN}", f"ep_x.{DOMAIN}", f"-x.{DOMAIN}", f"{'a' * 63}.{DOMAIN}"):
        # The last is a well-formed id that names no endpoint: 3D000.
        out.append(Case(f"odd SNI {odd[:20]}", over_tls(startup(user), sni=odd),
                        ("08P01", "3D000")))
    for length in range(8, 16 + 256 + 2):
        payload = struct.pack("!I", 1) + b"s" * max(0, length - 12)
        states = () if 16 <= length <= 12 + 256 else ("08P01",)
        out.append(Case(f"CancelRequest length {length}",
                        send(untyped(CANCEL, payload[: max(0, length - 8)], length)), states))
    body = b"user\0app\0"
    out.append(Case("no terminator", send(untyped(196608, body)), ("08P01",)))
    out.append(Case("no user", send(untyped(196608, b"database\0x\0\0")), ("28000",)))
    out.append(Case("duplicate keys", send(untyped(196608, body + body + b"\0")), ("08P01",)))
    out.append(Case("invalid UTF-8", send(untyped(196608, b"user\0\xff\xfe\0\0")), ("08P01",)))
    out.append(Case("64-byte names (a silent client after)",
                    over_tls(startup({"user": "u" * 64, "k" * 64: "v" * 64}), sni=sni),
                    ("08006",)))
    out.append(Case("several endpoint= that disagree",
                    over_tls(startup(user | {"options": "endpoint=ep-a endpoint=ep-b"})),
                    ("08P01",)))
    out.append(Case("options and SNI disagree",
                    over_tls(startup(user | {"options": "endpoint=ep-other"}), sni=sni),
                    ("08P01",)))
    # SASL.
    out.append(Case("SASL message length 3", sasl_case(ep.id, list, first=b"p\0\0\0\3"),
                    ("08P01",)))
    out.append(Case("SASL message length 2^31-1",
                    sasl_case(ep.id, list, first=b"p\x7f\xff\xff\xff"), ("08P01",)))
    out.append(Case("SASL inner length lies",
                    sasl_case(ep.id, list, first=frame(b"p", b"SCRAM-SHA-256\0\0\0\0\x64abc")),
                    ("08P01",)))
    out.append(Case("unknown mechanism",
                    sasl_case(ep.id, list,
                              first=messages.sasl_initial_response("SCRAM-SHA-1", b"n,,n=,r=x")),
                    ("08P01",)))
    for flag, mech in (("y", "SCRAM-SHA-256"), ("p=tls-server-end-point", "SCRAM-SHA-256"),
                       ("n", "SCRAM-SHA-256-PLUS"), ("p=tls-unique", "SCRAM-SHA-256-PLUS"),
                       ("q", "SCRAM-SHA-256")):
        first = messages.sasl_initial_response(mech, f"{flag},,n=,r=abcdef".encode())
        out.append(Case(f"channel-binding flag {flag} with {mech}",
                        sasl_case(ep.id, list, first=first), ("08P01", "28000")))
    out.append(Case("bad base64 in client-final",
                    sasl_case(ep.id, lambda sf: _final(sf, channel="!!!")), ("08P01",)))
    out.append(Case("bad base64 proof", sasl_case(ep.id, lambda sf: _final(sf, proof="%%%")),
                    ("08P01",)))
    out.append(Case("nonce mismatch", sasl_case(ep.id, lambda sf: _final(sf, nonce="bogus")),
                    ("08P01",)))
    out.append(Case("wrong proof", sasl_case(ep.id, _final), ("28P01",)))
    out.append(Case("Query before auth ends",
                    sasl_case(ep.id, lambda sf: [frame(b"Q", b"select 1\0")]), ("08P01",)))
    out.append(Case("Query instead of SASLInitialResponse",
                    sasl_case(ep.id, list, first=frame(b"Q", b"select 1\0")), ("08P01",)))
    out.append(Case("silent after AuthenticationSASL",
                    over_tls(startup(user), sni=sni), ("08006",)))
    return out


async def run_case(port: int, case: Case) -> tuple[Case, Reply | BaseException]:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            return case, await case.run(reader, writer)
        finally:
            writer.transport.abort()
    except (ConnectionError, OSError, asyncio.IncompleteReadError) as exc:
        return case, exc  # the proxy closed on us mid-way: a close is a proper end


async def test_fuzz_every_case_ends_properly_and_good_clients_are_served(
    stack: Up, fuzz_proxy: ProxyServer, caplog: pytest.LogCaptureFixture
) -> None:
    assert stack.client is not None and stack.certs is not None
    ep = await stack.client.create_endpoint()
    good = {
        "host": f"{ep.id}.{DOMAIN}", "hostaddr": "127.0.0.1", "port": fuzz_proxy.port,
        "user": ep.user, "password": ep.password, "dbname": ep.database,
        "sslmode": "verify-full", "sslrootcert": str(stack.certs.ca.cert),
        "channel_binding": "require",
    }

    async def good_client() -> int:
        async with await psycopg.AsyncConnection.connect(**good) as conn:
            row = await (await conn.execute("select 42")).fetchone()
            assert row is not None
            return int(row[0])

    all_cases = cases(ep)
    limit = asyncio.Semaphore(64)

    async def bounded(case: Case) -> tuple[Case, Reply | BaseException]:
        async with limit:
            return await run_case(fuzz_proxy.port, case)

    caplog.set_level(logging.INFO, logger="proxy")
    results, during = await asyncio.gather(
        asyncio.gather(*(bounded(case) for case in all_cases)), good_client()
    )
    assert during == 42
    problems = []
    for case, outcome in results:
        if isinstance(outcome, BaseException):
            if case.sqlstates and not isinstance(outcome, ConnectionError | OSError):
                problems.append(f"{case.name}: {outcome!r}")
            continue
        if not outcome.closed:
            problems.append(f"{case.name}: still open after {_deadline()} s ({outcome.types!r})")
        elif case.sqlstates and outcome.sqlstate not in case.sqlstates:
            problems.append(f"{case.name}: sqlstate {outcome.sqlstate}, want {case.sqlstates}"
                            f" ({outcome.error})")
        elif outcome.sqlstate == "XX000":
            problems.append(f"{case.name}: internal error")
    assert not problems, "\n".join(problems)
    errors = [
        r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("proxy")
    ]
    assert not errors, "the proxy logged internal errors"
    # Still serving, and nothing left in the handshake phase.
    assert await good_client() == 42
    assert fuzz_proxy.state.handshakes == 0
    assert len(all_cases) > 300
