"""Helpers of the engine tests: an engine whose events a test waits for, real
sockets on both sides, real certificates, PostgreSQL protocol messages.

The tests play "Python" (the adapter's role) on their own thread: the engine's
workers move the bytes; every wait here is for an event or for bytes, with a
deadline that means "broken", never "slow".
"""

from __future__ import annotations

import select
import socket
import ssl
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tls.certs import CertPair
from tls.devca import ensure_dev_ca, ensure_server_certificate

DEADLINE = 20.0


class EventWaiter:
    """The engine and the events it reported, kept until a test asks for them."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.pending: list[tuple[int, int, object]] = []
        self.sockets: list[socket.socket] = []

    def track(self, *socks: socket.socket) -> None:
        """Sockets the test keeps: closed with the engine at the end of the test."""
        self.sockets.extend(socks)

    def close(self) -> None:
        self.engine.shutdown()
        for sock in self.sockets:
            sock.close()

    def poll(self, timeout: float) -> None:
        ready, _, _ = select.select([self.engine.fileno()], [], [], max(timeout, 0.0))
        if ready:
            self.pending.extend(self.engine.events())

    def wait(self, conn_id: int, kind: int, deadline: float = DEADLINE) -> object:
        """The payload of the first `kind` event of `conn_id` (taken from the queue)."""
        return self.wait_any(conn_id, (kind,), deadline)[1]

    def wait_any(
        self, conn_id: int, kinds: tuple[int, ...], deadline: float = DEADLINE
    ) -> tuple[int, object]:
        """The first event of `conn_id` whose kind is one of `kinds`: (kind, payload)."""
        end = time.monotonic() + deadline
        while True:
            for i, (cid, k, payload) in enumerate(self.pending):
                if cid == conn_id and k in kinds:
                    del self.pending[i]
                    return k, payload
            left = end - time.monotonic()
            assert left > 0, f"no event {kinds} for conn {conn_id}; got {self.pending}"
            self.poll(left)

    def kinds(self, conn_id: int) -> list[int]:
        self.poll(0)
        return [k for cid, k, _ in self.pending if cid == conn_id]

    def read_until(self, conn_id: int, size: int, readable: int) -> bytes:
        """Read (PYTHON mode) until `size` bytes came, waiting for READABLE between."""
        data = b""
        while len(data) < size:
            chunk = self.engine.read(conn_id)
            assert chunk is not None, f"EOF after {len(data)} of {size} bytes"
            data += chunk
            if len(data) < size:
                self.wait(conn_id, readable)
        return data


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two ends of a loopback TCP connection (a real one, as computes and clients use)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        a = socket.create_connection(listener.getsockname(), timeout=DEADLINE)
        b, _ = listener.accept()
    b.settimeout(DEADLINE)
    return a, b


def hand_over(sock: socket.socket) -> int:
    """The fd of `sock`, non-blocking, detached: the engine owns it now."""
    sock.setblocking(False)
    return sock.detach()


def recv_exactly(sock: socket.socket | ssl.SSLSocket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        # Bounded: an SSL socket allocates the whole size asked for on every call.
        chunk = sock.recv(min(size - len(data), 256 * 1024))
        assert chunk, f"EOF after {len(data)} of {size} bytes"
        data += chunk
    return data


def recv_to_eof(sock: socket.socket | ssl.SSLSocket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


# ---- PostgreSQL protocol messages (the trackers read these) ----

def message(kind: bytes, body: bytes = b"") -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


def query(sql: str) -> bytes:
    return message(b"Q", sql.encode() + b"\0")


def ready(status: bytes = b"I") -> bytes:
    return message(b"Z", status)


def data_row(value: bytes) -> bytes:
    return message(b"D", struct.pack("!HI", 1, len(value)) + value)


def error(severity: bytes, code: bytes, text: bytes) -> bytes:
    return message(b"E", b"S" + severity + b"\0C" + code + b"\0M" + text + b"\0\0")


# ---- certificates ----

@dataclass
class Certificates:
    ca: CertPair
    pairs: list[CertPair]  # index 0 is the default
    exact: dict[str, int]
    wildcard: dict[str, int]

    def engine_args(self) -> tuple[list[tuple[str, str]], dict[str, int], dict[str, int]]:
        return [(str(p.cert), str(p.key)) for p in self.pairs], self.exact, self.wildcard

    def der(self, index: int) -> bytes:
        return ssl.PEM_cert_to_DER_cert(self.pairs[index].cert.read_text())


def make_certificates(directory: Path) -> Certificates:
    """Three server certificates from one dev CA. The name tables are built
    with tls/sni.py's rules, as the proxy builds them from the certificates."""
    ca = ensure_dev_ca(directory / "ca")
    names = [["localhost"], ["alpha.test", "*.alpha.test"], ["*.beta.test"]]
    pairs = [
        ensure_server_certificate(directory / f"cert{i}", ca, n) for i, n in enumerate(names)
    ]
    exact: dict[str, int] = {}
    wildcard: dict[str, int] = {}
    for index, patterns in enumerate(names):
        for pattern in patterns:
            if pattern.startswith("*."):
                wildcard.setdefault(pattern[2:], index)
            else:
                exact.setdefault(pattern, index)
    return Certificates(ca=ca, pairs=pairs, exact=exact, wildcard=wildcard)


def client_context(certs: Certificates, alpn: list[str] | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs.ca.cert))
    context.check_hostname = False  # the tests look at which certificate came
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    return context
