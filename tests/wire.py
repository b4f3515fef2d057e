"""A raw PostgreSQL wire client for front-door tests: exact bytes in, every reply out.

Real clients never send malformed packets; these helpers do, over real sockets
and real TLS, and collect what the proxy answers until it closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pgwake.up import Up
from proxy.app import ProxyServer
from proxy.pgwire import messages
from proxy.pgwire.codec import MessageReader
from proxy.pgwire.errors import ProtocolViolation
from tests.helpers import proxy_settings
from tls.certs import CertPair
from tls.context import ServerTLS
from wakeup.service import bind_tcp


@dataclass
class Reply:
    """What the proxy sent before it closed (or before our deadline)."""

    messages: list[tuple[bytes, bytes]] = field(default_factory=list)
    raw: bytes = b""
    closed: bool = False

    @property
    def types(self) -> bytes:
        return b"".join(kind for kind, _ in self.messages)

    @property
    def error(self) -> dict[str, str] | None:
        for kind, body in self.messages:
            if kind == b"E":
                return messages.parse_error_fields(body)
        return None

    @property
    def sqlstate(self) -> str | None:
        error = self.error
        return None if error is None else error["C"]

    def ended_properly(self) -> bool:
        """An ErrorResponse last, or a close with nothing after a final message."""
        if self.messages and self.messages[-1][0] == b"E":
            return True
        return self.closed


async def read_reply(
    reader: asyncio.StreamReader, timeout: float, *, until: Callable[[Reply], bool] | None = None
) -> Reply:
    """Read messages until the proxy closes, `until(reply)` holds, or `timeout` passes."""
    reply = Reply()
    parser = MessageReader()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        if until is not None and until(reply):
            return reply
        try:
            async with asyncio.timeout_at(deadline):
                data = await reader.read(65536)
        except TimeoutError:
            return reply
        except (ConnectionError, ssl.SSLError):
            reply.closed = True
            return reply
        if not data:
            reply.closed = True
            return reply
        reply.raw += data
        parser.feed(data)
        try:
            while (message := parser.next_message()) is not None:
                reply.messages.append(message)
        except ProtocolViolation:
            pass  # a lone 'S'/'N' byte, or garbage: kept in `raw`


def client_tls_context(
    ca: Path | None, *, alpn: Sequence[str] | None = ("postgresql",)
) -> ssl.SSLContext:
    return _client_tls_context(ca, tuple(alpn) if alpn else None)


@functools.lru_cache(maxsize=32)
def _client_tls_context(ca: Path | None, alpn: tuple[str, ...] | None) -> ssl.SSLContext:
    # One context per kind, reused. Without a CA nothing is verified, so the system's
    # CA bundle is not loaded either: parsing it costs ~20 ms of CPU in the event loop
    # that also runs the proxy, and dozens of cases at once on a busy machine stalled
    # the loop for seconds (the proxy's 1 s startup deadline then fired first).
    if ca is None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context = ssl.create_default_context(cafile=str(ca))
        context.check_hostname = False
    if alpn:
        context.set_alpn_protocols(list(alpn))
    return context


@contextlib.asynccontextmanager
async def raw_connection(
    port: int,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.transport.abort()


async def ssl_request_upgrade(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    context: ssl.SSLContext,
    server_hostname: str | None,
) -> None:
    """SSLRequest, expect 'S', then a TLS handshake in place."""
    writer.write(messages.ssl_request())
    await writer.drain()
    answer = await asyncio.wait_for(reader.readexactly(1), 5)
    assert answer == b"S", answer
    await writer.start_tls(context, server_hostname=server_hostname)


def startup(params: Mapping[str, str], version: tuple[int, int] = (3, 0)) -> bytes:
    return messages.startup_message(params, version)


def untyped(code: int, payload: bytes = b"", length: int | None = None) -> bytes:
    """An untyped startup-phase packet with any code, and any (even lying) length."""
    real = 8 + len(payload)
    return struct.pack("!II", real if length is None else length, code) + payload


async def start_frontdoor(
    stack: Up, pairs: Sequence[CertPair] | None = None, **overrides: object
) -> ProxyServer:
    """A second proxy in front of the stack's control plane, with its own settings/certs."""
    assert stack.client is not None and stack.certs is not None
    server_tls = ServerTLS.load(list(pairs) if pairs else [stack.certs.server])
    settings = proxy_settings(listen_port=0, domain=stack.settings.domain, **overrides)  # type: ignore[arg-type]
    proxy = ProxyServer(settings, control=stack.client, server_tls=server_tls)
    sock: socket.socket = bind_tcp("127.0.0.1", 0, settings.backlog)
    await proxy.start(sock)
    return proxy
