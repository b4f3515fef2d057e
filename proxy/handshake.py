"""Steps 1–2, accept and first bytes: direct TLS or SSLRequest, up to the StartupMessage."""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from proxy.errors import ClientError, Kind
from proxy.nativetransport import NativeTransport, detach_socket
from proxy.pgwire.errors import ProtocolViolation
from proxy.pgwire.startup import (
    CancelRequest,
    GSSENCRequest,
    SSLRequest,
    StartupMessage,
    StartupParser,
)
from proxy.stream import Stream
from tls.context import ServerTLS, TLSInfo, tls_info

if TYPE_CHECKING:
    from proxy.dataplane import NativePlane

TLS_RECORD_HANDSHAKE = 0x16  # first byte of a TLS ClientHello: PG17+ direct TLS
ALPN_POSTGRESQL = "postgresql"


@dataclass
class ClientHello:
    """What the startup phase produced: the client's stream, its startup packet, its TLS."""

    stream: Stream
    startup: StartupMessage | None  # None: it was a CancelRequest (see `cancel`)
    tls: TLSInfo | None
    trailing: bytes  # bytes after the StartupMessage (the first auth message, perhaps)
    cancel: CancelRequest | None = None
    direct_tls: bool = False
    tls_done: float | None = None  # time.perf_counter() when the TLS handshake finished


async def peek_first_byte(sock: socket.socket) -> bytes:
    """Wait until the client sent something and look at its first byte without reading it."""
    loop = asyncio.get_running_loop()
    readable: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()
    def on_readable() -> None:
        if not readable.done():
            readable.set_result(None)

    loop.add_reader(fd, on_readable)
    try:
        await readable
    finally:
        loop.remove_reader(fd)
    try:
        return sock.recv(1, socket.MSG_PEEK)
    except (BlockingIOError, InterruptedError):
        return await peek_first_byte(sock)


def _violation(exc: ProtocolViolation) -> ClientError:
    kind = Kind.UNSUPPORTED if exc.sqlstate == "0A000" else Kind.PROTOCOL
    return ClientError(kind, exc.message, sqlstate=exc.sqlstate)


def _startup_timed_out() -> ClientError:
    return ClientError(Kind.PROTOCOL, "timed out waiting for the startup packet", sqlstate="08006")


async def _next_packet(stream: Stream, parser: StartupParser, timeout: float) -> object:
    try:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    event = parser.next_event()
                except ProtocolViolation as exc:
                    raise _violation(exc) from None
                if event is not None:
                    return event
                parser.feed(await stream.recv())
    except TimeoutError:
        raise _startup_timed_out() from None


async def open_client(
    sock: socket.socket,
    *,
    server_tls: ServerTLS | None,
    allow_plaintext: bool,
    tls_timeout: float,
    startup_timeout: float,
    stream_box: list[Stream],
    plane: NativePlane | None = None,
) -> ClientHello:
    """Run the startup phase. `stream_box` receives the stream as soon as it exists, so
    the caller can send an ErrorResponse (or close it) whatever happens here.

    With the native data plane (`plane`), the engine takes the client's socket at
    its TLS handshake (or, for an allowed plaintext client, after its startup
    packet) and the rest of the session reads a stream over the engine."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(startup_timeout):
            first = await peek_first_byte(sock)
    except TimeoutError:
        # Nothing to answer yet: the client never said which protocol it speaks.
        raise ConnectionResetError("client sent nothing before the startup deadline") from None
    if not first:
        raise ConnectionResetError("client closed before sending anything")
    if first[0] == TLS_RECORD_HANDSHAKE:
        if server_tls is None:
            raise ConnectionResetError("direct TLS attempted but TLS is not configured")
        if plane is not None:
            peer = sock_peer(sock)
            stream, info = await _native_tls(plane, sock.detach(), peer, stream_box, tls_timeout)
            return await _direct_tls_alpn(stream, info, startup_timeout)
        # Our own instance: with ssl=, uvloop returns its SSL protocol wrapper, not ours.
        stream = Stream()
        transport, _ = await loop.connect_accepted_socket(
            lambda: stream, sock, ssl=server_tls.context, ssl_handshake_timeout=tls_timeout
        )
        stream_box.append(stream)
        info = tls_info(transport.get_extra_info("ssl_object"))
        return await _direct_tls_alpn(stream, info, startup_timeout)

    _, stream = await loop.connect_accepted_socket(Stream, sock)
    stream_box.append(stream)
    parser = StartupParser()
    answered_gss = False
    while True:
        event = await _next_packet(stream, parser, startup_timeout)
        if isinstance(event, GSSENCRequest):
            if answered_gss:
                raise ClientError(Kind.PROTOCOL, "GSSENCRequest sent twice")
            answered_gss = True
            stream.write(b"N")  # no GSSAPI encryption: the client goes on to SSL or plain
            continue
        if isinstance(event, SSLRequest):
            if parser.trailing_data or stream.buffered:
                # CVE-2021-23214: bytes sent before the handshake would be read as if
                # they came over TLS; a man in the middle could inject them.
                raise ClientError(
                    Kind.PROTOCOL, "received unencrypted data after SSL request"
                )
            if server_tls is None:
                stream.write(b"N")
                continue
            stream.write(b"S")
            if plane is not None:
                # Handed over at once: the client's first TLS bytes are read by the engine.
                assert stream.transport is not None
                fd = detach_socket(stream.transport)
                stream, info = await _native_tls(plane, fd, None, stream_box, tls_timeout)
                return await _after_tls(stream, info, direct=False, timeout=startup_timeout)
            await stream.start_tls(server_tls.context, handshake_timeout=tls_timeout)
            assert stream.transport is not None
            info = tls_info(stream.transport.get_extra_info("ssl_object"))
            return await _after_tls(stream, info, direct=False, timeout=startup_timeout)
        if isinstance(event, CancelRequest):
            return ClientHello(stream, None, None, b"", cancel=event)
        assert isinstance(event, StartupMessage)
        if server_tls is not None and not allow_plaintext:
            raise ClientError(
                Kind.TLS_REQUIRED,
                "connection requires TLS: this server does not accept unencrypted connections",
                hint="Connect with sslmode=require (or verify-full).",
            )
        trailing = parser.trailing_data
        if plane is not None:
            trailing += stream.take_buffered()
            assert stream.transport is not None
            fd = detach_socket(stream.transport)
            stream = await _native_plain(plane, fd, stream_box, startup_timeout)
        return ClientHello(stream, event, None, trailing)


def sock_peer(sock: socket.socket) -> object:
    try:
        return sock.getpeername()
    except OSError:
        return None


async def _direct_tls_alpn(stream: Stream, info: TLSInfo, timeout: float) -> ClientHello:
    if info.alpn != ALPN_POSTGRESQL:
        # PostgreSQL refuses this too: without ALPN a TLS connection could be
        # a cross-protocol attack (another service's client pointed at us).
        raise ClientError(
            Kind.PROTOCOL,
            "direct TLS connection without ALPN protocol \"postgresql\"",
            hint="Use sslnegotiation=direct with a PostgreSQL 17 or newer client.",
        )
    return await _after_tls(stream, info, direct=True, timeout=timeout)


def _native_stream(plane: NativePlane, fd: int, tls: bool, stream_box: list[Stream],
                   peer: object) -> tuple[NativeTransport, Stream]:
    conn_id = plane.engine.accept(fd, tls)
    transport = NativeTransport(plane, conn_id, tls=tls, extra={"peername": peer})
    stream = Stream()
    transport.set_protocol(stream)
    stream.connection_made(transport)
    stream_box[:] = [stream]  # errors from here on go through the engine
    return transport, stream


async def _native_tls(
    plane: NativePlane, fd: int, peer: object, stream_box: list[Stream], timeout: float
) -> tuple[Stream, TLSInfo]:
    """The engine's TLS handshake; the TLS facts as the Python path reports them."""
    transport, stream = _native_stream(plane, fd, True, stream_box, peer)
    try:
        async with asyncio.timeout(timeout):
            server_name, index, alpn, _records = await transport.ready
    except TimeoutError:
        raise ConnectionResetError("TLS handshake timed out") from None
    certificates = plane.certificates
    if not 0 <= index < len(certificates):
        raise ConnectionResetError("TLS handshake chose no known certificate")
    info = TLSInfo(
        server_name=server_name,
        end_point_hash=certificates[index].cert.end_point_hash,
        alpn=alpn,
    )
    return stream, info


async def _native_plain(
    plane: NativePlane, fd: int, stream_box: list[Stream], timeout: float
) -> Stream:
    transport, stream = _native_stream(plane, fd, False, stream_box, None)
    async with asyncio.timeout(timeout):
        await transport.ready
    return stream


async def _after_tls(
    stream: Stream, info: TLSInfo, *, direct: bool, timeout: float
) -> ClientHello:
    tls_done = time.perf_counter()
    parser = StartupParser()
    event = await _next_packet(stream, parser, timeout)
    if isinstance(event, SSLRequest | GSSENCRequest):
        raise ClientError(Kind.PROTOCOL, "encryption requested again inside TLS")
    if isinstance(event, CancelRequest):
        return ClientHello(stream, None, info, b"", cancel=event, direct_tls=direct)
    assert isinstance(event, StartupMessage)
    return ClientHello(
        stream, event, info, parser.trailing_data, direct_tls=direct, tls_done=tls_done
    )
