"""Proxy metrics (Prometheus), registered in a registry passed in; label sets are bounded."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# Connect latency spans a cached connect (~5 ms) to a cold wake (seconds).
LATENCY_BUCKETS = (
    0.002, 0.005, 0.01, 0.015, 0.025, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 30.0,
)


class ProxyMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.connect_latency = Histogram(
            "pgwake_connect_latency_seconds",
            "Time from accept to ReadyForQuery. excluded=client subtracts time spent "
            "waiting for the client (TLS and auth round trips).",
            ["cold_start", "outcome", "excluded"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.connect_phase = Histogram(
            "pgwake_connect_phase_seconds",
            "Consecutive parts of the time to ReadyForQuery (they add up to it): tls, "
            "startup, admit, verifier, auth, queue, wake, compute, finish.",
            ["phase", "cold_start"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.reattach_latency = Histogram(
            "pgwake_reattach_latency_seconds",
            "A parked session's first message to a new backend ready for it "
            "(wake, login, restore).",
            ["outcome"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry,
        )
        self.sessions_parked_total = Counter(
            "pgwake_sessions_parked_total",
            "Sessions parked because their compute went away while they were idle.",
            registry=registry,
        )
        self.sessions_evicted_total = Counter(
            "pgwake_sessions_evicted_total",
            "Idle sessions parked to make room under their endpoint's connection budget "
            "for a session queued for it (counted in pgwake_sessions_parked_total too).",
            registry=registry,
        )
        self.connections_active = Gauge(
            "pgwake_connections_active", "Client sessions being spliced now.", registry=registry
        )
        self.connections_total = Counter(
            "pgwake_connections_total", "Client connections by how they ended.", ["outcome"],
            registry=registry,
        )
        self.errors_total = Counter(
            "pgwake_errors_total", "ErrorResponses sent to clients by the proxy.", ["sqlstate"],
            registry=registry,
        )
        self.cache_requests = Counter(
            "pgwake_cache_requests_total", "Proxy cache lookups.", ["cache", "outcome"],
            registry=registry,
        )
        self.bytes_total = Counter(
            "pgwake_bytes_total", "Bytes spliced, by direction.", ["direction"],
            registry=registry,
        )

    def watch(self, sources: RuntimeSources) -> None:
        """Expose counters the proxy's parts keep themselves, read at scrape time."""
        self.registry.register(_RuntimeCollector(sources))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RuntimeSources(Protocol):
    """What the runtime collector reads; ProxyServer provides it."""

    def shared_errors(self) -> int: ...
    def shared_degraded(self) -> bool: ...
    def handshakes(self) -> int: ...
    def sessions_queued(self) -> int: ...
    def sessions_refused(self) -> int: ...
    def wake_calls(self) -> int: ...
    def stale_addresses_served(self) -> int: ...
    def compute_full_retries(self) -> int: ...
    def cancels_dropped(self) -> int: ...
    def sessions_by_state(self) -> dict[str, int]: ...


class _RuntimeCollector(Collector):
    def __init__(self, sources: RuntimeSources):
        self.sources = sources

    def collect(self) -> Iterator[Metric]:
        s = self.sources
        yield CounterMetricFamily(
            "pgwake_shared_state_errors", "Errors talking to the shared state (Redis).",
            value=s.shared_errors(),
        )
        yield GaugeMetricFamily(
            "pgwake_shared_state_degraded",
            "1 while Redis is unavailable and this proxy runs on per-replica state.",
            value=1.0 if s.shared_degraded() else 0.0,
        )
        yield GaugeMetricFamily(
            "pgwake_connections_handshaking", "Connections in the startup phase now.",
            value=s.handshakes(),
        )
        yield CounterMetricFamily(
            "pgwake_sessions_queued", "Sessions that queued for an endpoint slot.",
            value=s.sessions_queued(),
        )
        yield CounterMetricFamily(
            "pgwake_sessions_refused", "Sessions refused (53300) after queueing.",
            value=s.sessions_refused(),
        )
        yield CounterMetricFamily(
            "pgwake_wake_calls", "Wake calls this proxy made to the control API.",
            value=s.wake_calls(),
        )
        yield CounterMetricFamily(
            "pgwake_stale_addresses_served",
            "Connects sent to an endpoint's last known address past its TTL because the "
            "control plane was unreachable.",
            value=s.stale_addresses_served(),
        )
        yield CounterMetricFamily(
            "pgwake_compute_full_retries",
            "Compute logins refused with 53300 (full with sessions the budget did not "
            "see) and tried again.",
            value=s.compute_full_retries(),
        )
        yield CounterMetricFamily(
            "pgwake_cancel_requests_dropped",
            "CancelRequests dropped unlooked-up: over their source's pace, or a flood.",
            value=s.cancels_dropped(),
        )
        sessions = GaugeMetricFamily(
            "pgwake_sessions",
            "Client sessions by state: attached (with a backend), parked (without one), "
            "pinned and busy (among the attached).",
            labels=["state"],
        )
        for state, value in s.sessions_by_state().items():
            sessions.add_metric([state], value)
        yield sessions


async def serve_metrics(
    registry: CollectorRegistry, host: str, port: int,
    ready: Callable[[], bool] = lambda: True,
) -> asyncio.Server:
    """A minimal HTTP listener for `pgwake proxy --metrics`: `GET /metrics`, plus
    `/healthz` (the process answers) and `/readyz` (it takes new connections: 503
    while starting or draining), for load balancers and Kubernetes probes."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                request = await reader.readuntil(b"\r\n\r\n")
            path = request.split(b" ", 2)[1] if request.count(b" ") >= 2 else b""
            route = path.split(b"?")[0]
            if route == b"/metrics":
                body, ctype = generate_latest(registry), CONTENT_TYPE_LATEST
                status = b"200 OK"
            elif route == b"/healthz":
                body, ctype, status = b"ok\n", "text/plain", b"200 OK"
            elif route == b"/readyz":
                if ready():
                    body, ctype, status = b"ready\n", "text/plain", b"200 OK"
                else:
                    body, ctype, status = b"not ready\n", "text/plain", b"503 Service Unavailable"
            else:
                body, ctype, status = b"not found\n", "text/plain", b"404 Not Found"
            writer.write(
                b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype.encode()
                + b"\r\nContent-Length: " + str(len(body)).encode()
                + b"\r\nConnection: close\r\n\r\n" + body
            )
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)
