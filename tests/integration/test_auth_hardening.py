"""Auth at the front door under attack (issue 9, items 5, 7–11), with the real proxy,
the real control API, real TLS and real clients: a bounded role cache, role names
that cannot change a control API path, no wake for strangers, replies that do not
tell real roles from unknown ones, a per-role failure budget, and stale verifiers
while the control plane is down."""

from __future__ import annotations

import asyncio
import secrets
import ssl
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import psycopg
import pytest

from pgwake.up import Up
from proxy.app import ProxyServer
from proxy.pgwire import messages
from proxy.pgwire.codec import MessageReader
from proxy.ratelimit import LimitSettings
from proxy.rolecache import UNKNOWN_ROLE, RoleCache
from tests.helpers import proxy_settings
from tests.integration.test_shared_state import Relay
from tests.unit.test_scram import PasswordClient
from tests.wire import client_tls_context, ssl_request_upgrade, startup
from tls.context import ServerTLS
from wakeup.api import ControlAPIError, ControlClient, CreatedEndpoint, path_segment
from wakeup.service import bind_tcp

DOMAIN = "pgwake.localhost"
DEADLINE = 30.0


class RecordingControl(ControlClient):
    """The real control client, recording every request it sends (method, path)."""

    def __init__(self, base_url: str, api_key: str, **kwargs: Any) -> None:
        super().__init__(base_url, api_key, **kwargs)
        self.calls: list[tuple[str, str]] = []

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        self.calls.append((method, path))
        return await super()._call(method, path, **kwargs)


def api_key(stack: Up) -> str:
    return (stack.settings.data_dir / "api_key").read_text().strip()


@pytest.fixture
async def control(stack: Up) -> AsyncIterator[RecordingControl]:
    assert stack.control is not None
    client = RecordingControl(stack.control.api_url, api_key(stack))
    yield client
    await client.aclose()


async def frontdoor(stack: Up, control: ControlClient, **overrides: Any) -> ProxyServer:
    """A proxy of its own in front of the stack's control API (or a relay to it)."""
    assert stack.certs is not None
    tls = await asyncio.to_thread(ServerTLS.load, [stack.certs.server])
    settings = proxy_settings(listen_port=0, domain=DOMAIN, **overrides)
    proxy = ProxyServer(settings, control=control, server_tls=tls)
    await proxy.start(bind_tcp("127.0.0.1", 0, settings.backlog))
    return proxy


@pytest.fixture
async def endpoint(stack: Up) -> CreatedEndpoint:
    assert stack.client is not None
    return await stack.client.create_endpoint()


class Wire:
    """A raw client over real TLS (SNI), from a chosen loopback source address."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.parser = MessageReader()

    @classmethod
    async def open(cls, port: int, endpoint_id: str, source: str = "127.0.0.1") -> Wire:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, local_addr=(source, 0)
        )
        await ssl_request_upgrade(
            reader, writer, client_tls_context(None), f"{endpoint_id}.{DOMAIN}"
        )
        return cls(reader, writer)

    async def message(self) -> tuple[bytes, bytes]:
        async with asyncio.timeout(DEADLINE):
            while (message := self.parser.next_message()) is None:
                data = await self.reader.read(65536)
                if not data:
                    raise ConnectionError("the proxy closed the connection")
                self.parser.feed(data)
        return message

    def close(self) -> None:
        self.writer.transport.abort()


def error_of(message: tuple[bytes, bytes]) -> dict[str, str]:
    kind, body = message
    assert kind == b"E", message
    return messages.parse_error_fields(body)


async def first_reply(port: int, endpoint_id: str, user: str) -> tuple[bytes, bytes]:
    """StartupMessage in, the proxy's first reply out (AuthenticationSASL or an error)."""
    wire = await Wire.open(port, endpoint_id)
    try:
        wire.writer.write(startup({"user": user, "database": "main"}))
        return await wire.message()
    finally:
        wire.close()


async def scram_login(
    port: int, endpoint_id: str, user: str, password: str, *, source: str = "127.0.0.1"
) -> list[tuple[bytes, bytes]]:
    """A whole SCRAM-SHA-256 login by hand; every message the proxy sent, in order."""
    wire = await Wire.open(port, endpoint_id, source)
    seen: list[tuple[bytes, bytes]] = []
    try:
        wire.writer.write(startup({"user": user, "database": "main"}))
        seen.append(await wire.message())
        if seen[-1][0] != b"R":
            return seen
        client = PasswordClient(password, client_nonce=secrets.token_urlsafe(18))
        wire.writer.write(messages.sasl_initial_response("SCRAM-SHA-256", client.first()))
        seen.append(await wire.message())
        if seen[-1][0] != b"R":
            return seen
        _, server_first = messages.parse_authentication(seen[-1][1])
        wire.writer.write(messages.sasl_response(client.final(server_first)))
        seen.append(await wire.message())
        return seen
    finally:
        wire.close()


def libpq(port: int, ep: CreatedEndpoint, **overrides: object) -> dict[str, object]:
    values: dict[str, object] = {
        "host": f"{ep.id}.{DOMAIN}", "hostaddr": "127.0.0.1", "port": port,
        "user": ep.user, "password": ep.password, "dbname": ep.database,
        "sslmode": "require",
    }
    return values | overrides


async def select_user(port: int, ep: CreatedEndpoint, **overrides: object) -> str:
    async with await psycopg.AsyncConnection.connect(**libpq(port, ep, **overrides)) as conn:
        row = await (await conn.execute("select current_user")).fetchone()
        assert row is not None
        return str(row[0])


async def asyncpg_error(port: int, ep: CreatedEndpoint, user: str, password: str) -> Any:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with pytest.raises(asyncpg.PostgresError) as info:
        await asyncpg.connect(
            host="127.0.0.1", port=port, user=user, password=password,
            database=ep.database, ssl=ctx, server_settings={"options": f"endpoint={ep.id}"},
        )
    return info.value


# -- item 7: the role cache is bounded and keyed by validated names only -------------


async def test_role_cache_stays_bounded_under_many_distinct_names(
    stack: Up, control: RecordingControl, endpoint: CreatedEndpoint
) -> None:
    proxy = await frontdoor(stack, control, role_cache_max_entries=40)
    try:
        for index in range(200):
            kind, _ = await first_reply(proxy.port, endpoint.id, f"stranger_{index}")
            assert kind == b"R"
            assert len(proxy.state.roles) <= 40
        # Long names are cut to 63 bytes, as PostgreSQL cuts them; what is left is
        # either a valid name (a bounded key) or refused with no lookup at all.
        kind, _ = await first_reply(proxy.port, endpoint.id, "x" * 9000)
        assert kind == b"R"
        assert (endpoint.id, "x" * 63) in proxy.state.roles._entries
        control.calls.clear()
        fields = error_of(await first_reply(proxy.port, endpoint.id, "../" * 3000))
        assert fields["C"] == "28000"
        assert fields["M"] == f'role "{("../" * 21)}" does not exist'
        assert control.calls == []
        assert len(proxy.state.roles) == 40
        assert all(len(role) <= 63 for _, role in proxy.state.roles._entries)
        # The real role was pushed out by the crowd and is simply fetched again.
        assert await select_user(proxy.port, endpoint) == endpoint.user
    finally:
        await proxy.drain(timeout=2)


async def test_positive_and_negative_answers_live_alike_and_refresh(
    stack: Up, endpoint: CreatedEndpoint
) -> None:
    """The cache through the real control API, on a clock the test moves."""
    assert stack.client is not None
    now = [1000.0]
    outcomes: list[str] = []
    cache = RoleCache(
        stack.client, 30.0, refresh_after=5.0, max_entries=3,
        clock=lambda: now[0], count=outcomes.append,
    )
    try:
        real = await cache.get(endpoint.id, endpoint.user, timeout=DEADLINE)
        assert real.secret is not None
        assert await cache.get(endpoint.id, "ghost", timeout=DEADLINE) is UNKNOWN_ROLE
        assert outcomes == ["miss", "miss"]
        # Past refresh_after, within the TTL: both are answered at once, and both
        # re-checked in the background (a "no such role" is not kept long unchecked).
        now[0] += 10.0
        await cache.get(endpoint.id, endpoint.user, timeout=DEADLINE)
        await cache.get(endpoint.id, "ghost", timeout=DEADLINE)
        assert outcomes[2:] == ["hit", "hit"]
        assert len(cache._inflight) == 2
        await asyncio.gather(*cache._inflight.values())
        # Past the TTL (counted from the refresh): both are fetched again, alike.
        now[0] += 31.0
        await cache.get(endpoint.id, endpoint.user, timeout=DEADLINE)
        await cache.get(endpoint.id, "ghost", timeout=DEADLINE)
        assert outcomes[4:] == ["miss", "miss"]
        # Least recently used go first.
        for name in ("ghost_a", "ghost_b", "ghost_c"):
            await cache.get(endpoint.id, name, timeout=DEADLINE)
        assert len(cache) == 3
        assert (endpoint.id, endpoint.user) not in cache._entries
    finally:
        await cache.close()


# -- item 8: role names cannot change a control API path -----------------------------


async def test_traversal_role_names_reach_no_other_route(
    stack: Up, control: RecordingControl
) -> None:
    assert stack.client is not None
    a, b = await stack.client.create_endpoint(), await stack.client.create_endpoint()
    proxy = await frontdoor(stack, control)
    try:
        control.calls.clear()
        for user in ("../../../endpoints", f"../../{b.id}/roles/{b.user}", "app/..", ".."):
            fields = error_of(await first_reply(proxy.port, a.id, user))
            assert fields["C"] == "28000", fields
            assert fields["M"] == f'role "{user}" does not exist'
            assert "letters, digits" in fields["D"]
        assert control.calls == []
        # A real client with B's password, through A: refused, never verified against B.
        with pytest.raises(psycopg.OperationalError, match="does not exist"):
            await select_user(
                proxy.port, a, user=f"../../{b.id}/roles/{b.user}", password=b.password
            )
        assert control.calls == []
    finally:
        await proxy.drain(timeout=2)
    # The client itself builds no path from a value that could escape its segment...
    for value in ("..", ".", "", "a/b", "a\\b"):
        with pytest.raises(ValueError):
            path_segment(value)
    with pytest.raises(ValueError):
        await control.get_role(a.id, f"../../{b.id}/roles/{b.user}")
    with pytest.raises(ValueError):
        await control.get_endpoint("..")
    # ...and what it encodes arrives as one segment at the role route of A.
    with pytest.raises(ControlAPIError) as info:
        await control.get_role(a.id, "app%2F..%2F..%2Fendpoints")
    assert info.value.code == "role_not_found"
    assert control.calls[-1] == (
        "GET", f"/endpoints/{a.id}/roles/app%252F..%252F..%252Fendpoints"
    )


# -- item 9: an unknown role wakes nothing ----------------------------------------------


async def test_unknown_role_does_not_wake_a_suspended_endpoint(
    stack: Up, control: RecordingControl, endpoint: CreatedEndpoint
) -> None:
    assert stack.client is not None
    await stack.client.suspend(endpoint.id)
    proxy = await frontdoor(stack, control)
    try:
        control.calls.clear()
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            await select_user(proxy.port, endpoint, user="mallory")
        assert [c for c in control.calls if c[1].endswith("/wake")] == []
        assert (await stack.client.get_endpoint(endpoint.id)).state == "suspended"
        # The real role still wakes it, overlapped with its SCRAM exchange.
        assert await select_user(proxy.port, endpoint) == endpoint.user
        assert ("POST", f"/endpoints/{endpoint.id}/wake") in control.calls
    finally:
        await proxy.drain(timeout=2)


# -- item 10: real and unknown roles get the same replies ---------------------------


async def test_real_and_unknown_roles_get_the_same_replies(
    stack: Up, endpoint: CreatedEndpoint
) -> None:
    real = await scram_login(stack.proxy_port, endpoint.id, endpoint.user, "wrong password")
    unknown = await scram_login(stack.proxy_port, endpoint.id, "mallory", "wrong password")
    assert [kind for kind, _ in real] == [kind for kind, _ in unknown] == [b"R", b"R", b"E"]
    assert real[0] == unknown[0]  # the same mechanisms
    shapes = []
    for login in (real, unknown):
        code, server_first = messages.parse_authentication(login[1][1])
        attrs = dict(part.split("=", 1) for part in server_first.decode().split(","))
        shapes.append((code, sorted(attrs), len(attrs["s"]), attrs["i"], len(attrs["r"])))
    assert shapes[0] == shapes[1]
    real_error, unknown_error = error_of(real[2]), error_of(unknown[2])
    assert real_error["C"] == unknown_error["C"] == "28P01"
    assert real_error["M"].replace(endpoint.user, "mallory") == unknown_error["M"]
    assert real_error.keys() == unknown_error.keys()


# -- item 11: failures are budgeted per role, from any address ----------------------


async def test_one_role_guessed_from_many_addresses_runs_out(
    stack: Up, control: RecordingControl
) -> None:
    assert stack.client is not None
    target, other = await stack.client.create_endpoint(), await stack.client.create_endpoint()
    proxy = await frontdoor(
        stack, control,
        limits=LimitSettings(
            auth_failure_burst=5, auth_failure_rate=0.01,
            role_failure_burst=3, role_failure_rate=0.01,
        ),
    )
    try:
        # One failure from each of three addresses: each address is far from its own limit.
        for source in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
            login = await scram_login(
                proxy.port, target.id, target.user, "guess", source=source
            )
            assert error_of(login[-1])["C"] == "28P01"
        # A fourth address, even with the right password: the role's budget is spent.
        login = await scram_login(
            proxy.port, target.id, target.user, target.password, source="127.0.0.5"
        )
        fields = error_of(login[0])
        assert fields["C"] == "53300"
        assert fields["M"].startswith(
            f'too many failed authentication attempts for role "{target.user}" '
            f'of endpoint "{target.id}"; retry in '
        )
        # Unknown roles count alike: the refusal tells nothing about existence.
        for source in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
            await scram_login(proxy.port, target.id, "mallory", "guess", source=source)
        login = await scram_login(proxy.port, target.id, "mallory", "guess", source="127.0.0.5")
        assert error_of(login[0])["C"] == "53300"
        # The same role name on another endpoint has its own budget.
        assert await select_user(proxy.port, other) == other.user
    finally:
        await proxy.drain(timeout=2)


# -- item 5 (verifier side): stale verifiers while the control plane is down ----------


def stale_count(proxy: ProxyServer) -> float:
    value = proxy.state.metrics.registry.get_sample_value(
        "pgwake_cache_requests_total", {"cache": "role", "outcome": "stale"}
    )
    return value or 0.0


async def test_control_plane_down_serves_stale_verifiers_then_refreshes(
    stack: Up, endpoint: CreatedEndpoint
) -> None:
    assert stack.client is not None and stack.control is not None
    relay = Relay(stack.control.api_port)
    await relay.start()
    relayed = ControlClient(f"http://127.0.0.1:{relay.port}", api_key(stack), timeout=2.0)
    # A TTL of 0: every connect comes "after the verifier TTL" without waiting for it.
    settings = {"role_cache_ttl": 0.0, "negative_cache_ttl": 0.0}
    proxy = await frontdoor(stack, relayed, **settings)
    strict = await frontdoor(stack, relayed, role_cache_max_stale=0.0, **settings)
    try:
        assert await select_user(proxy.port, endpoint) == endpoint.user
        assert await select_user(strict.port, endpoint) == endpoint.user
        await relay.stop()

        assert await select_user(proxy.port, endpoint) == endpoint.user
        assert stale_count(proxy) == 1.0
        # The stale verifier still checks passwords: a wrong one is a wrong password.
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            await select_user(proxy.port, endpoint, password="wrong")
        assert await select_user(proxy.port, endpoint) == endpoint.user
        # Only where nothing stale may be served is the outage the client's answer.
        never_seen = await asyncpg_error(proxy.port, endpoint, "nobody", "x")
        assert never_seen.sqlstate == "57P03"
        assert "control plane unavailable" in str(never_seen)
        too_old = await asyncpg_error(strict.port, endpoint, endpoint.user, endpoint.password)
        assert too_old.sqlstate == "57P03"
        assert "control plane unavailable" in str(too_old)

        # Back: the next connect asks again and takes the new answer at once.
        await relay.start()
        await stack.client.set_password(endpoint.id, endpoint.user, "a-new-password")
        assert await select_user(proxy.port, endpoint, password="a-new-password") == endpoint.user
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            await select_user(proxy.port, endpoint)
        assert "pgwake_cache_requests_total" in proxy.state.metrics.render()[0].decode()
    finally:
        await proxy.drain(timeout=2)
        await strict.drain(timeout=2)
        await relayed.aclose()
        await relay.stop()
