"""The engine's own TLS 1.3 records (proxy/_native/tls_records.c) against real clients.

After a TLS 1.3 handshake the engine frees OpenSSL's SSL object and seals and opens
records itself; TLS 1.2 stays with OpenSSL. Real OpenSSL clients check it: Python's
ssl (also driven record by record through memory BIOs, to cut, tamper with and
forge records) and `openssl s_client` (every TLS 1.3 cipher suite, KeyUpdate both
ways).
"""

from __future__ import annotations

import os
import select
import shutil
import socket
import ssl
import subprocess
import time

import pytest

from tests.native.engine_support import (
    DEADLINE,
    Certificates,
    EventWaiter,
    client_context,
    hand_over,
    recv_exactly,
    tcp_pair,
)
from tests.native.test_engine import open_tls, tls_engine

dataplane = pytest.importorskip("proxy._dataplane")

BIG = os.urandom(200_000)  # many full records each way


def echo(engine: EventWaiter, cid: int, tls: ssl.SSLSocket, payload: bytes) -> None:
    """payload client → engine, then engine → client, through the engine's records."""
    tls.sendall(payload)
    assert engine.read_until(cid, len(payload), dataplane.READABLE) == payload
    engine.engine.write(cid, payload)
    assert recv_exactly(tls, len(payload)) == payload


def test_tls13_records_are_the_engines_and_carry_data_both_ways(
    engine: EventWaiter, certs: Certificates
) -> None:
    tls_engine(engine, certs)
    cid, tls, payload = open_tls(engine, certs, "alpha.test")
    assert tls.version() == "TLSv1.3"
    assert payload[3] == "tls1.3"  # type: ignore[index]
    echo(engine, cid, tls, b"short")
    echo(engine, cid, tls, BIG)
    echo(engine, cid, tls, b"")  # nothing: still in step
    echo(engine, cid, tls, b"x")


def test_tls12_records_stay_with_openssl(engine: EventWaiter, certs: Certificates) -> None:
    tls_engine(engine, certs)
    context = client_context(certs)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    client, server = tcp_pair()
    engine.track(client)
    cid = engine.engine.accept(hand_over(server), True)
    tls = context.wrap_socket(client, server_hostname="alpha.test")
    engine.track(tls)
    assert engine.wait(cid, dataplane.READY) == ("alpha.test", 1, None, "openssl")
    assert tls.version() == "TLSv1.2"
    echo(engine, cid, tls, BIG)


class BioClient:
    """A Python ssl client whose records the test moves itself."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext) -> None:
        self.sock = sock
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = context.wrap_bio(self.incoming, self.outgoing, server_hostname="alpha.test")

    def handshake(self) -> None:
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.sock.sendall(self.outgoing.read())
                self.receive()
        self.sock.sendall(self.outgoing.read())

    def receive(self) -> bool:
        """Bytes from the engine into the client; False at EOF."""
        ready, _, _ = select.select([self.sock], [], [], DEADLINE)
        assert ready, "the engine sent nothing"
        data = self.sock.recv(65536)
        if not data:
            self.incoming.write_eof()
            return False
        self.incoming.write(data)
        return True

    def records(self, payload: bytes) -> bytes:
        self.obj.write(payload)
        return self.outgoing.read()

    def read_until_error(self) -> ssl.SSLError:
        """What the client makes of the engine's answer to a bad record: its alert."""
        while True:
            try:
                self.obj.read(65536)
            except ssl.SSLWantReadError:
                if not self.receive():
                    raise AssertionError("EOF without an alert") from None
            except ssl.SSLError as exc:
                return exc


def bio_client(engine: EventWaiter, certs: Certificates) -> tuple[int, BioClient]:
    tls_engine(engine, certs)
    client, server = tcp_pair()
    engine.track(client)
    cid = engine.engine.accept(hand_over(server), True)
    bio = BioClient(client, client_context(certs))
    bio.handshake()
    assert engine.wait(cid, dataplane.READY)[3] == "tls1.3"  # type: ignore[index]
    return cid, bio


def test_records_cut_anywhere_arrive_whole(engine: EventWaiter, certs: Certificates) -> None:
    cid, bio = bio_client(engine, certs)
    wire = bio.records(b"first") + bio.records(b"second" * 5000)
    expected = b"first" + b"second" * 5000
    for cut in (1, 3, 5, 6, 7, 22, 4096):  # inside headers, bodies, tags
        bio.sock.sendall(wire[:cut])
        bio.sock.sendall(wire[cut:cut + 1])
        wire = wire[cut + 1:]
    bio.sock.sendall(wire)
    assert engine.read_until(cid, len(expected), dataplane.READABLE) == expected


@pytest.mark.parametrize(
    ("forge", "alert"),
    [
        # one bit of the ciphertext changed
        (lambda rec: rec[:10] + bytes([rec[10] ^ 1]) + rec[11:], "BAD_RECORD_MAC"),
        # a record longer than TLS 1.3 allows (the length field says so)
        (lambda rec: b"\x17\x03\x03\x41\x01" + b"\x00" * 100, "RECORD_OVERFLOW"),
        # a plaintext change_cipher_spec after the handshake
        (lambda rec: b"\x14\x03\x03\x00\x01\x01", "UNEXPECTED_MESSAGE"),
        # an unprotected alert after the handshake
        (lambda rec: b"\x15\x03\x03\x00\x02\x02\x28", "UNEXPECTED_MESSAGE"),
        # shorter than its tag
        (lambda rec: b"\x17\x03\x03\x00\x05" + rec[5:10], "BAD_RECORD_MAC"),
    ],
)
def test_a_bad_record_ends_the_connection_with_the_right_alert(
    engine: EventWaiter, certs: Certificates, forge: object, alert: str
) -> None:
    cid, bio = bio_client(engine, certs)
    good = bio.records(b"before")
    bio.sock.sendall(good)
    assert engine.read_until(cid, 6, dataplane.READABLE) == b"before"
    bio.sock.sendall(forge(bio.records(b"forged?")))  # type: ignore[operator]
    engine.wait(cid, dataplane.READABLE)
    assert engine.engine.read(cid) is None  # the client is gone, nothing forged came
    error = bio.read_until_error()
    assert alert in str(error).upper().replace(" ", "_")
    engine.engine.close(cid)
    engine.wait(cid, dataplane.CLOSED)


def test_close_notify_reads_as_eof_and_gets_ours(engine: EventWaiter, certs: Certificates) -> None:
    cid, bio = bio_client(engine, certs)
    bio.sock.sendall(bio.records(b"last words"))
    try:
        bio.obj.unwrap()
    except ssl.SSLWantReadError:
        pass
    bio.sock.sendall(bio.outgoing.read())
    assert engine.read_until(cid, 10, dataplane.READABLE) == b"last words"
    while engine.engine.read(cid) is not None:
        engine.wait(cid, dataplane.READABLE)
    engine.engine.close(cid)
    assert engine.wait(cid, dataplane.CLOSED) == "closed"
    while bio.receive():
        pass
    bio.obj.unwrap()  # the engine's close_notify decrypts and ends the session


OPENSSL = shutil.which("openssl")
SUITES = ["TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"]


class SClient:
    """`openssl s_client`: its stdin lines are data, or commands ("K": a KeyUpdate
    asking for ours, "k": one not asking)."""

    def __init__(self, port: int, suite: str) -> None:
        self.proc = subprocess.Popen(
            [OPENSSL or "openssl", "s_client", "-connect", f"127.0.0.1:{port}",
             "-tls1_3", "-ciphersuites", suite, "-servername", "alpha.test"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.seen = b""

    def send_line(self, line: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + b"\n")
        self.proc.stdin.flush()

    def wait_for(self, marker: bytes) -> None:
        assert self.proc.stdout is not None
        end = time.monotonic() + DEADLINE
        while marker not in self.seen:
            left = end - time.monotonic()
            assert left > 0, f"s_client never printed {marker!r}: {self.seen[-2000:]!r}"
            select.select([self.proc.stdout], [], [], left)
            self.seen += self.proc.stdout.read() or b""

    def close(self) -> None:
        self.proc.kill()
        self.proc.communicate()


@pytest.mark.skipif(OPENSSL is None, reason="the openssl command is not installed")
@pytest.mark.parametrize("suite", SUITES)
def test_every_tls13_suite_and_key_updates_both_ways(
    engine: EventWaiter, certs: Certificates, suite: str
) -> None:
    tls_engine(engine, certs)
    listener = socket.create_server(("127.0.0.1", 0))
    engine.track(listener)
    client = SClient(listener.getsockname()[1], suite)
    try:
        server, _ = listener.accept()
        cid = engine.engine.accept(hand_over(server), True)
        assert engine.wait(cid, dataplane.READY)[3] == "tls1.3"  # type: ignore[index]
        client.wait_for(suite.encode())
        client.send_line(b"hello")
        assert engine.read_until(cid, 6, dataplane.READABLE) == b"hello\n"
        engine.engine.write(cid, b"reply-1\n")
        client.wait_for(b"reply-1")
        for command, round_no in ((b"k", 2), (b"K", 3), (b"K", 4)):
            client.send_line(command)  # a KeyUpdate (K: the engine must send its own)
            client.wait_for(b"KEYUPDATE")
            client.seen = client.seen.replace(b"KEYUPDATE", b"", 1)
            line = b"after-%d" % round_no
            client.send_line(line)
            assert engine.read_until(cid, len(line) + 1, dataplane.READABLE) == line + b"\n"
            reply = b"reply-%d" % round_no
            engine.engine.write(cid, reply + b"\n")  # under the engine's new key after K
            client.wait_for(reply)
    finally:
        client.close()
