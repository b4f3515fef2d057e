"""Proxy settings: one frozen object; the CLI and PGWAKE_* environment only fill it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from proxy.ratelimit import LimitSettings


def default_engine_threads() -> int:
    """Half the machine's cores, at least one. Measured on 2 cores (pgbench -S -c 8,
    TLS): one engine thread spent ~14 % less CPU per transaction than two, at
    about the same tps; the clients, the computes and Python's own thread need the rest."""
    return max(1, (os.cpu_count() or 2) // 2)


@dataclass(frozen=True)
class ProxySettings:
    listen_host: str = "127.0.0.1"
    listen_port: int = 5432
    domain: str = "pgwake.localhost"
    allow_plaintext: bool = False
    # Deadlines. The handshake deadline covers everything until the splice.
    handshake_timeout: float = 10.0
    # Each startup packet (SSLRequest, StartupMessage), from the first byte on.
    startup_timeout: float = 5.0
    tls_timeout: float = 5.0
    auth_step_timeout: float = 5.0
    wake_timeout: float = 20.0
    control_timeout: float = 5.0
    compute_connect_timeout: float = 1.0
    compute_login_timeout: float = 5.0
    # After this long waiting on a wake, tell the client why it waits (a NOTICE).
    wake_notice_after: float = 0.25
    # Verifiers (and "no such role") are answered from the cache this long, re-checked
    # in the background when used after role_cache_refresh, and served up to
    # role_cache_max_stale longer while the control plane is unreachable.
    role_cache_ttl: float = 30.0
    role_cache_refresh: float = 5.0
    role_cache_max_entries: int = 10_000
    role_cache_max_stale: float = 600.0
    address_cache_ttl: float = 60.0
    # A busy endpoint's address is refreshed in the background after this share of its TTL.
    address_refresh_after: float = 0.75
    # Control plane unreachable: serve an endpoint's last known address up to this old.
    stale_address_max_age: float = 600.0
    drain_timeout: float = 10.0
    # After the drain deadline, how long a session may take to reach a message
    # boundary (and its query's cancel to be sent) before it is cut.
    drain_grace: float = 2.0
    # Sessions: a session idle this long is asked about (on its own backend) so that
    # it can park if its compute goes away; parking can be turned off.
    park_sessions: bool = True
    # Client sessions per endpoint on this proxy, attached and parked together. Parked
    # ones hold no backend, so this is far above the compute's connection budget
    # (which bounds attached sessions); it bounds the proxy's own memory per endpoint.
    # 10 000: an application fleet's pools against one endpoint through one proxy
    # (issue 12's idle-session figure is measured there).
    max_sessions_per_endpoint: int = 10_000
    survey_after: float = 1.0
    survey_timeout: float = 5.0
    backlog: int = 1024
    # Connections still in the handshake; past this new ones get 53300 and are closed.
    max_handshakes: int = 10_000
    limits: LimitSettings = field(default_factory=LimitSettings)
    # Certificate files are checked this often (and on SIGHUP); 0 turns the watch off.
    cert_reload_interval: float = 30.0
    # -- the wake path under load (shared state, storm guards) --
    redis_url: str | None = None  # None: shared state lives in this process
    wake_lock_expiry: float = 5.0  # a crashed lock holder blocks others at most this long
    negative_cache_ttl: float = 0.5  # remember "control plane unavailable" this long
    wake_rate_per_endpoint: float = 10.0  # control-API wake calls per second, per endpoint
    wake_burst_per_endpoint: float = 10.0
    control_rate: float = 50.0  # control-API wake calls per second, all endpoints, all replicas
    control_burst: float = 20.0
    compute_connect_concurrency: int = 32  # concurrent connect+login attempts per compute
    # Live client sessions per endpoint. None: the compute's own budget (max_connections
    # minus reserved slots, from the wake answer), shared by all replicas through Redis.
    endpoint_client_cap: int | None = None
    # Wait this long (within the handshake deadline) for a slot under the budget, then 53300.
    endpoint_queue_timeout: float = 10.0
    activity_interval: float = 1.0  # report per-endpoint connection counts this often
    cancel_key_ttl: float = 24 * 3600.0
    # What moves a session's bytes after login (proxy/dataplane.py): "auto" takes the
    # native engine when it was built, else the Python splice; "native" insists.
    data_plane: str = "auto"
    data_plane_threads: int = default_engine_threads()  # the native engine's worker threads
