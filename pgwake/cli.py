"""The `pgwake` command line (typer). CLI only: each command builds settings and calls in."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console, Group
from rich.table import Table

from pgwake import datadir
from proxy.settings import ProxySettings
from wakeup.api import SIZE_NAMES, ControlAPIError, ControlClient, Endpoint, Pool

app = typer.Typer(
    help="pgwake: a serverless front door for PostgreSQL.",
    no_args_is_help=True,
)
endpoint_app = typer.Typer(help="Create, inspect, suspend, wake and delete endpoints.",
                           no_args_is_help=True)
app.add_typer(endpoint_app, name="endpoint")
certs_app = typer.Typer(help="TLS certificates for the proxy.", no_args_is_help=True)
app.add_typer(certs_app, name="certs")
# Piped output (scripts, CI logs) gets wide tables instead of 80 columns.
console = Console(width=None if sys.stdout.isatty() else 200)
T = TypeVar("T")

DataDir = Annotated[
    Path | None,
    typer.Option("--data-dir", envvar="PGWAKE_DATA_DIR",
                 help="State directory (default /var/lib/pgwake as root, else ~/.local/share/pgwake)"),
]


def _run(coro: Awaitable[T]) -> T:
    import uvloop

    from pgwake.instance import StartupFailure
    from proxy.dataplane import DataPlaneUnavailable

    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coro)  # type: ignore[arg-type]
    except (StartupFailure, DataPlaneUnavailable) as exc:
        # Something the user can fix (data dir in use, address taken): say it, no traceback.
        sys.stderr.write(f"pgwake: {exc}\n")
        raise typer.Exit(1) from None


def _hostport(value: str, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise typer.BadParameter(f"{what} must be HOST:PORT, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def _port_range(value: str) -> tuple[int, int]:
    low, sep, high = value.partition("-")
    if not sep or not low.isdigit() or not high.isdigit() or not 0 < int(low) <= int(high) < 65536:
        raise typer.BadParameter(f"--port-range must be LOW-HIGH, got {value!r}")
    return int(low), int(high)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # One line per control API call drowns the session log.
    logging.getLogger("httpx").setLevel(logging.WARNING)


# The Kubernetes provisioner's options, shared by `up` and `control`.
ProvisionerOpt = Annotated[str, typer.Option(envvar="PGWAKE_PROVISIONER", help="Where computes run: local | kubernetes")]
NamespaceOpt = Annotated[str | None, typer.Option(envvar="PGWAKE_NAMESPACE", help="Kubernetes namespace of the computes")]
KubeconfigOpt = Annotated[Path | None, typer.Option(envvar="PGWAKE_KUBECONFIG", help="kubeconfig file (default: in-cluster service account)")]
InClusterOpt = Annotated[bool, typer.Option("--in-cluster", envvar="PGWAKE_IN_CLUSTER", help="Use the pod's service account (the default without --kubeconfig)")]
ComputeImageOpt = Annotated[str, typer.Option(envvar="PGWAKE_COMPUTE_IMAGE", help="Compute image (Kubernetes)")]
AdminCidrOpt = Annotated[list[str] | None, typer.Option(envvar="PGWAKE_ADMIN_CIDR", help="Where the control plane connects from; only there may the compute admin log in (repeatable)")]
ClientCidrOpt = Annotated[list[str] | None, typer.Option(envvar="PGWAKE_CLIENT_CIDR", help="Where proxies connect from (repeatable)")]
DataPlaneOpt = Annotated[str, typer.Option(envvar="PGWAKE_DATA_PLANE", help="What moves bytes after login: auto (native when built, else python) | native | python")]
DataPlaneThreadsOpt = Annotated[int, typer.Option(envvar="PGWAKE_DATA_PLANE_THREADS", help="Threads of the native data plane")]
StorageClassOpt = Annotated[str | None, typer.Option(envvar="PGWAKE_STORAGE_CLASS", help="StorageClass of durable computes' PVCs")]
VolumeSizeOpt = Annotated[str, typer.Option(envvar="PGWAKE_VOLUME_SIZE", help="PVC size of durable computes")]


@app.command()
def up(
    data_dir: DataDir = None,
    listen: Annotated[str, typer.Option(envvar="PGWAKE_LISTEN", help="Proxy address")] = "127.0.0.1:5432",
    api: Annotated[str, typer.Option(envvar="PGWAKE_API", help="Control API address")] = "127.0.0.1:8432",
    pool_size: Annotated[int, typer.Option(envvar="PGWAKE_POOL_SIZE", help="Warm pool size (ready computes)")] = 0,
    pool_max_age: Annotated[float, typer.Option(envvar="PGWAKE_POOL_MAX_AGE", help="Recycle pooled computes older than this many seconds")] = 3600.0,
    ephemeral_ttl: Annotated[float, typer.Option(envvar="PGWAKE_EPHEMERAL_TTL", help="Delete ephemeral endpoints this many seconds after creation")] = 24 * 3600.0,
    idle_timeout: Annotated[float, typer.Option(envvar="PGWAKE_IDLE_TIMEOUT", help="Suspend after this many idle seconds")] = 300.0,
    domain: Annotated[str, typer.Option(envvar="PGWAKE_DOMAIN", help="SNI domain: <endpoint>.<domain>")] = "pgwake.localhost",
    redis: Annotated[str | None, typer.Option(envvar="PGWAKE_REDIS", help="Redis URL for shared proxy state")] = None,
    api_key: Annotated[str | None, typer.Option(envvar="PGWAKE_API_KEY", help="Control API key (default: generated, stored in the data dir)")] = None,
    pg_bin: Annotated[Path | None, typer.Option(envvar="PGWAKE_PG_BIN", help="PostgreSQL bin directory")] = None,
    run_as: Annotated[str | None, typer.Option(envvar="PGWAKE_RUN_AS", help="Unprivileged user for postgres when root")] = None,
    wake_timeout: Annotated[float, typer.Option(envvar="PGWAKE_WAKE_TIMEOUT", help="Seconds a client waits for a wake before 57P03")] = 20.0,
    allow_plaintext: Annotated[bool, typer.Option(envvar="PGWAKE_ALLOW_PLAINTEXT", help="Accept unencrypted clients")] = False,
    log_level: Annotated[str, typer.Option(envvar="PGWAKE_LOG_LEVEL")] = "info",
    log_format: Annotated[str, typer.Option(envvar="PGWAKE_LOG_FORMAT", help="Connection log lines: text | json")] = "text",
    port_range: Annotated[str, typer.Option(envvar="PGWAKE_PORT_RANGE", help="TCP ports for computes, LOW-HIGH")] = "54400-55399",
    provisioner: ProvisionerOpt = "local",
    namespace: NamespaceOpt = None,
    kubeconfig: KubeconfigOpt = None,
    in_cluster: InClusterOpt = False,
    compute_image: ComputeImageOpt = "ghcr.io/pgwake/compute:18",
    admin_cidr: AdminCidrOpt = None,
    client_cidr: ClientCidrOpt = None,
    storage_class: StorageClassOpt = None,
    volume_size: VolumeSizeOpt = "10Gi",
    data_plane: DataPlaneOpt = ProxySettings.data_plane,
    data_plane_threads: DataPlaneThreadsOpt = ProxySettings.data_plane_threads,
) -> None:
    """Run the control plane, the proxy and computes (local processes or pods) in one process."""
    from pgwake.split import kubernetes_settings
    from pgwake.up import Up, UpSettings, run_forever

    if pg_bin is not None:
        pg_bin = pg_bin.resolve()

    _setup_logging(log_level)
    try:
        kube = kubernetes_settings(
            provisioner, namespace=namespace, kubeconfig=kubeconfig, in_cluster=in_cluster,
            image=compute_image, admin_cidrs=admin_cidr, client_cidrs=client_cidr,
            storage_class=storage_class, volume_size=volume_size,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    settings = UpSettings(
        data_dir=data_dir or datadir.default_data_dir(),
        listen=_hostport(listen, "--listen"),
        api=_hostport(api, "--api"),
        domain=domain,
        idle_timeout=idle_timeout,
        api_key=api_key,
        pg_bin=pg_bin,
        run_as=run_as,
        wake_timeout=wake_timeout,
        allow_plaintext=allow_plaintext,
        redis_url=redis,
        log_format=log_format,
        pool_size=pool_size,
        pool_max_age=pool_max_age,
        ephemeral_ttl=ephemeral_ttl,
        port_range=_port_range(port_range),
        kubernetes=kube,
        proxy_overrides=_data_plane_overrides(data_plane, data_plane_threads),
    )
    _run(run_forever(Up(settings)))


def _data_plane_overrides(data_plane: str, threads: int) -> tuple[tuple[str, object], ...]:
    from proxy.dataplane import DATA_PLANES

    if data_plane not in DATA_PLANES:
        raise typer.BadParameter(f"--data-plane must be one of {', '.join(DATA_PLANES)}")
    if threads < 1:
        raise typer.BadParameter("--data-plane-threads must be at least 1")
    return (("data_plane", data_plane), ("data_plane_threads", threads))


# -- talking to the control API ---------------------------------------------------------


def _client(data_dir: Path | None) -> ControlClient:
    url = os.environ.get("PGWAKE_API_URL")
    key = os.environ.get("PGWAKE_API_KEY")
    directory = data_dir or datadir.default_data_dir()
    if url is None:
        state = datadir.RunState.read(directory)
        if state is None:
            raise typer.BadParameter(
                f"no running pgwake found in {directory}: start `pgwake up`, or set "
                "PGWAKE_API_URL and PGWAKE_API_KEY"
            )
        url = state.api_url
    if key is None:
        path = directory / datadir.API_KEY_FILE
        if not path.exists():
            raise typer.BadParameter(f"no API key: set PGWAKE_API_KEY (looked in {path})")
        key = path.read_text().strip()
    return ControlClient(url, key)


def _call(data_dir: Path | None, fn: Callable[[ControlClient], Awaitable[T]]) -> T:
    async def go() -> T:
        async with _client(data_dir) as client:
            return await fn(client)

    try:
        return _run(go())
    except ControlAPIError as exc:
        console.print(f"[red]error:[/] {exc.message}")
        raise typer.Exit(1) from None


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")


def _endpoint_table(endpoints: list[Endpoint]) -> Table:
    table = Table("id", "name", "tier", "size", "state", "generation", "wakes", "address",
                  "last active")
    for e in endpoints:
        table.add_row(e.id, e.name, e.tier, e.size, e.state, str(e.generation), str(e.wakes),
                      e.address or "-", e.last_active.strftime("%Y-%m-%d %H:%M:%S"))
    return table


JsonFlag = Annotated[bool, typer.Option("--json", help="Machine-readable output")]


@endpoint_app.command("create")
def endpoint_create(
    name: Annotated[str | None, typer.Option(help="A label shown by list/show/status; not unique, and commands and URLs take the id")] = None,
    tier: Annotated[str, typer.Option(help="durable | ephemeral")] = "durable",
    size: Annotated[str, typer.Option(help="Size class: small | medium | large (see wakeup/sizes.py)")] = "small",
    as_json: JsonFlag = False,
    data_dir: DataDir = None,
) -> None:
    """Create a database endpoint; prints its URL and password (shown once)."""
    if tier not in ("durable", "ephemeral"):
        raise typer.BadParameter("--tier is durable or ephemeral")
    if size not in SIZE_NAMES:
        raise typer.BadParameter(f"--size is one of {', '.join(SIZE_NAMES)}")
    created = _call(data_dir, lambda c: c.create_endpoint(name, tier, size))  # type: ignore[arg-type]
    if as_json:
        _print_json(created.model_dump(mode="json"))
        return
    console.print(f"endpoint [bold]{created.id}[/] ({created.tier}, {created.size},"
                  f" {created.state})")
    console.print(f"user       {created.user}")
    console.print(f"password   {created.password}   [dim](shown once)[/]")
    console.print(f"url        {created.url}", soft_wrap=True)
    console.print(f"url_no_sni {created.url_no_sni}", soft_wrap=True)


@endpoint_app.command("list")
def endpoint_list(as_json: JsonFlag = False, data_dir: DataDir = None) -> None:
    """List endpoints and their states."""
    endpoints = _call(data_dir, lambda c: c.list_endpoints())
    if as_json:
        _print_json([e.model_dump(mode="json") for e in endpoints])
    else:
        console.print(_endpoint_table(endpoints))


@endpoint_app.command("show")
def endpoint_show(endpoint_id: str, as_json: JsonFlag = False, data_dir: DataDir = None) -> None:
    """Show one endpoint (state, generation, wakes, URLs)."""
    endpoint = _call(data_dir, lambda c: c.get_endpoint(endpoint_id))
    if as_json:
        _print_json(endpoint.model_dump(mode="json"))
    else:
        for key, value in endpoint.model_dump().items():
            console.print(f"{key:<15} {value}", soft_wrap=True)


@endpoint_app.command("suspend")
def endpoint_suspend(endpoint_id: str, as_json: JsonFlag = False, data_dir: DataDir = None) -> None:
    """Stop the endpoint's compute now; the next connection wakes it."""
    endpoint = _call(data_dir, lambda c: c.suspend(endpoint_id))
    if as_json:
        _print_json(endpoint.model_dump(mode="json"))
    else:
        console.print(f"{endpoint.id} {endpoint.state}")


@endpoint_app.command("wake")
def endpoint_wake(endpoint_id: str, as_json: JsonFlag = False, data_dir: DataDir = None) -> None:
    """Start the endpoint's compute without connecting."""
    woken = _call(data_dir, lambda c: c.wake(endpoint_id))
    if as_json:
        _print_json(woken.model_dump(mode="json"))
    else:
        console.print(f"{endpoint_id} awake at {woken.address} ({woken.cold_start}, "
                      f"{woken.duration_seconds * 1000:.1f} ms)")


@endpoint_app.command("resize")
def endpoint_resize(
    endpoint_id: str,
    size: Annotated[str, typer.Argument(help="small | medium | large")],
    drain: Annotated[float | None, typer.Option("--drain", help="Seconds pinned sessions get before 57P01 (default: the server's)")] = None,
    as_json: JsonFlag = False,
    data_dir: DataDir = None,
) -> None:
    """Move the endpoint to another size class (a generation handoff); waits until it serves."""
    if size not in SIZE_NAMES:
        raise typer.BadParameter(f"SIZE is one of {', '.join(SIZE_NAMES)}")
    resized = _call(data_dir, lambda c: c.resize(endpoint_id, size, drain_seconds=drain))
    if as_json:
        _print_json(resized.model_dump(mode="json"))
        return
    phases = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in resized.phases.items())
    console.print(f"{endpoint_id} {resized.previous_size} → {resized.size}, generation "
                  f"{resized.generation}, {resized.duration_seconds * 1000:.0f} ms"
                  + (f" ({phases})" if phases else " (not running: applies at the next wake)"))
    if resized.pinned_at_deadline:
        console.print(f"[yellow]{resized.pinned_at_deadline} pinned session(s) ended with 57P01 "
                      "at the drain deadline[/]")


@endpoint_app.command("delete")
def endpoint_delete(endpoint_id: str, as_json: JsonFlag = False, data_dir: DataDir = None) -> None:
    """Delete the endpoint and its data."""
    _call(data_dir, lambda c: c.delete_endpoint(endpoint_id))
    if as_json:
        _print_json({"id": endpoint_id, "state": "deleted"})
    else:
        console.print(f"{endpoint_id} deleted")


@app.command()
def status(
    as_json: JsonFlag = False,
    watch: Annotated[float | None, typer.Option("--watch", help="Refresh every N seconds until Ctrl-C")] = None,
    data_dir: DataDir = None,
) -> None:
    """Endpoints (state, generation, sessions attached/parked/pinned, last activity,
    address) and the warm pool."""

    async def snapshot(client: ControlClient) -> tuple[list[Endpoint], Pool]:
        return await client.list_endpoints(), await client.pool()

    if as_json:
        endpoints, pool = _call(data_dir, snapshot)
        _print_json({"endpoints": [_endpoint_status(e) for e in endpoints],
                     "pool": pool.model_dump(mode="json")})
        return
    if watch is None:
        console.print(_status_view(*_call(data_dir, snapshot)))
        return
    if watch <= 0:
        raise typer.BadParameter("--watch takes a positive number of seconds")

    async def live() -> None:
        from rich.live import Live

        async with _client(data_dir) as client:
            with Live(_status_view(*await snapshot(client)), console=console) as screen:
                while True:
                    await asyncio.sleep(watch)
                    screen.update(_status_view(*await snapshot(client)))

    try:
        _run(live())
    except KeyboardInterrupt:
        pass
    except ControlAPIError as exc:
        console.print(f"[red]error:[/] {exc.message}")
        raise typer.Exit(1) from None


def _endpoint_status(e: Endpoint) -> dict[str, object]:
    """An endpoint as `status --json` shows it: with its client sessions by state, as
    the proxies last reported them. `attached` have a backend (`pinned` ones among
    them cannot move off it); `parked` are held at a proxy without one."""
    shown = e.model_dump(mode="json")
    shown["sessions"] = {"attached": e.connections, "parked": e.parked, "pinned": e.pinned}
    return shown


def _status_view(endpoints: list[Endpoint], pool: Pool) -> Group:
    table = Table("id", "name", "tier", "size", "state", "gen", "wakes", "attached",
                  "parked", "pinned", "last active", "compute", title="endpoints")
    for e in endpoints:
        table.add_row(e.id, e.name, e.tier, e.size, e.state, str(e.generation), str(e.wakes),
                      str(e.connections), str(e.parked), str(e.pinned),
                      e.last_active.strftime("%H:%M:%S"), e.address or "-")
    pool_table = Table("tier", "size", "ready", "target", title="warm pool")
    for c in pool.classes:
        pool_table.add_row(c.tier, c.size_class, str(c.ready), str(c.target))
    states: dict[str, int] = {}
    for e in endpoints:
        states[e.state] = states.get(e.state, 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "no endpoints"
    pool_line = (f"pool: {pool.hits} hits, {pool.misses} misses, {pool.filled} filled, "
                 f"{pool.recycled} recycled, {pool.died} died")
    parts: list[Table | str] = [table, summary]
    if pool.classes:
        parts += [pool_table, pool_line]
    else:
        parts.append("warm pool: off (pgwake up --pool-size N)")
    return Group(*parts)


@certs_app.command("dev")
def certs_dev(
    domain: Annotated[str, typer.Option(envvar="PGWAKE_DOMAIN", help="SNI domain: the certificate covers *.<domain>")] = "pgwake.localhost",
    name: Annotated[list[str] | None, typer.Option("--name", help="Extra DNS name (repeatable)")] = None,
    out: Annotated[Path | None, typer.Option("--dir", help="Where to write (default: <data dir>/tls, what `pgwake up` serves)")] = None,
    as_json: JsonFlag = False,
    data_dir: DataDir = None,
) -> None:
    """Create (or reuse) a dev CA and a server certificate that sslmode=verify-full accepts."""
    from tls.devca import ensure_dev_ca, ensure_server_certificate

    directory = out or (data_dir or datadir.default_data_dir()) / "tls"
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    names = [f"*.{domain}", domain, "localhost", *(name or [])]
    ca = ensure_dev_ca(directory)
    server = ensure_server_certificate(directory, ca, names)
    paths = {"ca_cert": str(ca.cert), "ca_key": str(ca.key),
             "cert": str(server.cert), "key": str(server.key), "names": names}
    if as_json:
        _print_json(paths)
        return
    console.print(f"dev CA       {ca.cert}  [dim](key {ca.key})[/]", soft_wrap=True)
    console.print(f"certificate  {server.cert}  [dim](key {server.key})[/]", soft_wrap=True)
    console.print(f"names        {', '.join(names)} (+ 127.0.0.1, ::1)", soft_wrap=True)
    console.print(f"clients      sslmode=verify-full sslrootcert={ca.cert} "
                  f"host=<endpoint>.{domain} hostaddr=127.0.0.1", soft_wrap=True)


@app.command("proxy")
def proxy_command(
    listen: Annotated[str, typer.Option(envvar="PGWAKE_LISTEN", help="Proxy address (port 0: any)")] = "127.0.0.1:5432",
    control_url: Annotated[str | None, typer.Option(envvar="PGWAKE_CONTROL_URL", help="Control API URL (default: from --data-dir)")] = None,
    redis: Annotated[str | None, typer.Option(envvar="PGWAKE_REDIS", help="Redis URL for state shared with other proxies")] = None,
    data_dir: DataDir = None,
    tls_cert: Annotated[Path | None, typer.Option(envvar="PGWAKE_TLS_CERT", help="Server certificate (PEM)")] = None,
    tls_key: Annotated[Path | None, typer.Option(envvar="PGWAKE_TLS_KEY", help="Server key (PEM)")] = None,
    api_key: Annotated[str | None, typer.Option(envvar="PGWAKE_API_KEY", help="Control API key")] = None,
    domain: Annotated[str, typer.Option(envvar="PGWAKE_DOMAIN", help="SNI domain: <endpoint>.<domain>")] = "pgwake.localhost",
    wake_timeout: Annotated[float, typer.Option(envvar="PGWAKE_WAKE_TIMEOUT", help="Seconds a client waits for a wake before 57P03")] = 20.0,
    endpoint_client_cap: Annotated[int | None, typer.Option(envvar="PGWAKE_ENDPOINT_CLIENT_CAP", help="Client sessions per endpoint (default: the compute's max_connections minus reserved slots, one budget across proxies sharing --redis); past it, queue then 53300")] = None,
    control_rate: Annotated[float, typer.Option(envvar="PGWAKE_CONTROL_RATE", help="Control-API wake calls per second (all proxies)")] = 50.0,
    address_cache_ttl: Annotated[float, typer.Option(envvar="PGWAKE_ADDRESS_CACHE_TTL", help="Seconds a compute address is cached")] = 60.0,
    allow_plaintext: Annotated[bool, typer.Option(envvar="PGWAKE_ALLOW_PLAINTEXT", help="Accept unencrypted clients")] = False,
    log_level: Annotated[str, typer.Option(envvar="PGWAKE_LOG_LEVEL")] = "info",
    log_format: Annotated[str, typer.Option(envvar="PGWAKE_LOG_FORMAT", help="Connection log lines: text | json")] = "text",
    metrics: Annotated[str | None, typer.Option(envvar="PGWAKE_METRICS", help="Serve Prometheus /metrics on HOST:PORT")] = None,
    handshake_timeout: Annotated[float, typer.Option(help="Seconds from accept to a spliced session; slower clients get 08006")] = ProxySettings.handshake_timeout,
    startup_timeout: Annotated[float, typer.Option(help="Seconds for each startup packet (SSLRequest, StartupMessage)")] = ProxySettings.startup_timeout,
    tls_timeout: Annotated[float, typer.Option(help="Seconds for the client's TLS handshake")] = ProxySettings.tls_timeout,
    auth_step_timeout: Annotated[float, typer.Option(help="Seconds for each of the client's authentication messages")] = ProxySettings.auth_step_timeout,
    endpoint_queue_timeout: Annotated[float, typer.Option(help="Seconds a client waits for a session slot under --endpoint-client-cap, then 53300")] = ProxySettings.endpoint_queue_timeout,
    data_plane: DataPlaneOpt = ProxySettings.data_plane,
    data_plane_threads: DataPlaneThreadsOpt = ProxySettings.data_plane_threads,
) -> None:
    """Run only the proxy, against a control API elsewhere (state shared through --redis)."""
    from pgwake.split import proxy_run_settings, run_proxy

    _setup_logging(log_level)
    host, port = _hostport(listen, "--listen")
    try:
        settings = proxy_run_settings(
            ProxySettings(
                listen_host=host, listen_port=port, domain=domain, allow_plaintext=allow_plaintext,
                wake_timeout=wake_timeout, redis_url=redis, endpoint_client_cap=endpoint_client_cap,
                control_rate=control_rate, address_cache_ttl=address_cache_ttl,
                handshake_timeout=handshake_timeout, startup_timeout=startup_timeout,
                tls_timeout=tls_timeout, auth_step_timeout=auth_step_timeout,
                endpoint_queue_timeout=endpoint_queue_timeout,
                **dict(_data_plane_overrides(data_plane, data_plane_threads)),  # type: ignore[arg-type]
            ),
            control_url=control_url, data_dir=data_dir, tls_cert=tls_cert, tls_key=tls_key,
            api_key=api_key,
            metrics=_hostport(metrics, "--metrics") if metrics else None,
            log_format=log_format,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    _run(run_proxy(settings))


@app.command("control")
def control_command(
    data_dir: DataDir = None,
    api: Annotated[str, typer.Option(envvar="PGWAKE_API", help="Control API address")] = "127.0.0.1:8432",
    proxy_host: Annotated[str, typer.Option(envvar="PGWAKE_PROXY_HOST", help="Public proxy host, for the URLs handed out")] = "127.0.0.1",
    proxy_port: Annotated[int, typer.Option(envvar="PGWAKE_PROXY_PORT", help="Public proxy port, for the URLs handed out")] = 5432,
    domain: Annotated[str, typer.Option(envvar="PGWAKE_DOMAIN", help="SNI domain: <endpoint>.<domain>")] = "pgwake.localhost",
    redis: Annotated[str | None, typer.Option(envvar="PGWAKE_REDIS", help="Redis URL: publish address invalidations to proxies")] = None,
    idle_timeout: Annotated[float, typer.Option(envvar="PGWAKE_IDLE_TIMEOUT", help="Suspend after this many idle seconds")] = 300.0,
    api_key: Annotated[str | None, typer.Option(envvar="PGWAKE_API_KEY", help="Control API key (default: generated, stored in the data dir)")] = None,
    pg_bin: Annotated[Path | None, typer.Option(envvar="PGWAKE_PG_BIN", help="PostgreSQL bin directory")] = None,
    port_range: Annotated[str, typer.Option(envvar="PGWAKE_PORT_RANGE", help="TCP ports for computes, LOW-HIGH")] = "54400-55399",
    log_level: Annotated[str, typer.Option(envvar="PGWAKE_LOG_LEVEL")] = "info",
    control_db: Annotated[str | None, typer.Option(envvar="PGWAKE_CONTROL_DB", help="Control DB URL (default: an embedded PostgreSQL in the data dir)")] = None,
    provisioner: ProvisionerOpt = "local",
    namespace: NamespaceOpt = None,
    kubeconfig: KubeconfigOpt = None,
    in_cluster: InClusterOpt = False,
    compute_image: ComputeImageOpt = "ghcr.io/pgwake/compute:18",
    admin_cidr: AdminCidrOpt = None,
    client_cidr: ClientCidrOpt = None,
    storage_class: StorageClassOpt = None,
    volume_size: VolumeSizeOpt = "10Gi",
) -> None:
    """Run only the control plane (control API, control DB, computes), no proxy."""
    from pgwake.split import ControlRunSettings, kubernetes_settings, run_control
    from wakeup.urls import PublicAddress

    _setup_logging(log_level)
    try:
        kube = kubernetes_settings(
            provisioner, namespace=namespace, kubeconfig=kubeconfig, in_cluster=in_cluster,
            image=compute_image, admin_cidrs=admin_cidr, client_cidrs=client_cidr,
            storage_class=storage_class, volume_size=volume_size,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    settings = ControlRunSettings(
        data_dir=data_dir or datadir.default_data_dir(),
        api=_hostport(api, "--api"),
        public=PublicAddress(domain=domain, host=proxy_host, port=proxy_port),
        idle_timeout=idle_timeout,
        api_key=api_key,
        pg_bin=pg_bin.resolve() if pg_bin else None,
        port_range=_port_range(port_range),
        redis_url=redis,
        control_db_url=control_db,
        kubernetes=kube,
    )
    _run(run_control(settings))


def env_name(option: str) -> str:
    """`--pool-size` → `PGWAKE_POOL_SIZE`: the same name whichever command takes it."""
    return "PGWAKE_" + option.lstrip("-").replace("-", "_").upper()


def with_env_vars(command: Any) -> Any:
    """Every option of every command reads PGWAKE_<OPTION> (DESIGN's contract), set in one
    place; click's own prefix would name them after the command path instead
    (PGWAKE_ENDPOINT_CREATE_NAME). Duck-typed: typer ships its own copy of click."""
    for param in command.params:
        if param.param_type_name == "option" and not param.envvar and param.name != "help":
            long_names = [o for o in param.opts if o.startswith("--")]
            if long_names:
                param.envvar = env_name(long_names[0])
                param.show_envvar = True
    for sub in getattr(command, "commands", {}).values():
        with_env_vars(sub)
    return command


def cli() -> Any:
    """The click command tree of `app`, with the environment variables filled in."""
    return with_env_vars(typer.main.get_command(app))


def main() -> None:
    cli()()
