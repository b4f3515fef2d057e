"""Session state known to the proxy: attached, pinned (and why), movable state, per endpoint.

Two sources. The wire, through the splice's trackers: an open transaction
(ReadyForQuery `T`/`E`), a COPY in progress, an extended-protocol exchange
without its Sync, a stream the proxy could not follow. And the compute itself,
asked on the session's own backend while the session is idle (`survey`): temp
tables, advisory locks, WITH HOLD cursors and LISTEN pin a session; SET values
and named prepared statements can move, and are captured. A session with any
pin reason cannot move to another backend.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from proxy.endnotice import resize_error
from proxy.nativesplice import AnySplice
from proxy.pgwire import messages
from proxy.pgwire.codec import frame
from proxy.pgwire.errors import ProtocolViolation
from proxy.splice import ProbeRefused

log = logging.getLogger(__name__)

# One simple Query, three result sets, one round trip. Schema-qualified, so a
# client's search_path cannot change what it reads.
PROBE_SQL = (
    "select pg_catalog.pg_my_temp_schema() <> 0 and exists(select from pg_catalog.pg_class"
    " where relnamespace = pg_catalog.pg_my_temp_schema()),"
    " exists(select from pg_catalog.pg_locks where locktype = 'advisory'"
    " and pid = pg_catalog.pg_backend_pid()),"
    " exists(select from pg_catalog.pg_cursors where is_holdable),"
    " exists(select from pg_catalog.pg_listening_channels());"
    " select name, pg_catalog.current_setting(name) from pg_catalog.pg_settings"
    " where source = 'session';"
    " select name, statement, from_sql, parameter_types::pg_catalog.oid[]::text"
    " from pg_catalog.pg_prepared_statements;"
    " select pg_catalog.pg_listening_channels()"
)
PROBE_QUERY = frame(b"Q", PROBE_SQL.encode() + b"\x00")
_PINS = ("temp_tables", "advisory_locks", "holdable_cursors", "listen")


@dataclass(frozen=True)
class PreparedStatement:
    name: str
    statement: str  # for SQL PREPARE, the PREPARE statement itself
    from_sql: bool
    parameter_types: tuple[int, ...]  # the types the compute resolved, as OIDs


@dataclass(frozen=True)
class SessionSnapshot:
    """What the compute told about an idle session."""

    pins: tuple[str, ...] = ()
    settings: dict[str, str] = field(default_factory=dict)
    prepared: tuple[PreparedStatement, ...] = ()
    # LISTEN channels: re-issued on the new backend when the session allows losing
    # notifications in the gap (`options=pgwake_listen=lossy`); otherwise LISTEN pins.
    listening: tuple[str, ...] = ()


def parse_data_row(body: bytes) -> list[bytes | None]:
    if len(body) < 2:
        raise ProtocolViolation("malformed DataRow")
    (count,) = struct.unpack_from("!H", body)
    pos = 2
    values: list[bytes | None] = []
    for _ in range(count):
        if pos + 4 > len(body):
            raise ProtocolViolation("malformed DataRow")
        (length,) = struct.unpack_from("!i", body, pos)
        pos += 4
        if length < 0:
            values.append(None)
            continue
        if pos + length > len(body):
            raise ProtocolViolation("malformed DataRow")
        values.append(body[pos : pos + length])
        pos += length
    return values


def parse_probe_answer(answer: list[tuple[bytes, bytes]]) -> SessionSnapshot:
    """The three result sets of PROBE_SQL (text format) → a snapshot. An error
    (say, the client's statement_timeout) pins the session: its state is unknown."""
    results: list[list[list[bytes | None]]] = [[]]
    for kind, body in answer:
        if kind == b"E":
            fields = messages.parse_error_fields(body)
            return SessionSnapshot(pins=(f"probe_failed:{fields.get('C', '?')}",))
        if kind == b"D":
            results[-1].append(parse_data_row(body))
        elif kind == b"C":
            results.append([])
    if len(results) < 5 or len(results[0]) != 1:
        raise ProtocolViolation("unexpected answer to the session probe")
    flags, settings_rows, prepared_rows = results[0][0], results[1], results[2]
    listening = tuple(row[0].decode() for row in results[3] if row[0] is not None)
    pins = tuple(name for name, flag in zip(_PINS, flags, strict=True) if flag == b"t")
    settings = {
        row[0].decode(): (row[1] or b"").decode() for row in settings_rows if row[0] is not None
    }
    prepared = []
    for name, statement, from_sql, types in prepared_rows:
        assert name is not None and statement is not None
        oids = tuple(int(t) for t in (types or b"{}").decode().strip("{}").split(",") if t)
        prepared.append(
            PreparedStatement(name.decode(), statement.decode(), from_sql == b"t", oids)
        )
    return SessionSnapshot(pins, settings, tuple(prepared), listening)


async def probe_session(splice: AnySplice, *, timeout: float) -> SessionSnapshot:
    """Ask the compute about an idle session, on the session's own backend."""
    return parse_probe_answer(await splice.probe(PROBE_QUERY, timeout=timeout))


@dataclass(frozen=True)
class SessionCounts:
    """One endpoint's sessions on this proxy. `parked` sessions hold no backend
    (always 0 until parking exists); `pinned` ones are among the attached."""

    attached: int = 0
    parked: int = 0
    pinned: int = 0
    busy: int = 0  # a request is outstanding (a query runs)
    # Idle, and known (asked of the compute) to hold nothing that cannot move: an
    # idle suspend parks these, so they do not keep the compute awake.
    parkable: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"attached": self.attached, "parked": self.parked, "pinned": self.pinned,
                "busy": self.busy, "parkable": self.parkable}


def pin_reasons(splice: AnySplice) -> list[str]:
    """Why this session cannot move to another backend now (empty: it can)."""
    backend, frontend = splice.backend, splice.frontend
    reasons = []
    if backend.broken or frontend.broken:
        reasons.append("untracked_stream")
    if backend.status != b"I":
        reasons.append("transaction")
    if backend.copying:
        reasons.append("copy")
    if frontend.unsynced:
        reasons.append("extended_protocol")
    return reasons


class SessionRegistry:
    """The proxy's spliced sessions by endpoint (what status, metrics and activity
    reports count)."""

    def __init__(self) -> None:
        self._by_endpoint: dict[str, set[AnySplice]] = {}
        self._parked: dict[str, int] = {}  # sessions without a backend, per endpoint
        # The latest snapshot of each session the compute was asked about, with the
        # client's request count then: any request since makes it stale.
        self.snapshots: dict[AnySplice, tuple[int, SessionSnapshot]] = {}
        # Endpoints the control plane says are being resized (its activity answers).
        self.resizing: frozenset[str] = frozenset()
        self._held: set[str] = set()  # endpoints whose sessions are held (see `hold`)
        self._lossy_listen: set[AnySplice] = set()

    def add(self, endpoint: str, splice: AnySplice, *, lossy_listen: bool = False) -> None:
        """`lossy_listen`: the client allowed its LISTEN registrations to move (and
        notifications sent while it has no backend to be lost)."""
        self._by_endpoint.setdefault(endpoint, set()).add(splice)
        if lossy_listen:
            self._lossy_listen.add(splice)
        if endpoint in self.resizing:
            splice.shutdown_notice = self._notice_for(endpoint)

    def _notice_for(self, endpoint: str) -> Callable[[AnySplice], bytes]:
        return lambda splice: resize_error(endpoint, self.pin_reasons(splice))

    def hold(self, endpoint: str) -> None:
        """The endpoint's compute may be about to go (its address was invalidated):
        hold each session at its next idle point, so that it is idle and movable
        when the compute stops, and parks. The next activity answer releases the
        holds unless the endpoint is being resized."""
        splices = self._by_endpoint.get(endpoint)
        if splices:
            self._held.add(endpoint)
            for splice in splices:
                splice.hold_when_idle()

    def set_resizing(self, endpoints: frozenset[str]) -> None:
        """The endpoints being resized now (each activity answer says): a session of
        theirs that the old generation's shutdown ends is told why, in the proxy's
        words; held sessions of other endpoints carry on."""
        for endpoint in self._held - endpoints:
            for splice in self._by_endpoint.get(endpoint, ()):
                splice.release_hold()
        self._held &= endpoints
        if endpoints == self.resizing:
            return
        self.resizing = endpoints
        for endpoint, splices in self._by_endpoint.items():
            notice = self._notice_for(endpoint) if endpoint in endpoints else None
            for splice in splices:
                splice.shutdown_notice = notice

    def discard(self, endpoint: str, splice: AnySplice) -> None:
        splices = self._by_endpoint.get(endpoint)
        if splices is not None:
            splices.discard(splice)
            self.snapshots.pop(splice, None)
            self._lossy_listen.discard(splice)
            if not splices:
                del self._by_endpoint[endpoint]

    def pin_reasons(self, splice: AnySplice) -> list[str]:
        """The wire's reasons, and the compute's when it was asked (`survey`) and the
        session has asked nothing since (otherwise only the next survey can tell)."""
        reasons = pin_reasons(splice)
        snapshot = self.snapshot(splice)
        if snapshot is not None:
            lossy = splice in self._lossy_listen
            reasons.extend(pin for pin in snapshot.pins if not (lossy and pin == "listen"))
        return reasons

    def snapshot(self, splice: AnySplice) -> SessionSnapshot | None:
        """The compute's word on this session, if nothing was asked of it since."""
        entry = self.snapshots.get(splice)
        if entry is None or entry[0] != splice.frontend.requests:
            return None
        return entry[1]

    def movable(self, splice: AnySplice) -> bool:
        """The compute said (and nothing was asked since) that this session holds
        nothing that cannot move, and the wire agrees: it may park."""
        return self.snapshot(splice) is not None and not self.pin_reasons(splice)

    async def survey_idle(self, *, now: float, idle_for: float, timeout: float) -> int:
        """Ask about every session idle for `idle_for` whose snapshot is stale, so a
        compute that vanishes (a kill, a suspend) finds it known. Returns how many."""
        asked = 0
        for endpoint, splices in list(self._by_endpoint.items()):
            stale = [
                splice for splice in splices
                if splice.idle and self.snapshot(splice) is None
                and now - splice.frontend.last_activity >= idle_for
            ]
            for splice in stale:
                asked += 1
                await self.ask(endpoint, splice, timeout=timeout)
        return asked

    async def survey(self, endpoint: str, *, timeout: float, stale_only: bool = False
                     ) -> dict[AnySplice, list[str]]:
        """Ask the compute about every idle session of `endpoint` (concurrently, each
        on its own backend; with `stale_only`, those asked nothing since their last
        answer are not asked again) and return each session's pin reasons."""
        splices = list(self._by_endpoint.get(endpoint, ()))

        async def ask(splice: AnySplice) -> None:
            if not splice.idle or (stale_only and self.snapshot(splice) is not None):
                return
            await self.ask(endpoint, splice, timeout=timeout)

        await asyncio.gather(*(ask(splice) for splice in splices))
        return {splice: self.pin_reasons(splice) for splice in splices}

    async def ask(self, endpoint: str, splice: AnySplice, *, timeout: float) -> None:
        """Ask the compute about one idle session, on its own backend, and keep the
        answer; a session that became busy or ended meanwhile is not asked."""
        try:
            requests = splice.frontend.requests
            snapshot = await probe_session(splice, timeout=timeout)
            self.snapshots[splice] = (requests, snapshot)
        except ProbeRefused:
            pass  # it became busy or ended: the wire says why
        except (ProtocolViolation, TimeoutError) as exc:
            log.warning("session probe on %s failed: %s", endpoint, exc)

    def idle_sessions(self, endpoint: str) -> list[AnySplice]:
        """The endpoint's idle sessions with a backend, longest idle first."""
        idle = [splice for splice in self._by_endpoint.get(endpoint, ()) if splice.idle]
        idle.sort(key=lambda splice: splice.client_active_at)
        return idle

    def sessions(self, endpoint: str) -> int:
        """Attached and parked sessions of the endpoint on this proxy."""
        return len(self._by_endpoint.get(endpoint, ())) + self._parked.get(endpoint, 0)

    def park(self, endpoint: str) -> None:
        self._parked[endpoint] = self._parked.get(endpoint, 0) + 1

    def unpark(self, endpoint: str) -> None:
        left = self._parked.get(endpoint, 0) - 1
        if left > 0:
            self._parked[endpoint] = left
        else:
            self._parked.pop(endpoint, None)

    def counts(self) -> dict[str, SessionCounts]:
        """Per endpoint: attached, parked, pinned and busy sessions."""
        result = {}
        for endpoint in self._by_endpoint.keys() | self._parked.keys():
            splices = self._by_endpoint.get(endpoint, set())
            pinned = sum(1 for splice in splices if self.pin_reasons(splice))
            busy = sum(1 for splice in splices if splice.outstanding)
            parkable = sum(
                1 for splice in splices
                if splice.idle and not splice.outstanding and self.movable(splice)
            )
            result[endpoint] = SessionCounts(
                attached=len(splices), parked=self._parked.get(endpoint, 0),
                pinned=pinned, busy=busy, parkable=parkable,
            )
        return result

    def totals(self) -> dict[str, int]:
        """All endpoints together, by state (for /metrics)."""
        totals = {"attached": 0, "parked": 0, "pinned": 0, "busy": 0, "parkable": 0}
        for counts in self.counts().values():
            for state, value in counts.as_dict().items():
                totals[state] += value
        return totals
