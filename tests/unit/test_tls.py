"""Tests for the tls package: dev CA, SNI selection, channel binding, hot reload.

Handshakes are real: the stdlib ssl client talks to a ServerTLS context over
loopback sockets, under the default asyncio loop, uvloop and blocking sockets.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import ssl
import stat
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tls import (
    ALPN_PROTOCOL,
    CertificateReloader,
    CertificateSelector,
    CertPair,
    LoadedCert,
    ServerTLS,
    TLSInfo,
    end_point_hash,
    ensure_dev_ca,
    ensure_server_certificate,
    load_certificate,
    match_hostname,
    tls_info,
)

DEV_NAMES = ["*.pgwake.localhost", "pgwake.localhost", "localhost"]
DEADLINE = 10.0


@dataclass
class DevPKI:
    directory: Path
    ca: CertPair
    server: CertPair


@pytest.fixture
def pki(tmp_path: Path) -> DevPKI:
    directory = tmp_path / "tls"
    ca = ensure_dev_ca(directory)
    server = ensure_server_certificate(directory, ca, DEV_NAMES)
    return DevPKI(directory=directory, ca=ca, server=server)


def client_context(ca: CertPair, *, verify: bool = True) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca.cert))
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols([ALPN_PROTOCOL])
    return context


@dataclass
class EchoServer:
    """A line echo server that records tls_info for each accepted connection."""

    port: int = 0
    infos: asyncio.Queue[TLSInfo] = field(default_factory=asyncio.Queue)
    handlers: set[asyncio.Task[None]] = field(default_factory=set)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        try:
            self.infos.put_nowait(tls_info(writer.get_extra_info("ssl_object")))
            while line := await reader.readline():
                writer.write(line)
                await writer.drain()
        finally:
            writer.close()
            await writer.wait_closed()


@asynccontextmanager
async def echo_server(context: ssl.SSLContext) -> AsyncIterator[EchoServer]:
    echo = EchoServer()
    server = await asyncio.start_server(echo.handle, "127.0.0.1", 0, ssl=context)
    echo.port = server.sockets[0].getsockname()[1]
    try:
        yield echo
    finally:
        server.close()
        await server.wait_closed()
        # Clients are closed by now, so each handler has seen EOF.
        if echo.handlers:
            await asyncio.wait_for(asyncio.gather(*echo.handlers), DEADLINE)


@dataclass
class Client:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    @property
    def peer_der(self) -> bytes:
        ssl_object = self.writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True)
        assert isinstance(der, bytes)
        return der

    async def echo(self, payload: bytes) -> bytes:
        self.writer.write(payload + b"\n")
        return await asyncio.wait_for(self.reader.readline(), DEADLINE)

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


async def connect(port: int, context: ssl.SSLContext, server_name: str | None) -> Client:
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname=server_name),
        DEADLINE,
    )
    return Client(reader, writer)


async def handshake(
    echo: EchoServer, context: ssl.SSLContext, server_name: str | None
) -> tuple[bytes, TLSInfo]:
    """Connect, round-trip a line, close; return the peer certificate and server-side info."""
    client = await connect(echo.port, context, server_name)
    try:
        assert await client.echo(b"ping") == b"ping\n"
        der = client.peer_der
    finally:
        await client.close()
    info = await asyncio.wait_for(echo.infos.get(), DEADLINE)
    return der, info


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


# --- dev CA ---------------------------------------------------------------


def test_dev_ca_is_a_p256_root_with_pathlen_zero(pki: DevPKI) -> None:
    cert = x509.load_pem_x509_certificate(pki.ca.cert.read_bytes())
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca is True
    assert constraints.value.path_length == 0
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "pgwake dev CA"
    public_key = cert.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert public_key.curve.name == "secp256r1"
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert timedelta(days=3649) < lifetime < timedelta(days=3651)


def test_server_certificate_names_usage_and_key_ids(pki: DevPKI) -> None:
    ca = x509.load_pem_x509_certificate(pki.ca.cert.read_bytes())
    cert = x509.load_pem_x509_certificate(pki.server.cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == DEV_NAMES
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    ca_key_id = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    authority = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert authority.key_identifier == ca_key_id.digest
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime <= timedelta(days=398)
    assert cert.not_valid_after_utc - datetime.now(UTC) > timedelta(days=396)


def test_key_files_are_private(pki: DevPKI) -> None:
    for key in (pki.ca.key, pki.server.key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_ensure_is_idempotent(pki: DevPKI) -> None:
    before = {path: path.read_bytes() for path in (*_paths(pki.ca), *_paths(pki.server))}
    assert ensure_dev_ca(pki.directory) == pki.ca
    assert ensure_server_certificate(pki.directory, pki.ca, list(reversed(DEV_NAMES))) == (
        pki.server
    )
    assert {path: path.read_bytes() for path in before} == before


def test_server_certificate_is_reissued_for_other_names(pki: DevPKI) -> None:
    old = pki.server.cert.read_bytes()
    ensure_server_certificate(pki.directory, pki.ca, ["*.pgwake.localhost"])
    assert pki.server.cert.read_bytes() != old
    assert load_certificate(pki.server).dns_names == ("*.pgwake.localhost",)
    assert stat.S_IMODE(pki.server.key.stat().st_mode) == 0o600


def test_server_certificate_is_reissued_for_a_new_ca(pki: DevPKI) -> None:
    old = pki.server.cert.read_bytes()
    pki.ca.key.unlink()
    ca = ensure_dev_ca(pki.directory)
    ensure_server_certificate(pki.directory, ca, DEV_NAMES)
    assert pki.server.cert.read_bytes() != old
    ca_cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    x509.load_pem_x509_certificate(pki.server.cert.read_bytes()).verify_directly_issued_by(ca_cert)


def test_server_certificate_needs_a_name(pki: DevPKI) -> None:
    with pytest.raises(ValueError):
        ensure_server_certificate(pki.directory, pki.ca, [])


# --- verification by a real client ------------------------------------------


@pytest.mark.asyncio
async def test_wildcard_certificate_verifies_for_endpoint_names(pki: DevPKI) -> None:
    server_tls = ServerTLS.load([pki.server])
    expected_hash = sha256(load_certificate(pki.server).der)
    async with echo_server(server_tls.context) as echo:
        for name in ("ep-abc.pgwake.localhost", "EP-ABC.pgwake.localhost", "pgwake.localhost"):
            der, info = await handshake(echo, client_context(pki.ca), name)
            assert info == TLSInfo(
                server_name=name, end_point_hash=expected_hash, alpn="postgresql"
            )
            assert sha256(der) == expected_hash


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "name", ["a.ep-abc.pgwake.localhost", "ep-abc.other.localhost", "pgwake.localhost.evil"]
)
async def test_names_outside_the_wildcard_fail_verification(pki: DevPKI, name: str) -> None:
    server_tls = ServerTLS.load([pki.server])
    async with echo_server(server_tls.context) as echo:
        with pytest.raises(ssl.SSLCertVerificationError):
            await connect(echo.port, client_context(pki.ca), name)
        assert echo.infos.empty()


@pytest.mark.asyncio
async def test_client_without_alpn_is_reported_not_rejected(pki: DevPKI) -> None:
    server_tls = ServerTLS.load([pki.server])
    context = ssl.create_default_context(cafile=str(pki.ca.cert))
    async with echo_server(server_tls.context) as echo:
        _, info = await handshake(echo, context, "ep-abc.pgwake.localhost")
    assert info.alpn is None


async def _serve_on_current_loop(pki: DevPKI) -> TLSInfo:
    """Raw loop.create_server with a Protocol, as the proxy does under uvloop."""
    loop = asyncio.get_running_loop()
    server_tls = ServerTLS.load([pki.server])
    accepted: asyncio.Future[TLSInfo] = loop.create_future()
    closed: asyncio.Future[None] = loop.create_future()

    class Recorder(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            accepted.set_result(tls_info(transport.get_extra_info("ssl_object")))
            transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            closed.set_result(None)

    server = await loop.create_server(Recorder, "127.0.0.1", 0, ssl=server_tls.context)
    try:
        port = server.sockets[0].getsockname()[1]
        client = await connect(port, client_context(pki.ca), "ep-x.pgwake.localhost")
        try:
            info = await asyncio.wait_for(accepted, DEADLINE)
            await asyncio.wait_for(closed, DEADLINE)
        finally:
            await client.close()
    finally:
        server.close()
        await server.wait_closed()
    return info


@pytest.mark.parametrize(
    "loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"]
)
def test_tls_info_under_each_event_loop(
    pki: DevPKI, loop_factory: Callable[[], asyncio.AbstractEventLoop]
) -> None:
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        info = runner.run(_serve_on_current_loop(pki))
    assert info == TLSInfo(
        server_name="ep-x.pgwake.localhost",
        end_point_hash=sha256(load_certificate(pki.server).der),
        alpn="postgresql",
    )


def test_tls_info_on_blocking_sockets(pki: DevPKI) -> None:
    server_tls = ServerTLS.load([pki.server])
    infos: list[TLSInfo] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(DEADLINE)
        port = listener.getsockname()[1]

        def serve_one() -> None:
            connection, _ = listener.accept()
            connection.settimeout(DEADLINE)
            with server_tls.context.wrap_socket(connection, server_side=True) as tls_socket:
                infos.append(tls_info(tls_socket))
                tls_socket.sendall(tls_socket.recv(64))

        thread = threading.Thread(target=serve_one)
        thread.start()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as raw:
                with client_context(pki.ca).wrap_socket(
                    raw, server_hostname="ep-blocking.pgwake.localhost"
                ) as client:
                    client.sendall(b"hello")
                    assert client.recv(64) == b"hello"
        finally:
            thread.join(DEADLINE)
    assert infos == [
        TLSInfo(
            server_name="ep-blocking.pgwake.localhost",
            end_point_hash=sha256(load_certificate(pki.server).der),
            alpn="postgresql",
        )
    ]


def test_tls_info_requires_a_server_tls_handshake() -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ssl_object = context.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="x")
    with pytest.raises(LookupError):
        tls_info(ssl_object)


# --- SNI selection ----------------------------------------------------------


@pytest.mark.asyncio
async def test_sni_prefers_exact_then_wildcard_then_default(pki: DevPKI) -> None:
    exact = ensure_server_certificate(pki.directory / "exact", pki.ca, ["special.pgwake.localhost"])
    other = ensure_server_certificate(pki.directory / "other", pki.ca, ["*.other.localhost"])
    # The wildcard certificate is first (the default) yet loses to the exact one.
    server_tls = ServerTLS.load([pki.server, exact, other])
    hashes_by_cert = {
        pair: sha256(load_certificate(pair).der) for pair in (pki.server, exact, other)
    }
    cases: list[tuple[str | None, CertPair, bool]] = [
        ("special.pgwake.localhost", exact, True),
        ("ep-abc.pgwake.localhost", pki.server, True),
        ("ep-abc.other.localhost", other, True),
        ("unknown.example", pki.server, False),
        (None, pki.server, False),
    ]
    async with echo_server(server_tls.context) as echo:
        for name, expected, verify in cases:
            context = client_context(pki.ca, verify=verify)
            der, info = await handshake(echo, context, name)
            assert info.server_name == name
            assert info.end_point_hash == hashes_by_cert[expected] == sha256(der)
            assert info.alpn == "postgresql"


def test_certificate_selector_table() -> None:
    selector = CertificateSelector(
        [
            (["*.pgwake.localhost", "pgwake.localhost"], "wildcard"),
            (["special.pgwake.localhost"], "exact"),
            (["*.pgwake.localhost"], "shadowed"),
            (["Mixed.Case.Example"], "mixed"),
        ],
        default="default",
    )
    assert selector.select("special.pgwake.localhost") == "exact"
    assert selector.select("SPECIAL.pgwake.localhost.") == "exact"
    assert selector.select("ep-1.pgwake.localhost") == "wildcard"
    assert selector.select("pgwake.localhost") == "wildcard"
    assert selector.select("a.ep-1.pgwake.localhost") == "default"
    assert selector.select("mixed.case.example") == "mixed"
    assert selector.select("*.pgwake.localhost") == "default"
    assert selector.select(".pgwake.localhost") == "default"
    assert selector.select(None) == "default"


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        ("*.a.b", "x.a.b", True),
        ("*.a.b", "X.A.B", True),
        ("*.A.B", "x.a.b.", True),
        ("*.a.b", "a.b", False),
        ("*.a.b", "y.x.a.b", False),
        ("*.a.b", ".a.b", False),
        ("*.a.b", "*.a.b", False),
        ("a.b", "a.b", True),
        ("A.b", "a.B", True),
        ("a.b", "x.a.b", False),
        ("x*.a.b", "xy.a.b", False),
        ("*x.a.b", "yx.a.b", False),
        ("x.*.b", "x.a.b", False),
        ("*", "localhost", False),
        ("*.*.b", "x.a.b", False),
        ("", "", False),
        ("localhost", "localhost", True),
    ],
)
def test_match_hostname(pattern: str, name: str, expected: bool) -> None:
    assert match_hostname(pattern, name) is expected


# --- channel binding hash ---------------------------------------------------


@pytest.mark.parametrize(
    ("algorithm", "digest"),
    [(hashes.SHA256(), "sha256"), (hashes.SHA384(), "sha384"), (hashes.SHA512(), "sha512")],
)
def test_end_point_hash_follows_the_signature_hash(
    algorithm: hashes.SHA256 | hashes.SHA384 | hashes.SHA512, digest: str
) -> None:
    cert = _self_signed(algorithm)
    der = cert.public_bytes(serialization.Encoding.DER)
    assert end_point_hash(cert) == hashlib.new(digest, der).digest()


# --- reload -----------------------------------------------------------------


@pytest.mark.asyncio
async def test_reload_serves_new_certificate_to_new_connections_only(pki: DevPKI) -> None:
    server_tls = ServerTLS.load([pki.server])
    reloader = CertificateReloader(server_tls)
    old_der = load_certificate(pki.server).der
    async with echo_server(server_tls.context) as echo:
        before = await connect(echo.port, client_context(pki.ca), "ep-old.pgwake.localhost")
        try:
            assert await before.echo(b"one") == b"one\n"
            assert before.peer_der == old_der
            old_info = await asyncio.wait_for(echo.infos.get(), DEADLINE)
            assert old_info.end_point_hash == sha256(old_der)
            assert reloader.check() is False

            ensure_server_certificate(pki.directory, pki.ca, ["*.other.localhost"])
            new = load_certificate(pki.server)
            assert new.der != old_der
            assert reloader.check() is True
            assert reloader.check() is False

            der, info = await handshake(echo, client_context(pki.ca), "ep-new.other.localhost")
            assert der == new.der
            assert info.end_point_hash == sha256(new.der)
            # The connection opened before the reload still works on the old context.
            assert await before.echo(b"two") == b"two\n"
            assert before.peer_der == old_der
        finally:
            await before.close()


@pytest.mark.asyncio
async def test_reload_keeps_old_certificate_when_new_files_are_broken(
    pki: DevPKI, caplog: pytest.LogCaptureFixture
) -> None:
    server_tls = ServerTLS.load([pki.server])
    reloader = CertificateReloader(server_tls)
    old_der = load_certificate(pki.server).der
    other = ensure_server_certificate(pki.directory / "other", pki.ca, ["*.pgwake.localhost"])

    with caplog.at_level(logging.WARNING, logger="tls.reload"):
        pki.server.cert.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64\n")
        assert reloader.check() is False
        assert reloader.check() is False
        # A certificate that does not match the key on disk is refused as well.
        pki.server.cert.write_bytes(other.cert.read_bytes())
        assert reloader.check() is False
    warnings = [record for record in caplog.records if record.name == "tls.reload"]
    assert len(warnings) == 2, [record.getMessage() for record in warnings]

    async with echo_server(server_tls.context) as echo:
        der, _ = await handshake(echo, client_context(pki.ca), "ep-abc.pgwake.localhost")
    assert der == old_der

    # Once the files are consistent again, they are picked up.
    pki.server.key.write_bytes(other.key.read_bytes())
    assert reloader.check() is True
    assert server_tls.certificates[0].cert.der == load_certificate(other).der


@pytest.mark.asyncio
async def test_reload_survives_missing_files(pki: DevPKI) -> None:
    server_tls = ServerTLS.load([pki.server])
    reloader = CertificateReloader(server_tls)
    pki.server.cert.unlink()
    assert reloader.check() is False
    assert server_tls.certificates[0].cert.pair == pki.server


@pytest.mark.asyncio
async def test_run_checks_before_waiting_and_stops_on_event(pki: DevPKI) -> None:
    server_tls = ServerTLS.load([pki.server])
    reloader = CertificateReloader(server_tls)
    ensure_server_certificate(pki.directory, pki.ca, ["*.other.localhost"])
    stop = asyncio.Event()
    stop.set()
    await asyncio.wait_for(reloader.run(3600, stop), DEADLINE)
    assert server_tls.certificates[0].cert.dns_names == ("*.other.localhost",)

    running = asyncio.Event()
    task = asyncio.create_task(reloader.run(3600, running))
    running.set()
    await asyncio.wait_for(task, DEADLINE)


def test_server_tls_needs_a_certificate() -> None:
    with pytest.raises(ValueError):
        ServerTLS([])


def test_loaded_certificate_facts(pki: DevPKI) -> None:
    loaded = load_certificate(pki.server)
    assert isinstance(loaded, LoadedCert)
    assert loaded.dns_names == tuple(DEV_NAMES)
    assert loaded.not_after > datetime.now(UTC) + timedelta(days=396)
    assert loaded.end_point_hash == sha256(loaded.der)


def _paths(pair: CertPair) -> tuple[Path, Path]:
    return (pair.cert, pair.key)


def _self_signed(algorithm: hashes.SHA256 | hashes.SHA384 | hashes.SHA512) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hash test")])
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .sign(key, algorithm)
    )
