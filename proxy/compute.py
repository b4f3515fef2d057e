"""Step 7, compute login: connect to the compute and log in with SCRAM using the ClientKey."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field

from proxy.pgwire import messages
from proxy.pgwire.codec import MessageReader, frame
from proxy.pgwire.errors import ProtocolViolation
from proxy.scram import ScramClient, ScramError
from proxy.stream import PeerClosed, Stream
from wakeup.api import ComputeAddress


class ComputeUnreachable(Exception):
    """No TCP connection (refused, timed out): the cached address may be stale."""


class ComputeRejected(Exception):
    """The compute answered with an ErrorResponse during login."""

    def __init__(self, fields: dict[str, str]):
        super().__init__(fields.get("M", "compute refused the connection"))
        self.fields = fields

    @property
    def sqlstate(self) -> str:
        return self.fields.get("C", "08006")


@dataclass
class ComputeSession:
    stream: Stream
    transport: asyncio.Transport
    address: ComputeAddress
    backend_pid: int = 0
    backend_secret: bytes = b""
    parameters: list[bytes] = field(default_factory=list)  # raw ParameterStatus messages
    notices: list[bytes] = field(default_factory=list)  # raw NoticeResponse messages
    trailing: bytes = b""

    def close(self) -> None:
        self.transport.close()


async def connect_tcp(address: ComputeAddress, timeout: float) -> tuple[asyncio.Transport, Stream]:
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            transport, stream = await loop.create_connection(Stream, address.host, address.port)
    except (OSError, TimeoutError) as exc:
        raise ComputeUnreachable(f"{address}: {exc!r}") from exc
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return transport, stream


async def login(
    address: ComputeAddress,
    params: Mapping[str, str],
    *,
    user: str,
    client_key: bytes,
    server_key: bytes,
    connect_timeout: float,
    login_timeout: float,
) -> ComputeSession:
    """Log in and read up to ReadyForQuery; the session is then ready to splice."""
    session = await open_session(address, params, connect_timeout=connect_timeout)
    return await finish_login(
        session, user=user, client_key=client_key, server_key=server_key,
        login_timeout=login_timeout,
    )


async def open_session(
    address: ComputeAddress, params: Mapping[str, str], *, connect_timeout: float
) -> ComputeSession:
    """Connect and send the StartupMessage. Needs no credentials, so it can run while
    the client is still authenticating: the compute forks its backend meanwhile."""
    transport, stream = await connect_tcp(address, connect_timeout)
    stream.write(messages.startup_message(params))
    return ComputeSession(stream, transport, address)


async def finish_login(
    session: ComputeSession,
    *,
    user: str,
    client_key: bytes,
    server_key: bytes,
    login_timeout: float,
) -> ComputeSession:
    """SCRAM with the ClientKey, then read up to ReadyForQuery."""
    try:
        async with asyncio.timeout(login_timeout):
            await _login(session, user, client_key, server_key)
    except BaseException:
        session.transport.abort()
        raise
    return session


async def _login(
    session: ComputeSession,
    user: str,
    client_key: bytes,
    server_key: bytes,
) -> None:
    stream = session.stream
    reader = MessageReader()

    async def next_message() -> tuple[bytes, bytes]:
        while True:
            message = reader.next_message()
            if message is not None:
                return message
            try:
                reader.feed(await stream.recv())
            except PeerClosed as exc:
                raise ComputeUnreachable("compute closed the connection during login") from exc

    scram: ScramClient | None = None
    try:
        while True:
            kind, body = await next_message()
            if kind == b"R":
                code, rest = messages.parse_authentication(body)
                if code == 0:
                    continue
                if code == 10:  # AuthenticationSASL
                    if "SCRAM-SHA-256" not in messages.parse_sasl_mechanisms(rest):
                        raise ComputeRejected({"C": "28000", "M": "compute offers no SCRAM"})
                    scram = ScramClient(user, client_key, server_key, nonce=os.urandom(18))
                    stream.write(
                        messages.sasl_initial_response(scram.mechanism, scram.client_first())
                    )
                elif code == 11 and scram is not None:  # SASLContinue
                    stream.write(messages.sasl_response(scram.server_first(rest)))
                elif code == 12 and scram is not None:  # SASLFinal
                    scram.server_final(rest)
                else:
                    raise ComputeRejected(
                        {"C": "28000", "M": f"compute asked for unsupported authentication {code}"}
                    )
            elif kind == b"S":
                session.parameters.append(frame(kind, body))
            elif kind == b"K":
                session.backend_pid, session.backend_secret = messages.parse_backend_key_data(body)
            elif kind == b"N":
                session.notices.append(frame(kind, body))
            elif kind == b"E":
                raise ComputeRejected(messages.parse_error_fields(body))
            elif kind == b"Z":
                session.trailing = reader.take_trailing() + stream.take_buffered()
                return
            elif kind == b"v":  # NegotiateProtocolVersion: we ask for 3.0 only
                continue
            else:
                raise ComputeRejected(
                    {"C": "08P01", "M": f"unexpected message {kind!r} from compute during login"}
                )
    except ScramError as exc:
        raise ComputeRejected({"C": exc.sqlstate, "M": exc.message}) from None
    except ProtocolViolation as exc:
        raise ComputeRejected({"C": "08P01", "M": exc.message}) from None

