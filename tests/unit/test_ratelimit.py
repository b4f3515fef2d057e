"""Token buckets and the front-door limiters, on a hand-driven clock."""

from __future__ import annotations

import pytest

from proxy.ratelimit import (
    BucketSpec,
    FrontDoorLimits,
    LimitSettings,
    TokenBuckets,
    auth_failure_key,
    whole_seconds,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bucket_admits_a_burst_then_refills_at_the_rate() -> None:
    clock = Clock()
    buckets = TokenBuckets(BucketSpec(rate=2, burst=3), clock=clock)
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a") == pytest.approx(0.5)
    assert buckets.take("b") == 0.0  # keys are independent
    clock.now += 0.5
    assert buckets.take("a") == 0.0
    assert buckets.take("a") == pytest.approx(0.5)
    clock.now += 100
    assert [buckets.take("a") for _ in range(4)][-1] == pytest.approx(0.5)  # capped at burst


def test_peek_takes_nothing() -> None:
    buckets = TokenBuckets(BucketSpec(rate=1, burst=1), clock=Clock())
    assert buckets.peek("a") == 0.0
    assert buckets.peek("a") == 0.0
    assert buckets.take("a") == 0.0
    assert buckets.peek("a") == pytest.approx(1.0)


def test_drain_goes_into_bounded_debt_so_persistence_backs_off() -> None:
    clock = Clock()
    buckets = TokenBuckets(BucketSpec(rate=1, burst=2), clock=clock)
    waits = [buckets.drain("a") for _ in range(6)]
    # Each failure past the burst pushes the next allowed try further out, up to a limit.
    assert waits[:2] == [0.0, pytest.approx(1.0)]
    assert waits[2] == pytest.approx(2.0) and waits[3] == pytest.approx(3.0)
    assert waits[4] == waits[5] == pytest.approx(3.0)
    clock.now += 3
    assert buckets.peek("a") == 0.0


def test_table_is_bounded_and_forgets_full_buckets_first() -> None:
    clock = Clock()
    buckets = TokenBuckets(BucketSpec(rate=1, burst=5), max_keys=4, clock=clock)
    buckets.take("busy")
    for i in range(3):
        buckets.take(f"k{i}")
    clock.now += 10  # every bucket is full again: all may go
    for _ in range(5):
        buckets.take("busy")
    buckets.take("new")
    assert len(buckets) <= 4
    assert buckets.peek("busy") > 0  # the one in use was kept
    for i in range(1000):
        buckets.take(f"flood{i}")
    assert len(buckets) <= 4


def test_bucket_spec_is_validated() -> None:
    with pytest.raises(ValueError):
        BucketSpec(rate=0, burst=1)
    with pytest.raises(ValueError):
        BucketSpec(rate=1, burst=0.5)


async def test_front_door_limits_from_settings() -> None:
    clock = Clock()
    limits = FrontDoorLimits.local(
        LimitSettings(auth_failure_burst=2, auth_failure_rate=0.1, connect_burst=1, connect_rate=1),
        clock=clock,
    )
    key = auth_failure_key("10.0.0.1", "ep-a")
    assert await limits.auth_failures.retry_after(key) == 0.0
    assert await limits.auth_failures.record_failure(key) == 0.0
    assert await limits.auth_failures.record_failure(key) == pytest.approx(10.0)
    assert await limits.auth_failures.retry_after(key) == pytest.approx(10.0)
    assert await limits.auth_failures.retry_after(auth_failure_key("10.0.0.2", "ep-a")) == 0.0
    assert await limits.connect_attempts.admit("ep-a") == 0.0
    assert await limits.connect_attempts.admit("ep-a") == pytest.approx(1.0)
    clock.now += 10
    assert await limits.auth_failures.retry_after(key) == 0.0


def test_whole_seconds_never_says_zero() -> None:
    assert whole_seconds(0.01) == 1
    assert whole_seconds(5.2) == 6
