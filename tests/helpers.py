"""Helpers for tests: data dirs postgres can reach, stack settings, running real programs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from pgwake.up import Up, UpSettings
from proxy.settings import ProxySettings


def make_data_dir(prefix: str = "pgwake-test-") -> Path:
    """A directory the unprivileged postgres user can traverse (pytest's tmp is 0700)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


def up_settings(data_dir: Path, pg_bin: Path, **overrides: object) -> UpSettings:
    values: dict[str, object] = {
        "data_dir": data_dir,
        "listen": ("127.0.0.1", 0),
        "api": ("127.0.0.1", 0),
        "domain": "pgwake.localhost",
        "idle_timeout": 3600.0,
        "pg_bin": pg_bin,
        "ephemeral_dir": data_dir / "ephemeral",
        # Disjoint port ranges per test process keep parallel stacks apart.
        "port_range": (20000 + (os.getpid() % 200) * 100, 20000 + (os.getpid() % 200) * 100 + 99),
    }
    values.update(overrides)
    proxy = dict(values.get("proxy_overrides", ()))  # type: ignore[call-overload]
    proxy.setdefault("data_plane", data_plane())
    values["proxy_overrides"] = tuple(proxy.items())
    return UpSettings(**values)  # type: ignore[arg-type]


def data_plane() -> str:
    """The data path the tests run on (`pytest --data-plane`, which also sets
    PGWAKE_DATA_PLANE for the pgwake programs the tests start)."""
    return os.environ.get("PGWAKE_DATA_PLANE", "auto")


def proxy_settings(**values: object) -> ProxySettings:
    """ProxySettings on the tests' data path."""
    values.setdefault("data_plane", data_plane())
    return ProxySettings(**values)  # type: ignore[arg-type]


async def run(
    *argv: str, env: dict[str, str] | None = None, timeout: float = 60
) -> tuple[int, str, str]:
    """Run a real program (psql, the pgwake CLI) without blocking the event loop."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except BaseException:
        # A program that overran its deadline must not outlive the test.
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@contextlib.asynccontextmanager
async def running_up(prefix: str, pg_bin: Path, **overrides: object) -> AsyncIterator[Up]:
    """A whole `pgwake up` in this process, on its own data dir, removed afterwards."""
    directory = make_data_dir(prefix)
    up = Up(up_settings(directory, pg_bin, **overrides))
    await up.start()
    try:
        yield up
    finally:
        await up.stop()
        shutil.rmtree(directory, ignore_errors=True)
