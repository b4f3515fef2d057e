"""Step 4, auth at the proxy: SCRAM (or, for the password form, a cleartext password)
checked against the role's cached verifier."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from proxy.errors import ClientError, Kind
from proxy.pgwire import messages
from proxy.pgwire.codec import MessageReader
from proxy.pgwire.errors import ProtocolViolation
from proxy.scram import (
    DEFAULT_ITERATIONS,
    ScramError,
    ScramSecret,
    ScramServer,
    parse_verifier,
    salted_password,
    verify_password,
)
from proxy.stream import Stream
from proxy.wake import control_error
from wakeup.api import ControlAPIError, ControlClient

ROLE_NOT_FOUND = "role_not_found"


@dataclass(frozen=True)
class RoleSecret:
    secret: ScramSecret | None  # None: no such role (cached briefly, answered with a mock)


class RoleCache:
    """Verifiers fetched from the control API, kept for `ttl` (negative answers shorter)."""

    def __init__(
        self,
        control: ControlClient,
        ttl: float,
        negative_ttl: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.control = control
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.clock = clock
        self._entries: dict[tuple[str, str], tuple[float, RoleSecret]] = {}
        self._inflight: dict[tuple[str, str], asyncio.Future[RoleSecret]] = {}

    def invalidate(self, endpoint_id: str, role: str) -> None:
        self._entries.pop((endpoint_id, role), None)

    def put(self, endpoint_id: str, role: str, verifier: str) -> None:
        """A verifier the control plane pushed (a new endpoint): no fetch on first connect."""
        try:
            secret = parse_verifier(verifier)
        except ValueError:
            return
        self._entries[(endpoint_id, role)] = (self.clock() + self.ttl, RoleSecret(secret))

    async def get(self, endpoint_id: str, role: str, *, timeout: float) -> RoleSecret:
        key = (endpoint_id, role)
        hit = self._entries.get(key)
        if hit is not None and hit[0] > self.clock():
            return hit[1]
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[RoleSecret] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            result = await self._fetch(endpoint_id, role, timeout)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it themselves
            raise
        else:
            future.set_result(result)
            ttl = self.ttl if result.secret is not None else self.negative_ttl
            self._entries[key] = (self.clock() + ttl, result)
            return result
        finally:
            del self._inflight[key]

    async def _fetch(self, endpoint_id: str, role: str, timeout: float) -> RoleSecret:
        try:
            answer = await self.control.get_role(endpoint_id, role, timeout=timeout)
        except ControlAPIError as exc:
            if exc.code == ROLE_NOT_FOUND:
                return RoleSecret(None)
            raise control_error(endpoint_id, exc) from exc
        try:
            return RoleSecret(parse_verifier(answer.verifier))
        except ValueError:
            # Not a SCRAM verifier (e.g. md5): we cannot authenticate this role.
            return RoleSecret(None)


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
) -> bytes:
    """Run SCRAM with the client; return the ClientKey recovered from its proof.

    The caller sends AuthenticationOk (after this returns) when it is ready.
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
