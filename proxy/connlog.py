"""The connection log: one structured line per client connection, json or text."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Protocol

from proxy.timing import PHASES


class Loggable(Protocol):
    def as_dict(self) -> dict[str, object]: ...

    def as_text(self) -> str: ...


class ConnectionLog:
    def __init__(self, fmt: str = "text", logger: logging.Logger | None = None):
        if fmt not in ("text", "json"):
            raise ValueError(f"--log-format is json or text, not {fmt!r}")
        self.fmt = fmt
        self.logger = logger or logging.getLogger("pgwake.connections")

    def write(self, entry: Loggable) -> None:
        if not self.logger.isEnabledFor(logging.INFO):
            return
        if self.fmt == "json":
            self.logger.info(json.dumps(entry.as_dict(), separators=(",", ":")))
        else:
            self.logger.info(entry.as_text())


@dataclass
class SessionLog:
    """One structured line per client connection, written when it ends."""

    session_id: int
    client: str
    endpoint: str | None = None
    role: str | None = None
    cold_start: str | None = None
    sqlstate: str | None = None
    outcome: str = "client_gone"
    # Seconds: accept → ReadyForQuery, and its consecutive parts (proxy/timing.py
    # PHASES), which add up to it.
    ready_s: float | None = None
    phases: dict[str, float] = field(default_factory=dict)
    bytes_in: int = 0
    bytes_out: int = 0

    @property
    def client_wait_s(self) -> float:
        """The parts paced by the client: its TLS, StartupMessage and SCRAM round trips."""
        return sum(self.phases.get(p, 0.0) for p in ("tls", "startup", "auth"))

    def as_dict(self) -> dict[str, object]:
        values: dict[str, object] = {
            k: v for k, v in self.__dict__.items() if k != "phases"
        }
        values.update({f"{phase}_s": v for phase, v in self.phases.items()})
        for key, value in values.items():
            if isinstance(value, float):
                values[key] = round(value, 6)
        return values

    def as_text(self) -> str:
        def ms(value: float | None) -> str:
            return "-" if value is None else f"{value * 1000:.2f}"

        parts = " ".join(f"{phase}_ms={ms(self.phases.get(phase))}" for phase in PHASES)
        return (
            f"session={self.session_id} client={self.client} endpoint={self.endpoint} "
            f"role={self.role} outcome={self.outcome} cold_start={self.cold_start} "
            f"ready_ms={ms(self.ready_s)} {parts} bytes_in={self.bytes_in} "
            f"bytes_out={self.bytes_out} sqlstate={self.sqlstate or '-'}"
        )
