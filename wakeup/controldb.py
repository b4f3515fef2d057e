"""The embedded control DB: a private PostgreSQL on a Unix socket for `pgwake up`."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from wakeup.provisioners.pgbin import PgBinaries, RunAs
from wakeup.provisioners.process import (
    AdoptedPostmaster,
    PostgresProcess,
    ServerOptions,
    read_postmaster_pid,
    run_checked,
)

log = logging.getLogger(__name__)

CONTROL_USER = "pgwake"
SOCKET_PORT = 5432  # names the socket file only; the control DB has no TCP listener


class EmbeddedControlDB:
    def __init__(self, binaries: PgBinaries, run_as: RunAs | None, directory: Path):
        self.binaries = binaries
        self.run_as = run_as
        self.directory = directory
        self._process: PostgresProcess | AdoptedPostmaster | None = None

    @property
    def pgdata(self) -> Path:
        return self.directory / "pgdata"

    @property
    def socket_dir(self) -> Path:
        return self.directory / "s"

    def connect_kwargs(self) -> dict[str, Any]:
        return {
            "host": str(self.socket_dir),
            "port": SOCKET_PORT,
            "user": CONTROL_USER,
            "database": "postgres",
        }

    def _own(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.run_as is not None:
            self.run_as.chown(path)

    async def start(self, timeout: float = 60.0) -> None:
        self._own(self.directory)
        self._own(self.socket_dir)
        if not (self.pgdata / "PG_VERSION").exists():
            building = self.directory / "pgdata.building"
            shutil.rmtree(building, ignore_errors=True)
            await run_checked(
                [
                    self.binaries.program("initdb"), "-D", str(building), "-U", CONTROL_USER,
                    "--auth-local=trust", "--auth-host=reject", "-E", "UTF8", "--locale=C",
                    "--no-instructions",
                ],
                self.run_as,
                timeout=300,
            )
            building.rename(self.pgdata)
        running = read_postmaster_pid(self.pgdata)
        if running is not None:
            # Left behind by a pgwake that crashed: keep using it.
            log.info("control DB already running (pid %d); adopting it", running.pid)
            self._process = AdoptedPostmaster(running)
            return
        process = PostgresProcess(
            self.binaries,
            ServerOptions(
                pgdata=self.pgdata,
                port=SOCKET_PORT,
                socket_dir=self.socket_dir,
                log_path=self.directory / "postgres.log",
                listen="",
                settings=(("shared_buffers", "32MB"), ("max_connections", "50")),
            ),
            self.run_as,
        )
        await process.start(timeout)
        self._process = process

    async def stop(self) -> None:
        if self._process is not None:
            await self._process.stop()
            self._process = None
