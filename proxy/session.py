"""One client connection, start to end: the connection path of DESIGN.md, step by step."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import socket
import time
from dataclasses import dataclass, field

from proxy.auth import RoleCache, authenticate_client
from proxy.cancel import CancelMap, CancelTarget, send_cancel
from proxy.compute import ComputeRejected, ComputeSession, ComputeUnreachable, login
from proxy.errors import ClientError, Kind
from proxy.handshake import ClientHello, open_client
from proxy.pgwire import messages
from proxy.pgwire.codec import MessageReader
from proxy.pgwire.errors import ProtocolViolation
from proxy.pgwire.startup import (
    NEWEST_SUPPORTED_MINOR,
    StartupMessage,
    extract_endpoint_from_options,
)
from proxy.routing import resolve
from proxy.settings import ProxySettings
from proxy.splice import Splice
from proxy.stream import PeerClosed, Stream
from proxy.wake import WakeClient, Woken
from tls.context import ServerTLS

log = logging.getLogger(__name__)
_session_ids = itertools.count(1)


@dataclass
class ProxyState:
    """Everything sessions share, passed in (no module-level singletons)."""

    settings: ProxySettings
    server_tls: ServerTLS | None
    wake: WakeClient
    roles: RoleCache
    cancels: CancelMap
    mock_key: bytes
    sessions: set[asyncio.Task[None]] = field(default_factory=set)
    splices: set[Splice] = field(default_factory=set)
    handshakes: int = 0


@dataclass
class SessionLog:
    session_id: int
    client: str
    endpoint: str | None = None
    role: str | None = None
    cold_start: str | None = None
    sqlstate: str | None = None
    connect_seconds: float | None = None
    bytes_in: int = 0
    bytes_out: int = 0


class Session:
    def __init__(self, state: ProxyState, sock: socket.socket, peer: str):
        self.state = state
        self.settings = state.settings
        self.sock = sock
        self.log = SessionLog(next(_session_ids), peer)
        self._stream_box: list[Stream] = []
        self._compute: ComputeSession | None = None

    async def run(self) -> None:
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.handshake_timeout
        self.state.handshakes += 1
        try:
            try:
                async with asyncio.timeout_at(deadline):
                    spliced = await self._handshake()
            finally:
                self.state.handshakes -= 1
            if spliced is None:
                return
            self.log.connect_seconds = time.perf_counter() - started
            await self._splice(*spliced)
        except ClientError as exc:
            self._fail(exc)
        except TimeoutError:
            self._fail(ClientError(Kind.PROTOCOL, "connection setup timed out", sqlstate="08006"))
        except (PeerClosed, ConnectionError, OSError) as exc:
            log.debug("session %d: client went away: %r", self.log.session_id, exc)
        except Exception:
            log.exception("session %d: internal error", self.log.session_id)
            self._fail(
                ClientError(
                    Kind.INTERNAL, f"internal error in pgwake (session {self.log.session_id})"
                )
            )
        finally:
            self._close()
            log.info(
                "session %d client=%s endpoint=%s role=%s cold_start=%s connect_ms=%s "
                "bytes_in=%d bytes_out=%d sqlstate=%s",
                self.log.session_id, self.log.client, self.log.endpoint, self.log.role,
                self.log.cold_start,
                None if self.log.connect_seconds is None
                else round(self.log.connect_seconds * 1000, 2),
                self.log.bytes_in, self.log.bytes_out, self.log.sqlstate,
            )

    def _fail(self, exc: ClientError) -> None:
        self.log.sqlstate = exc.sqlstate
        if self._stream_box:
            stream = self._stream_box[0]
            stream.write(
                messages.error_response(
                    exc.sqlstate, exc.message, detail=exc.detail, hint=exc.hint
                )
            )
        log.info("session %d: %s %s", self.log.session_id, exc.sqlstate, exc.message)

    def _close(self) -> None:
        if self._compute is not None:
            self._compute.close()
        if self._stream_box:
            self._stream_box[0].close()
        else:
            self.sock.close()

    # -- steps 1–7 ---------------------------------------------------------------------

    async def _handshake(self) -> tuple[ClientHello, MessageReader, ComputeSession, int] | None:
        s = self.settings
        hello = await open_client(
            self.sock,
            server_tls=self.state.server_tls,
            allow_plaintext=s.allow_plaintext,
            tls_timeout=s.tls_timeout,
            stream_box=self._stream_box,
        )
        if hello.cancel is not None:
            target = self.state.cancels.lookup(hello.cancel.pid, hello.cancel.secret)
            if target is not None:
                await send_cancel(target)
            return None
        assert hello.startup is not None
        startup = hello.startup
        stream = hello.stream

        # Protocol version: 3.0 .. 3.2 as asked; newer minors and unknown
        # protocol options are negotiated down (PostgreSQL does the same).
        minor = min(startup.minor, NEWEST_SUPPORTED_MINOR)
        if startup.minor > NEWEST_SUPPORTED_MINOR or startup.protocol_options:
            stream.write(
                messages.negotiate_protocol_version(minor, sorted(startup.protocol_options))
            )

        # Step 3: endpoint.
        try:
            options_endpoint, options_rest = extract_endpoint_from_options(
                startup.params.get("options", "")
            )
        except ProtocolViolation as exc:
            raise ClientError(Kind.ROUTING, exc.message, sqlstate=exc.sqlstate) from None
        route = resolve(hello.tls.server_name if hello.tls else None, options_endpoint, s.domain)
        endpoint = route.endpoint_id
        user = startup.params["user"]
        self.log.endpoint, self.log.role = endpoint, user
        compute_params = forwarded_parameters(startup, options_rest)

        # Step 4 (with 5 overlapped): the verifier, and the wake started right away.
        role = await self.state.roles.get(endpoint, user, timeout=s.control_timeout)
        wake = asyncio.create_task(self._wake(endpoint), name=f"session-wake:{endpoint}")
        try:
            reader = MessageReader()
            reader.feed(hello.trailing)
            try:
                client_key = await authenticate_client(
                    stream,
                    reader,
                    user=user,
                    secret=role.secret,
                    channel_binding=hello.tls.end_point_hash if hello.tls else None,
                    mock_key=self.state.mock_key,
                    step_timeout=s.auth_step_timeout,
                )
            except ClientError as exc:
                if exc.kind is Kind.AUTH:
                    # The password may have just changed: fetch it afresh next time.
                    self.state.roles.invalidate(endpoint, user)
                raise
            stream.write(messages.auth_ok())
            assert role.secret is not None  # a mock exchange never succeeds

            # Steps 6–7: address (cached or woken) and compute login, with one retry
            # through a fresh wake when a cached address turns out stale.
            compute = await self._connect_compute(
                wake, endpoint, compute_params, user, client_key, role.secret.server_key
            )
        finally:
            wake.cancel()
        self._compute = compute
        return hello, reader, compute, minor

    async def _wake(self, endpoint: str) -> Woken:
        return await self.state.wake.address(endpoint, timeout=self.settings.wake_timeout)

    async def _await_wake(self, wake: asyncio.Task[Woken], endpoint: str, stream: Stream) -> Woken:
        done, _ = await asyncio.wait({wake}, timeout=self.settings.wake_notice_after)
        if not done:
            stream.write(
                messages.notice_response(f'waking endpoint "{endpoint}"; the database is starting')
            )
        return await wake

    async def _connect_compute(
        self,
        wake: asyncio.Task[Woken],
        endpoint: str,
        params: dict[str, str],
        user: str,
        client_key: bytes,
        server_key: bytes,
    ) -> ComputeSession:
        stream = self._stream_box[0]
        woken = await self._await_wake(wake, endpoint, stream)
        for attempt in range(4):
            self.log.cold_start = woken.cold_start
            try:
                return await login(
                    woken.address,
                    params,
                    user=user,
                    client_key=client_key,
                    server_key=server_key,
                    connect_timeout=self.settings.compute_connect_timeout * (attempt + 1),
                    login_timeout=self.settings.compute_login_timeout,
                )
            except ComputeUnreachable as exc:
                log.info("session %d: compute %s unreachable: %s",
                         self.log.session_id, woken.address, exc)
            except ComputeRejected as exc:
                # 57P03: starting up or shutting down (a suspend raced us); 28P01
                # from a *cached* address: the port now belongs to another compute.
                stale = exc.sqlstate == "57P03" or (
                    exc.sqlstate in ("28P01", "28000") and woken.cold_start == "cached"
                )
                if not stale:
                    raise ClientError(
                        Kind.COMPUTE, exc.fields.get("M", "compute refused the connection"),
                        sqlstate=exc.sqlstate, hint=exc.fields.get("H"),
                        detail=exc.fields.get("D"),
                    ) from None
            self.state.wake.invalidate(endpoint)
            if attempt:
                await asyncio.sleep(0.02 * 2**attempt)  # backoff after the immediate retry
            woken = await self._await_wake(
                asyncio.create_task(self._wake(endpoint)), endpoint, stream
            )
        raise ClientError(
            Kind.WAKE,
            f'endpoint "{endpoint}" is not accepting connections yet',
            hint="Retry the connection.",
        )

    # -- steps 8–9 -------------------------------------------------------------------

    async def _splice(
        self, hello: ClientHello, reader: MessageReader, compute: ComputeSession, minor: int
    ) -> None:
        stream = hello.stream
        for message in compute.parameters:
            stream.write(message)
        for message in compute.notices:
            stream.write(message)
        target = CancelTarget(compute.address, compute.backend_pid, compute.backend_secret)
        key = self.state.cancels.issue(target, long_secret=minor >= 2)
        stream.write(messages.backend_key_data(key.pid, key.secret))
        stream.write(messages.ready_for_query(b"I"))
        assert stream.transport is not None
        splice = Splice(stream.transport, compute.transport)
        self.state.splices.add(splice)
        try:
            splice.start(
                client_pending=reader.take_trailing() + stream.take_buffered(),
                compute_pending=compute.trailing,
            )
            result = await splice.wait()
        finally:
            self.state.splices.discard(splice)
            self.state.cancels.release(key)
        self.log.bytes_in, self.log.bytes_out = result.bytes_from_client, result.bytes_from_compute
        if result.closed_by == "client" and not result.client_terminated:
            # The client vanished, perhaps mid-query: don't let the query run on.
            await send_cancel(target)


def forwarded_parameters(startup: StartupMessage, options_rest: str) -> dict[str, str]:
    """The startup parameters the compute sees: ours stripped, protocol options dropped."""
    params = {k: v for k, v in startup.params.items() if k != "options"}
    params.setdefault("database", params["user"])
    if options_rest.strip():
        params["options"] = options_rest
    return params


def mock_key_from(secret: bytes) -> bytes:
    return hashlib.sha256(b"pgwake mock scram" + secret).digest()


