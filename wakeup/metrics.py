"""Control-plane metrics (Prometheus): wakes, their phases, computes, the warm pool."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

HANDOFF_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
WAKE_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ControlMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.wake_duration = Histogram(
            "pgwake_wake_duration_seconds", "Control-plane wake time by cold start kind.",
            ["cold_start"], buckets=WAKE_BUCKETS, registry=registry,
        )
        self.wake_phase = Histogram(
            "pgwake_wake_phase_seconds", "Time spent in each phase of a wake or create.",
            ["phase"], buckets=WAKE_BUCKETS, registry=registry,
        )
        self.handoff_phase = Histogram(
            "pgwake_handoff_phase_seconds",
            "Time spent in each phase of a generation handoff (resize).",
            ["phase"], buckets=HANDOFF_BUCKETS, registry=registry,
        )
        self.handoff_duration = Histogram(
            "pgwake_handoff_duration_seconds", "Whole generation handoffs (resize), freeze to"
            " unfreeze.", buckets=HANDOFF_BUCKETS, registry=registry,
        )
        self.pool_ready = Gauge(
            "pgwake_pool_ready", "Ready, unassigned computes in the warm pool.", registry=registry
        )
        self.pool_claims = Counter(
            "pgwake_pool_claims_total", "Endpoint creations by pool outcome.", ["outcome"],
            registry=registry,
        )
        self.computes = Gauge(
            "pgwake_computes", "Computes by state.", ["state"], registry=registry
        )
