"""One postgres server process: start it directly, know when it is ready, stop it fast."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import signal
import subprocess
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wakeup.provisioners.base import ProvisionerError
from wakeup.provisioners.pgbin import PgBinaries, RunAs

log = logging.getLogger(__name__)

# postgres logs this once the postmaster accepts connections (lc_messages=C is
# forced on the command line so the text does not depend on the locale).
READY_LINE = b"database system is ready to accept connections"
BIND_FAILURE = b"could not bind"


@dataclass(frozen=True)
class ServerOptions:
    pgdata: Path
    port: int
    socket_dir: Path
    log_path: Path
    listen: str = "127.0.0.1"  # "" = Unix socket only
    settings: tuple[tuple[str, str], ...] = ()


class StartFailed(ProvisionerError):
    def __init__(self, message: str, *, port_in_use: bool = False) -> None:
        super().__init__(message)
        self.port_in_use = port_in_use


class PostgresProcess:
    """A postmaster we started; its stderr is relayed into a log file by one task.

    Readiness is the READY_LINE on stderr: an event, not a poll, so a start is
    noticed within a millisecond of postgres announcing it.

    Spawned with the standard library's Popen (not the event loop's subprocess
    support): it closes every inherited descriptor and can switch user, and
    uvloop's spawn does neither, which let computes hold pgwake's stdout open.
    Exit is watched through a pidfd.
    """

    def __init__(
        self, binaries: PgBinaries, options: ServerOptions, run_as: RunAs | None,
        env: dict[str, str] | None = None,
    ):
        self.env = env  # None: a minimal environment (PATH, LC_ALL, TZ)
        self.binaries = binaries
        self.options = options
        self.run_as = run_as
        self._proc: subprocess.Popen[bytes] | None = None
        self._relay: asyncio.Task[None] | None = None
        self._pipe: asyncio.BaseTransport | None = None
        self._ready = asyncio.Event()
        self._tail: deque[str] = deque(maxlen=20)
        self._port_in_use = False

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _argv(self) -> list[str]:
        o = self.options
        argv = [
            self.binaries.program("postgres"),
            "-D", str(o.pgdata),
            "-p", str(o.port),
            "-k", str(o.socket_dir),
            "-c", f"listen_addresses={o.listen}",
            "-c", "lc_messages=C",
        ]
        for key, value in o.settings:
            argv += ["-c", f"{key}={value}"]
        return argv

    async def start(self, timeout: float) -> None:
        o = self.options
        self._proc = spawn(self._argv(), self.run_as, stderr=subprocess.PIPE, env=self.env)
        assert self._proc.stderr is not None
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 20)
        # uvloop's transport closes the descriptor itself and then calls close() on
        # the file object too; a file object that also closed it would close a
        # number another thread may have reused in between (EBADF in a concurrent
        # rmtree). So the loop gets its own duplicate in a non-closing wrapper, and
        # Popen's file object is closed now.
        stderr_fd = os.dup(self._proc.stderr.fileno())
        self._proc.stderr.close()
        self._proc.stderr = None
        self._pipe, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader),
            io.FileIO(stderr_fd, "rb", closefd=False),
        )
        self._relay = asyncio.create_task(self._relay_stderr(reader), name=f"pglog:{o.pgdata}")
        exited = asyncio.ensure_future(wait_pid_exit(self._proc, timeout))
        ready = asyncio.ensure_future(self._ready.wait())
        try:
            done, _ = await asyncio.wait(
                {exited, ready}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            ready.cancel()
            if not exited.done():
                exited.cancel()
        if ready in done and self._ready.is_set():
            return
        if self._proc.poll() is not None:
            await self._finish_relay()
            tail = "\n".join(self._tail)
            raise StartFailed(
                f"postgres exited with code {self._proc.returncode} while starting:\n{tail}",
                port_in_use=self._port_in_use,
            )
        await self.kill()
        raise StartFailed(f"postgres did not become ready within {timeout:.0f}s")

    async def _relay_stderr(self, stream: asyncio.StreamReader) -> None:
        # One open per compute start; the writes are small and go to the page cache.
        with open(self.options.log_path, "ab", buffering=0) as logfile:  # noqa: ASYNC230
            while True:
                try:
                    line = await stream.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    line = await stream.read(65536)
                if not line:
                    return
                logfile.write(line)
                if not self._ready.is_set():
                    self._tail.append(line.decode(errors="replace").rstrip())
                    if READY_LINE in line:
                        self._ready.set()
                    elif BIND_FAILURE in line:
                        self._port_in_use = True

    async def _finish_relay(self) -> None:
        if self._relay is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._relay, 5)
        if self._pipe is not None:
            self._pipe.close()

    async def stop(self, timeout: float = 30.0, *, smart: float = 0.0) -> None:
        """Smart shutdown (SIGTERM) for `smart` s if asked, then fast (SIGINT);
        immediate (SIGQUIT) then SIGKILL past the deadline."""
        if self._proc is None:
            return
        for sig, wait in _stop_steps(timeout, smart):
            if self._proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(sig)
            if await wait_pid_exit(self._proc, wait):
                break
        await self._finish_relay()

    def send_signal(self, sig: signal.Signals) -> None:
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(sig)

    async def kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            await wait_pid_exit(self._proc, 10.0)
        await self._finish_relay()


def spawn(argv: list[str], run_as: RunAs | None, **kwargs: Any) -> subprocess.Popen[bytes]:
    """Start `argv` (as `run_as`), returning as soon as it is exec'd.

    Popen switches ids itself only by fork(), which copies pgwake's page tables
    while the event loop waits: 5-12 ms for a 150-250 MB process, on every wake.
    Without an id switch it uses vfork (~0.2 ms), so the switch is left to
    setpriv, exec'd first, which then execs `argv` under the same pid.
    """
    switch: dict[str, Any] = {}
    if run_as is not None and run_as.setpriv is not None:
        argv = run_as.switching(argv)
    elif run_as is not None:
        switch = {"user": run_as.uid, "group": run_as.gid, "extra_groups": []}
    return subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=kwargs.pop("stdout", subprocess.DEVNULL),
        # Own session: a Ctrl-C in pgwake's terminal must not reach computes
        # directly; pgwake drains and stops them itself.
        start_new_session=True,
        close_fds=True,
        env=kwargs.pop("env", None)
        or {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC"},
        **switch,
        **kwargs,
    )


async def wait_pid_exit(proc: subprocess.Popen[bytes] | int, timeout: float) -> bool:
    """Wait (without polling) for a process to exit; reap it if it is our child."""
    pid = proc if isinstance(proc, int) else proc.pid
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()
    def on_exit() -> None:
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(fd, on_exit)
    try:
        await asyncio.wait_for(exited, timeout)
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    if not isinstance(proc, int):
        proc.wait()  # already exited: reaps without blocking
    return True


@dataclass(frozen=True)
class PostmasterPid:
    pid: int
    port: int
    socket_dir: str
    listen: str
    status: str


def read_postmaster_pid(pgdata: Path) -> PostmasterPid | None:
    """postmaster.pid of a live postmaster, else None (missing, stale or not ready)."""
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
        pid = int(lines[0])
        result = PostmasterPid(
            pid=pid,
            port=int(lines[3]),
            socket_dir=lines[4],
            listen=lines[5],
            status=lines[7].strip() if len(lines) > 7 else "",
        )
    except (OSError, ValueError, IndexError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, owned by another user (postgres while we are not root)
    return result


class AdoptedPostmaster:
    """A postmaster left running by an earlier pgwake process (found again after a crash).

    We did not spawn it, so its exit is watched through a pidfd, not a child wait.
    """

    def __init__(self, info: PostmasterPid):
        self.info = info

    @property
    def pid(self) -> int:
        return self.info.pid

    @property
    def running(self) -> bool:
        try:
            os.kill(self.info.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def send_signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.info.pid, sig)

    async def stop(self, timeout: float = 30.0, *, smart: float = 0.0) -> None:
        for sig, wait in _stop_steps(timeout, smart):
            try:
                os.kill(self.info.pid, sig)
            except ProcessLookupError:
                return
            if await wait_pid_exit(self.info.pid, wait):
                return

    async def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.info.pid, signal.SIGKILL)
        await wait_pid_exit(self.info.pid, 5.0)


async def run_checked(argv: list[str], run_as: RunAs | None, timeout: float) -> str:
    """Run a helper program (initdb, cp) and raise with its output if it fails."""

    def go() -> subprocess.CompletedProcess[bytes]:
        proc = spawn(argv, run_as, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise ProvisionerError(f"{argv[0]} did not finish within {timeout:.0f}s") from None
        return subprocess.CompletedProcess(argv, proc.returncode, out)

    result = await asyncio.to_thread(go)
    text = result.stdout.decode(errors="replace")
    if result.returncode != 0:
        raise ProvisionerError(f"{' '.join(argv)} failed ({result.returncode}):\n{text[-2000:]}")
    return text


def _stop_steps(timeout: float, smart: float) -> list[tuple[signal.Signals, float]]:
    """Signals to send in turn, each with how long to wait for the exit."""
    steps = [(signal.SIGINT, timeout), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)]
    # Smart: sessions finish their work, new connections get 57P03.
    return [(signal.SIGTERM, smart), *steps] if smart > 0 else steps
