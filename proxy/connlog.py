"""The connection log: one structured line per client connection, json or text."""

from __future__ import annotations

import json
import logging
from typing import Protocol


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
