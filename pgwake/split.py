"""Split deployment: `pgwake control` (control plane only) and `pgwake proxy` (proxy only)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import resource
import signal
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry

from pgwake import datadir
from pgwake.instance import InstanceLock, bind_listener
from proxy.app import ProxyServer
from proxy.connlog import ConnectionLog
from proxy.metrics import ProxyMetrics, serve_metrics
from proxy.settings import ProxySettings
from tls.certs import CertPair
from tls.context import ServerTLS
from wakeup.api import ControlClient
from wakeup.control import ControlSettings
from wakeup.provisioners.k8s_api import KubeSettings
from wakeup.provisioners.k8s_objects import ComputeSpec
from wakeup.provisioners.kubernetes import KubernetesSettings
from wakeup.service import ControlService, ControlServiceSettings
from wakeup.urls import PublicAddress

log = logging.getLogger(__name__)


def raise_nofile_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit: a proxy holds two sockets per client."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


@dataclass(frozen=True)
class ProxyRunSettings:
    proxy: ProxySettings
    control_url: str
    api_key: str
    tls: CertPair | None
    metrics: tuple[str, int] | None = None  # where to serve Prometheus /metrics
    log_format: str = "text"


def proxy_run_settings(
    proxy: ProxySettings,
    *,
    control_url: str | None,
    data_dir: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    api_key: str | None,
    metrics: tuple[str, int] | None = None,
    log_format: str = "text",
) -> ProxyRunSettings:
    """Where the proxy's certificate, API key and control API come from.

    `--data-dir` of a `pgwake up`/`pgwake control` on this machine supplies all
    three; elsewhere `--tls-cert/--tls-key`, `PGWAKE_API_KEY` and `--control-url`.
    """
    pair = CertPair(tls_cert, tls_key) if tls_cert and tls_key else None
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    if data_dir is not None:
        if pair is None:
            pair = datadir.dev_certificates(data_dir, proxy.domain).server
        if api_key is None:
            key_file = data_dir / datadir.API_KEY_FILE
            if key_file.exists():
                api_key = key_file.read_text().strip()
        if control_url is None:
            state = datadir.RunState.read(data_dir)
            control_url = state.api_url if state else None
    if control_url is None:
        raise ValueError("no control API: give --control-url (or --data-dir of a running one)")
    if api_key is None:
        raise ValueError("no API key: set PGWAKE_API_KEY (or give --data-dir)")
    if pair is None and not proxy.allow_plaintext:
        raise ValueError("no certificate: give --tls-cert and --tls-key (or --data-dir)")
    return ProxyRunSettings(proxy, control_url, api_key, pair, metrics, log_format)


async def run_proxy(settings: ProxyRunSettings) -> None:
    raise_nofile_limit()
    stop = _stop_event()
    server_tls = (
        await asyncio.to_thread(ServerTLS.load, [settings.tls]) if settings.tls else None
    )
    registry = CollectorRegistry()
    async with ControlClient(settings.control_url, settings.api_key) as control:
        proxy = ProxyServer(
            settings.proxy, control=control, server_tls=server_tls,
            metrics=ProxyMetrics(registry), connection_log=ConnectionLog(settings.log_format),
        )
        p = settings.proxy
        await proxy.start(bind_listener(p.listen_host, p.listen_port, "--listen", p.backlog))
        metrics_server = None
        if settings.metrics is not None:
            metrics_server = await serve_metrics(
                registry, *settings.metrics, ready=proxy.listening.is_set
            )
        # Parseable lines: tests and scripts binding port 0 read the ports from them.
        print(f"pgwake proxy listening on {settings.proxy.listen_host}:{proxy.port}", flush=True)
        if metrics_server is not None:
            bound = metrics_server.sockets[0].getsockname()
            print(f"pgwake proxy metrics on http://{bound[0]}:{bound[1]}/metrics", flush=True)
        try:
            await stop.wait()
        finally:
            if metrics_server is not None:
                metrics_server.close()
            await proxy.drain()


@dataclass(frozen=True)
class ControlRunSettings:
    data_dir: Path
    api: tuple[str, int]
    public: PublicAddress
    idle_timeout: float = 300.0
    api_key: str | None = None
    pg_bin: Path | None = None
    run_as: str | None = None
    port_range: tuple[int, int] = (54400, 55399)
    redis_url: str | None = None
    control_db_url: str | None = None
    extra: dict[str, object] = field(default_factory=dict)
    kubernetes: KubernetesSettings | None = None  # None: local computes


def kubernetes_settings(
    provisioner: str,
    *,
    namespace: str | None,
    kubeconfig: Path | None,
    in_cluster: bool,
    image: str,
    admin_cidrs: list[str] | None,
    client_cidrs: list[str] | None,
    storage_class: str | None = None,
    volume_size: str = "10Gi",
) -> KubernetesSettings | None:
    """`--provisioner kubernetes` and its flags, checked; None for `local`."""
    if provisioner == "local":
        if namespace or kubeconfig or in_cluster:
            raise ValueError("--namespace/--kubeconfig/--in-cluster need --provisioner kubernetes")
        return None
    if provisioner != "kubernetes":
        raise ValueError(f"--provisioner must be local or kubernetes, not {provisioner!r}")
    if not namespace:
        raise ValueError("--provisioner kubernetes needs --namespace")
    if kubeconfig is not None and in_cluster:
        raise ValueError("give --kubeconfig or --in-cluster, not both")
    for cidr in (*(admin_cidrs or ()), *(client_cidrs or ())):
        ipaddress.ip_network(cidr)  # ValueError names the bad one
    return KubernetesSettings(
        api=KubeSettings(namespace=namespace, kubeconfig=kubeconfig),
        compute=ComputeSpec(
            image=image,
            admin_cidrs=tuple(admin_cidrs or ComputeSpec.admin_cidrs),
            client_cidrs=tuple(client_cidrs or ComputeSpec.client_cidrs),
            storage_class=storage_class,
            volume_size=volume_size,
        ),
    )


async def run_control(s: ControlRunSettings) -> None:
    stop = _stop_event()
    datadir.prepare(s.data_dir)
    lock = InstanceLock(s.data_dir)
    lock.acquire()
    try:
        await _serve_control(s, stop)
    finally:
        lock.release()


async def _serve_control(s: ControlRunSettings, stop: asyncio.Event) -> None:
    key, key_file = datadir.api_key(s.data_dir, s.api_key)
    certs = await asyncio.to_thread(datadir.dev_certificates, s.data_dir, s.public.domain)
    public = PublicAddress(s.public.domain, s.public.host, s.public.port,
                           s.public.ca_file or certs.ca.cert)
    api_socket = bind_listener(*s.api, "--api")
    service = ControlService(
        ControlServiceSettings(
            data_dir=s.data_dir,
            api_host=s.api[0],
            api_port=s.api[1],
            api_key=key,
            public=public,
            local=datadir.local_settings(s.data_dir, s.pg_bin, s.run_as, s.port_range),
            control=ControlSettings(idle_timeout=s.idle_timeout),
            control_db_url=s.control_db_url,
            redis_url=s.redis_url,
            kubernetes=s.kubernetes,
        ),
        api_socket=api_socket,
    )
    await service.start()
    try:
        datadir.RunState(
            api_url=service.api_url,
            proxy=f"{public.host}:{public.port}",
            domain=public.domain,
            ca_file=str(public.ca_file),
            pid=os.getpid(),
        ).write(s.data_dir)
        print(f"pgwake control API on {service.api_url} (key: "
              f"{key_file or 'given by --api-key / PGWAKE_API_KEY'})", flush=True)
        await stop.wait()
    finally:
        await service.stop()
        (s.data_dir / datadir.STATE_FILE).unlink(missing_ok=True)


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop
