"""A client connection owned by the native engine, seen from Python as an asyncio Transport.

The engine terminates the client's TLS; while Python has the session (the
startup and auth phase, a parked session, the rare cases of the splice) the
engine holds the client's plaintext for Python to `read` and encrypts what
Python writes. This class makes that look like any other transport, so the
handshake's Stream, the Python splice and a parked session's wait work on it
unchanged. In SPLICE mode the engine moves the bytes itself; the splice's
session events (yielded, compute closed, client closed) go to `splice_events`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from proxy.dataplane import NativePlane

HIGH_WATER = 256 * 1024


class NativeTransport(asyncio.Transport):
    def __init__(self, plane: NativePlane, conn_id: int, *, tls: bool,
                 extra: dict[str, Any] | None = None):
        super().__init__(extra)
        self.plane = plane
        self.engine = plane.engine
        self.conn_id = conn_id
        self.tls = tls
        self._protocol: asyncio.Protocol | None = None
        self._loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[tuple[str | None, int, str | None, str | None]] = (
            self._loop.create_future()
        )
        self.splicing = False  # the engine moves the bytes (SPLICE mode)
        self._reading = True
        self._readable = False  # the engine holds bytes (or an EOF) for `read`
        self._closing = False
        self._closed = False
        self._write_paused = False
        self._high = HIGH_WATER
        # Session events of SPLICE mode, for the NativeSplice that runs it.
        self.splice_events: Callable[[int, Any], None] | None = None
        plane.register(conn_id, self)

    # -- events from the engine ---------------------------------------------------------

    def on_event(self, kind: int, payload: Any) -> None:
        plane = self.plane
        if kind == plane.READABLE:
            self._readable = True
            if self._reading and not self.splicing:
                self._deliver()
        elif kind == plane.READY:
            if not self.ready.done():
                self.ready.set_result(payload)
        elif kind == plane.DRAINED:
            if self._write_paused and self._protocol is not None:
                self._write_paused = False
                self._protocol.resume_writing()
        elif kind == plane.CLOSED:
            self._lost(payload)
        else:  # YIELDED, COMPUTE_CLOSED, CLIENT_CLOSED: the splice's
            if kind != plane.CLIENT_CLOSED:
                self.splicing = False
                self._reading = False  # the engine hands the client back paused
            handler = self.splice_events
            if handler is not None:
                handler(kind, payload)

    def _lost(self, reason: Any) -> None:
        if self._closed:
            return
        asked = self._closing  # Python closed it: a plain end, not an error
        self._closed = self._closing = True
        self.plane.unregister(self.conn_id)
        if not self.ready.done():
            self.ready.set_exception(ConnectionResetError(str(reason or "closed")))
            self.ready.exception()  # retrieved: the handshake may have stopped waiting
        if self._protocol is not None:
            exc = None if asked or not reason else ConnectionResetError(str(reason))
            self._protocol.connection_lost(exc)

    def _deliver(self) -> None:
        """Hand the engine's bytes for Python to the protocol, while it reads."""
        while self._reading and self._readable and not self._closing and not self.splicing:
            try:
                data = self.engine.read(self.conn_id)
            except (ValueError, RuntimeError):
                return  # gone or handed over meanwhile: the event saying so is on its way
            if data is None:
                self._readable = False
                protocol = self._protocol
                assert protocol is not None
                if not protocol.eof_received():
                    self.close()
                return
            if not data:
                self._readable = False  # re-armed: the next bytes send READABLE
                return
            assert self._protocol is not None
            self._protocol.data_received(data)

    # -- asyncio.Transport ----------------------------------------------------------------

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = cast(asyncio.Protocol, protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._protocol is not None
        return self._protocol

    def is_closing(self) -> bool:
        return self._closing

    def is_reading(self) -> bool:
        return self._reading and not self._closing

    def pause_reading(self) -> None:
        if self._reading and not self._closing:
            self._reading = False
            if not self.splicing:
                with contextlib.suppress(ValueError, RuntimeError):
                    self.engine.pause(self.conn_id, True)

    def resume_reading(self) -> None:
        if self._reading or self._closing:
            return
        self._reading = True
        if not self.splicing:
            with contextlib.suppress(ValueError, RuntimeError):
                self.engine.pause(self.conn_id, False)
        if self._readable:
            self._loop.call_soon(self._deliver)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or not data:
            return
        try:
            queued = self.engine.write(self.conn_id, bytes(data))
        except (ValueError, RuntimeError):
            return  # the connection is ending: nobody reads this any more
        except BufferError:
            # Past the engine's hard bound on what waits for the client (the writer
            # ignored pause_writing): end the connection rather than hold more.
            self.abort()
            return
        if queued > self._high and not self._write_paused and self._protocol is not None:
            self._write_paused = True
            self._protocol.pause_writing()

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return False  # TLS has no half-close; a plaintext client's is the engine's business

    def write_eof(self) -> None:
        raise NotImplementedError("the native data plane does not half-close from Python")

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is not None:
            self._high = high

    def get_write_buffer_size(self) -> int:
        try:
            return int(self.engine.state(self.conn_id)[16])
        except (ValueError, RuntimeError):
            return 0

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        with contextlib.suppress(ValueError, RuntimeError):
            self.engine.close(self.conn_id, False)

    def abort(self) -> None:
        if self._closed:
            return
        self._closing = True
        with contextlib.suppress(ValueError, RuntimeError):
            self.engine.close(self.conn_id, True)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "pgwake_tls":
            return self.tls
        return super().get_extra_info(name, default)


class _Discard(asyncio.Protocol):
    """The protocol of a transport whose socket was handed on: hears nothing more
    (asyncio.Protocol's methods all do nothing)."""


def detach_socket(transport: asyncio.BaseTransport) -> int:
    """Take a uvloop transport's socket away from it: pause it, duplicate its
    descriptor, and close the transport's own (which neither shuts the connection
    down nor loses bytes: nothing more is read, and nothing is left to write).
    Returns the new descriptor, non-blocking, for the engine to own."""
    tcp = cast(asyncio.Transport, transport)
    if tcp.get_write_buffer_size():
        raise RuntimeError("cannot hand over a socket with unsent bytes")
    tcp.pause_reading()
    sock = tcp.get_extra_info("socket")
    fd = os.dup(sock.fileno())
    os.set_blocking(fd, False)
    tcp.set_protocol(_Discard())
    tcp.abort()
    return fd
