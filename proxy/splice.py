"""Step 8, splice: move bytes both ways between two transports, with flow control.

No per-message parsing here: each side's data_received writes straight into
the other transport. When a transport's write buffer fills, it pauses the
*other* transport's reading (and resumes it when drained), so a slow reader
never makes the proxy buffer without bound.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

TERMINATE = b"X\x00\x00\x00\x04"
READY_FOR_QUERY_HEAD = b"Z\x00\x00\x00\x05"  # + one status byte
# Transport write-buffer limits: enough to keep a TLS record pipeline busy,
# small enough that 10 000 idle sessions cost little.
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024


@dataclass
class SpliceResult:
    bytes_from_client: int
    bytes_from_compute: int
    client_terminated: bool  # the client said Terminate (a clean goodbye)
    closed_by: str  # "client" | "compute" | "proxy"


class _Side(asyncio.Protocol):
    """Receives from its own transport and writes to the peer's."""

    __slots__ = ("at", "bytes", "eof", "last", "name", "other", "peer", "splice", "tls", "write")

    def __init__(self, splice: Splice, name: str, tls: bool):
        self.splice = splice
        self.tls = tls
        self.name = name
        self.peer: asyncio.Transport | None = None
        self.other: _Side | None = None
        self.bytes = 0
        self.eof = False
        self.last = b""  # the latest chunk, by reference: its tail is read once, at the end
        self.write: Callable[[bytes], object] = _not_started
        self.at = 0.0  # time.monotonic() of the latest chunk: the activity report reads it

    # The hot path: one call per chunk each way. Keep it to a counter, a
    # reference, a clock read and the peer's bound write method (no slicing).
    def data_received(self, data: bytes) -> None:
        self.bytes += len(data)
        self.last = data
        self.at = _monotonic()
        self.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        assert self.peer is not None
        if self.name == "compute":
            # A compute never half-closes a healthy session: it went away.
            self.splice.finish(self.name)
            return False
        if self.tls:
            # TLS has no half-close (close_notify ends the session); end both sides.
            self.splice.finish(self.name)
            return False
        if self.peer.can_write_eof():
            self.peer.write_eof()
        else:
            self.splice.finish(self.name)
            return False
        if self.other is not None and self.other.eof:
            self.splice.finish(self.name)
            return False
        return True  # keep reading the other direction (half-close)

    def connection_lost(self, exc: Exception | None) -> None:
        self.splice.finish(self.name)

    # Our transport's write buffer is full: stop reading from the peer.
    def pause_writing(self) -> None:
        if self.peer is not None and not self.peer.is_closing():
            self.peer.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and not self.peer.is_closing():
            self.peer.resume_reading()


class Splice:
    def __init__(
        self,
        client: asyncio.Transport,
        compute: asyncio.Transport,
        compute_lost_error: bytes = b"",
    ):
        self.client = client
        self.compute = compute
        # Sent to the client when the compute vanishes between messages (a crash,
        # a kill): a clean SQLSTATE instead of a bare "connection closed".
        self.compute_lost_error = compute_lost_error
        self._client_side = _Side(self, "client", _is_tls(client))
        self._compute_side = _Side(self, "compute", _is_tls(compute))
        self._done: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def start(self, client_pending: bytes = b"", compute_pending: bytes = b"") -> None:
        cs, ps = self._client_side, self._compute_side
        cs.peer, cs.other, cs.write = self.compute, ps, self.compute.write
        ps.peer, ps.other, ps.write = self.client, cs, self.client.write
        for transport in (self.client, self.compute):
            transport.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)
        self.client.set_protocol(cs)
        self.compute.set_protocol(ps)
        # Bytes that arrived during the handshake, after its last message.
        if client_pending:
            cs.data_received(client_pending)
        if compute_pending:
            ps.data_received(compute_pending)
        for transport in (self.client, self.compute):
            if transport.is_closing():
                self.finish("client" if transport is self.client else "compute")
            elif not transport.is_reading():
                transport.resume_reading()

    def finish(self, closed_by: str) -> None:
        if not self._done.done():
            self._done.set_result(closed_by)
            # Only at a message boundary: the compute's last bytes were a whole
            # ReadyForQuery, so an ErrorResponse cannot land inside another message.
            # (A healthy compute that ends a session sends its own FATAL first.)
            last = self._compute_side.last
            if (
                closed_by == "compute"
                and self.compute_lost_error
                and last[-6:-1] == READY_FOR_QUERY_HEAD
                and not self.client.is_closing()
            ):
                self.client.write(self.compute_lost_error)
        self.client.close()
        self.compute.close()

    def abort(self) -> None:
        if not self._done.done():
            self._done.set_result("proxy")
        self.client.abort()
        self.compute.abort()

    @property
    def client_active_at(self) -> float:
        """time.monotonic() of the client's latest bytes (0.0: none yet)."""
        return self._client_side.at

    async def wait(self) -> SpliceResult:
        closed_by = await self._done
        return SpliceResult(
            bytes_from_client=self._client_side.bytes,
            bytes_from_compute=self._compute_side.bytes,
            client_terminated=self._client_side.last.endswith(TERMINATE),
            closed_by=closed_by,
        )


_monotonic = time.monotonic


def _not_started(data: bytes) -> None:
    raise RuntimeError("splice side used before Splice.start()")


def _is_tls(transport: asyncio.Transport) -> bool:
    return transport.get_extra_info("ssl_object") is not None
