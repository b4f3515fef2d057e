"""The native engine's SPLICE mode: bytes both ways with the trackers' counts,
flow control both ways, half-close, the compute or the client going, yields
(IDLE, BOUNDARY, NOW, the error yield), several threads. The compute is a
real TCP peer the test drives with PostgreSQL protocol messages."""

from __future__ import annotations

import fcntl
import socket
import ssl
import struct
import termios
import threading
import time

import pytest

from tests.native.engine_support import (
    DEADLINE,
    Certificates,
    EventWaiter,
    client_context,
    data_row,
    error,
    hand_over,
    message,
    query,
    ready,
    recv_exactly,
    recv_to_eof,
    tcp_pair,
)

dataplane = pytest.importorskip("proxy._dataplane")

# state() fields
MODE, STATUS, READY_COUNT, REQUESTS, UNSYNCED, COPYING, FATAL = range(7)
FRONT_BROKEN, BACK_BROKEN, TERMINATED, FRONT_AT_BOUNDARY, BACK_AT_BOUNDARY = range(7, 12)
BACK_LAST_TYPE, LAST_CLIENT_ACTIVITY, FROM_CLIENT, FROM_COMPUTE, CLIENT_QUEUED = range(12, 17)

COMPLETE = message(b"C", b"SELECT 1\0")


Client = socket.socket | ssl.SSLSocket


def open_client(ew: EventWaiter, certs: Certificates, tls: bool) -> tuple[int, Client]:
    client, server = tcp_pair()
    ew.track(client)
    if tls:
        ew.engine.set_certificates(*certs.engine_args())
    cid = ew.engine.accept(hand_over(server), tls)
    if tls:
        client = client_context(certs, ["postgresql"]).wrap_socket(
            client, server_hostname="db.alpha.test"
        )
        ew.track(client)
    ew.wait(cid, dataplane.READY)
    return cid, client


def spliced(
    ew: EventWaiter, certs: Certificates, tls: bool, flags: int = 0, status: bytes = b"I",
    to_client: bytes = b"",
) -> tuple[int, Client, socket.socket]:
    cid, client = open_client(ew, certs, tls)
    engine_side, compute = tcp_pair()
    ew.track(compute)
    ew.engine.splice(cid, hand_over(engine_side), to_client, flags, ord(status))
    return cid, client, compute


def wait_state(ew: EventWaiter, cid: int, check: object, what: str) -> tuple:
    """Poll state() until `check(state)` holds (the engine's threads get there)."""
    end = time.monotonic() + DEADLINE
    while True:
        state = ew.engine.state(cid)
        if check(state):  # type: ignore[operator]
            return state
        assert time.monotonic() < end, f"never {what}: {state}"
        time.sleep(0.005)


both = pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])


@both
def test_splice_moves_bytes_both_ways_and_tracks_them(
    engine: EventWaiter, certs: Certificates, tls: bool
) -> None:
    before = time.monotonic()
    cid, client, compute = spliced(engine, certs, tls)
    q = query("select 1")
    client.sendall(q)
    assert recv_exactly(compute, len(q)) == q
    answer = data_row(b"1") + COMPLETE + ready(b"T")
    compute.sendall(answer)
    assert recv_exactly(client, len(answer)) == answer
    state = wait_state(engine, cid, lambda s: s[READY_COUNT] == 1, "ReadyForQuery")
    assert state[MODE] == dataplane.MODE_SPLICE
    assert state[STATUS] == ord("T") and state[REQUESTS] == 1
    assert state[FROM_CLIENT] == len(q) and state[FROM_COMPUTE] == len(answer)
    assert state[FRONT_AT_BOUNDARY] and state[BACK_AT_BOUNDARY]
    assert state[BACK_LAST_TYPE] == ord("Z")
    assert before <= state[LAST_CLIENT_ACTIVITY] <= time.monotonic()
    assert state[CLIENT_QUEUED] == 0
    assert not any(state[i] for i in (UNSYNCED, COPYING, FATAL, FRONT_BROKEN, BACK_BROKEN))
    client.sendall(message(b"X"))
    wait_state(engine, cid, lambda s: s[TERMINATED], "Terminate")


def test_splice_keeps_order_of_python_writes_and_unread_client_bytes(
    engine: EventWaiter, certs: Certificates
) -> None:
    cid, client = open_client(engine, certs, tls=True)
    engine.engine.write(cid, b"from python,")
    early = query("sent before the splice")
    client.sendall(early)
    engine.wait(cid, dataplane.READABLE)  # the engine holds it; Python does not read
    engine_side, compute = tcp_pair()
    engine.track(compute)
    login_tail = ready(b"I")
    engine.engine.splice(cid, hand_over(engine_side), login_tail, 0, ord("I"))
    assert recv_exactly(client, 12 + len(login_tail)) == b"from python," + login_tail
    assert recv_exactly(compute, len(early)) == early
    later = query("after")
    client.sendall(later)
    assert recv_exactly(compute, len(later)) == later
    state = engine.engine.state(cid)
    assert state[REQUESTS] == 2 and state[READY_COUNT] == 1  # the login tail is tracked


def _copy_data(total: int, size: int = 60000) -> bytes:
    pattern = bytes(range(251)) * (size // 251 + 1)
    chunk = message(b"d", pattern[:size])
    return chunk * (total // len(chunk))


def _queued(sock: socket.socket, request: int) -> int:
    buf = fcntl.ioctl(sock.fileno(), request, b"\0\0\0\0")
    return int(struct.unpack("i", buf)[0])


@both
def test_slow_client_never_makes_the_engine_buffer_without_bound(
    engine: EventWaiter, certs: Certificates, tls: bool
) -> None:
    cid, client, compute = spliced(engine, certs, tls)
    blob = _copy_data(24 << 20)
    # The sender waits while the client drains the kernel's buffers and the
    # engine's queue (megabytes, slow under a sanitizer): a longer deadline.
    compute.settimeout(DEADLINE * 6)
    sender = threading.Thread(target=compute.sendall, args=(blob,))
    sender.start()
    peak = 0

    def stalled(state: tuple) -> bool:
        nonlocal peak
        peak = max(peak, state[CLIENT_QUEUED])
        # The engine stopped reading while the compute still has bytes to send.
        return bool(state[CLIENT_QUEUED] >= dataplane.HIGH_WATER
                    and _queued(compute, termios.TIOCOUTQ) > 0)

    state = wait_state(engine, cid, stalled, "stalled on the slow client")
    assert state[FROM_COMPUTE] < len(blob)
    for _ in range(20):  # and stays bounded while the client sleeps
        peak = max(peak, engine.engine.state(cid)[CLIENT_QUEUED])
    assert peak <= dataplane.HIGH_WATER + 64 * 1024
    assert recv_exactly(client, len(blob)) == blob
    sender.join(DEADLINE)
    assert wait_state(engine, cid, lambda s: s[CLIENT_QUEUED] == 0, "drained")[
        FROM_COMPUTE
    ] == len(blob)


@both
def test_slow_compute_never_makes_the_engine_buffer_without_bound(
    engine: EventWaiter, certs: Certificates, tls: bool
) -> None:
    cid, client = open_client(engine, certs, tls)
    engine_side, compute = tcp_pair()
    engine.track(compute)
    # A fixed send buffer on the engine's side, so the bound below is exact.
    engine_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 128 * 1024)
    sndbuf = engine_side.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    engine.engine.splice(cid, hand_over(engine_side), b"", 0, ord("I"))
    blob = _copy_data(24 << 20)
    client.settimeout(DEADLINE * 6)
    sender = threading.Thread(target=client.sendall, args=(blob,))
    sender.start()

    def held(state: tuple) -> int:
        return int(state[FROM_CLIENT]) - _queued(compute, termios.FIONREAD)

    previous = -1

    def stalled(state: tuple) -> bool:
        nonlocal previous
        settled = state[FROM_CLIENT] == previous and state[FROM_CLIENT] > sndbuf
        previous = state[FROM_CLIENT]
        return bool(settled)

    state = wait_state(engine, cid, stalled, "stalled on the slow compute")
    assert state[FROM_CLIENT] < len(blob)
    # What the engine read but the compute's socket does not hold yet: its own
    # queue (bounded by HIGH_WATER + one read) plus its socket's send buffer.
    assert held(state) <= dataplane.HIGH_WATER + 64 * 1024 + sndbuf + 64 * 1024
    assert recv_exactly(compute, len(blob)) == blob
    sender.join(DEADLINE)


def test_plain_client_half_close_reaches_the_compute(
    engine: EventWaiter, certs: Certificates
) -> None:
    cid, client, compute = spliced(engine, certs, tls=False)
    q = query("select 1")
    client.sendall(q)
    client.shutdown(socket.SHUT_WR)
    assert recv_to_eof(compute) == q  # the EOF came through after the bytes
    answer = data_row(b"late") + COMPLETE + ready()
    compute.sendall(answer)  # the other direction still flows
    assert recv_exactly(client, len(answer)) == answer
    compute.close()
    assert engine.wait(cid, dataplane.COMPUTE_CLOSED) == "eof"
    assert engine.engine.state(cid)[MODE] == dataplane.MODE_PYTHON


def test_tls_client_close_ends_both_sides(engine: EventWaiter, certs: Certificates) -> None:
    cid, client, compute = spliced(engine, certs, tls=True)
    terminate = message(b"X")
    client.sendall(terminate)
    assert isinstance(client, ssl.SSLSocket)
    client.setblocking(False)
    with pytest.raises(ssl.SSLWantReadError):
        client.unwrap()  # our close_notify goes; theirs has not come yet
    assert engine.wait(cid, dataplane.CLIENT_CLOSED) == "eof"  # TLS has no half-close
    assert recv_to_eof(compute) == terminate
    state = engine.engine.state(cid)
    assert state[TERMINATED] and state[FROM_CLIENT] == len(terminate)
    engine.engine.close(cid)
    assert engine.wait(cid, dataplane.CLOSED) == "closed"
    client.settimeout(DEADLINE)
    client.unwrap()  # the engine answered with its close_notify


def test_client_reset_is_client_closed(engine: EventWaiter, certs: Certificates) -> None:
    cid, client, compute = spliced(engine, certs, tls=False)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()  # RST
    reason = engine.wait(cid, dataplane.CLIENT_CLOSED)
    assert reason in ("eof", "Connection reset by peer")
    assert recv_to_eof(compute) == b""
    engine.engine.close(cid)
    assert engine.wait(cid, dataplane.CLOSED) == "closed"


@both
def test_compute_closed_hands_the_client_back_to_python(
    engine: EventWaiter, certs: Certificates, tls: bool
) -> None:
    cid, client, compute = spliced(engine, certs, tls)
    last = ready()
    compute.sendall(last)
    compute.close()
    assert engine.wait(cid, dataplane.COMPUTE_CLOSED) == "eof"
    assert recv_exactly(client, len(last)) == last
    state = engine.engine.state(cid)
    assert state[MODE] == dataplane.MODE_PYTHON and state[BACK_AT_BOUNDARY]
    # Python's part: an error of its own at the boundary, then the end.
    lost = error(b"FATAL", b"08006", b"the compute went away")
    engine.engine.write(cid, lost)
    engine.engine.close(cid)
    assert recv_to_eof(client) == lost
    assert engine.wait(cid, dataplane.CLOSED) == "closed"


def _adopt(fd: int) -> socket.socket:
    sock = socket.socket(fileno=fd)
    sock.settimeout(DEADLINE)
    return sock


@both
def test_yield_idle_waits_for_ready_for_query(
    engine: EventWaiter, certs: Certificates, tls: bool
) -> None:
    cid, client, compute = spliced(engine, certs, tls)
    q = query("select pg_sleep(0)")
    client.sendall(q)
    assert recv_exactly(compute, len(q)) == q
    engine.engine.request_yield(cid, dataplane.YIELD_IDLE)
    compute.sendall(data_row(b"x"))
    compute.sendall(COMPLETE)
    compute.sendall(ready())
    fd, held, reason = engine.wait(cid, dataplane.YIELDED)  # type: ignore[misc]
    assert (held, reason) == (b"", "idle")
    answer = data_row(b"x") + COMPLETE + ready()
    assert recv_exactly(client, len(answer)) == answer
    state = engine.engine.state(cid)
    assert state[MODE] == dataplane.MODE_PYTHON
    assert state[READY_COUNT] == 1 and state[REQUESTS] == 1
    # The compute is Python's now, and the client's next bytes are read by Python.
    own = _adopt(fd)
    engine.track(own)
    own.sendall(query("by python"))
    assert recv_exactly(compute, len(query("by python"))) == query("by python")
    nxt = query("next")
    client.sendall(nxt)
    engine.engine.pause(cid, False)
    engine.wait(cid, dataplane.READABLE)
    assert engine.read_until(cid, len(nxt), dataplane.READABLE) == nxt


def test_yield_idle_when_already_idle_is_immediate(
    engine: EventWaiter, certs: Certificates
) -> None:
    cid, _client, _compute = spliced(engine, certs, tls=False)
    engine.engine.request_yield(cid, dataplane.YIELD_IDLE)
    fd, held, reason = engine.wait(cid, dataplane.YIELDED)  # type: ignore[misc]
    engine.track(_adopt(fd))
    assert (held, reason) == (b"", "idle")


def test_yield_boundary_waits_for_the_end_of_the_message(
    engine: EventWaiter, certs: Certificates
) -> None:
    cid, client, compute = spliced(engine, certs, tls=True)
    client.sendall(query("select"))
    row = data_row(b"a long value" * 100)
    compute.sendall(row[:40])
    assert recv_exactly(client, 40) == row[:40]
    engine.engine.request_yield(cid, dataplane.YIELD_BOUNDARY)
    held_back = query("not for the compute")
    client.sendall(held_back)
    compute.sendall(row[40:])
    fd, held, reason = engine.wait(cid, dataplane.YIELDED)  # type: ignore[misc]
    engine.track(_adopt(fd))
    assert (held, reason) == (b"", "boundary")
    assert recv_exactly(client, len(row) - 40) == row[40:]
    assert engine.engine.state(cid)[BACK_AT_BOUNDARY]
    engine.engine.pause(cid, False)
    engine.wait(cid, dataplane.READABLE)
    assert engine.read_until(cid, len(held_back), dataplane.READABLE) == held_back


def test_yield_now_is_at_once_and_splice_resumes(
    engine: EventWaiter, certs: Certificates
) -> None:
    cid, client, compute = spliced(engine, certs, tls=False)
    row = data_row(b"half")
    compute.sendall(row[:6])
    assert recv_exactly(client, 6) == row[:6]
    engine.engine.request_yield(cid, dataplane.YIELD_NOW)
    fd, held, reason = engine.wait(cid, dataplane.YIELDED)  # type: ignore[misc]
    assert (held, reason) == (b"", "now")
    assert not engine.engine.state(cid)[BACK_AT_BOUNDARY]
    # Python hands the same compute back: the splice goes on.
    engine.engine.splice(cid, fd, b"", 0, ord("I"))
    compute.sendall(row[6:])
    assert recv_exactly(client, len(row) - 6) == row[6:]
    q = query("again")
    client.sendall(q)
    assert recv_exactly(compute, len(q)) == q


def test_error_while_idle_yields_with_may_park(
    engine: EventWaiter, certs: Certificates
) -> None:
    cid, client, compute = spliced(engine, certs, tls=True, flags=dataplane.MAY_PARK)
    fatal = error(b"FATAL", b"57P01", b"terminating connection due to administrator command")
    compute.sendall(fatal)
    fd, held, reason = engine.wait(cid, dataplane.YIELDED)  # type: ignore[misc]
    engine.track(_adopt(fd))
    assert (held, reason) == (fatal, "error")
    assert engine.engine.state(cid)[FROM_COMPUTE] == 0
    # Nothing of it reached the client: Python's own bytes come first.
    engine.engine.write(cid, b"parked")
    assert recv_exactly(client, 6) == b"parked"


def test_error_while_busy_is_forwarded_unless_reword(
    engine: EventWaiter, certs: Certificates
) -> None:
    _cid, client, compute = spliced(engine, certs, tls=False, flags=dataplane.MAY_PARK)
    q = query("select 1/0")
    client.sendall(q)
    assert recv_exactly(compute, len(q)) == q
    err = error(b"ERROR", b"22012", b"division by zero")
    compute.sendall(err)
    assert recv_exactly(client, len(err)) == err
    compute.sendall(ready())
    assert recv_exactly(client, 6) == ready()

    cid2, client2, compute2 = spliced(
        engine, certs, tls=False, flags=dataplane.MAY_PARK | dataplane.REWORD
    )
    client2.sendall(q)
    assert recv_exactly(compute2, len(q)) == q
    compute2.sendall(err)
    fd, held, reason = engine.wait(cid2, dataplane.YIELDED)  # type: ignore[misc]
    engine.track(_adopt(fd))
    assert (held, reason) == (err, "error")


def test_several_threads_splice_many_sessions(certs: Certificates) -> None:
    ew = EventWaiter(dataplane.Engine(4))
    try:
        sessions = [spliced(ew, certs, tls=i % 2 == 1) for i in range(16)]
        payloads = [_copy_data(1 << 20, size=1000 + i) for i in range(16)]
        failures: list[BaseException] = []

        def run(i: int) -> None:
            _cid, client, compute = sessions[i]
            try:
                up = threading.Thread(target=client.sendall, args=(payloads[i],))
                down = threading.Thread(target=compute.sendall, args=(payloads[-1 - i],))
                up.start()
                down.start()
                assert recv_exactly(compute, len(payloads[i])) == payloads[i]
                assert recv_exactly(client, len(payloads[-1 - i])) == payloads[-1 - i]
                up.join(DEADLINE)
                down.join(DEADLINE)
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(DEADLINE * 3)
        assert not failures, failures
        for i, (cid, _client, _compute) in enumerate(sessions):
            state = ew.engine.state(cid)
            assert state[FROM_CLIENT] == len(payloads[i])
            assert state[FROM_COMPUTE] == len(payloads[-1 - i])
    finally:
        ew.close()
