"""A buffered asyncio Protocol for the handshake phase: awaitable reads with deadlines.

The handshake reads with sans-IO parsers; this class only moves bytes. When the
handshake ends, `take_buffered()` hands any bytes already read to the splice
(h11's `trailing_data`), and the transport gets a new protocol.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import cast

MAX_BUFFER = 256 * 1024  # pause reading past this: a client cannot make us hold more


class PeerClosed(ConnectionError):
    """The other side closed the connection (or it broke) while we waited for bytes."""


class Stream(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._waiter: asyncio.Future[None] | None = None
        self._eof = False
        self._lost: BaseException | None = None
        self._closed = False
        self._paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._write_paused = False

    # -- asyncio.Protocol ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) > MAX_BUFFER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False  # close our side too: nobody half-closes during a handshake

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._lost = exc
        self._wake()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- API -------------------------------------------------------------------------

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    @property
    def closed(self) -> bool:
        return self._closed

    async def recv(self) -> bytes:
        """Everything buffered (at least one byte); raises PeerClosed at EOF.

        Callers bound it with `asyncio.timeout_at(deadline)`.
        """
        while not self._buffer:
            if self._eof or self._closed:
                raise PeerClosed("connection closed by peer") from self._lost
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self.take_buffered()

    def take_buffered(self) -> bytes:
        data = bytes(self._buffer)
        self._buffer.clear()
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self._closed:
            self.transport.write(data)

    async def drain(self) -> None:
        if self._write_paused and not self._closed:
            self._drain_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    async def start_tls(self, context: ssl.SSLContext, *, handshake_timeout: float) -> None:
        """Upgrade the connection in place; this protocol keeps receiving (decrypted) bytes."""
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        transport = await loop.start_tls(
            self.transport,
            self,
            context,
            server_side=True,
            ssl_handshake_timeout=handshake_timeout,
        )
        if transport is None:
            raise PeerClosed("connection closed during the TLS handshake")
        self.transport = transport
