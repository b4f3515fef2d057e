"""One client connection, start to end: the connection path of DESIGN.md, step by step."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

from proxy.attach import Credentials, RestoreFailed, lossy_listen, restore, wait_for_client
from proxy.auth import authenticate_client, read_cleartext_password, verify_cleartext
from proxy.cancel import CancelTarget, send_cancel
from proxy.clientparams import forwarded_parameters
from proxy.compute import (
    ComputeRejected,
    ComputeSession,
    ComputeUnreachable,
    finish_login,
    login,
    open_session,
)
from proxy.connlog import SessionLog
from proxy.errors import ClientError, Kind
from proxy.guards import Slot
from proxy.handshake import ClientHello, open_client
from proxy.nativesplice import AnySplice, NativeSplice
from proxy.nativetransport import NativeTransport
from proxy.pgwire import messages
from proxy.pgwire.codec import MessageReader
from proxy.pgwire.errors import ProtocolViolation
from proxy.pgwire.startup import (
    NEWEST_SUPPORTED_MINOR,
    extract_endpoint_from_options,
    extract_option,
)
from proxy.ratelimit import (
    auth_failure_key,
    role_failure_key,
    whole_seconds,
)
from proxy.routing import (
    PasswordForm,
    parse_password_form,
    resolve_optional,
    resolve_with_password,
)
from proxy.sessionstate import SessionSnapshot
from proxy.splice import Splice, SpliceResult
from proxy.state import ProxyState
from proxy.stream import PeerClosed, Stream
from proxy.timing import Timeline
from proxy.wake import Woken
from wakeup.api import ROLE_NAME_RULE, as_postgres_name, valid_role_name

log = logging.getLogger(__name__)
_session_ids = itertools.count(1)


class Session:
    def __init__(self, state: ProxyState, sock: socket.socket, peer: str):
        self.state = state
        self.settings = state.settings
        self.sock = sock
        self.log = SessionLog(next(_session_ids), peer)
        self._stream_box: list[Stream] = []
        self._compute: ComputeSession | None = None
        self._slot: Slot | None = None  # this session's place under the endpoint's budget
        self._deadline = 0.0  # the handshake deadline (event loop time)
        self.want_timing = False
        self.lossy_listen = False  # options=pgwake_listen=lossy (proxy/attach.py)
        self.timeline = Timeline()
        self._credentials: Credentials | None = None  # to log in again after parking

    async def run(self) -> None:
        self.timeline = Timeline()
        loop = asyncio.get_running_loop()
        self._deadline = deadline = loop.time() + self.settings.handshake_timeout
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
            # Handed over in a box the splice empties: a session may idle (parked) for
            # hours, and what only the handshake needed should not idle with it.
            box, spliced = [spliced], None
            await self._splice(box)
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
        entry.ready_s = self.timeline.total
        entry.phases = dict(self.timeline.parts)
        cached = entry.cold_start == "cached"
        # A cached address means no wake was needed: the compute was warm.
        cold_start = "warm" if cached else (entry.cold_start or "unknown")
        assert entry.ready_s is not None
        metrics.connect_latency.labels(cold_start, "ok", "none").observe(entry.ready_s)
        metrics.connect_latency.labels(cold_start, "ok", "client").observe(
            max(entry.ready_s - entry.client_wait_s, 0.0)
        )
        metrics.cache_requests.labels("address", "hit" if cached else "miss").inc()
        for phase, seconds in entry.phases.items():
            metrics.connect_phase.labels(phase, cold_start).observe(seconds)

    def _fail(self, exc: ClientError) -> None:
        self.log.sqlstate = exc.sqlstate
        self.log.outcome = exc.kind.value
        elapsed = self.timeline.clock() - self.timeline.started
        self.log.phases = dict(self.timeline.parts)
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
        if self._slot is not None:
            self.state.activity.session_ended(self._slot.endpoint_id)
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
            plane=self.state.plane,
        )
        if hello.tls_done is not None:
            self.timeline.mark("tls", at=hello.tls_done)
        self.timeline.mark("startup")
        if hello.cancel is not None:
            # Paced per source address before any lookup, so a flood of made-up
            # keys never reaches the shared state; like PostgreSQL, no answer either way.
            cancels = self.state.cancels
            if cancels.admit(self.log.client.rpartition(":")[0]):
                target = await cancels.lookup(hello.cancel.pid, hello.cancel.secret)
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
            listen, options_rest = extract_option(options_rest, "pgwake_listen")
            self.lossy_listen = lossy_listen(listen)
        except ProtocolViolation as exc:
            raise ClientError(Kind.ROUTING, exc.message, sqlstate=exc.sqlstate) from None
        user = as_postgres_name(startup.params["user"])
        if not valid_role_name(user):
            # It cannot be a role anywhere (the control API's own rule), so saying so
            # reveals nothing; it never reaches a cache key, a URL or a log line.
            raise ClientError(
                Kind.AUTH,
                f'role "{user}" does not exist',
                sqlstate="28000",
                detail=f"This name cannot be a role: {ROLE_NAME_RULE}.",
            )
        reader = MessageReader()
        reader.feed(hello.trailing)
        route = resolve_optional(
            hello.tls.server_name if hello.tls else None, options_endpoint, s.domain
        )
        password_form: PasswordForm | None = None
        self.timeline.mark("admit")
        if route is None:
            # Neither SNI nor options: the password form `endpoint=<id>;<password>`.
            # Only asked for over TLS (or where plaintext was explicitly allowed).
            password = await read_cleartext_password(
                stream, reader, step_timeout=s.auth_step_timeout
            )
            password_form = parse_password_form(password)
            self.timeline.mark("auth")
        route = resolve_with_password(route, password_form, s.domain)
        endpoint = route.endpoint_id
        self.log.endpoint, self.log.role = endpoint, user
        compute_params = forwarded_parameters(startup, options_rest)
        failure_keys = (
            auth_failure_key(self.log.client.rpartition(":")[0], endpoint),
            role_failure_key(endpoint, user),
        )
        await self._admit(endpoint, user, failure_keys)
        self.timeline.mark("admit")

        # Step 4 (with 5 overlapped): the wake starts only once the role is known
        # to exist (a stranger with a made-up name wakes nothing), and with SCRAM
        # only after the server-first message is out, so that it overlaps the
        # client's proof computation. An unknown role on an awake compute gets
        # the same early compute connection as a real one (as PostgreSQL forks a
        # backend before it knows the role): the two paths do the same work and
        # cannot be told apart by timing.
        wake: asyncio.Task[Woken] | None = None
        lookup: asyncio.Task[Woken | None] | None = None
        early: asyncio.Task[ComputeSession | None] | None = None
        compute: ComputeSession | None = None

        def start_wake() -> None:
            nonlocal wake, lookup, early
            if wake is not None or lookup is not None:
                return
            if role.secret is not None:
                wake = asyncio.create_task(self._wake(endpoint), name=f"session-wake:{endpoint}")
                lookup = wake
            else:
                lookup = asyncio.create_task(self._cached_only(endpoint))
            if password_form is None:
                early = asyncio.create_task(self._open_early(lookup, endpoint, compute_params))

        try:
            role = await self.state.roles.get(endpoint, user, timeout=s.control_timeout)
            self.timeline.mark("verifier")
            try:
                if password_form is not None:
                    start_wake()  # the password check below takes a PBKDF2's time
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
                        after_server_first=start_wake,
                    )
            except ClientError as exc:
                if exc.kind is Kind.AUTH:
                    # The password may have just changed: fetch it afresh next time.
                    self.state.roles.invalidate(endpoint, user)
                    limits = self.state.limits
                    await limits.auth_failures.record_failure(failure_keys[0])
                    await limits.role_failures.record_failure(failure_keys[1])
                raise
            stream.write(messages.auth_ok())
            self.timeline.mark("auth")
            assert role.secret is not None and wake is not None  # a mock never succeeds

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
            if lookup is not None:
                lookup.cancel()
                if lookup.done() and not lookup.cancelled():
                    lookup.exception()  # retrieved: after a failed auth it is no news
        self._compute = compute
        self._credentials = Credentials(
            compute_params, user, client_key, role.secret.server_key
        )
        return hello, reader, compute, minor

    async def _admit(self, endpoint: str, user: str, failure_keys: tuple[str, str]) -> None:
        """The front-door limits, checked before anything costs (a verifier fetch, a wake).

        Failures count per client address and per role: one address guessing many
        roles, and many addresses guessing one role, both run out. Unknown roles
        count alike, so a refusal says nothing about whether the role exists."""
        limits = self.state.limits
        by_address, by_role = failure_keys
        wait = await limits.auth_failures.retry_after(by_address)
        if wait > 0:
            raise ClientError(
                Kind.TOO_MANY,
                "too many failed authentication attempts; "
                f"retry in {whole_seconds(wait)} s",
            )
        wait = await limits.role_failures.retry_after(by_role)
        if wait > 0:
            raise ClientError(
                Kind.TOO_MANY,
                f'too many failed authentication attempts for role "{user}" of endpoint '
                f'"{endpoint}"; retry in {whole_seconds(wait)} s',
            )
        if self.state.registry.sessions(endpoint) >= self.settings.max_sessions_per_endpoint:
            raise ClientError(
                Kind.TOO_MANY,
                f'too many client sessions for endpoint "{endpoint}" on this proxy '
                f"(limit {self.settings.max_sessions_per_endpoint})",
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
        if self._credentials is not None and self._compute is None:
            # A parked session re-attaching: its client is mid-session and sees
            # latency only (a NOTICE would land in the middle of its output).
            return await wake
        done, _ = await asyncio.wait({wake}, timeout=self.settings.wake_notice_after)
        if not done:
            # Slow: say "waking" only if a compute is really being started (an active
            # endpoint's lookup can be slow too, and the NOTICE shows up in output).
            starting = asyncio.create_task(
                self.state.wake.starting(endpoint, timeout=self.settings.control_timeout)
            )
            try:
                await asyncio.wait({wake, starting}, return_when=asyncio.FIRST_COMPLETED)
                if not wake.done() and await starting:
                    stream.write(messages.notice_response(
                        f'waking endpoint "{endpoint}"; the database is starting'
                    ))
            finally:
                starting.cancel()
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
        timeline = self.timeline
        woken = await self._await_wake(wake, endpoint, stream)
        timeline.mark("wake")
        guards = self.state.guards
        loop = asyncio.get_running_loop()
        opened: ComputeSession | None = None
        if early is not None:
            with contextlib.suppress(ComputeUnreachable, ClientError):
                opened = await early  # an early failure is retried below, as usual
        # A session slot under the compute's budget (shared by all replicas; queueing,
        # then 53300 just before the handshake deadline), held to the session's end.
        if self._slot is None:
            self._slot = await guards.acquire(
                endpoint, woken.budget, timeout=self._deadline - loop.time() - 0.05)
            self.state.activity.session_started(endpoint)
        timeline.mark("queue")
        attempt = full = 0
        while attempt < 4:
            self.log.cold_start = woken.cold_start
            try:
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
                timeline.mark("compute")
                return session
            except ComputeUnreachable as exc:
                log.info("session %d: compute %s unreachable: %s",
                         self.log.session_id, woken.address, exc)
            except ComputeRejected as exc:
                if exc.sqlstate == "53300":
                    # The compute is full with sessions the budget did not see (a replica
                    # that lost Redis, direct clients): wait for room, within the deadline.
                    full += 1
                    if await guards.compute_full(endpoint, full, self._deadline - 0.05):
                        continue
                    raise ClientError(
                        Kind.TOO_MANY, exc.fields.get("M", "too many connections"),
                        sqlstate=exc.sqlstate, hint="Close idle connections or use a "
                        "connection pool.",
                    ) from None
                # 57P03/57P01: starting up or shutting down (a suspend raced us);
                # 28P01 from a *cached* address: the port now belongs to another compute.
                stale = exc.sqlstate in ("57P03", "57P01") or (
                    exc.sqlstate in ("28P01", "28000") and woken.cold_start in ("cached", "stale")
                )
                if not stale:
                    raise ClientError(
                        Kind.COMPUTE, exc.fields.get("M", "compute refused the connection"),
                        sqlstate=exc.sqlstate, hint=exc.fields.get("H"),
                        detail=exc.fields.get("D"),
                    ) from None
            timeline.mark("compute")
            await self.state.wake.invalidate(endpoint)
            if attempt:
                await asyncio.sleep(0.02 * 2**attempt)  # backoff after the immediate retry
            attempt += 1
            woken = await self._await_wake(
                asyncio.create_task(self._wake(endpoint)), endpoint, stream
            )
            timeline.mark("wake")
        raise ClientError(
            Kind.WAKE,
            f'endpoint "{endpoint}" is not accepting connections yet',
            hint="Retry the connection.",
        )

    async def _cached_only(self, endpoint: str) -> Woken | None:
        """The compute's address if it is awake and cached; never a wake."""
        cached = await self.state.wake.shared.get_address(endpoint)
        return None if cached is None else Woken(cached.address, "cached", cached.generation)

    async def _open_early(
        self, wake: asyncio.Task[Woken] | asyncio.Task[Woken | None], endpoint: str,
        params: dict[str, str],
    ) -> ComputeSession | None:
        """Step 7 begun during step 4: when the compute is already awake (a cached
        address) and a session slot is free now, connect and send the startup packet
        while the client does its SCRAM, so the compute's fork and backend start
        overlap the client's round trips. Anything less certain waits for auth."""
        woken = await wake
        if woken is None or woken.cold_start != "cached":
            return None
        if self._slot is None:
            self._slot = await self.state.guards.try_acquire(endpoint, woken.budget)
            if self._slot is None:
                return None
            self.state.activity.session_started(endpoint)
        async with self.state.guards.connecting(woken.address):
            return await open_session(
                woken.address, params, connect_timeout=self.settings.compute_connect_timeout
            )

    # -- steps 8–9 -------------------------------------------------------------------

    async def _splice(
        self, box: list[tuple[ClientHello, MessageReader, ComputeSession, int]]
    ) -> None:
        hello, reader, compute, minor = box.pop()
        stream = hello.stream
        del hello  # the startup packet and the TLS facts: not needed from here on
        target = CancelTarget(compute.address, compute.backend_pid, compute.backend_secret)
        key = await self.state.cancels.issue(target, long_secret=minor >= 2)
        greeting = [*compute.parameters, *compute.notices,
                    messages.backend_key_data(key.pid, key.secret)]
        self.timeline.mark("finish")
        self._observe_ready()
        if self.want_timing:
            greeting.extend(self._timing_messages())
        greeting.append(messages.ready_for_query(b"I"))
        # One write: one TLS record and one syscall for the ~15 messages, not one each.
        stream.write(b"".join(greeting))
        del greeting
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
        del reader
        try:
            while True:
                splice = self._new_splice(stream, compute, lost_error, park)
                result, snapshot = await self._run_splice(
                    splice, endpoint, client_pending, compute
                )
                if not result.parked:
                    break
                # Parked: no backend, no slot, until the client's next message; nor
                # the ended splice and the compute session's objects.
                del splice, compute
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

    def _new_splice(
        self, stream: Stream, compute: ComputeSession, lost_error: bytes,
        park: tuple[Stream, Callable[[Any], bool]] | None,
    ) -> AnySplice:
        """Step 8 on the session's data path: the native engine's when it owns the
        client (proxy/nativesplice.py), else the Python splice."""
        plane, client = self.state.plane, stream.transport
        if plane is not None and isinstance(client, NativeTransport):
            return NativeSplice(plane, client, compute.transport, lost_error, park=park)
        assert client is not None
        return Splice(client, compute.transport, lost_error, park=park)

    async def _run_splice(
        self, splice: AnySplice, endpoint: str, client_pending: bytes, compute: ComputeSession
    ) -> tuple[SpliceResult, SessionSnapshot | None]:
        self.state.splices.add(splice)
        self.state.registry.add(endpoint, splice, lossy_listen=self.lossy_listen)
        self.state.activity.attach(endpoint, splice)
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
            self.state.activity.detach(splice)
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
        # The slot queue inside _connect_compute waits up to this deadline, as a
        # connect does up to the handshake's.
        self._deadline = asyncio.get_running_loop().time() + self.settings.wake_timeout
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


    def _timing_messages(self) -> list[bytes]:
        """`options=pgwake_timing=on`: the connect-time breakdown (parts that add up to
        the total), for programs (ParameterStatus `pgwake.timing`) and for people (a
        NOTICE psql prints)."""
        cold_start = self.log.cold_start or "-"
        breakdown = f"{self.timeline.text()} cold_start={cold_start}"
        return [
            messages.parameter_status("pgwake.timing", breakdown),
            messages.parameter_status("pgwake.cold_start", cold_start),
            messages.notice_response(f"pgwake connect timing: {breakdown}"),
        ]


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


