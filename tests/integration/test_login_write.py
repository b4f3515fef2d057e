"""The post-login messages (ParameterStatus…BackendKeyData…ReadyForQuery) leave in one TLS
record: counted on the wire by a raw TLS client (ssl.MemoryBIO over a plain socket)."""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path

from pgwake.up import Up
from proxy.pgwire import messages
from proxy.pgwire.codec import MessageReader
from tests.wire import client_tls_context


class RecordCountingClient:
    """A blocking TLS client that counts the TLS records it receives."""

    def __init__(self, port: int, ca: Path):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.sendall(messages.ssl_request())
        assert self.sock.recv(1) == b"S"
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = client_tls_context(ca).wrap_bio(self.incoming, self.outgoing)
        self.raw = b""
        self.records = 0
        self.reader = MessageReader()
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                self._receive()
        self._flush()

    def _flush(self) -> None:
        pending = self.outgoing.read()
        if pending:
            self.sock.sendall(pending)

    def _receive(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("proxy closed")
        self.raw += data
        # Whole TLS records only: a 5-byte header, then `length` bytes.
        while len(self.raw) >= 5:
            length = int.from_bytes(self.raw[3:5], "big")
            if len(self.raw) < 5 + length:
                break
            record, self.raw = self.raw[: 5 + length], self.raw[5 + length :]
            self.records += 1
            self.incoming.write(record)

    def send(self, data: bytes) -> None:
        self.tls.write(data)
        self._flush()

    def next_message(self) -> tuple[bytes, bytes]:
        while True:
            message = self.reader.next_message()
            if message is not None:
                return message
            try:
                self.reader.feed(self.tls.read(65536))
            except ssl.SSLWantReadError:
                self._receive()

    def close(self) -> None:
        self.sock.close()


def records_for_greeting(port: int, ca: Path, endpoint: str, password: str) -> tuple[int, bytes]:
    client = RecordCountingClient(port, ca)
    try:
        client.send(messages.startup_message({"user": "app", "database": "main"}, (3, 0)))
        kind, body = client.next_message()
        assert (kind, body[:4]) == (b"R", b"\x00\x00\x00\x03"), (kind, body)  # cleartext
        before = client.records
        secret = f"endpoint={endpoint};{password}".encode() + b"\x00"
        client.send(b"p" + (4 + len(secret)).to_bytes(4, "big") + secret)
        kinds = b""
        while not kinds.endswith(b"Z"):
            kind, _ = client.next_message()
            kinds += kind
        return client.records - before, kinds
    finally:
        client.close()


async def test_post_login_messages_are_one_tls_record(stack: Up) -> None:
    assert stack.client is not None and stack.certs is not None
    ep = await stack.client.create_endpoint()
    records, kinds = await asyncio.to_thread(
        records_for_greeting, stack.proxy_port, stack.certs.ca.cert, ep.id, ep.password
    )
    assert kinds.startswith(b"R") and kinds.count(b"S") >= 10 and b"K" in kinds, kinds
    # AuthenticationOk goes out as soon as the password checks (before the compute
    # login); everything after it is one record.
    assert records == 2, (records, kinds)
