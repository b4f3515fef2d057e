"""The control half as a running service: control DB, provisioner, control plane, janitor, API."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import uvicorn
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from wakeup.control import ControlPlane, ControlSettings, EndpointReady, EndpointWoken
from wakeup.controldb import EmbeddedControlDB
from wakeup.invalidations import RedisInvalidations
from wakeup.metrics import ControlMetrics
from wakeup.pool import PoolManager, PoolSettings
from wakeup.provisioners.base import Provisioner
from wakeup.provisioners.kubernetes import KubernetesProvisioner, KubernetesSettings
from wakeup.provisioners.local import LocalProvisioner, LocalSettings
from wakeup.provisioners.pgbin import find_binaries, resolve_run_as
from wakeup.server import create_app
from wakeup.store import Store
from wakeup.suspender import Janitor
from wakeup.urls import PublicAddress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ControlServiceSettings:
    data_dir: Path
    api_host: str
    api_port: int
    api_key: str
    public: PublicAddress
    local: LocalSettings
    control: ControlSettings
    control_db_url: str | None = None  # None: run the embedded control DB
    pool: PoolSettings = field(default_factory=PoolSettings)
    redis_url: str | None = None  # publish address invalidations to proxies here
    # Set: computes are pods in this namespace (`local` then only places the
    # embedded control DB's binaries).
    kubernetes: KubernetesSettings | None = None


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn inside our loop: signals belong to the process owner, not to uvicorn."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    def install_signal_handlers(self) -> None:
        return None


class ControlService:
    def __init__(
        self,
        settings: ControlServiceSettings,
        *,
        api_socket: socket.socket | None = None,
        registry: CollectorRegistry | None = None,
    ):
        self.settings = settings
        # One registry per process: `pgwake up` shares it with the proxy, so the
        # control API's /metrics shows both halves.
        self.registry = registry or CollectorRegistry()
        self.metrics = ControlMetrics(self.registry)
        self.provisioner: Provisioner = (
            KubernetesProvisioner(settings.kubernetes) if settings.kubernetes is not None
            else LocalProvisioner(settings.local)
        )
        self.store: Store | None = None
        self.control: ControlPlane | None = None
        self.pool: PoolManager | None = None
        self.janitor: Janitor | None = None
        self.controldb: EmbeddedControlDB | None = None
        self._http: _EmbeddedUvicorn | None = None
        self._socket: socket.socket | None = api_socket
        self._tasks: list[asyncio.Task[Any]] = []
        self._stop = asyncio.Event()
        self.extra_readiness: dict[str, Any] = {}
        self._pool_stop = asyncio.Event()
        self._pool_task: asyncio.Task[None] | None = None
        self.invalidations: RedisInvalidations | None = None

    @property
    def api_port(self) -> int:
        assert self._socket is not None
        port: int = self._socket.getsockname()[1]
        return port

    @property
    def api_url(self) -> str:
        host = self.settings.api_host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        return f"http://{host}:{self.api_port}"

    async def start(self) -> None:
        s = self.settings
        await self.provisioner.prepare()
        if s.control_db_url is None:
            if isinstance(self.provisioner, LocalProvisioner):
                binaries, run_as = self.provisioner.binaries, self.provisioner.run_as
                assert binaries is not None
            else:
                binaries = await asyncio.to_thread(find_binaries, s.local.pg_bin)
                run_as = await asyncio.to_thread(resolve_run_as, s.local.run_as)
            self.controldb = EmbeddedControlDB(binaries, run_as, s.data_dir / "control")
            await self.controldb.start()
            self.store = Store(**self.controldb.connect_kwargs())
        else:
            self.store = Store(s.control_db_url)
        await self.store.open()
        self.control = ControlPlane(self.store, self.provisioner, s.control, metrics=self.metrics)
        await self.control.recover()
        if s.redis_url:
            self.invalidations = RedisInvalidations(s.redis_url)
            self.control.invalidation_listeners.append(self.invalidations)
            invalidations = self.invalidations

            async def announce(ready: EndpointReady) -> None:
                await invalidations.announce(
                    ready.endpoint_id, str(ready.address), ready.generation,
                    ready.connection_budget,
                )

            self.control.ready_listeners.append(announce)

            async def announce_woken(woken: EndpointWoken) -> None:
                await invalidations.announce(
                    woken.endpoint_id, str(woken.address), woken.generation, woken.budget
                )

            self.control.woken_listeners.append(announce_woken)
        app = create_app(
            self.control,
            api_key=s.api_key,
            public=s.public,
            readiness=self.readiness,
            metrics=self.render_metrics,
        )
        config = uvicorn.Config(
            app, host=s.api_host, port=s.api_port, log_level="warning", lifespan="off",
            access_log=False,
        )
        self._http = _EmbeddedUvicorn(config)
        # We bind the socket ourselves: the port is known (and connectable, the
        # kernel queues connections) before uvicorn's task even runs.
        if self._socket is None:
            self._socket = bind_tcp(s.api_host, s.api_port)
        self._tasks.append(
            asyncio.create_task(self._http.serve(sockets=[self._socket]), name="control-api")
        )
        self.janitor = Janitor(self.control)
        self._tasks.append(
            asyncio.create_task(self.janitor.run(self._stop), name="janitor")
        )
        if s.pool.enabled:
            self.pool = self.control.pool = PoolManager(
                self.store, self.provisioner, s.pool, metrics=self.metrics
            )
            self._pool_task = asyncio.create_task(self.pool.run(self._pool_stop), name="pool")
        log.info("control API on %s", self.api_url)

    async def render_metrics(self) -> tuple[bytes, str]:
        if self.store is not None:
            try:
                counts = await self.store.counts_by_state()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                counts = None  # the control DB is down; /readyz says so
            if counts is not None:
                for state in ("running", "stopped"):
                    self.metrics.computes.labels(state).set(counts.get(state, 0))
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    async def readiness(self) -> dict[str, bool]:
        checks = {"control_db": self.store is not None and await self.store.ping()}
        for name, check in self.extra_readiness.items():
            checks[name] = bool(check())
        return checks

    async def stop(self) -> None:
        self._stop.set()
        if self._pool_task is not None:
            # Before the computes stop: no refill may start a new one behind our back.
            self._pool_stop.set()
            await asyncio.gather(self._pool_task, return_exceptions=True)
        if self._http is not None:
            self._http.should_exit = True
        if self.control is not None:
            await self.control.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.store is not None:
            await self.store.close()
        if self.invalidations is not None:
            await self.invalidations.close()
        if self.controldb is not None:
            await self.controldb.stop()


def bind_tcp(host: str, port: int, backlog: int = 1024) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock
