"""Step 8 on the native data plane: the engine splices; Python keeps the decisions.

A NativeSplice offers what proxy/splice.py's Splice offers (the session
registry, the drain and parking use either), but the bytes move in the C
engine on its own threads, with the message boundaries tracked there. Python
is told of session events only. Everything rare (a probe of the session's
state, a hold before a resize, a drain's ending, a compute's ErrorResponse
while idle, a session being resized) runs in a Python Splice for as long as
it takes: the engine yields the session at a safe point (YIELDED: the compute
socket comes back to Python, the client stays with the engine in its PYTHON
mode), a Splice runs it over the same client transport, and at the next plain
idle point hands it back (`Splice.handback`). The session's counters run on
across these phases, so its snapshot and activity stay its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from proxy.nativetransport import NativeTransport, _Discard, detach_socket
from proxy.splice import ProbeRefused, Splice, SpliceResult
from proxy.stream import Stream

if TYPE_CHECKING:
    from proxy.dataplane import NativePlane

log = logging.getLogger(__name__)

_READY = ord("Z")


@dataclass(frozen=True)
class EngineState:
    """One consistent reading of the engine's trackers (engine.state)."""

    mode: int
    status: bytes
    ready_count: int
    requests: int
    unsynced: bool
    copying: bool
    fatal: bool
    front_broken: bool
    back_broken: bool
    terminated: bool
    front_at_boundary: bool
    back_at_boundary: bool
    back_last_type: int
    last_activity: float
    bytes_from_client: int
    bytes_from_compute: int
    client_queued: int
    # Where the client stream is inside a message (body bytes to come, a partial header).
    front_skip: int = 0
    front_head: bytes = b""

    @classmethod
    def read(cls, raw: tuple[Any, ...]) -> EngineState:
        values = list(raw[:19])
        values[1] = bytes([values[1]]) if isinstance(values[1], int) else values[1]
        return cls(*values)

    @property
    def outstanding(self) -> bool:
        return self.requests > self.ready_count or self.unsynced

    @property
    def idle(self) -> bool:
        return (self.back_at_boundary and self.back_last_type == _READY
                and self.status == b"I" and not self.outstanding)


# What a connection the engine no longer knows reads as.
_GONE = EngineState(0, b"I", 0, 0, False, False, False, False, False, True,
                    True, True, _READY, 0.0, 0, 0, 0)


# A session before its first phase: right after the login's ReadyForQuery.
_FRESH = EngineState(0, b"I", 0, 0, False, False, False, False, False, False,
                     True, True, _READY, 0.0, 0, 0, 0)


@dataclass(frozen=True)
class FrontendReading:
    """The client side's tracker as the registry reads it: one reading of the engine
    (or of the Python phase's tracker), not a call to the engine per attribute."""

    requests: int
    unsynced: bool
    terminated: bool
    broken: bool
    at_boundary: bool
    last_activity: float


@dataclass(frozen=True)
class BackendReading:
    status: bytes
    copying: bool
    broken: bool
    at_boundary: bool
    fatal: bool
    idle: bool
    last_type: int


class NativeSplice:
    def __init__(
        self,
        plane: NativePlane,
        client: NativeTransport,
        compute: asyncio.Transport,
        compute_lost_error: bytes = b"",
        park: tuple[asyncio.Protocol, Callable[[Any], bool]] | None = None,
    ):
        self.plane = plane
        self.engine = plane.engine
        self.client = client
        self.compute: asyncio.Transport | None = compute
        self.compute_lost_error = compute_lost_error
        self.park = park
        self.parked = False
        self.python: Splice | None = None  # the Python Splice of a rare case, while it runs
        self._native = False  # the engine splices now
        self._yield_asked = 0  # the strongest yield asked of the engine (0: none)
        self._done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._tasks: set[asyncio.Task[Any]] = set()
        # What the Python phase is wanted for (applied when it starts).
        self._end_error = b""
        self._end_when_idle = True
        self._hold = False
        self._probe_waiters: list[asyncio.Future[Splice]] = []
        self._notice: Callable[[Any], bytes] | None = None
        # Counters of finished phases (the engine's restart at each splice).
        self._requests_base = 0
        self._bytes_client = 0
        self._bytes_compute = 0
        self._final: EngineState | None = None
        # Where the engine left the session: what it reads as between two phases.
        self._last_state = _FRESH
        self.query_running_at_end = False
        self.error_sent: str | None = None
        self.client_terminated = False

    # -- what the registry and activity read --------------------------------------------

    def state(self) -> EngineState:
        if self._final is not None:
            return self._final
        if not self._native:
            return self._last_state
        try:
            return EngineState.read(self.engine.state(self.client.conn_id))
        except ValueError:
            return _GONE  # the connection is gone: the phases' own counters stand

    @property
    def frontend(self) -> FrontendReading:
        py = self.python
        if py is not None:
            front = py.frontend
            return FrontendReading(self._requests_base + front.requests, front.unsynced,
                                   front.terminated, front.broken, front.at_boundary,
                                   front.last_activity)
        state = self.state()
        requests = self._requests_base + (state.requests if self._native else 0)
        return FrontendReading(requests, state.unsynced, state.terminated,
                               state.front_broken, state.front_at_boundary,
                               state.last_activity)

    @property
    def backend(self) -> BackendReading:
        py = self.python
        if py is not None:
            back = py.backend
            return BackendReading(back.status, back.copying, back.broken, back.at_boundary,
                                  back.fatal, back.idle, back.last_type)
        state = self.state()
        return BackendReading(state.status, state.copying, state.back_broken,
                              state.back_at_boundary, state.fatal, state.idle,
                              state.back_last_type)

    @property
    def requests(self) -> int:
        if self.python is not None:
            return self._requests_base + self.python.frontend.requests
        # Between phases the engine's count is in the base already.
        return self._requests_base + (self.state().requests if self._native else 0)

    @property
    def outstanding(self) -> bool:
        if self.python is not None:
            return self.python.outstanding
        return self.state().outstanding

    @property
    def idle(self) -> bool:
        if self.python is not None:
            return self.python.idle
        return self.state().idle

    @property
    def client_active_at(self) -> float:
        if self.python is not None:
            return self.python.client_active_at
        return self.state().last_activity

    @property
    def holding(self) -> bool:
        return self._hold

    @property
    def shutdown_notice(self) -> Callable[[Any], bytes] | None:
        return self._notice

    @shutdown_notice.setter
    def shutdown_notice(self, notice: Callable[[Any], bytes] | None) -> None:
        self._notice = notice
        if self.python is not None:
            self.python.shutdown_notice = self._inner_notice() if notice else None
        elif notice is not None and self._native:
            # A compute's shutdown ends a busy session with its own words; during a
            # resize the proxy says why, so the rare case runs in Python from the
            # next message boundary until the session is idle again.
            self._ask_yield(self.plane.YIELD_BOUNDARY)

    def _inner_notice(self) -> Callable[[Any], bytes] | None:
        notice = self._notice
        if notice is None:
            return None
        return lambda _inner: notice(self)

    # -- start, phases ------------------------------------------------------------------

    def start(self, client_pending: bytes = b"", compute_pending: bytes = b"") -> None:
        self.client.splice_events = self._on_event
        compute = self.compute
        assert compute is not None
        # Bytes the client sent before its ReadyForQuery go through a Python Splice,
        # which counts them, and hands the session over once idle.
        if client_pending or self._notice is not None or not self._to_native(
            compute, compute_pending, b"I"
        ):
            self._run_python(compute, client_pending, compute_pending, None)

    def _flags(self) -> int:
        flags = 0
        if self.park is not None:
            flags |= self.plane.MAY_PARK
        if self._notice is not None:
            flags |= self.plane.REWORD
        return flags

    def _to_native(self, compute: asyncio.Transport, to_client: bytes, status: bytes) -> bool:
        try:
            fd = detach_socket(compute)
        except RuntimeError:
            return False  # bytes still on their way to the compute: at the next idle point
        self.compute = None
        self.client.set_protocol(_Discard())
        self.client.splicing = True
        self._native = True
        self._yield_asked = 0
        try:
            self.engine.splice(self.client.conn_id, fd, to_client, self._flags(), status[0])
        except (ValueError, RuntimeError):
            # The client left during the handover: nothing to splice.
            self._native = False
            self.client.splicing = False
            with contextlib.suppress(OSError):
                socket.socket(fileno=fd).close()
            self._set_done("client")
            return True
        if self._end_error:
            self._ask_yield(self.plane.YIELD_IDLE if self._end_when_idle
                            else self.plane.YIELD_BOUNDARY)
        elif self._hold or self._probe_waiters:
            self._ask_yield(self.plane.YIELD_IDLE)
        return True

    def _ask_yield(self, when: int) -> None:
        """Ask the engine for the session at `when` (a stronger ask replaces a weaker)."""
        if not self._native or self._done.done():
            return
        order = {self.plane.YIELD_IDLE: 1, self.plane.YIELD_BOUNDARY: 2, self.plane.YIELD_NOW: 3}
        if order[when] <= self._yield_asked:
            return
        self._yield_asked = order[when]
        # ValueError/RuntimeError: the engine already left SPLICE mode (the client or
        # the compute went); the event that says so is on its way and ends the session.
        with contextlib.suppress(ValueError, RuntimeError):
            self.engine.request_yield(self.client.conn_id, when)

    def _on_event(self, kind: int, payload: Any) -> None:
        plane = self.plane
        if kind == plane.YIELDED:
            compute_fd, compute_bytes, reason = payload
            self._leave_native()
            self._spawn(self._resume_in_python(compute_fd, compute_bytes, reason))
        elif kind == plane.COMPUTE_CLOSED:
            self._leave_native()
            self._native_ended("compute")
        elif kind == plane.CLIENT_CLOSED:
            self._leave_native()
            self._native_ended("client")

    def _leave_native(self) -> None:
        """The engine stopped splicing: keep its counters, they restart next time."""
        state = self.state()
        self._native = False
        self.client.splicing = False
        self._yield_asked = 0
        self._last_state = state
        self._requests_base += state.requests
        self._bytes_client += state.bytes_from_client
        self._bytes_compute += state.bytes_from_compute

    async def _resume_in_python(self, fd: int, compute_bytes: bytes, reason: str) -> None:
        loop = asyncio.get_running_loop()
        state = self._last_state
        if self._done.done():
            with contextlib.suppress(OSError):
                socket.socket(fileno=fd).close()
            return
        try:
            # A Stream keeps whatever arrives before the Splice takes the transport.
            transport, early = await loop.connect_accepted_socket(
                Stream, socket.socket(fileno=fd)
            )
        except OSError as exc:
            log.info("native splice: the compute socket is gone: %s", exc)
            self._native_ended("compute")
            return
        seed = None if state.idle else state
        if seed is not None:
            # Carried on from where the engine was (the requests still unanswered).
            self._requests_base -= state.requests - state.ready_count
        self._run_python(transport, b"", compute_bytes + early.take_buffered(), seed,
                         state.last_activity)

    def _run_python(self, compute: asyncio.Transport, client_pending: bytes,
                    compute_pending: bytes, seed: EngineState | None,
                    last_activity: float | None = None) -> None:
        park = None
        if self.park is not None:
            stream, movable = self.park
            park = (stream, lambda _inner: movable(self))
        py = Splice(self.client, compute, self.compute_lost_error, park=park)
        py.shutdown_notice = self._inner_notice()
        if seed is not None:
            front, back = py.frontend, py.backend
            front.requests = seed.requests - seed.ready_count
            front.unsynced = seed.unsynced
            # Yielded at a compute boundary, the client may be inside a message.
            front._skip, front._head = seed.front_skip, seed.front_head
            front.broken, back.broken = seed.front_broken, seed.back_broken
            front._pending = bool(seed.front_skip or seed.front_head or seed.front_broken)
            back._pending = seed.back_broken
            back.status, back.copying, back.fatal = seed.status, seed.copying, seed.fatal
            back.last_type = seed.back_last_type
        py.handback = lambda: self._handback(py)
        self.python = py
        self.compute = compute
        py.start(client_pending, compute_pending, last_activity=last_activity)
        if self._end_error:
            (py.end_when_idle if self._end_when_idle else py.end_at_boundary)(self._end_error)
        if self._hold:
            py.hold_when_idle()
        for waiter in self._probe_waiters:
            if not waiter.done():
                waiter.set_result(py)
        self._probe_waiters.clear()
        self._spawn(self._watch_python(py))

    def _handback(self, py: Splice) -> bool:
        if self._probe_waiters or self._hold or self._end_error:
            return False
        compute = py.compute
        if compute.get_write_buffer_size():
            return False
        front = py.frontend
        requests = front.requests
        py.detach()
        self.python = None
        self._requests_base += requests
        self._bytes_client += py._client_side.bytes
        self._bytes_compute += py._compute_side.bytes
        if not self._to_native(compute, b"", py.backend.status):
            # Could not hand over now: Python carries on (a fresh Splice, same place).
            self._run_python(compute, b"", b"", None, front.last_activity)
        return True

    async def _watch_python(self, py: Splice) -> None:
        result = await py.wait()
        if result.closed_by == "detached" or self._done.done():
            return
        self.python = None
        self._bytes_client += result.bytes_from_client
        self._bytes_compute += result.bytes_from_compute
        self.parked = result.parked
        self.query_running_at_end = result.query_running
        self.error_sent = result.error_sent
        self.client_terminated = result.client_terminated
        self._requests_base += py.frontend.requests
        self._set_done(result.closed_by)

    def _native_ended(self, closed_by: str) -> None:
        """The engine's splice ended (its compute or its client went): what
        Splice.finish decides, from the engine's trackers."""
        state = self._last_state
        self._final = state
        client = self.client
        self.client_terminated = state.terminated
        if self._end_error and closed_by == "compute":
            # Ending (a drain) when the compute went first: the proxy's words, as the
            # Python splice would have sent them a moment earlier.
            self.query_running_at_end = state.outstanding
            if state.back_at_boundary and not state.terminated and not client.is_closing():
                client.write(self._end_error)
                self.error_sent = "ended"
            client.close()
            self._set_done("proxy")
            return
        if (
            closed_by == "compute" and self.park is not None and state.idle
            and not state.terminated and not client.is_closing() and self.park[1](self)
        ):
            self.parked = True
            client.set_protocol(self.park[0])
            client.resume_reading()
            self._set_done("compute")
            return
        self.query_running_at_end = state.outstanding
        if (
            closed_by == "compute" and self.compute_lost_error and state.back_at_boundary
            and not state.fatal and not state.terminated and not client.is_closing()
        ):
            client.write(self.compute_lost_error)
            self.error_sent = "compute_lost"
        client.close()
        self._set_done(closed_by)

    def _set_done(self, closed_by: str) -> None:
        if not self._done.done():
            self._done.set_result(closed_by)
        # The client's transport outlives this splice when the session parks: it must
        # not keep the ended splice (and its Python phase's objects) alive.
        if self.client.splice_events == self._on_event:
            self.client.splice_events = None

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the Splice interface the registry, drain and session use -----------------------

    async def probe(self, query: bytes, *, timeout: float, max_bytes: int = 1 << 20
                    ) -> list[tuple[bytes, bytes]]:
        if self._done.done() or self._end_error or not self.idle:
            raise ProbeRefused("session is not idle")
        py = await self._python_phase(timeout)
        if self._done.done() or (py is not None and py.detached):
            raise ProbeRefused("the session ended")
        if py is None:
            raise TimeoutError("the session was not yielded in time")
        return await py.probe(query, timeout=timeout, max_bytes=max_bytes)

    async def evict_soon(self, timeout: float) -> bool:
        """Park the session now if it is idle and movable (Splice.evict): in the
        engine's hands it is first yielded at its idle point, then parked in Python."""
        if self._done.done() or self._end_error or not self.idle:
            return False
        py = await self._python_phase(timeout)
        return py is not None and not py.detached and py.evict()

    async def _python_phase(self, timeout: float) -> Splice | None:
        """The session in a Python Splice (asked of the engine at its next idle point);
        None if it ended or did not come in time."""
        if self.python is not None:
            return self.python
        waiter: asyncio.Future[Splice] = asyncio.get_running_loop().create_future()
        self._probe_waiters.append(waiter)
        self._ask_yield(self.plane.YIELD_IDLE)
        try:
            async with asyncio.timeout(timeout):
                py = await asyncio.shield(waiter)
        except TimeoutError:
            return None
        finally:
            if waiter in self._probe_waiters:
                self._probe_waiters.remove(waiter)
        return None if self._done.done() else py

    def end_when_idle(self, error: bytes) -> None:
        self._end_error, self._end_when_idle = error, True
        if self.python is not None:
            self.python.end_when_idle(error)
        else:
            self._ask_yield(self.plane.YIELD_IDLE)

    def end_at_boundary(self, error: bytes) -> None:
        self._end_error, self._end_when_idle = error, False
        if self.python is not None:
            self.python.end_at_boundary(error)
        else:
            self._ask_yield(self.plane.YIELD_BOUNDARY)

    def hold_when_idle(self) -> None:
        self._hold = True
        if self.python is not None:
            self.python.hold_when_idle()
        else:
            self._ask_yield(self.plane.YIELD_IDLE)

    def release_hold(self) -> None:
        if not self._hold:
            return
        self._hold = False
        if self.python is not None:
            self.python.release_hold()

    def abort(self) -> None:
        if self.python is not None:
            self.python.abort()
        if not self._done.done():
            self.query_running_at_end = self.outstanding
            self._final = self.state()
            self._set_done("proxy")
        self.client.abort()
        if self.compute is not None:
            self.compute.abort()

    async def wait(self) -> SpliceResult:
        closed_by = await self._done
        return SpliceResult(
            bytes_from_client=self._bytes_client,
            bytes_from_compute=self._bytes_compute,
            client_terminated=self.client_terminated,
            closed_by=closed_by,
            query_running=self.query_running_at_end,
            error_sent=self.error_sent,
            parked=self.parked,
        )


AnySplice = Splice | NativeSplice
