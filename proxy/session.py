"""One client connection, start to end: the connection path of DESIGN.md, step by step."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import socket
import time
from dataclasses import dataclass, field

from proxy.attach import Credentials, RestoreFailed, restore, wait_for_client
from proxy.auth import RoleCache, authenticate_client, read_cleartext_password, verify_cleartext
from proxy.cancel import CancelMap, CancelTarget, send_cancel
from proxy.compute import (
    ComputeRejected,
    ComputeSession,
    ComputeUnreachable,
    finish_login,
    login,
    open_session,
)
from proxy.connlog import ConnectionLog
from proxy.errors import ClientError, Kind
from proxy.guards import ConnectionGuards
from proxy.handshake import ClientHello, open_client
from proxy.metrics import ProxyMetrics
from proxy.pgwire import messages
from proxy.pgwire.codec import MessageReader
from proxy.pgwire.errors import ProtocolViolation
from proxy.pgwire.startup import (
    NEWEST_SUPPORTED_MINOR,
    StartupMessage,
    extract_endpoint_from_options,
    extract_option,
)
from proxy.ratelimit import FrontDoorLimits, auth_failure_key, whole_seconds
from proxy.routing import (
    PasswordForm,
    parse_password_form,
    resolve_optional,
    resolve_with_password,
)
from proxy.sessionstate import SessionRegistry, SessionSnapshot
from proxy.settings import ProxySettings
from proxy.splice import SessionEnding, Splice, SpliceResult
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
    limits: FrontDoorLimits
    metrics: ProxyMetrics
    connection_log: ConnectionLog
    sessions: set[asyncio.Task[None]] = field(default_factory=set)
    splices: set[Splice] = field(default_factory=set)
    ending: SessionEnding | None = None  # set while the proxy drains
    registry: SessionRegistry = field(default_factory=SessionRegistry)
    parked: set[Stream] = field(default_factory=set)  # clients of parked sessions
    handshakes: int = 0
    guards: ConnectionGuards = field(default_factory=ConnectionGuards)


@dataclass
class SessionLog:
    """One structured line per client connection, written when it ends."""

    session_id: int
    client: str
    endpoint: str | None = None
    role: str | None = None
    cold_start: str | None = None
    sqlstate: str | None = None
    outcome: str = "client_gone"
    # Seconds. startup: accept → StartupMessage (TLS included; the client's pace);
    # auth: the SCRAM round trips (the client's pace; the wake runs meanwhile);
    # wake_wait: waiting for the compute after auth; compute: login to it.
    startup_s: float | None = None
    auth_s: float | None = None
    wake_wait_s: float | None = None
    compute_s: float | None = None
    ready_s: float | None = None
    bytes_in: int = 0
    bytes_out: int = 0

    @property
    def client_wait_s(self) -> float:
        return (self.startup_s or 0.0) + (self.auth_s or 0.0)

    def as_dict(self) -> dict[str, object]:
        values = {k: v for k, v in self.__dict__.items()}
        for key, value in values.items():
            if isinstance(value, float):
                values[key] = round(value, 6)
        return values

    def as_text(self) -> str:
        def ms(value: float | None) -> str:
            return "-" if value is None else f"{value * 1000:.2f}"

        return (
            f"session={self.session_id} client={self.client} endpoint={self.endpoint} "
            f"role={self.role} outcome={self.outcome} cold_start={self.cold_start} "
            f"ready_ms={ms(self.ready_s)} startup_ms={ms(self.startup_s)} "
            f"auth_ms={ms(self.auth_s)} wake_wait_ms={ms(self.wake_wait_s)} "
            f"compute_ms={ms(self.compute_s)} bytes_in={self.bytes_in} "
            f"bytes_out={self.bytes_out} sqlstate={self.sqlstate or '-'}"
        )


class Session:
    def __init__(self, state: ProxyState, sock: socket.socket, peer: str):
        self.state = state
        self.settings = state.settings
        self.sock = sock
        self.log = SessionLog(next(_session_ids), peer)
        self._stream_box: list[Stream] = []
        self._compute: ComputeSession | None = None
        self._slot: str | None = None  # the endpoint whose session slot this holds
        self.want_timing = False
        self._credentials: Credentials | None = None  # to log in again after parking

    async def run(self) -> None:
        self.started = started = time.perf_counter()
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
                self.log.outcome = "cancel_request"
                return
            self.log.ready_s = time.perf_counter() - started
            self._observe_ready()
            await self._splice(*spliced)
            self.log.outcome = "ok"
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
            metrics = self.state.metrics
            metrics.connections_total.labels(self.log.outcome).inc()
            if self.log.sqlstate is not None:
                metrics.errors_total.labels(self.log.sqlstate).inc()
            self.state.connection_log.write(self.log)

    def _observe_ready(self) -> None:
        """Connect latency twice: as the client saw it, and without the client's own pace."""
        entry, metrics = self.log, self.state.metrics
        cached = entry.cold_start == "cached"
        # A cached address means no wake was needed: the compute was warm.
        cold_start = "warm" if cached else (entry.cold_start or "unknown")
        assert entry.ready_s is not None
        metrics.connect_latency.labels(cold_start, "ok", "none").observe(entry.ready_s)
        metrics.connect_latency.labels(cold_start, "ok", "client").observe(
            max(entry.ready_s - entry.client_wait_s, 0.0)
        )
        metrics.cache_requests.labels("address", "hit" if cached else "miss").inc()

    def _fail(self, exc: ClientError) -> None:
        self.log.sqlstate = exc.sqlstate
        self.log.outcome = exc.kind.value
        elapsed = time.perf_counter() - self.started
        self.state.metrics.connect_latency.labels(
            self.log.cold_start or "unknown", exc.kind.value, "none"
        ).observe(elapsed)
        if self._stream_box:
            stream = self._stream_box[0]
            stream.write(
                messages.error_response(
                    exc.sqlstate, exc.message, detail=exc.detail, hint=exc.hint
                )
            )
        log.info("session %d: %s %s", self.log.session_id, exc.sqlstate, exc.message)

    def _close(self) -> None:
        self._release_slot()
        if self._compute is not None:
            self._compute.close()
        if self._stream_box:
            self._stream_box[0].close()
        else:
            self.sock.close()

    # -- steps 1–7 ---------------------------------------------------------------------

    async def _handshake(self) -> tuple[ClientHello, MessageReader, ComputeSession, int] | None:
        s = self.settings
        if self.state.handshakes > s.max_handshakes:
            refuse_busy(self.sock)
            raise ClientError(Kind.TOO_MANY, "too many connections in the startup phase")
        hello = await open_client(
            self.sock,
            server_tls=self.state.server_tls,
            allow_plaintext=s.allow_plaintext,
            tls_timeout=s.tls_timeout,
            startup_timeout=s.startup_timeout,
            stream_box=self._stream_box,
        )
        self.log.startup_s = time.perf_counter() - self.started
        if hello.cancel is not None:
            target = await self.state.cancels.lookup(hello.cancel.pid, hello.cancel.secret)
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
            timing, options_rest = extract_option(options_rest, "pgwake_timing")
            self.want_timing = timing in ("on", "true", "1")
        except ProtocolViolation as exc:
            raise ClientError(Kind.ROUTING, exc.message, sqlstate=exc.sqlstate) from None
        user = startup.params["user"]
        reader = MessageReader()
        reader.feed(hello.trailing)
        route = resolve_optional(
            hello.tls.server_name if hello.tls else None, options_endpoint, s.domain
        )
        password_form: PasswordForm | None = None
        if route is None:
            # Neither SNI nor options: the password form `endpoint=<id>;<password>`.
            # Only asked for over TLS (or where plaintext was explicitly allowed).
            password = await read_cleartext_password(
                stream, reader, step_timeout=s.auth_step_timeout
            )
            password_form = parse_password_form(password)
        route = resolve_with_password(route, password_form, s.domain)
        endpoint = route.endpoint_id
        self.log.endpoint, self.log.role = endpoint, user
        compute_params = forwarded_parameters(startup, options_rest)
        failure_key = auth_failure_key(self.log.client.rpartition(":")[0], endpoint)
        await self._admit(endpoint, failure_key)

        # Step 4 (with 5 overlapped): the wake starts first, so that on a fresh
        # endpoint it and the verifier's fetch are concurrent control API calls.
        wake = asyncio.create_task(self._wake(endpoint), name=f"session-wake:{endpoint}")
        early: asyncio.Task[ComputeSession | None] | None = None
        compute: ComputeSession | None = None
        try:
            role = await self.state.roles.get(endpoint, user, timeout=s.control_timeout)
            if role.secret is not None and password_form is None:
                early = asyncio.create_task(self._open_early(wake, endpoint, compute_params))
            auth_started = time.perf_counter()
            try:
                if password_form is not None:
                    client_key = await verify_cleartext(
                        user, role.secret, password_form.password, mock_key=self.state.mock_key
                    )
                else:
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
                    await self.state.limits.auth_failures.record_failure(failure_key)
                raise
            stream.write(messages.auth_ok())
            self.log.auth_s = time.perf_counter() - auth_started
            assert role.secret is not None  # a mock exchange never succeeds

            # Steps 6–7: address (cached or woken) and compute login, with one retry
            # through a fresh wake when a cached address turns out stale.
            compute = await self._connect_compute(
                wake, endpoint, compute_params, user, client_key, role.secret.server_key,
                early,
            )
        finally:
            if early is not None:
                early.cancel()
                if early.done() and not early.cancelled() and early.exception() is None:
                    opened = early.result()
                    if opened is not None and opened is not compute:
                        opened.transport.abort()  # auth failed: the early login is unused
            wake.cancel()
            if wake.done() and not wake.cancelled():
                wake.exception()  # retrieved: after a failed lookup or auth it is no news
        self._compute = compute
        self._credentials = Credentials(
            compute_params, user, client_key, role.secret.server_key
        )
        return hello, reader, compute, minor

    async def _admit(self, endpoint: str, failure_key: str) -> None:
        """The front-door limits, checked before anything costs (a verifier fetch, a wake)."""
        limits = self.state.limits
        wait = await limits.auth_failures.retry_after(failure_key)
        if wait > 0:
            raise ClientError(
                Kind.TOO_MANY,
                "too many failed authentication attempts; "
                f"retry in {whole_seconds(wait)} s",
            )
        wait = await limits.connect_attempts.admit(f"connect:{endpoint}")
        if wait > 0:
            raise ClientError(
                Kind.TOO_MANY,
                f'too many connection attempts to endpoint "{endpoint}"; '
                f"retry in {whole_seconds(wait)} s",
            )

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
        early: asyncio.Task[ComputeSession | None] | None = None,
    ) -> ComputeSession:
        stream = self._stream_box[0]
        waited = time.perf_counter()
        # A session slot under the endpoint's cap (queueing, then 53300), held to the end.
        if self._slot is None:
            await self.state.guards.acquire(endpoint)
            self._slot = endpoint
        woken = await self._await_wake(wake, endpoint, stream)
        self.log.wake_wait_s = time.perf_counter() - waited
        opened: ComputeSession | None = None
        if early is not None:
            with contextlib.suppress(ComputeUnreachable, ClientError):
                opened = await early  # an early failure is retried below, as usual
        for attempt in range(4):
            self.log.cold_start = woken.cold_start
            try:
                login_started = time.perf_counter()
                async with self.state.guards.connecting(woken.address):
                    if opened is not None and opened.address == woken.address:
                        session, opened = opened, None
                        session = await finish_login(
                            session,
                            user=user,
                            client_key=client_key,
                            server_key=server_key,
                            login_timeout=self.settings.compute_login_timeout,
                        )
                    else:
                        session = await login(
                            woken.address,
                            params,
                            user=user,
                            client_key=client_key,
                            server_key=server_key,
                            connect_timeout=self.settings.compute_connect_timeout
                            * (attempt + 1),
                            login_timeout=self.settings.compute_login_timeout,
                        )
                self.log.compute_s = time.perf_counter() - login_started
                return session
            except ComputeUnreachable as exc:
                log.info("session %d: compute %s unreachable: %s",
                         self.log.session_id, woken.address, exc)
            except ComputeRejected as exc:
                # 57P03/57P01: starting up or shutting down (a suspend raced us);
                # 28P01 from a *cached* address: the port now belongs to another compute.
                stale = exc.sqlstate in ("57P03", "57P01") or (
                    exc.sqlstate in ("28P01", "28000") and woken.cold_start == "cached"
                )
                if not stale:
                    raise ClientError(
                        Kind.COMPUTE, exc.fields.get("M", "compute refused the connection"),
                        sqlstate=exc.sqlstate, hint=exc.fields.get("H"),
                        detail=exc.fields.get("D"),
                    ) from None
            await self.state.wake.invalidate(endpoint)
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

    async def _open_early(
        self, wake: asyncio.Task[Woken], endpoint: str, params: dict[str, str]
    ) -> ComputeSession | None:
        """Step 7 begun during step 4: when the compute is already awake (a cached
        address) and a session slot is free now, connect and send the startup packet
        while the client does its SCRAM, so the compute's fork and backend start
        overlap the client's round trips. Anything less certain waits for auth."""
        woken = await wake
        if woken.cold_start != "cached":
            return None
        if self._slot is None:
            if not self.state.guards.try_acquire(endpoint):
                return None
            self._slot = endpoint
        async with self.state.guards.connecting(woken.address):
            return await open_session(
                woken.address, params, connect_timeout=self.settings.compute_connect_timeout
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
        key = await self.state.cancels.issue(target, long_secret=minor >= 2)
        stream.write(messages.backend_key_data(key.pid, key.secret))
        if self.want_timing:
            self._send_timing(stream)
        stream.write(messages.ready_for_query(b"I"))
        assert stream.transport is not None and self.log.endpoint is not None
        endpoint = self.log.endpoint
        lost_error = messages.error_response(
            "08006",
            f'lost the connection to the compute of endpoint "{endpoint}"',
            hint="The database restarted or crashed; reconnect to wake it again.",
        )
        registry = self.state.registry
        park = (stream, registry.movable) if self.settings.park_sessions else None
        client_pending = reader.take_trailing() + stream.take_buffered()
        try:
            while True:
                splice = Splice(stream.transport, compute.transport, lost_error, park=park)
                result, snapshot = await self._run_splice(
                    splice, endpoint, client_pending, compute
                )
                if not result.parked:
                    break
                # Parked: no backend, no slot, until the client's next message.
                self.state.metrics.sessions_parked_total.inc()
                self._compute = None
                self._release_slot()
                registry.park(endpoint)
                self.state.parked.add(stream)
                try:
                    client_pending = await wait_for_client(stream)
                    if not client_pending:
                        return  # the client left (or said Terminate) while parked
                    compute = await self._reattach(endpoint, snapshot, stream)
                finally:
                    registry.unpark(endpoint)
                    self.state.parked.discard(stream)
                target = CancelTarget(
                    compute.address, compute.backend_pid, compute.backend_secret
                )
                await self.state.cancels.retarget(key, target)
        finally:
            await self.state.cancels.release(key)
        if result.error_sent is not None:
            self.log.sqlstate = "08006" if result.error_sent == "compute_lost" else "57P01"
        if result.query_running and result.closed_by != "compute":
            # The client vanished (or the proxy ended the session) mid-query: a backend
            # learns of a closed socket only when it next writes, so the query would
            # run on. Cancel it (DESIGN step 9).
            await send_cancel(target)

    async def _run_splice(
        self, splice: Splice, endpoint: str, client_pending: bytes, compute: ComputeSession
    ) -> tuple[SpliceResult, SessionSnapshot | None]:
        self.state.splices.add(splice)
        self.state.registry.add(endpoint, splice)
        try:
            splice.start(client_pending=client_pending, compute_pending=compute.trailing)
            self.state.metrics.connections_active.inc()
            if self.state.ending is not None:
                self.state.ending.apply(splice)
            try:
                result = await splice.wait()
            finally:
                self.state.metrics.connections_active.dec()
        finally:
            snapshot = self.state.registry.snapshot(splice)
            self.state.splices.discard(splice)
            self.state.registry.discard(endpoint, splice)
        self.log.bytes_in += result.bytes_from_client
        self.log.bytes_out += result.bytes_from_compute
        self.state.metrics.bytes_total.labels("from_client").inc(result.bytes_from_client)
        self.state.metrics.bytes_total.labels("from_compute").inc(result.bytes_from_compute)
        return result, snapshot

    async def _reattach(
        self, endpoint: str, snapshot: SessionSnapshot | None, stream: Stream
    ) -> ComputeSession:
        """A new backend for a parked session: wake, log in again with the ClientKey
        held since the handshake, restore the snapshot. Failure is a clean 08006."""
        started = time.perf_counter()
        credentials = self._credentials
        assert credentials is not None
        outcome = "error"
        try:
            wake = asyncio.create_task(self._wake(endpoint), name=f"reattach-wake:{endpoint}")
            try:
                async with asyncio.timeout(self.settings.wake_timeout):
                    compute = await self._connect_compute(
                        wake, endpoint, credentials.params, credentials.user,
                        credentials.client_key, credentials.server_key,
                    )
            finally:
                wake.cancel()
            self._compute = compute
            if snapshot is not None:
                await restore(compute, snapshot)
            outcome = "ok"
            return compute
        except RestoreFailed as exc:
            raise ClientError(
                Kind.COMPUTE, f'could not restore the session on endpoint "{endpoint}": {exc}',
                sqlstate="08006",
            ) from None
        except TimeoutError:
            raise ClientError(
                Kind.WAKE, f'endpoint "{endpoint}" did not wake in time', sqlstate="08006"
            ) from None
        finally:
            self.state.metrics.reattach_latency.labels(outcome).observe(
                time.perf_counter() - started
            )

    def _release_slot(self) -> None:
        if self._slot is not None:
            self.state.guards.release(self._slot)
            self._slot = None


    def _send_timing(self, stream: Stream) -> None:
        """`options=pgwake_timing=on`: the connect-time breakdown, for programs
        (ParameterStatus `pgwake.timing`) and for people (a NOTICE psql prints)."""
        entry = self.log
        ready = time.perf_counter() - self.started

        def ms(value: float | None) -> str:
            return "-" if value is None else f"{value * 1000:.1f}"

        breakdown = (
            f"total={ms(ready)}ms startup={ms(entry.startup_s)}ms auth={ms(entry.auth_s)}ms "
            f"wake_wait={ms(entry.wake_wait_s)}ms compute_login={ms(entry.compute_s)}ms "
            f"cold_start={entry.cold_start}"
        )
        stream.write(messages.parameter_status("pgwake.timing", breakdown))
        stream.write(messages.parameter_status("pgwake.cold_start", entry.cold_start or "-"))
        stream.write(messages.notice_response(f"pgwake connect timing: {breakdown}"))


def forwarded_parameters(startup: StartupMessage, options_rest: str) -> dict[str, str]:
    """The startup parameters the compute sees: ours stripped, protocol options dropped."""
    params = {k: v for k, v in startup.params.items() if k != "options"}
    params.setdefault("database", params["user"])
    if options_rest.strip():
        params["options"] = options_rest
    return params


def refuse_busy(sock: socket.socket) -> None:
    """Best effort, before reading anything: one small ErrorResponse, then the caller closes."""
    with contextlib.suppress(OSError):
        sock.send(
            messages.error_response(
                "53300", "too many connections in the startup phase; retry shortly"
            )
        )


def mock_key_from(secret: bytes) -> bytes:
    return hashlib.sha256(b"pgwake mock scram" + secret).digest()


