"""One running pgwake per data directory, and start-up failures a user can act on.

The lock is an `flock` on a file in the data directory, held by an open file
for the life of the process: the kernel releases it when the process ends,
however it ends, so a crash never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
from pathlib import Path

from pgwake import datadir
from wakeup.service import bind_tcp

LOCK_FILE = "pgwake.lock"


class StartupFailure(Exception):
    """pgwake cannot start, for a reason the message explains (no traceback needed)."""


class AlreadyRunning(StartupFailure):
    pass


class InstanceLock:
    """Exclusive ownership of a data directory (`pgwake up` / `pgwake control`)."""

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self._fd: int | None = None

    def acquire(self) -> None:
        path = self.data_dir / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise AlreadyRunning(describe_running(self.data_dir, holder)) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            # Closing drops the lock; the file stays (unlinking it would let a third
            # process lock a new inode while a second still waits on the old one).
            os.close(self._fd)
            self._fd = None


def _read_pid(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(os.pread(fd, 32, 0).decode().strip())
    return None


def describe_running(data_dir: Path, pid: int | None) -> str:
    state = datadir.RunState.read(data_dir)
    who = f"pid {pid}" if pid else "another process"
    if state is not None and (pid is None or state.pid == pid):
        where = f"proxy on {state.proxy}, control API on {state.api_url}"
    else:
        where = "still starting"
    return (
        f"already running on data directory {data_dir} ({who}, {where}).\n"
        "Stop it first, or give this one another --data-dir (PGWAKE_DATA_DIR)."
    )


def bind_listener(host: str, port: int, flag: str, backlog: int = 1024) -> socket.socket:
    """A listening socket, or a StartupFailure naming the address and the flag to change."""
    try:
        return bind_tcp(host, port, backlog)
    except OSError as exc:
        env = "PGWAKE_" + flag.removeprefix("--").replace("-", "_").upper()
        if exc.errno == errno.EADDRINUSE:
            reason = "the address is already in use (another pgwake, PostgreSQL or other server?)"
        else:
            reason = exc.strerror or str(exc)
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise StartupFailure(
            f"cannot listen on {shown} ({flag}): {reason}.\n"
            f"Choose another address with {flag} HOST:PORT (or {env})."
        ) from None
