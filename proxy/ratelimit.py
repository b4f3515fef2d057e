"""Front-door limits: token buckets per key, an auth-failure limiter, and their interface.

The session only sees the two Protocols below, so a shared backend (Redis, for
several proxy replicas) can replace the in-process one without touching the
connection path. In-process state is bounded: a full bucket is the same as no
bucket, so full buckets are forgotten first when a table reaches its cap.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class BucketSpec:
    """`burst` tokens at most, refilled at `rate` tokens per second."""

    rate: float
    burst: float

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.burst < 1:
            raise ValueError(f"a bucket needs rate > 0 and burst >= 1, got {self}")


class AttemptLimiter(Protocol):
    """Admits an attempt for a key, or says how long to wait before the next one."""

    async def admit(self, key: str) -> float:
        """Take a token: 0.0 if admitted, else the seconds until one is available."""
        ...


class FailureLimiter(Protocol):
    """Counts failures per key; a key that failed too often is refused for a while."""

    async def retry_after(self, key: str) -> float:
        """0.0 if the key may try now, else the seconds until it may."""
        ...

    async def record_failure(self, key: str) -> float:
        """Count a failure; return `retry_after` as it stands afterwards."""
        ...


class TokenBuckets:
    """In-process token buckets, one per key, at most `max_keys` of them."""

    def __init__(
        self,
        spec: BucketSpec,
        *,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.spec = spec
        self.max_keys = max_keys
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key → (tokens, as of)

    def _tokens(self, key: str, now: float) -> float:
        entry = self._buckets.get(key)
        if entry is None:
            return self.spec.burst
        tokens, as_of = entry
        return min(self.spec.burst, tokens + (now - as_of) * self.spec.rate)

    def peek(self, key: str) -> float:
        """Seconds until `key` has a whole token (0.0: it has one now); takes nothing."""
        tokens = self._tokens(key, self.clock())
        return 0.0 if tokens >= 1 else (1 - tokens) / self.spec.rate

    def take(self, key: str) -> float:
        """Take a token if there is one: 0.0; else the seconds until there is (takes none)."""
        now = self.clock()
        tokens = self._tokens(key, now)
        if tokens < 1:
            return (1 - tokens) / self.spec.rate
        self._store(key, tokens - 1, now)
        return 0.0

    def drain(self, key: str) -> float:
        """Take a token even if that leaves the bucket in debt (failures always count),
        but never more than one burst of debt; return the seconds until a whole token."""
        now = self.clock()
        tokens = max(self._tokens(key, now) - 1, -self.spec.burst)
        self._store(key, tokens, now)
        return 0.0 if tokens >= 1 else (1 - tokens) / self.spec.rate

    def __len__(self) -> int:
        return len(self._buckets)

    def _store(self, key: str, tokens: float, now: float) -> None:
        if key not in self._buckets and len(self._buckets) >= self.max_keys:
            self._prune(now)
        self._buckets[key] = (tokens, now)

    def _prune(self, now: float) -> None:
        full = [k for k in self._buckets if self._tokens(k, now) >= self.spec.burst]
        for key in full:
            del self._buckets[key]
        if len(self._buckets) >= self.max_keys:
            # Every bucket is in use (a flood of distinct keys): forget the oldest
            # half. That errs towards admitting, never towards refusing everyone.
            by_age = sorted(self._buckets, key=lambda k: self._buckets[k][1])
            for key in by_age[: len(by_age) // 2 + 1]:
                del self._buckets[key]


class LocalAttemptLimiter:
    """`AttemptLimiter` on in-process token buckets (per proxy replica)."""

    def __init__(self, buckets: TokenBuckets) -> None:
        self.buckets = buckets

    async def admit(self, key: str) -> float:
        return self.buckets.take(key)


class LocalFailureLimiter:
    """`FailureLimiter` on in-process token buckets: `burst` failures, then `rate` per
    second. A client that keeps failing keeps its bucket empty: it backs off or is refused."""

    def __init__(self, buckets: TokenBuckets) -> None:
        self.buckets = buckets

    async def retry_after(self, key: str) -> float:
        return self.buckets.peek(key)

    async def record_failure(self, key: str) -> float:
        return self.buckets.drain(key)


@dataclass(frozen=True)
class LimitSettings:
    # Auth failures per (client IP, endpoint): 10 at once, then one per 6 s.
    auth_failure_burst: float = 10
    auth_failure_rate: float = 1 / 6
    # Auth failures per (endpoint, role), from any address: a guess of one role from
    # many addresses runs out too. Larger than one address's budget, so that one
    # noisy client does not lock the role's real users out first.
    role_failure_burst: float = 30
    role_failure_rate: float = 1 / 2
    # Connection attempts per endpoint (authenticated or not): a wake costs money.
    connect_burst: float = 2000
    connect_rate: float = 500
    max_keys: int = 100_000


@dataclass
class FrontDoorLimits:
    """The limiters one proxy uses; built from settings, or given (a shared backend)."""

    auth_failures: FailureLimiter  # keyed by auth_failure_key (client address, endpoint)
    role_failures: FailureLimiter  # keyed by role_failure_key (endpoint, validated role)
    connect_attempts: AttemptLimiter

    @classmethod
    def local(
        cls, settings: LimitSettings, clock: Callable[[], float] = time.monotonic
    ) -> FrontDoorLimits:
        return cls(
            auth_failures=LocalFailureLimiter(
                TokenBuckets(
                    BucketSpec(settings.auth_failure_rate, settings.auth_failure_burst),
                    max_keys=settings.max_keys,
                    clock=clock,
                )
            ),
            role_failures=LocalFailureLimiter(
                TokenBuckets(
                    BucketSpec(settings.role_failure_rate, settings.role_failure_burst),
                    max_keys=settings.max_keys,
                    clock=clock,
                )
            ),
            connect_attempts=LocalAttemptLimiter(
                TokenBuckets(
                    BucketSpec(settings.connect_rate, settings.connect_burst),
                    max_keys=settings.max_keys,
                    clock=clock,
                )
            ),
        )


def auth_failure_key(client_ip: str, endpoint: str) -> str:
    return f"auth:{client_ip}:{endpoint}"


def role_failure_key(endpoint: str, role: str) -> str:
    """Both parts validated by the caller (at most 63 characters each): a bounded key."""
    return f"role:{endpoint}:{role}"


def whole_seconds(seconds: float) -> int:
    """A wait as the client reads it: whole seconds, never 0 while it is refused."""
    return max(1, math.ceil(seconds))
