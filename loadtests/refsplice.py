"""The reference C TLS splice (refsplice.c) for `splicecpu`: built at run time, run in front
of a compute.

Issue 12 quoted a figure for "a 200-line C epoll + OpenSSL splice"; this is that
splice, measured in the same rounds as pgwake and PgBouncer so the figure can be
checked on the machine at hand. It is a yardstick, not product code.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from loadtests.throughput import free_port

SOURCE = Path(__file__).with_name("refsplice.c")
NAME = "reference C splice"


class RefSpliceUnavailable(Exception):
    """The reference splice cannot be built here (no compiler or no OpenSSL headers)."""


async def build(directory: Path, timeout: float = 120.0) -> Path:
    """Compile refsplice.c into `directory`; the binary's path."""
    cc = shutil.which("cc")
    if cc is None:
        raise RefSpliceUnavailable("no C compiler (cc) on PATH")
    binary = directory / "refsplice"
    proc = await asyncio.create_subprocess_exec(
        cc, "-O2", "-o", str(binary), str(SOURCE), "-lssl", "-lcrypto",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise RefSpliceUnavailable(f"cc took over {timeout:.0f} s") from None
    if proc.returncode != 0:
        raise RefSpliceUnavailable(
            "cc failed (is libssl-dev installed?): " + err.decode(errors="replace")[-400:])
    return binary


@dataclass
class RefSplice:
    pid: int
    port: int


@contextlib.asynccontextmanager
async def running(binary: Path, compute_port: int, cert: Path, key: Path, *,
                  readahead: bool = True, timeout: float = 30.0) -> AsyncIterator[RefSplice]:
    """The splice listening on 127.0.0.1 (TLS only) in front of the compute's plain port."""
    port = free_port()
    # stderr to a file: nobody reads it while pgbench runs, and a full pipe would stall it.
    log = binary.with_name("refsplice.log")
    with log.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            str(binary), str(port), str(compute_port), str(cert), str(key),
            "1" if readahead else "0",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=stderr,
        )
    assert proc.stdout is not None
    try:
        try:
            async with asyncio.timeout(timeout):
                line = await proc.stdout.readline()
        except TimeoutError:
            line = b""
        if line != b"ready\n":
            raise RuntimeError(
                f"refsplice did not start: {log.read_text(errors='replace')[-1000:]}")
        yield RefSplice(proc.pid, port)
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
