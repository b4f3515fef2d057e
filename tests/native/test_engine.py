"""The native engine's connection life: accept, the TLS handshake (SNI, ALPN,
settings), PYTHON-mode read/write with flow control, close/abort, stale ids,
shutdown. Real sockets, real TLS clients (Python's ssl, libpq through psycopg)."""

from __future__ import annotations

import socket
import ssl
import threading
import warnings
from pathlib import Path

import psycopg
import pytest

from tests.native.engine_support import (
    DEADLINE,
    Certificates,
    EventWaiter,
    client_context,
    hand_over,
    message,
    recv_exactly,
    recv_to_eof,
    tcp_pair,
)

dataplane = pytest.importorskip("proxy._dataplane")


def tls_engine(engine: EventWaiter, certs: Certificates) -> EventWaiter:
    engine.engine.set_certificates(*certs.engine_args())
    return engine


def open_tls(
    ew: EventWaiter, certs: Certificates, server_name: str | None = None,
    alpn: list[str] | None = None,
) -> tuple[int, ssl.SSLSocket, object]:
    client, server = tcp_pair()
    cid = ew.engine.accept(hand_over(server), True)
    ew.track(client)
    tls = client_context(certs, alpn).wrap_socket(client, server_hostname=server_name)
    ew.track(tls)
    return cid, tls, ew.wait(cid, dataplane.READY)


def open_plain(ew: EventWaiter) -> tuple[int, socket.socket]:
    client, server = tcp_pair()
    ew.track(client)
    cid = ew.engine.accept(hand_over(server), False)
    assert ew.wait(cid, dataplane.READY) == (None, -1, None, None)
    return cid, client


def test_plain_conn_reads_writes_and_sees_eof(engine: EventWaiter) -> None:
    cid, client = open_plain(engine)
    assert engine.engine.read(cid) == b""
    client.sendall(b"startup bytes")
    engine.wait(cid, dataplane.READABLE)
    assert engine.read_until(cid, 13, dataplane.READABLE) == b"startup bytes"
    assert engine.engine.write(cid, b"answer") == 0
    assert recv_exactly(client, 6) == b"answer"
    client.shutdown(socket.SHUT_WR)
    engine.wait(cid, dataplane.READABLE)
    assert engine.engine.read(cid) is None
    state = engine.engine.state(cid)
    assert state[0] == dataplane.MODE_PYTHON
    engine.engine.close(cid)
    assert engine.wait(cid, dataplane.CLOSED) == "closed"
    assert recv_to_eof(client) == b""


@pytest.mark.parametrize(
    ("server_name", "index"),
    [
        (None, 0),
        ("localhost", 0),
        ("alpha.test", 1),
        ("db.alpha.test", 1),
        ("DB.Alpha.TEST.", 1),  # case and a trailing dot do not matter (tls/sni.py)
        ("x.db.alpha.test", 0),  # a wildcard covers one label only
        ("ep1.beta.test", 2),
        ("beta.test", 0),
        ("elsewhere.example", 0),
    ],
)
def test_sni_picks_the_certificate_and_reports_it(
    engine: EventWaiter, certs: Certificates, server_name: str | None, index: int
) -> None:
    tls_engine(engine, certs)
    _cid, tls, payload = open_tls(engine, certs, server_name, alpn=["postgresql"])
    name, cert_index, alpn, records = payload  # type: ignore[misc]
    assert records == "tls1.3"
    assert cert_index == index
    assert tls.getpeercert(binary_form=True) == certs.der(index)
    if server_name is None:
        assert name is None
    else:
        assert name.lower().rstrip(".") == server_name.lower().rstrip(".")
    assert alpn == "postgresql"
    assert tls.selected_alpn_protocol() == "postgresql"
    tls.close()


@pytest.mark.parametrize("offered", [None, ["http/1.1"], ["http/1.1", "postgresql"]])
def test_alpn_is_postgresql_only_when_offered(
    engine: EventWaiter, certs: Certificates, offered: list[str] | None
) -> None:
    tls_engine(engine, certs)
    _cid, tls, payload = open_tls(engine, certs, "alpha.test", alpn=offered)
    expected = "postgresql" if offered and "postgresql" in offered else None
    assert payload == ("alpha.test", 1, expected, "tls1.3")
    assert tls.selected_alpn_protocol() == expected
    tls.close()


def test_tls_python_mode_round_trip_without_session_tickets(
    engine: EventWaiter, certs: Certificates
) -> None:
    tls_engine(engine, certs)
    cid, tls, _ = open_tls(engine, certs, "alpha.test")
    tls.sendall(b"hello engine")
    engine.wait(cid, dataplane.READABLE)
    assert engine.read_until(cid, 12, dataplane.READABLE) == b"hello engine"
    engine.engine.write(cid, b"hello client")
    assert recv_exactly(tls, 12) == b"hello client"
    # As PostgreSQL: no session tickets (a TLS 1.3 server sends them after the
    # handshake, so they would have come with the data by now).
    assert tls.version() in ("TLSv1.2", "TLSv1.3")
    assert tls.session is not None and not tls.session.has_ticket
    engine.engine.close(cid)
    assert engine.wait(cid, dataplane.CLOSED) == "closed"
    assert recv_to_eof(tls) == b""  # a close_notify, then the end


def test_tls_below_1_2_is_refused(engine: EventWaiter, certs: Certificates) -> None:
    tls_engine(engine, certs)
    client, server = tcp_pair()
    engine.track(client)
    cid = engine.engine.accept(hand_over(server), True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_ciphers("ALL:@SECLEVEL=0")
    with warnings.catch_warnings():  # an old client is the point of the test
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises((ssl.SSLError, OSError)):
        context.wrap_socket(client, server_hostname="alpha.test")
    reason = engine.wait(cid, dataplane.CLOSED)
    assert isinstance(reason, str) and reason.startswith("tls handshake failed")
    with pytest.raises(ValueError):
        engine.engine.state(cid)


def test_not_tls_at_all_fails_the_handshake(engine: EventWaiter, certs: Certificates) -> None:
    tls_engine(engine, certs)
    client, server = tcp_pair()
    engine.track(client)
    cid = engine.engine.accept(hand_over(server), True)
    client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    reason = engine.wait(cid, dataplane.CLOSED)
    assert isinstance(reason, str) and reason.startswith("tls handshake failed")
    assert recv_to_eof(client) is not None


def test_tls_accept_needs_certificates(engine: EventWaiter) -> None:
    client, server = tcp_pair()
    with pytest.raises(RuntimeError):
        engine.engine.accept(server.fileno(), True)
    client.close()
    server.close()


def test_bad_certificate_files_are_refused(engine: EventWaiter, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.pem")
    with pytest.raises(ValueError, match="cannot load certificate"):
        engine.engine.set_certificates([(missing, missing)], {}, {})
    with pytest.raises(ValueError):
        engine.engine.set_certificates([], {}, {})


def test_libpq_with_sslmode_require_completes_a_handshake(
    engine: EventWaiter, certs: Certificates
) -> None:
    """libpq (psycopg) asks SSLRequest, gets 'S' (Python's part), then the engine
    runs the TLS handshake; the startup message reaches Python in PYTHON mode."""
    tls_engine(engine, certs)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        outcome: list[BaseException] = []

        def connect() -> None:
            try:
                psycopg.connect(
                    f"host=db.alpha.test hostaddr=127.0.0.1 port={port} user=u dbname=d "
                    "sslmode=require connect_timeout=20"
                ).close()
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=connect)
        thread.start()
        listener.settimeout(DEADLINE)
        server, _ = listener.accept()
        server.settimeout(DEADLINE)
        assert recv_exactly(server, 8) == b"\x00\x00\x00\x08\x04\xd2\x16\x2f"  # SSLRequest
        engine.track(server)
        server.sendall(b"S")
        cid = engine.engine.accept(hand_over(server), True)
        # libpq 17+ offers ALPN "postgresql" after an SSLRequest too.
        assert engine.wait(cid, dataplane.READY) == ("db.alpha.test", 1, "postgresql", "tls1.3")
        engine.wait(cid, dataplane.READABLE)
        head = engine.read_until(cid, 8, dataplane.READABLE)
        length = int.from_bytes(head[:4], "big")
        startup = head + engine.read_until(cid, length - len(head), dataplane.READABLE)
        assert startup[4:8] == b"\x00\x03\x00\x00" and b"user\x00u\x00" in startup
        engine.engine.write(
            cid, message(b"E", b"SFATAL\0C28000\0Mno such user here\0\0")
        )
        engine.engine.close(cid)
        assert engine.wait(cid, dataplane.CLOSED) == "closed"
        thread.join(DEADLINE)
    assert outcome and "no such user here" in str(outcome[0])


def test_write_past_high_water_reports_drained(engine: EventWaiter) -> None:
    cid, client = open_plain(engine)
    blob = bytes(range(256)) * 49152  # 12 MiB: more than the socket buffers take at once
    queued = engine.engine.write(cid, blob)
    assert queued > dataplane.HIGH_WATER
    received = recv_exactly(client, len(blob))
    assert received == blob
    engine.wait(cid, dataplane.DRAINED)
    assert engine.engine.state(cid)[16] == 0


def test_pause_stops_reading_until_resumed(engine: EventWaiter) -> None:
    cid, client = open_plain(engine)
    engine.engine.pause(cid, True)
    client.sendall(b"while paused")
    engine.engine.pause(cid, False)
    engine.wait(cid, dataplane.READABLE)
    assert engine.read_until(cid, 12, dataplane.READABLE) == b"while paused"


def test_close_flushes_abort_does_not_wait_and_ids_go_stale(engine: EventWaiter) -> None:
    cid, client = open_plain(engine)
    engine.engine.write(cid, b"last words")
    engine.engine.close(cid)
    assert engine.wait(cid, dataplane.CLOSED) == "closed"
    assert recv_to_eof(client) == b"last words"
    for call in (
        lambda: engine.engine.read(cid),
        lambda: engine.engine.write(cid, b"x"),
        lambda: engine.engine.state(cid),
        lambda: engine.engine.close(cid),
        lambda: engine.engine.pause(cid, True),
        lambda: engine.engine.request_yield(cid, dataplane.YIELD_NOW),
        lambda: engine.engine.read(-1),
        lambda: engine.engine.read(1 << 70),
    ):
        with pytest.raises(ValueError):
            call()
    # The slot is reused with a new generation: the old id stays stale.
    cid2, client2 = open_plain(engine)
    assert cid2 != cid
    with pytest.raises(ValueError):
        engine.engine.state(cid)
    engine.engine.close(cid2, abort=True)
    assert engine.wait(cid2, dataplane.CLOSED) == "aborted"
    assert recv_to_eof(client2) == b""


def test_calls_in_the_wrong_mode_are_refused(engine: EventWaiter) -> None:
    cid, _client = open_plain(engine)
    with pytest.raises(RuntimeError):
        engine.engine.request_yield(cid, dataplane.YIELD_NOW)
    compute, peer = tcp_pair()
    engine.track(peer)
    engine.engine.splice(cid, hand_over(compute), b"", 0, ord("I"))
    with pytest.raises(RuntimeError):
        engine.engine.read(cid)
    with pytest.raises(RuntimeError):
        engine.engine.write(cid, b"x")
    with pytest.raises(ValueError):
        engine.engine.request_yield(cid, 99)
    engine.engine.close(cid)
    assert engine.wait(cid, dataplane.CLOSED) == "closed"
    assert recv_to_eof(peer) == b""


def test_shutdown_closes_everything_and_is_idempotent(certs: Certificates) -> None:
    ew = EventWaiter(dataplane.Engine(3))
    try:
        shutdown_closes_everything(ew, certs)
    finally:
        ew.close()


def shutdown_closes_everything(ew: EventWaiter, certs: Certificates) -> None:
    tls_engine(ew, certs)
    conns = [open_plain(ew) for _ in range(3)]
    _cid, tls, _ = open_tls(ew, certs, "alpha.test")
    ew.engine.shutdown()
    ew.engine.shutdown()
    for c, client in conns:
        assert recv_to_eof(client) == b""
        with pytest.raises(ValueError):
            ew.engine.state(c)
    with pytest.raises((OSError, ssl.SSLError)):
        while tls.recv(1024):
            pass
        raise OSError("clean end")
    client, server = tcp_pair()
    with pytest.raises(RuntimeError):
        ew.engine.accept(server.fileno(), False)
    server.close()
    client.close()


def test_python_mode_buffers_at_most_high_water_per_read(engine: EventWaiter) -> None:
    """A client that sends more than Python reads is not read further once the
    engine holds HIGH_WATER: every read() returns at most that plus one chunk."""
    cid, client = open_plain(engine)
    blob = bytes(range(256)) * (64 * 1024)  # 16 MiB
    client.settimeout(DEADLINE * 6)
    sender = threading.Thread(target=client.sendall, args=(blob,))
    sender.start()
    got = bytearray()
    while len(got) < len(blob):
        engine.wait(cid, dataplane.READABLE)
        chunk = engine.engine.read(cid)
        assert chunk is not None
        assert len(chunk) <= dataplane.HIGH_WATER + 64 * 1024
        got += chunk
    sender.join(DEADLINE)
    assert bytes(got) == blob


def test_close_during_the_handshake(engine: EventWaiter, certs: Certificates) -> None:
    tls_engine(engine, certs)
    client, server = tcp_pair()
    engine.track(client)
    cid = engine.engine.accept(hand_over(server), True)
    engine.engine.close(cid)  # the client never sent its ClientHello
    assert engine.wait(cid, dataplane.CLOSED) == "closed"
    assert recv_to_eof(client) == b""


def test_close_gives_up_on_a_client_that_never_reads(engine: EventWaiter) -> None:
    """close() flushes, but not forever: a client that reads nothing does not
    keep the connection (and its queue) alive."""
    cid, client = open_plain(engine)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    with pytest.raises(BufferError):  # the queue's bound
        engine.engine.write(cid, bytes(16 * 1024 * 1024 + 1))
    queued = engine.engine.write(cid, bytes(16 * 1024 * 1024 - 1))
    assert queued > 0
    engine.engine.close(cid)
    assert engine.wait(cid, dataplane.CLOSED) == "closed"
    with pytest.raises(ValueError):
        engine.engine.state(cid)
