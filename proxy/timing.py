"""The connect-time breakdown: consecutive phases that add up to the time to ready.

Each `mark(phase)` gives the time since the previous mark to `phase`, so the
parts sum to the total by construction (no gaps, no overlaps): what the
connection log, the `pgwake_timing` ParameterStatus/NOTICE and the phase
metric all read. Work done concurrently (the wake while the client does SCRAM)
shows up where the session waited for it, not twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable

# In connection order. tls: accept → TLS handshake done (plaintext: 0);
# startup: → StartupMessage read; admit: routing and front-door limits;
# verifier: the role's SCRAM verifier (cache or control API); auth: SCRAM with the
# client; wake: the address (cache, or the wake still running after auth); queue:
# waiting for a session slot under the compute's connection budget; compute: connect and
# log in to the compute (retries included); finish: cancel key, ParameterStatus
# and the rest up to ReadyForQuery.
PHASES = ("tls", "startup", "admit", "verifier", "auth", "wake", "queue", "compute", "finish")


class Timeline:
    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.started = self._at = clock()
        self.parts: dict[str, float] = {}

    def mark(self, phase: str, at: float | None = None) -> None:
        """The time since the previous mark (up to `at`, default now) was `phase`."""
        now = self.clock() if at is None else max(at, self._at)
        self.parts[phase] = self.parts.get(phase, 0.0) + (now - self._at)
        self._at = now

    @property
    def total(self) -> float:
        """Seconds from accept to the latest mark."""
        return self._at - self.started

    def text(self) -> str:
        parts = " ".join(
            f"{phase}={self.parts[phase] * 1000:.2f}ms" for phase in PHASES if phase in self.parts
        )
        return f"total={self.total * 1000:.2f}ms {parts}"
