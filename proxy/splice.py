"""Step 8, splice: move bytes both ways between two transports, with flow control.

Each side's data_received writes straight into the other transport; the
chunk is also shown to a sans-IO tracker that reads only message headers
(proxy.pgwire.tracker), so the splice knows where message boundaries are,
the last ReadyForQuery status and whether a request is outstanding. That is
what lets the proxy end a session with an ErrorResponse of its own without
ever cutting a message in two. When a transport's write buffer fills, it
pauses the *other* transport's reading (and resumes it when drained), so a
slow reader never makes the proxy buffer without bound.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from time import monotonic
from typing import Protocol

from proxy.endnotice import replace_admin_shutdown
from proxy.pgwire import messages
from proxy.pgwire.codec import MessageReader, frame
from proxy.pgwire.errors import ProtocolViolation
from proxy.pgwire.tracker import BackendTracker, FrontendTracker

log = logging.getLogger(__name__)

# PostgreSQL's own wording for a server shutdown is "terminating connection due to
# administrator command"; this says whose shutdown it is.
SHUTDOWN_ERROR = messages.error_response(
    "57P01", "terminating connection because the proxy is shutting down",
    hint="Reconnect: another proxy instance will serve the session.",
)

# Said to a backend the proxy ends on purpose (an eviction): it exits cleanly, as
# for a client that says goodbye, instead of logging an unexpected EOF.
TERMINATE = frame(b"X", b"")

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
    # A request was outstanding on the compute when the splice ended (a query may
    # still be running there: the caller cancels it).
    query_running: bool = False
    # The proxy wrote an ErrorResponse of its own: "compute_lost" or "ended" (a drain).
    error_sent: str | None = None
    parked: bool = False  # the compute went away; the client's transport was kept


class _Side(asyncio.Protocol):
    """Receives from its own transport and writes to the peer's."""

    __slots__ = ("bytes", "eof", "name", "other", "peer", "splice", "tls", "write")

    def __init__(self, splice: Splice, name: str, tls: bool):
        self.splice = splice
        self.tls = tls
        self.name = name
        self.peer: asyncio.Transport | None = None
        self.other: _Side | None = None
        self.bytes = 0
        self.eof = False
        self.write: Callable[[bytes], object] = _not_started

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


class _ClientSide(_Side):
    __slots__ = ("feed", "tracker")

    def __init__(self, splice: Splice, tls: bool):
        super().__init__(splice, "client", tls)
        self.tracker = FrontendTracker()
        self.feed = self.tracker.feed

    # The hot path: one call per chunk each way. A counter, the header walk
    # (bodies skipped by length) and the peer's bound write method.
    def data_received(self, data: bytes) -> None:
        self.bytes += len(data)
        self.tracker.last_activity = monotonic()
        try:
            self.feed(data)
        except ProtocolViolation as exc:
            # The compute will refuse the same bytes with its own error; the splice
            # just stops knowing where the boundaries are.
            log.info("client stream untracked: %s", exc.message)
        self.write(data)


class _ComputeSide(_Side):
    __slots__ = ("capture", "feed", "held", "may_park", "special", "tracker", "watch")

    def __init__(self, splice: Splice, tls: bool):
        super().__init__(splice, "compute", tls)
        self.tracker = BackendTracker()
        self.feed = self.tracker.feed
        self.watch = False  # the splice wants to hear of every step (ending at a boundary)
        self.capture: _Capture | None = None  # the answer to the proxy's own query
        self.may_park = False
        # An ErrorResponse that came while the session was idle: a backend says FATAL
        # just before it goes (a suspend's shutdown). Held until the close shows
        # whether the session parks (then the client never sees it) or not.
        self.held = b""
        # Any of capture, held or watch: the rare cases leave the hot path at once.
        self.special = False

    def update(self) -> None:
        self.special = self.capture is not None or bool(self.held) or self.watch

    def data_received(self, data: bytes) -> None:
        if self.special:
            self._special(data)
            return
        if data[0] == 69 and self.may_park:  # b"E"
            held = self._error_chunk(data)
            if held is None:
                return
            data = held
        # Inline, not self._forward(data): the hot path saves the call per chunk.
        self.bytes += len(data)
        try:
            self.feed(data)
        except ProtocolViolation as exc:
            log.warning("compute stream untracked: %s", exc.message)
        self.write(data)

    def _forward(self, data: bytes) -> None:
        """To the client, with the message boundaries tracked on the way (the rare
        cases' path; `data_received` does the same inline)."""
        self.bytes += len(data)
        try:
            self.feed(data)
        except ProtocolViolation as exc:
            log.warning("compute stream untracked: %s", exc.message)
        self.write(data)

    def _error_chunk(self, data: bytes) -> bytes | None:
        """An ErrorResponse while the session may park: held (None) when the session
        is idle, since a backend says FATAL just before it goes and the close shows
        whether the session parks; else passed on, reworded during a resize."""
        if self.splice.idle:
            self.held = data
            self.special = True
            return None
        if self.splice.shutdown_notice is not None:
            return self.splice.reword_shutdown(data)
        return data

    def _special(self, data: bytes) -> None:
        if self.capture is not None:
            self.capture.feed(data)
            return
        if self.held:
            data, self.held = self.held + data, b""
            self.update()
        elif data[0] == 69 and self.may_park:  # b"E"
            held = self._error_chunk(data)
            if held is None:
                return
            data = held
        self._forward(data)
        if self.watch:
            self.splice.compute_progressed()


class ProbeRefused(Exception):
    """The session is not idle (or is ending): the proxy may not use its backend now."""


class _Capture:
    """Collects the compute's answer to a query of the proxy's own, up to its
    ReadyForQuery; asynchronous messages meant for the client (notifications,
    parameter changes) are passed on to it whole."""

    def __init__(self, splice: Splice, max_bytes: int) -> None:
        self.splice = splice
        self.reader = MessageReader(max_length=max_bytes)
        self.answer: list[tuple[bytes, bytes]] = []
        self.done: asyncio.Future[list[tuple[bytes, bytes]]] = (
            asyncio.get_running_loop().create_future()
        )
        self.budget = max_bytes

    def feed(self, data: bytes) -> None:
        self.budget -= len(data)
        self.reader.feed(data)
        try:
            while (message := self.reader.next_message()) is not None:
                kind, body = message
                if kind in (b"A", b"S"):
                    self.splice.client.write(frame(kind, body))
                    continue
                self.answer.append(message)
                if kind == b"Z":
                    self.splice.end_capture(self.reader.take_trailing())
                    if not self.done.done():
                        self.done.set_result(self.answer)
                    return
            if self.budget < 0:
                raise ProtocolViolation("the answer to the proxy's query is too large")
        except ProtocolViolation as exc:
            if not self.done.done():
                self.done.set_exception(exc)
            self.splice.finish("proxy")


class Splice:
    def __init__(
        self,
        client: asyncio.Transport,
        compute: asyncio.Transport,
        compute_lost_error: bytes = b"",
        park: tuple[asyncio.Protocol, Callable[[Splice], bool]] | None = None,
    ):
        self.client = client
        self.compute = compute
        # Where the client's transport goes when the compute vanishes while the
        # session is idle and movable (the predicate says so): the session parks.
        self.park = park
        self.parked = False
        # Sent to the client when the compute vanishes between messages (a crash,
        # a kill): a clean SQLSTATE instead of a bare "connection closed".
        self.compute_lost_error = compute_lost_error
        self._client_side = _ClientSide(self, _is_tls(client))
        self._compute_side = _ComputeSide(self, _is_tls(compute))
        self._compute_side.may_park = park is not None
        self._done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._end_error = b""  # the proxy ends the session with this ErrorResponse…
        self._end_when_idle = True  # …once idle, or else at the next boundary
        # A compute about to go (its address was invalidated: a resize's freeze, a
        # suspend): at the next idle point stop reading the client, so the session
        # stays idle (and, once surveyed, movable) until the compute stops and it
        # parks, instead of running on into the stop.
        self._hold = False
        self._holding = False
        self.query_running_at_end = False
        self.error_sent: str | None = None
        # Set while the endpoint is being resized: the words for a session the
        # compute's fast shutdown ends because it could not move (proxy.endnotice).
        self.shutdown_notice: Callable[[Splice], bytes] | None = None
        # The native data plane runs this splice only for a rare case (a probe, a
        # hold, an ending, a compute's error while idle): at the next plain idle
        # point it takes the session back (`handback` says whether it did).
        self.handback: Callable[[], bool] | None = None
        self.detached = False

    def reword_shutdown(self, chunk: bytes) -> bytes:
        notice = self.shutdown_notice
        if notice is None:
            return chunk
        return replace_admin_shutdown(chunk, lambda: notice(self))

    @property
    def frontend(self) -> FrontendTracker:
        return self._client_side.tracker

    @property
    def backend(self) -> BackendTracker:
        return self._compute_side.tracker

    @property
    def outstanding(self) -> bool:
        """A request the compute has not finished answering (a query may be running)."""
        front = self._client_side.tracker
        return front.requests > self._compute_side.tracker.ready_count or front.unsynced

    @property
    def idle(self) -> bool:
        """Idle outside a transaction, with nothing asked and nothing half-sent."""
        return self._compute_side.tracker.idle and not self.outstanding

    def start(self, client_pending: bytes = b"", compute_pending: bytes = b"",
              last_activity: float | None = None) -> None:
        cs, ps = self._client_side, self._compute_side
        # Idle time counts from the start: a short session is never surveyed. (A
        # session the native data plane hands over keeps its client's own time.)
        cs.tracker.last_activity = monotonic() if last_activity is None else last_activity
        if self.handback is not None:
            ps.watch = ps.special = True
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
        self.maybe_handback()

    def maybe_handback(self) -> None:
        """Give the session back to the native data plane when it is plainly idle:
        nothing asked, nothing held, nothing special pending on either side."""
        side = self._compute_side
        if (
            self.handback is None or self._done.done() or self._hold or self._end_error
            or side.capture is not None or side.held or not self.idle
            or not self.frontend.at_boundary or self.client.is_closing()
            or self.compute.is_closing()
        ):
            return
        self.handback()

    def detach(self) -> asyncio.Transport:
        """Stop running this session (the native data plane takes it back): nothing
        more is read or forwarded here, and `wait` says "detached"."""
        self.detached = True
        self.client.pause_reading()
        if not self._done.done():
            self._done.set_result("detached")
        return self.compute

    async def probe(self, query: bytes, *, timeout: float, max_bytes: int = 1 << 20
                    ) -> list[tuple[bytes, bytes]]:
        """Run the proxy's own simple Query on this session's backend while the
        session is idle, and return the compute's answer (up to its ReadyForQuery)
        without the client seeing it. The client's next message waits meanwhile."""
        side = self._compute_side
        if not self.idle or not self.frontend.at_boundary or self._end_error or (
            side.capture is not None or self._done.done()
        ):
            raise ProbeRefused("session is not idle")
        capture = side.capture = _Capture(self, max_bytes)
        side.special = True
        self.client.pause_reading()
        self.compute.write(query)
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(capture.done)
        except BaseException:
            # No answer in time: the backend's state is unknown, so is the stream.
            self.finish("proxy")
            raise

    def end_capture(self, trailing: bytes) -> None:
        self._compute_side.capture = None
        self._compute_side.update()
        if trailing:
            self._compute_side.data_received(trailing)
        if self._done.done():
            return
        if self._end_error:
            self.compute_progressed()  # a drain that began meanwhile
        if (not self._end_error or self._end_when_idle) and not self._holding:
            if not self.client.is_closing():
                self.client.resume_reading()
        self._hold_if_idle()
        self.maybe_handback()

    def evict(self) -> bool:
        """Park the session now, as its compute going away would, if it is idle, at a
        message boundary and movable (the park predicate): its backend is told
        Terminate and closed, and the client's transport goes to the parked session,
        whose next message re-attaches. False, with nothing changed, otherwise."""
        if (
            self.park is None or self._done.done() or self._end_error
            or self._compute_side.capture is not None or not self.idle
            or not self.frontend.at_boundary or self._client_side.tracker.terminated
            or self.client.is_closing() or not self.park[1](self)
        ):
            return False
        # Both in this one callback: no client byte can reach the backend in between.
        self.compute.write(TERMINATE)
        self.finish("compute")
        return self.parked

    async def evict_soon(self, timeout: float) -> bool:
        """`evict`, as the native data plane's splice offers it (which must first have
        the session yielded by its engine)."""
        return self.evict()

    def end_when_idle(self, error: bytes) -> None:
        """Send `error` and close at the session's next idle point (now, if idle)."""
        self._end_error = error
        self._compute_side.watch = self._compute_side.special = True
        self.compute_progressed()

    def end_at_boundary(self, error: bytes) -> None:
        """Send `error` and close at the compute stream's next message boundary
        (now, if it is at one). The client's further requests are not read."""
        self._end_error = error
        self._end_when_idle = False
        if not self.client.is_closing():
            self.client.pause_reading()
        self._compute_side.watch = self._compute_side.special = True
        self.compute_progressed()

    def hold_when_idle(self) -> None:
        """Stop forwarding the client's requests from its next idle point on (now, if
        idle): the session is moved there when its compute stops (see `release_hold`)."""
        self._hold = True
        self._compute_side.watch = self._compute_side.special = True
        self._hold_if_idle()

    def release_hold(self) -> None:
        """The compute stays after all (no handoff, or it was abandoned): carry on."""
        if not self._hold:
            return
        self._hold = False
        self._compute_side.watch = bool(self._end_error) or self.handback is not None
        self._compute_side.update()
        if self._holding:
            self._holding = False
            if not self.client.is_closing() and not self._done.done() and (
                not self._end_error or self._end_when_idle
            ):
                self.client.resume_reading()
        self.maybe_handback()

    def _hold_if_idle(self) -> None:
        if (
            self._hold and not self._holding and not self._done.done()
            and self._compute_side.capture is None and self.idle
            and self.frontend.at_boundary and not self.client.is_closing()
        ):
            self._holding = True
            self.client.pause_reading()

    @property
    def holding(self) -> bool:
        return self._hold

    def compute_progressed(self) -> None:
        self._hold_if_idle()
        if not self._end_error and self.handback is not None:
            self.maybe_handback()
            return
        if not self._end_error or self._done.done() or self._compute_side.capture is not None:
            return
        ready = self.idle if self._end_when_idle else self.backend.at_boundary
        if ready:
            if not self.client.is_closing():
                self.client.write(self._end_error)
                self.error_sent = "ended"
            self.finish("proxy")

    def finish(self, closed_by: str) -> None:
        if self.detached:
            return  # the native data plane runs the session now
        capture = self._compute_side.capture
        if capture is not None and not capture.done.done():
            capture.done.set_exception(ProbeRefused("the session ended"))
            capture.done.exception()  # retrieved: the probe may have given up already
        side = self._compute_side
        if self.parked:
            self.compute.close()  # the client's transport belongs to the session now
            return
        if (
            closed_by == "compute"
            and self.park is not None
            and not self._done.done()
            and self.idle
            and not self._client_side.tracker.terminated
            and not self.client.is_closing()
            and self.park[1](self)
        ):
            # The backend went away under an idle, movable session: keep the client.
            self.parked = True
            side.held = b""
            side.update()
            self.client.set_protocol(self.park[0])
            if self._holding:
                self._holding = False
                self.client.resume_reading()  # the parked session reads its client again
            self._done.set_result(closed_by)
            self.compute.close()
            return
        if side.held:
            held, side.held, side.may_park = side.held, b"", False
            side.update()
            # The compute's own last words, for the client (reworded in a resize).
            side.data_received(self.reword_shutdown(held))
        if not self._done.done():
            self._done.set_result(closed_by)
            self.query_running_at_end = self.outstanding
            backend = self._compute_side.tracker
            # Only at a message boundary, so that an ErrorResponse never lands inside
            # another message; never after the compute's own FATAL, nor after the
            # client's Terminate (it asked for the close: a PostgreSQL server says
            # nothing more, and some drivers treat a late error as a crash).
            if (
                closed_by == "compute"
                and self.compute_lost_error
                and backend.at_boundary
                and not backend.fatal
                and not self._client_side.tracker.terminated
                and not self.client.is_closing()
            ):
                self.client.write(self.compute_lost_error)
                self.error_sent = "compute_lost"
        self.client.close()
        self.compute.close()

    def abort(self) -> None:
        if self.detached:
            return
        if not self._done.done():
            self._done.set_result("proxy")
            self.query_running_at_end = self.outstanding
        self.client.abort()
        self.compute.abort()

    @property
    def client_active_at(self) -> float:
        """time.monotonic() of the client's latest bytes (0.0: none yet)."""
        return self._client_side.tracker.last_activity

    async def wait(self) -> SpliceResult:
        closed_by = await self._done
        return SpliceResult(
            bytes_from_client=self._client_side.bytes,
            bytes_from_compute=self._compute_side.bytes,
            client_terminated=self._client_side.tracker.terminated,
            closed_by=closed_by,
            query_running=self.query_running_at_end,
            error_sent=self.error_sent,
            parked=self.parked,
        )


class Endable(Protocol):
    """A splice of either data path, as an ending sees it."""

    def end_when_idle(self, error: bytes) -> None: ...
    def end_at_boundary(self, error: bytes) -> None: ...


@dataclass
class SessionEnding:
    """How the proxy is ending its sessions (a drain): applied to each live splice,
    and to any splice that starts meanwhile."""

    error: bytes
    when_idle: bool = True

    def apply(self, splice: Endable) -> None:
        if self.when_idle:
            splice.end_when_idle(self.error)
        else:
            splice.end_at_boundary(self.error)


def _not_started(data: bytes) -> None:
    raise RuntimeError("splice side used before Splice.start()")


def _is_tls(transport: asyncio.Transport) -> bool:
    return bool(
        transport.get_extra_info("ssl_object") is not None
        or transport.get_extra_info("pgwake_tls")
    )
