"""Proxy settings: one frozen object; the CLI and PGWAKE_* environment only fill it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ProxySettings:
    listen_host: str = "127.0.0.1"
    listen_port: int = 5432
    domain: str = "pgwake.localhost"
    allow_plaintext: bool = False
    # Deadlines. The handshake deadline covers everything until the splice.
    handshake_timeout: float = 10.0
    tls_timeout: float = 5.0
    auth_step_timeout: float = 5.0
    wake_timeout: float = 20.0
    control_timeout: float = 5.0
    compute_connect_timeout: float = 1.0
    compute_login_timeout: float = 5.0
    # After this long waiting on a wake, tell the client why it waits (a NOTICE).
    wake_notice_after: float = 0.25
    role_cache_ttl: float = 30.0
    address_cache_ttl: float = 60.0
    drain_timeout: float = 10.0
    backlog: int = 1024
