"""The engine between a real libpq client (psycopg, sslmode=require) and a real
PostgreSQL: Python's part (SSLRequest, the startup relay, the yields) is played
by the test as the proxy will play it; the engine terminates TLS and splices."""

from __future__ import annotations

import queue
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from tests.native.engine_support import (
    DEADLINE,
    Certificates,
    EventWaiter,
    hand_over,
    query,
    recv_exactly,
)
from tests.native.realpg import running_postgres

dataplane = pytest.importorskip("proxy._dataplane")

MODE, STATUS, READY_COUNT, REQUESTS = range(4)
TERMINATED, FROM_CLIENT, FROM_COMPUTE = 9, 14, 15
SSL_REQUEST = struct.pack("!II", 8, 80877103)


@pytest.fixture(scope="module")
def pg_socket() -> Iterator[Path]:
    with running_postgres() as path:
        yield path


@pytest.fixture
def engine(engine: EventWaiter, certs: Certificates) -> EventWaiter:
    """The conftest's engine, with the test certificates loaded."""
    engine.engine.set_certificates(*certs.engine_args())
    return engine


def read_messages_until_ready(sock: socket.socket) -> bytes:
    """A compute's bytes up to and including its ReadyForQuery."""
    data = b""
    pos = 0
    while True:
        while len(data) >= pos + 5:
            kind, length = data[pos : pos + 1], struct.unpack("!I", data[pos + 1 : pos + 5])[0]
            if len(data) < pos + 1 + length:
                break
            pos += 1 + length
            if kind == b"Z":
                assert pos == len(data), "nothing follows ReadyForQuery here"
                return data
        chunk = sock.recv(65536)
        assert chunk, "the compute closed during the login"
        data += chunk


class Client:
    """A psycopg client on its own thread, driven step by step by the test."""

    def __init__(self, port: int) -> None:
        self.steps: queue.Queue[Callable[[psycopg.Connection], object] | None] = queue.Queue()
        self.results: queue.Queue[object] = queue.Queue()
        self.thread = threading.Thread(target=self._run, args=(port,))
        self.thread.start()

    def _run(self, port: int) -> None:
        try:
            conn = psycopg.connect(
                f"host=db.alpha.test hostaddr=127.0.0.1 port={port} user=postgres "
                "dbname=postgres sslmode=require connect_timeout=20", autocommit=True
            )
        except BaseException as exc:
            self.results.put(exc)
            return
        self.results.put("connected")
        with conn:
            while (step := self.steps.get(timeout=DEADLINE)) is not None:
                try:
                    self.results.put(step(conn))
                except BaseException as exc:
                    self.results.put(exc)

    def do(self, step: Callable[[psycopg.Connection], object]) -> object:
        self.steps.put(step)
        return self.result()

    def result(self) -> object:
        result = self.results.get(timeout=DEADLINE)
        if isinstance(result, BaseException):
            raise result
        return result

    def finish(self) -> None:
        self.steps.put(None)
        self.thread.join(DEADLINE)


def login(engine: EventWaiter, pg_socket: Path) -> tuple[int, Client, socket.socket]:
    """Python's part of a connection: SSLRequest, TLS (the engine), the startup
    relayed to the compute until ReadyForQuery, then the splice."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(DEADLINE)
        client = Client(listener.getsockname()[1])
        raw, _ = listener.accept()
    raw.settimeout(DEADLINE)
    engine.track(raw)
    assert recv_exactly(raw, 8) == SSL_REQUEST
    raw.sendall(b"S")
    cid = engine.engine.accept(hand_over(raw), True)
    assert engine.wait(cid, dataplane.READY) == ("db.alpha.test", 1, "postgresql", "tls1.3")
    engine.wait(cid, dataplane.READABLE)
    head = engine.read_until(cid, 4, dataplane.READABLE)
    length = struct.unpack("!I", head[:4])[0]
    startup = head if len(head) >= length else head + engine.read_until(
        cid, length - len(head), dataplane.READABLE
    )
    compute = socket.socket(socket.AF_UNIX)
    compute.settimeout(DEADLINE)
    engine.track(compute)
    compute.connect(str(pg_socket))
    compute.sendall(startup)
    engine.engine.write(cid, read_messages_until_ready(compute))
    # The login ended: the engine moves the bytes from here on.
    engine.engine.splice(cid, hand_over(compute), b"", dataplane.MAY_PARK, ord("I"))
    assert client.result() == "connected"
    return cid, client, compute


def rows(sql: str) -> Callable[[psycopg.Connection], object]:
    return lambda conn: conn.execute(sql).fetchall()


def run(sql: str) -> Callable[[psycopg.Connection], object]:
    return lambda conn: conn.execute(sql).statusmessage


def test_real_client_and_server_through_the_splice_with_an_idle_yield(
    engine: EventWaiter, pg_socket: Path
) -> None:
    cid, client, _ = login(engine, pg_socket)
    try:
        assert client.do(rows("select 1")) == [(1,)]
        many = client.do(rows("select g, repeat('x', 200) from generate_series(1, 20000) g"))
        assert isinstance(many, list) and len(many) == 20000 and many[-1] == (20000, "x" * 200)
        client.do(run("begin"))
        assert engine.engine.state(cid)[STATUS] == ord("T")
        client.do(run("commit"))
        state = engine.engine.state(cid)
        assert state[STATUS] == ord("I") and state[READY_COUNT] == state[REQUESTS] == 4

        # Python takes the compute back while the session is idle, asks it
        # something of its own, and hands it back: the client never notices.
        engine.engine.request_yield(cid, dataplane.YIELD_IDLE)
        fd, held, reason = engine.wait(cid, dataplane.YIELDED)  # type: ignore[misc]
        assert (held, reason) == (b"", "idle")
        own = socket.socket(fileno=fd)
        own.settimeout(DEADLINE)
        own.sendall(query("select 42"))
        answer = read_messages_until_ready(own)
        assert b"42" in answer and answer.endswith(b"Z\x00\x00\x00\x05I")
        own.setblocking(False)
        engine.engine.splice(cid, own.detach(), b"", dataplane.MAY_PARK, ord("I"))
        engine.engine.pause(cid, False)
        assert client.do(rows("select 2")) == [(2,)]
    finally:
        client.finish()  # Terminate, then the TLS connection closes
    # Both ends go: the client after its Terminate, the backend on reading it;
    # the engine reports whichever it sees first.
    assert engine.wait_any(cid, (dataplane.CLIENT_CLOSED, dataplane.COMPUTE_CLOSED))[1] == "eof"
    state = engine.engine.state(cid)
    assert state[TERMINATED] and state[FROM_CLIENT] > 0 and state[FROM_COMPUTE] > 0
    engine.engine.close(cid)
    assert engine.wait(cid, dataplane.CLOSED) == "closed"


def test_a_backend_fatal_while_idle_is_held_for_python(
    engine: EventWaiter, pg_socket: Path
) -> None:
    cid, client, _ = login(engine, pg_socket)
    try:
        pid = client.do(lambda conn: conn.execute("select pg_backend_pid()").fetchone()[0])
        with psycopg.connect(f"host={pg_socket.parent} user=postgres dbname=postgres") as admin:
            admin.execute("select pg_terminate_backend(%s)", (pid,))
        # The compute's last words while idle: not forwarded, Python decides.
        fd, held, reason = engine.wait(cid, dataplane.YIELDED)  # type: ignore[misc]
        socket.socket(fileno=fd).close()
        assert reason == "error" and held.startswith(b"E") and b"57P01" in held
        # Here Python decides the session does not park: the client gets them.
        engine.engine.write(cid, held)
        engine.engine.close(cid)
        assert engine.wait(cid, dataplane.CLOSED) == "closed"
        with pytest.raises(psycopg.OperationalError, match="administrator command"):
            client.do(rows("select 1"))
    finally:
        client.finish()
