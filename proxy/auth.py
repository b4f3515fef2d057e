"""Step 4, auth at the proxy: SCRAM (or, for the password form, a cleartext password)
checked against the role's cached verifier."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

from proxy.errors import ClientError, Kind
from proxy.pgwire import messages
from proxy.pgwire.codec import MessageReader
from proxy.pgwire.errors import ProtocolViolation
from proxy.scram import (
    DEFAULT_ITERATIONS,
    ScramError,
    ScramSecret,
    ScramServer,
    salted_password,
    verify_password,
)
from proxy.stream import Stream


async def read_message(stream: Stream, reader: MessageReader) -> tuple[bytes, bytes]:
    while True:
        message = reader.next_message()
        if message is not None:
            return message
        reader.feed(await stream.recv())


async def expect_password_message(
    stream: Stream, reader: MessageReader, step: str
) -> bytes:
    kind, body = await read_message(stream, reader)
    if kind != b"p":
        raise ClientError(
            Kind.PROTOCOL,
            f"expected a {step} message, got message type {kind!r}",
        )
    return body


async def read_cleartext_password(
    stream: Stream, reader: MessageReader, *, step_timeout: float
) -> bytes:
    """Ask for the password in cleartext (the caller checked the channel is TLS or allowed)."""
    stream.write(messages.auth_cleartext_password())
    try:
        async with asyncio.timeout(step_timeout):
            body = await expect_password_message(stream, reader, "PasswordMessage")
        return messages.parse_password_message(body)
    except ProtocolViolation as exc:
        raise ClientError(Kind.PROTOCOL, exc.message, sqlstate=exc.sqlstate) from None
    except TimeoutError:
        raise ClientError(Kind.PROTOCOL, "authentication timed out", sqlstate="08006") from None


async def verify_cleartext(
    user: str, secret: ScramSecret | None, password: bytes, *, mock_key: bytes
) -> bytes:
    """The ClientKey for a correct `password`; else 28P01, worded and timed like SCRAM's.

    PBKDF2 runs in a thread: 4096 rounds would stall every other session for
    milliseconds. An unknown role costs the same work, so timing reveals nothing.
    """
    if secret is None:
        await asyncio.to_thread(salted_password, password, mock_key, DEFAULT_ITERATIONS)
        client_key = None
    else:
        client_key = await asyncio.to_thread(verify_password, secret, password)
    if client_key is None:
        raise ClientError(Kind.AUTH, f'password authentication failed for user "{user}"')
    return client_key


async def authenticate_client(
    stream: Stream,
    reader: MessageReader,
    *,
    user: str,
    secret: ScramSecret | None,
    channel_binding: bytes | None,
    mock_key: bytes,
    step_timeout: float,
    after_server_first: Callable[[], None] | None = None,
) -> bytes:
    """Run SCRAM with the client; return the ClientKey recovered from its proof.

    `after_server_first` runs once the server-first message is written: work
    that only a real role gets (a wake, an early compute connection) starts
    there, so that it overlaps the client's proof computation but cannot slow
    the replies a prober times without a password (timing would tell real roles
    from unknown ones). The caller sends AuthenticationOk when it is ready.
    """
    server = ScramServer(
        user, secret, nonce=os.urandom(18), channel_binding=channel_binding, mock_key=mock_key
    )
    stream.write(messages.auth_sasl(server.mechanisms()))
    try:
        async with asyncio.timeout(step_timeout):
            body = await expect_password_message(stream, reader, "SASLInitialResponse")
        mechanism, data = messages.parse_sasl_initial_response(body)
        stream.write(messages.auth_sasl_continue(server.client_first(mechanism, data)))
        if after_server_first is not None:
            after_server_first()
        async with asyncio.timeout(step_timeout):
            body = await expect_password_message(stream, reader, "SASLResponse")
        final = server.client_final(body)
    except ScramError as exc:
        kind = Kind.AUTH if exc.sqlstate == "28P01" else Kind.PROTOCOL
        raise ClientError(kind, exc.message, sqlstate=exc.sqlstate) from None
    except ProtocolViolation as exc:
        raise ClientError(Kind.PROTOCOL, exc.message, sqlstate=exc.sqlstate) from None
    except TimeoutError:
        raise ClientError(Kind.PROTOCOL, "authentication timed out", sqlstate="08006") from None
    stream.write(messages.auth_sasl_final(final))
    return server.client_key
