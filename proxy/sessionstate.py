"""Session state as the proxy sees it on the wire: attached, pinned (and why), per endpoint.

What the splice's trackers can tell without asking the compute: an open
transaction (ReadyForQuery `T`/`E`), a COPY in progress, an extended-protocol
exchange without its Sync, a stream the proxy could not follow. State only the
compute knows (temp tables, advisory locks, WITH HOLD cursors, LISTEN) is not
asked for yet. A session with any reason here cannot move to another backend.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.splice import Splice


@dataclass(frozen=True)
class SessionCounts:
    """One endpoint's sessions on this proxy. `parked` sessions hold no backend
    (always 0 until parking exists); `pinned` ones are among the attached."""

    attached: int = 0
    parked: int = 0
    pinned: int = 0
    busy: int = 0  # a request is outstanding (a query runs)

    def as_dict(self) -> dict[str, int]:
        return {"attached": self.attached, "parked": self.parked, "pinned": self.pinned,
                "busy": self.busy}


def pin_reasons(splice: Splice) -> list[str]:
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
        self._by_endpoint: dict[str, set[Splice]] = {}

    def add(self, endpoint: str, splice: Splice) -> None:
        self._by_endpoint.setdefault(endpoint, set()).add(splice)

    def discard(self, endpoint: str, splice: Splice) -> None:
        splices = self._by_endpoint.get(endpoint)
        if splices is not None:
            splices.discard(splice)
            if not splices:
                del self._by_endpoint[endpoint]

    def counts(self) -> dict[str, SessionCounts]:
        """Per endpoint: attached, parked, pinned and busy sessions."""
        result = {}
        for endpoint, splices in self._by_endpoint.items():
            pinned = sum(1 for splice in splices if pin_reasons(splice))
            busy = sum(1 for splice in splices if splice.outstanding)
            result[endpoint] = SessionCounts(attached=len(splices), pinned=pinned, busy=busy)
        return result
