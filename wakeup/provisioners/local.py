"""Local provisioner: computes are PostgreSQL processes on this machine (the embedded default)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import socket
from dataclasses import dataclass, field
from pathlib import Path

from wakeup.provisioners.base import (
    AdminTarget,
    ComputeAddress,
    ProvisionerError,
    Tier,
    connection_budget,
)
from wakeup.provisioners.pgbin import (
    PgBinaries,
    RunAs,
    check_reachable,
    find_binaries,
    resolve_run_as,
)
from wakeup.provisioners.process import (
    AdoptedPostmaster,
    PostgresProcess,
    PostmasterPid,
    ServerOptions,
    StartFailed,
    read_postmaster_pid,
    run_checked,
)
from wakeup.sizes import DEFAULT_SIZE, SizeClass, size_class_of

log = logging.getLogger(__name__)

ADMIN_USER = "pgwake_admin"

# Only the control plane, over the compute's private Unix socket, may log in as
# the admin; clients come through the proxy over TCP with SCRAM.
PG_HBA = f"""\
# written by pgwake
local   all  {ADMIN_USER}  trust
local   all  all           reject
host    all  {ADMIN_USER}  all  reject
host    all  all           127.0.0.1/32  scram-sha-256
host    all  all           ::1/128       scram-sha-256
"""

COMPUTE_CONF = """\
# written by pgwake: settings every compute shares (the size class's
# shared_buffers, max_connections, work_mem … come as -c options: wakeup/sizes.py)
password_encryption = 'scram-sha-256'
huge_pages = off
dynamic_shared_memory_type = posix
log_line_prefix = '%m [%p] '
log_timezone = 'UTC'
timezone = 'UTC'
"""


@dataclass(frozen=True)
class LocalSettings:
    root: Path  # durable computes and templates live here
    ephemeral_root: Path  # memory-backed (tmpfs) directory for the ephemeral tier
    pg_bin: Path | None = None
    run_as: str | None = None
    port_range: tuple[int, int] = (54400, 55399)
    listen: str = "127.0.0.1"
    start_timeout: float = 30.0
    stop_timeout: float = 30.0
    extra_settings: tuple[tuple[str, str], ...] = field(default_factory=tuple)


class LocalProvisioner:
    outlives_control_plane = False
    ephemeral_survives_stop = True  # the memory-backed directory stays until delete

    def __init__(self, settings: LocalSettings):
        self.settings = settings
        self.binaries: PgBinaries | None = None
        self.run_as: RunAs | None = None
        self._running: dict[str, PostgresProcess | AdoptedPostmaster] = {}
        self._ports: dict[str, int] = {}
        self._template_lock = asyncio.Lock()
        self._next_port = settings.port_range[0]

    # -- layout -----------------------------------------------------------------

    def _base(self, tier: Tier) -> Path:
        return self.settings.ephemeral_root if tier is Tier.EPHEMERAL else self.settings.root

    def compute_dir(self, compute_id: str, tier: Tier) -> Path:
        if not compute_id.replace("-", "").isalnum():
            raise ProvisionerError(f"invalid compute id {compute_id!r}")
        return self._base(tier) / compute_id

    def connection_budget(self, size: SizeClass) -> int:
        # A local compute runs its size class's settings with `extra_settings` on top.
        return connection_budget(
            {**dict(size.postgres_settings()), **dict(self.settings.extra_settings)}
        )

    def _template_dir(self) -> Path:
        assert self.binaries is not None
        return self.settings.root / "templates" / f"pg{self.binaries.major}"

    # -- lifecycle --------------------------------------------------------------

    async def prepare(self) -> None:
        loop = asyncio.get_running_loop()
        self.binaries = await loop.run_in_executor(None, find_binaries, self.settings.pg_bin)
        self.run_as = await loop.run_in_executor(None, resolve_run_as, self.settings.run_as)
        for base in (self.settings.root, self.settings.ephemeral_root):
            self._mkdir_owned(base)
            check_reachable(base, self.run_as)
        await self._ensure_template()
        log.info(
            "local provisioner: PostgreSQL %s from %s (%s)%s",
            self.binaries.version,
            self.binaries.bindir,
            self.binaries.source,
            f", running as {self.run_as.name}" if self.run_as else "",
        )

    def _mkdir_owned(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.run_as is not None:
            self.run_as.chown(path)
        path.chmod(0o700)

    async def _ensure_template(self) -> None:
        """initdb once per major version; every compute is a copy of it (30 ms, not 300)."""
        assert self.binaries is not None
        async with self._template_lock:
            template = self._template_dir()
            if (template / "PG_VERSION").exists():
                return
            self._mkdir_owned(template.parent)
            building = template.with_name(template.name + ".building")
            shutil.rmtree(building, ignore_errors=True)
            await run_checked(
                [
                    self.binaries.program("initdb"),
                    "-D", str(building),
                    "-U", ADMIN_USER,
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "-E", "UTF8",
                    "--locale=C",
                    "--no-instructions",
                ],
                self.run_as,
                timeout=300,
            )
            (building / "pg_hba.conf").write_text(PG_HBA)
            with open(building / "postgresql.conf", "a") as conf:  # noqa: ASYNC230 (once)
                conf.write("\n" + COMPUTE_CONF)
            building.rename(template)

    async def create(self, compute_id: str, tier: Tier) -> None:
        target = self.compute_dir(compute_id, tier)
        if target.exists():
            raise ProvisionerError(f"compute {compute_id} already has storage at {target}")
        self._mkdir_owned(target)
        # cp -a keeps the owner (postgres) and modes that postgres insists on (0700).
        await run_checked(
            ["cp", "-a", str(self._template_dir()), str(target / "pgdata")],
            None,
            timeout=120,
        )
        sockdir = target / "s"
        self._mkdir_owned(sockdir)

    def _pick_port(self) -> int:
        """Round-robin over the range: a port freed by a suspend is reused as late as
        possible, so a proxy's stale cached address rarely finds another compute."""
        low, high = self.settings.port_range
        taken = set(self._ports.values())
        size = high - low + 1
        for step in range(size):
            port = low + (self._next_port - low + step) % size
            if port in taken:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                # As postgres binds its own (SO_REUSEADDR): a port whose last compute
                # was stopped or killed keeps its connections in TIME_WAIT for a
                # minute, which stops nobody from listening there; a listener does.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind((self.settings.listen or "127.0.0.1", port))
                except OSError:
                    continue
            self._next_port = port + 1 if port < high else low
            return port
        raise ProvisionerError(f"no free port in the compute port range {low}-{high}")

    async def start(
        self, compute_id: str, tier: Tier, *, size: SizeClass | None = None,
        adopt: bool = True,
    ) -> ComputeAddress:
        """Start the compute with `size`'s settings (default: the smallest class).

        `adopt`: a postmaster already serving this data directory (ours, or left by
        an earlier pgwake) is returned as is. Without it (a generation handoff,
        whose new settings an old postmaster does not have) a live postmaster is an
        error. Either way a second postmaster is never started on one data
        directory: one that is alive but not adoptable (starting, stopping) is
        refused here, before PostgreSQL's own postmaster.pid lock would refuse it.
        """
        assert self.binaries is not None, "prepare() first"
        if adopt:
            current = await self.status(compute_id, tier)
            if current is not None:
                return current
        target = self.compute_dir(compute_id, tier)
        if not (target / "pgdata" / "PG_VERSION").exists():
            raise ProvisionerError(f"compute {compute_id} has no storage (was it deleted?)")
        alive = self.live_postmaster(compute_id, tier)
        if alive is not None:
            raise ProvisionerError(
                f"compute {compute_id}: a postmaster (pid {alive.pid},"
                f" {alive.status or 'no status'}) still runs on its data directory;"
                " refusing to start a second one"
            )
        settings = (size or size_class_of(DEFAULT_SIZE)).postgres_settings()
        last_error: StartFailed | None = None
        for _attempt in range(3):
            port = self._pick_port()
            self._ports[compute_id] = port
            proc = PostgresProcess(
                self.binaries,
                ServerOptions(
                    pgdata=target / "pgdata",
                    port=port,
                    socket_dir=target / "s",
                    log_path=target / "postgres.log",
                    listen=self.settings.listen,
                    # Operator extras come last: they win over the size class.
                    settings=settings + self.settings.extra_settings,
                ),
                self.run_as,
            )
            try:
                await proc.start(self.settings.start_timeout)
            except StartFailed as exc:
                self._ports.pop(compute_id, None)
                last_error = exc
                if exc.port_in_use:
                    continue  # someone else took the port between probe and bind
                raise
            except BaseException:
                self._ports.pop(compute_id, None)
                await proc.kill()
                raise
            self._running[compute_id] = proc
            return ComputeAddress(self.settings.listen or "127.0.0.1", port)
        assert last_error is not None
        raise last_error

    async def stop(self, compute_id: str, *, smart: float = 0.0) -> None:
        proc = self._running.get(compute_id)
        if proc is not None and smart > 0:
            # Still listed (and its port still ours) while sessions finish.
            await proc.stop(self.settings.stop_timeout, smart=smart)
        proc = self._running.pop(compute_id, None)
        self._ports.pop(compute_id, None)
        if proc is not None:
            await proc.stop(self.settings.stop_timeout)

    def live_postmaster(self, compute_id: str, tier: Tier) -> PostmasterPid | None:
        """The postmaster whose postmaster.pid names a live process, in any status."""
        return read_postmaster_pid(self.compute_dir(compute_id, tier) / "pgdata")

    async def refuse_new_connections(self, compute_id: str, timeout: float = 5.0) -> bool:
        """Begin a smart shutdown: sessions that are open go on, every new connection
        gets 57P03 (which proxies answer by waking again). Returns once the postmaster
        says so in postmaster.pid ("stopping"); False if it is not running."""
        proc = self._running.get(compute_id)
        if proc is None or not proc.running:
            return False
        proc.send_signal(signal.SIGTERM)
        pgdata = self._pgdata_of_running(compute_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # The postmaster rewrites its pid file when it takes the signal; there is no
        # event to wait on, so look briefly, with a deadline.
        while loop.time() < deadline:
            info = read_postmaster_pid(pgdata) if pgdata is not None else None
            if info is None or info.status == "stopping":
                return True
            await asyncio.sleep(0.002)
        log.warning("compute %s did not begin its smart shutdown within %.0fs",
                    compute_id, timeout)
        return True

    def _pgdata_of_running(self, compute_id: str) -> Path | None:
        proc = self._running.get(compute_id)
        if isinstance(proc, PostgresProcess):
            return proc.options.pgdata
        if isinstance(proc, AdoptedPostmaster):
            for tier in Tier:
                pgdata = self.compute_dir(compute_id, tier) / "pgdata"
                info = read_postmaster_pid(pgdata)
                if info is not None and info.pid == proc.pid:
                    return pgdata
        return None

    async def kill(self, compute_id: str) -> None:
        """SIGKILL, as a crash would; used by tests and by orphan cleanup."""
        proc = self._running.pop(compute_id, None)
        self._ports.pop(compute_id, None)
        if proc is not None:
            await proc.kill()

    async def destroy(self, compute_id: str, tier: Tier) -> None:
        await self.stop(compute_id)
        target = self.compute_dir(compute_id, tier)
        info = read_postmaster_pid(target / "pgdata")
        if info is not None:
            await AdoptedPostmaster(info).stop(self.settings.stop_timeout)
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: shutil.rmtree(target, ignore_errors=True)
        )

    async def status(self, compute_id: str, tier: Tier) -> ComputeAddress | None:
        proc = self._running.get(compute_id)
        if proc is not None:
            if proc.running:
                return ComputeAddress(self.settings.listen or "127.0.0.1", self._ports[compute_id])
            self._running.pop(compute_id, None)
            self._ports.pop(compute_id, None)
            if isinstance(proc, PostgresProcess):
                await proc.kill()  # it has exited (a crash): reap it, close its log relay
            return None
        # Not ours: perhaps started by an earlier pgwake process. Adopt it.
        info = read_postmaster_pid(self.compute_dir(compute_id, tier) / "pgdata")
        if info is None or info.status != "ready":
            return None
        self._running[compute_id] = AdoptedPostmaster(info)
        self._ports[compute_id] = info.port
        log.info("adopted running compute %s (pid %d, port %d)", compute_id, info.pid, info.port)
        return ComputeAddress(self.settings.listen or "127.0.0.1", info.port)

    def is_running(self, compute_id: str) -> bool:
        proc = self._running.get(compute_id)
        return proc is not None and proc.running

    def admin_target(self, compute_id: str, tier: Tier) -> AdminTarget:
        port = self._ports.get(compute_id)
        if port is None:
            raise ProvisionerError(f"compute {compute_id} is not running")
        return AdminTarget(str(self.compute_dir(compute_id, tier) / "s"), port, ADMIN_USER)

    def known_computes(self, tier: Tier) -> list[str]:
        base = self._base(tier)
        if not base.exists():
            return []
        return sorted(
            p.name for p in base.iterdir() if p.is_dir() and (p / "pgdata").exists()
        )

    async def close(self) -> None:
        ids = list(self._running)
        results = await asyncio.gather(
            *(self.stop(cid) for cid in ids), return_exceptions=True
        )
        for cid, result in zip(ids, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("stopping compute %s failed: %s", cid, result)

    async def stop_orphan(self, compute_id: str, tier: Tier) -> None:
        """Stop a postmaster found in storage that the control DB does not call running."""
        info = read_postmaster_pid(self.compute_dir(compute_id, tier) / "pgdata")
        if info is not None:
            log.warning("stopping orphan compute %s (pid %d)", compute_id, info.pid)
            with contextlib.suppress(ProcessLookupError):
                await AdoptedPostmaster(info).stop(self.settings.stop_timeout)
