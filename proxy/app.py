"""The proxy server: listener, live-session registry, drain on shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import socket
import time

from prometheus_client import CollectorRegistry

from proxy.activity import report_activity
from proxy.cancel import CancelMap
from proxy.connlog import ConnectionLog
from proxy.dataplane import open_plane
from proxy.evict import Evictor
from proxy.guards import ConnectionGuards
from proxy.metrics import ProxyMetrics
from proxy.ratelimit import FrontDoorLimits
from proxy.rolecache import RoleCache
from proxy.session import Session, mock_key_from
from proxy.sessionstate import SessionCounts, SessionRegistry
from proxy.settings import ProxySettings
from proxy.shared import LocalShared, RedisShared, open_shared
from proxy.splice import SHUTDOWN_ERROR, SessionEnding
from proxy.state import ProxyState
from proxy.wake import WakeClient
from tls.context import ServerTLS
from tls.reload import CertificateReloader
from wakeup.api import ComputeAddress, ControlClient

log = logging.getLogger(__name__)


class ProxyServer:
    """Accepts connections and runs a Session per connection until drained."""

    def __init__(
        self,
        settings: ProxySettings,
        *,
        control: ControlClient,
        server_tls: ServerTLS | None,
        metrics: ProxyMetrics | None = None,
        connection_log: ConnectionLog | None = None,
        limits: FrontDoorLimits | None = None,
    ):
        self.settings = settings
        self.control = control
        self.shared = open_shared(settings.redis_url)
        metrics = metrics or ProxyMetrics(CollectorRegistry())
        role_lookups = metrics.cache_requests
        self.state = ProxyState(
            settings=settings,
            server_tls=server_tls,
            wake=WakeClient(control, self.shared, settings),
            roles=RoleCache(
                control,
                settings.role_cache_ttl,
                refresh_after=settings.role_cache_refresh,
                max_entries=settings.role_cache_max_entries,
                max_stale=settings.role_cache_max_stale,
                outage_retry=settings.negative_cache_ttl,
                count=lambda outcome: role_lookups.labels("role", outcome).inc(),
            ),
            cancels=CancelMap(self.shared),
            mock_key=mock_key_from(os.urandom(32)),
            metrics=metrics,
            connection_log=connection_log or ConnectionLog(),
            limits=limits or FrontDoorLimits.local(settings.limits),
        )
        # Several cert/key pairs are one ServerTLS; the reloader watches all their files.
        self.reloader = CertificateReloader(server_tls) if server_tls is not None else None
        self._reload_stop = asyncio.Event()
        self._reload_task: asyncio.Task[None] | None = None
        self._listener: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._activity_task: asyncio.Task[None] | None = None
        self._survey_task: asyncio.Task[None] | None = None
        self._evictor: Evictor | None = None
        self._asking: set[asyncio.Task[None]] = set()  # surveys after an invalidation
        if isinstance(self.shared, RedisShared):
            self.shared.local.on_forget.append(self._address_forgotten)
        elif isinstance(self.shared, LocalShared):
            self.shared.on_forget.append(self._address_forgotten)
        self.listening = asyncio.Event()
        self.state.metrics.watch(self)
        # The data path (proxy/dataplane.py): the native engine when built (or asked
        # for), else the Python splice; `data_plane` says which, for banners and logs.
        self.data_plane, self.state.plane = open_plane(
            settings.data_plane, settings.data_plane_threads, server_tls
        )

    # -- what /metrics reads at scrape time (proxy.metrics.RuntimeSources) --------------

    def shared_errors(self) -> int:
        return self.shared.errors

    def shared_degraded(self) -> bool:
        return bool(getattr(self.shared, "degraded", False))

    def handshakes(self) -> int:
        return self.state.handshakes

    def sessions_queued(self) -> int:
        return self.state.guards.queued_total

    def sessions_refused(self) -> int:
        return self.state.guards.refused_total

    def wake_calls(self) -> int:
        return self.state.wake.wake_calls

    def stale_addresses_served(self) -> int:
        return self.state.wake.stale_served

    # -- what the control plane pushes when it runs in this process (`pgwake up`) ------

    async def endpoint_ready(
        self, endpoint_id: str, role: str, verifier: str, address: ComputeAddress,
        generation: int, budget: int | None = None,
    ) -> None:
        """A new endpoint: cache its owner's verifier and its address (with the
        compute's connection budget) before any client asks, so its first connect
        makes no control-API call."""
        self.state.roles.put(endpoint_id, role, verifier)
        await self.state.wake.prime(endpoint_id, address, generation, budget)

    def _invalidated_by_report(self, endpoint_id: str, seconds_ago: float) -> None:
        # With Redis, invalidations arrive by pub/sub at once; without it, here.
        if isinstance(self.shared, LocalShared):
            self.shared.forget_older(endpoint_id, seconds_ago)

    async def address_invalid(self, endpoint_id: str) -> None:
        """Suspended or deleted: the next connect wakes instead of trying a dead port."""
        await self.state.wake.invalidate(endpoint_id)

    def _address_forgotten(self, endpoint_id: str) -> None:
        """The endpoint's address was invalidated: its compute may be about to go
        (a suspend, a resize's freeze). Learn at once what its idle sessions hold,
        rather than after `survey_after`, and tell the control plane now, so that a
        handoff's drain need not wait for them and they park when the compute stops."""
        if not self.settings.park_sessions or self.state.ending is not None:
            return
        if not self.state.registry.sessions(endpoint_id):
            return
        self.state.registry.hold(endpoint_id)
        task = asyncio.get_running_loop().create_task(
            self._ask_and_report(endpoint_id), name=f"proxy-survey:{endpoint_id}"
        )
        self._asking.add(task)
        task.add_done_callback(self._asking.discard)

    async def _ask_and_report(self, endpoint_id: str) -> None:
        try:
            await self.state.registry.survey(
                endpoint_id, timeout=self.settings.survey_timeout, stale_only=True
            )
        finally:
            self.state.activity.report_now.set()

    def compute_full_retries(self) -> int:
        return self.state.guards.compute_full_total

    def cancels_dropped(self) -> int:
        return self.state.cancels.rate_limited + int(getattr(self.shared, "cancel_drops", 0))

    def sessions_by_state(self) -> dict[str, int]:
        return self.state.registry.totals()

    def session_counts(self) -> dict[str, SessionCounts]:
        """Per endpoint: this proxy's sessions attached, parked and pinned (for the
        activity report and status)."""
        return self.state.registry.counts()

    @property
    def port(self) -> int:
        assert self._listener is not None
        port: int = self._listener.getsockname()[1]
        return port

    async def start(self, sock: socket.socket | None = None) -> None:
        """Listen on `sock` (already bound) or bind the configured address."""
        s = self.settings
        if sock is None:
            family = socket.AF_INET6 if ":" in s.listen_host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((s.listen_host, s.listen_port))
            sock.listen(s.backlog)
        sock.setblocking(False)
        raise_open_file_limit()
        self._listener = sock
        if self.state.plane is not None:
            self.state.plane.start()
        if self.reloader is not None and s.cert_reload_interval > 0:
            self._reload_task = asyncio.create_task(
                self.reloader.run(s.cert_reload_interval, self._reload_stop),
                name="proxy-cert-reload",
            )
        await self.shared.start()
        self.state.guards = ConnectionGuards(
            shared=self.shared,
            endpoint_cap=s.endpoint_client_cap,
            queue_timeout=s.endpoint_queue_timeout,
            connect_concurrency=s.compute_connect_concurrency,
        )
        self.state.guards.start()
        if s.park_sessions:
            self._evictor = Evictor(
                self.state.registry, self.state.guards, self.state.metrics,
                probe_timeout=s.survey_timeout,
            )
            self.state.guards.make_room = self._evictor.make_room
        # Accept only once the shared state and the guards every session uses are set.
        self._accept_task = asyncio.create_task(self._accept_loop(sock), name="proxy-accept")
        self._activity_task = asyncio.create_task(
            report_activity(
                self.control, self.state.guards.counts, self.state.activity,
                s.activity_interval, self._invalidated_by_report,
                self.session_counts if s.park_sessions else None,
                self.state.registry.set_resizing,
            ),
            name="proxy-activity",
        )
        if s.park_sessions:
            self._survey_task = asyncio.create_task(
                survey_sessions(self.state.registry, s), name="proxy-session-survey"
            )
        self.listening.set()
        log.info("proxy listening on %s:%d; data plane: %s", s.listen_host, self.port,
                 self.data_plane.detail)

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, addr = await loop.sock_accept(listener)
            except OSError as exc:
                # EMFILE and friends: keep serving the connections we have.
                log.warning("accept failed: %s", exc)
                await asyncio.sleep(0.05)
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer = f"{addr[0]}:{addr[1]}"
            task = asyncio.create_task(Session(self.state, sock, peer).run())
            self.state.sessions.add(task)
            task.add_done_callback(self.state.sessions.discard)

    def reload_certificates(self) -> bool:
        """Check the certificate files now (SIGHUP); True if any was swapped in.

        New handshakes get the new certificate; live connections keep theirs.
        """
        return self.reloader.check() if self.reloader is not None else False

    async def stop_accepting(self) -> None:
        self.listening.clear()
        if self._accept_task is not None:
            self._accept_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accept_task
            self._accept_task = None
        if self._listener is not None:
            self._listener.close()

    async def drain(self, timeout: float | None = None) -> None:
        """Stop accepting; give live sessions `timeout` to end, then cut them."""
        self.listening.clear()  # not ready: load balancers stop sending new clients
        await self.stop_accepting()
        timeout = self.settings.drain_timeout if timeout is None else timeout
        if self._survey_task is not None:
            self._survey_task.cancel()  # no more probes on sessions being ended
        for task in list(self._asking):
            task.cancel()
        sessions = set(self.state.sessions)
        if sessions:
            log.info("draining %d sessions (up to %.0f s)", len(sessions), timeout)
            # Idle sessions end at once, busy ones at their next idle point; at the
            # deadline the rest end at the next message boundary (their running
            # query is cancelled on the compute). Each gets 57P01, never a bare EOF.
            self.state.ending = ending = SessionEnding(SHUTDOWN_ERROR)
            for splice in list(self.state.splices):
                ending.apply(splice)
            for parked in list(self.state.parked):
                parked.write(SHUTDOWN_ERROR)  # a parked session is always between messages
                parked.close()
            _, pending = await asyncio.wait(sessions, timeout=timeout)
            if pending:
                ending.when_idle = False
                for splice in list(self.state.splices):
                    ending.apply(splice)
                _, pending = await asyncio.wait(pending, timeout=self.settings.drain_grace)
            for splice in list(self.state.splices):
                splice.abort()
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._survey_task is not None:
            self._survey_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._survey_task
        await self.state.wake.close()
        await self.state.roles.close()
        if self._evictor is not None:
            await self._evictor.close()
        await self.state.guards.close()
        if self._activity_task is not None:
            self._activity_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._activity_task
        await self.shared.close()
        if self.state.plane is not None:
            self.state.plane.close()
            self.state.plane = None
        self._reload_stop.set()
        if self._reload_task is not None:
            await self._reload_task
            self._reload_task = None


def raise_open_file_limit(ceiling: int = 1 << 20) -> int:
    """Raise the soft limit on open files to the hard limit (each client costs a descriptor,
    and a 1024 default is a few hundred stalled clients); return the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = ceiling if hard == resource.RLIM_INFINITY else min(hard, ceiling)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open file limit from %d to %d: %s", soft, target, exc)
            return soft
        return target
    return soft


async def survey_sessions(registry: SessionRegistry, settings: ProxySettings) -> None:
    """The sessions' janitor: learn, from the compute, the state of every session
    that has gone idle, so it can park when its compute goes away."""
    while True:
        await asyncio.sleep(settings.survey_after / 2)
        try:
            await registry.survey_idle(
                now=time.monotonic(), idle_for=settings.survey_after,
                timeout=settings.survey_timeout,
            )
        except Exception:
            log.exception("session survey failed")
