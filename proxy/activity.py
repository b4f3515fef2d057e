"""Activity per endpoint, as this proxy sees it, and the periodic report to the control plane.

Idle means no session started, ended or ran anything (and no wake was asked
for) for `idle_timeout`, across all proxies. A connection that comes and goes
between two looks of the janitor must still count, so the proxy does not report
"sessions open now" alone: each report carries, per endpoint, the wall-clock
time of the latest activity and the sessions started since the previous report.
Reports are periodic (one request per interval, whatever the connect rate), not
one per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from wakeup.api import ControlAPIError, ControlClient

if TYPE_CHECKING:
    from proxy.sessionstate import SessionCounts

log = logging.getLogger(__name__)


class Spliced(Protocol):
    @property
    def client_active_at(self) -> float: ...


@dataclass(frozen=True)
class ActivitySnapshot:
    last_active: dict[str, float]  # endpoint → wall-clock seconds of its latest activity
    started: dict[str, int]  # endpoint → sessions started since the previous snapshot

    def __bool__(self) -> bool:
        return bool(self.last_active or self.started)


class ActivityTracker:
    """Notes session starts and ends; reads live splices' latest client bytes at report time.

    The hot path costs nothing here: the splice stores a timestamp per chunk and
    this object reads it once per report.
    """

    def __init__(
        self,
        wall: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ):
        self.wall = wall
        self.monotonic = monotonic
        self._last: dict[str, float] = {}
        self._started: dict[str, int] = {}
        self._live: dict[Spliced, str] = {}
        # Set when the control plane should hear from this proxy now, not at the
        # next period (an endpoint entered a handoff and its sessions were asked).
        self.report_now = asyncio.Event()

    def session_started(self, endpoint_id: str) -> None:
        self._last[endpoint_id] = self.wall()
        self._started[endpoint_id] = self._started.get(endpoint_id, 0) + 1

    def session_ended(self, endpoint_id: str) -> None:
        self._last[endpoint_id] = self.wall()

    def touch(self, endpoint_id: str) -> None:
        self._last[endpoint_id] = self.wall()

    def attach(self, endpoint_id: str, splice: Spliced) -> None:
        self._live[splice] = endpoint_id

    def detach(self, splice: Spliced) -> None:
        endpoint_id = self._live.pop(splice, None)
        if endpoint_id is not None:
            self._note_splice(endpoint_id, splice)

    def _note_splice(self, endpoint_id: str, splice: Spliced) -> None:
        at = splice.client_active_at
        if at <= 0.0:
            return
        when = self.wall() - max(0.0, self.monotonic() - at)
        if when > self._last.get(endpoint_id, 0.0):
            self._last[endpoint_id] = when

    def snapshot(self) -> ActivitySnapshot:
        """Everything since the previous snapshot (then forgotten)."""
        for splice, endpoint_id in self._live.items():
            self._note_splice(endpoint_id, splice)
        snap = ActivitySnapshot(self._last, self._started)
        self._last, self._started = {}, {}
        return snap


async def report_activity(
    control: ControlClient,
    counts: Callable[[], dict[str, int]],
    tracker: ActivityTracker,
    interval: float,
    invalidated: Callable[[str, float], None] = lambda endpoint_id, ago: None,
    sessions: Callable[[], Mapping[str, SessionCounts]] | None = None,
    resizing: Callable[[frozenset[str]], None] = lambda endpoints: None,
) -> None:
    """Every `interval`: live sessions per endpoint, latest activity, sessions started.
    The answer names addresses that became invalid (suspends): `invalidated(endpoint,
    seconds_ago)` drops cached copies older than that, for proxies without Redis.
    One small request per interval, however many clients connect (and even when idle:
    the answer is how suspends reach this proxy). With `sessions` (a proxy that
    parks), the report also says which sessions are pinned, parked and parkable:
    the janitor suspends under parkable sessions, a handoff waits for pinned ones.
    `tracker.report_now` sends the next report at once; `resizing(endpoints)` hears
    which endpoints are in a handoff, from each answer.
    """
    proxy_id = f"{socket.gethostname()}:{os.getpid()}:{id(tracker):x}"
    pending = ActivitySnapshot({}, {})
    failing = False
    while True:
        # The report's period, by design, unless something asks for a report now.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval):
                await tracker.report_now.wait()
        tracker.report_now.clear()
        live = counts()
        snap = _merge(pending, tracker.snapshot())
        states = sessions() if sessions is not None else None
        try:
            answer = await control.report_activity(
                proxy_id, live, ttl=interval * 3, timeout=interval,
                last_active=snap.last_active, started=snap.started, interval=interval,
                pinned=None if states is None else {
                    ep: c.pinned for ep, c in states.items() if c.pinned},
                parked={ep: c.parked for ep, c in (states or {}).items() if c.parked},
                parkable={ep: c.parkable for ep, c in (states or {}).items() if c.parkable},
                unmovable=None if states is None else {
                    ep: c.attached - c.parkable for ep, c in states.items()
                    if c.attached > c.parkable},
            )
            pending = ActivitySnapshot({}, {})
            if failing:
                log.warning("activity reports reach the control plane again")
            failing = False
            for endpoint_id, ago in answer.invalidated.items():
                invalidated(endpoint_id, ago)
            resizing(frozenset(answer.resizing))
        except ControlAPIError as exc:
            # Keep what was not delivered for the next report (bounded by the endpoints).
            pending = snap
            if not failing:
                log.warning("activity report failed: %s", exc)
            failing = True


def _merge(old: ActivitySnapshot, new: ActivitySnapshot) -> ActivitySnapshot:
    if not old:
        return new
    last = dict(old.last_active)
    for endpoint_id, when in new.last_active.items():
        last[endpoint_id] = max(when, last.get(endpoint_id, 0.0))
    started = dict(old.started)
    for endpoint_id, n in new.started.items():
        started[endpoint_id] = started.get(endpoint_id, 0) + n
    return ActivitySnapshot(last, started)

