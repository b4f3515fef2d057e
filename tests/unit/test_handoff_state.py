"""The generation handoff's pure state machine and the size class table."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wakeup.sizes import SIZES, UnknownSize, size_class_of
from wakeup.state import (
    HANDOFF_ENDPOINT_STATE,
    HANDOFF_TRANSITIONS,
    TRANSITIONS,
    HandoffPhase,
    HandoffRun,
    IllegalHandoffStep,
    State,
)

HAPPY_PATH = [
    HandoffPhase.DRAIN, HandoffPhase.STOP, HandoffPhase.START, HandoffPhase.UNFREEZE,
    HandoffPhase.DONE,
]


def test_happy_path_records_every_phase() -> None:
    run = HandoffRun(now=100.0)
    assert run.endpoint_state() is State.HANDOFF
    now = 100.0
    for step, target in enumerate(HAPPY_PATH, start=1):
        now += step
        _ended, took = run.advance(target, now)
        assert took == step
        assert run.phase is target
    assert run.finished
    assert run.endpoint_state() is State.ACTIVE
    assert list(run.durations) == [
        HandoffPhase.FREEZE, HandoffPhase.DRAIN, HandoffPhase.STOP, HandoffPhase.START,
        HandoffPhase.UNFREEZE,
    ]
    assert sum(run.durations.values()) == 15


def test_no_step_back_and_no_skipping_the_stop() -> None:
    run = HandoffRun(now=0.0)
    with pytest.raises(IllegalHandoffStep):
        run.advance(HandoffPhase.START, 1.0)  # a start before the old one stopped
    run.advance(HandoffPhase.DRAIN, 1.0)
    with pytest.raises(IllegalHandoffStep):
        run.advance(HandoffPhase.FREEZE, 2.0)
    with pytest.raises(IllegalHandoffStep):
        run.advance(HandoffPhase.FAILED, 2.0)  # nothing can fail before the stop
    assert run.phase is HandoffPhase.DRAIN


def test_failure_leaves_the_endpoint_suspended() -> None:
    run = HandoffRun(now=0.0)
    for target in (HandoffPhase.DRAIN, HandoffPhase.STOP, HandoffPhase.START,
                   HandoffPhase.FAILED):
        run.advance(target, 1.0)
    assert run.finished and run.endpoint_state() is State.SUSPENDED
    # …which the endpoint lifecycle allows from `handoff`.
    assert State.SUSPENDED in TRANSITIONS[State.HANDOFF]
    assert State.HANDOFF in TRANSITIONS[State.ACTIVE]


def test_every_phase_maps_to_a_state() -> None:
    assert set(HANDOFF_ENDPOINT_STATE) == set(HandoffPhase) == set(HANDOFF_TRANSITIONS)


@given(st.lists(st.sampled_from(list(HandoffPhase)), max_size=20),
       st.lists(st.floats(min_value=0, max_value=1e6), min_size=20, max_size=20))
def test_any_sequence_moves_forward_or_raises(
    steps: list[HandoffPhase], times: list[float]
) -> None:
    order = list(HandoffPhase)
    run = HandoffRun(now=0.0)
    for target, now in zip(steps, times, strict=False):
        before = run.phase
        try:
            _, took = run.advance(target, now)
        except IllegalHandoffStep:
            assert target not in HANDOFF_TRANSITIONS[before]
            assert run.phase is before
            continue
        assert took >= 0
        assert order.index(target) > order.index(before)
    assert all(v >= 0 for v in run.durations.values())


def _bytes(value: str) -> int:
    match = re.fullmatch(r"(\d+)(kB|MB|GB)", value)
    assert match, value
    return int(match[1]) * {"kB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}[match[2]]


def _k8s_bytes(value: str) -> int:
    match = re.fullmatch(r"(\d+)(Mi|Gi)", value)
    assert match, value
    return int(match[1]) * {"Mi": 1 << 20, "Gi": 1 << 30}[match[2]]


def test_size_table_grows_and_fits_its_memory() -> None:
    assert list(SIZES) == ["small", "medium", "large"]
    sizes = list(SIZES.values())
    for smaller, bigger in itertools.pairwise(sizes):
        assert _bytes(bigger.shared_buffers) > _bytes(smaller.shared_buffers)
        assert bigger.max_connections > smaller.max_connections
        assert _bytes(bigger.work_mem) > _bytes(smaller.work_mem)
        assert _k8s_bytes(bigger.memory_limit) > _k8s_bytes(smaller.memory_limit)
    for size in sizes:
        settings = dict(size.postgres_settings())
        assert {"shared_buffers", "max_connections", "work_mem"} <= set(settings)
        resources = size.kubernetes_resources()
        assert set(resources) == {"requests", "limits"}
        assert set(resources["requests"]) == set(resources["limits"]) == {"cpu", "memory"}
        # shared_buffers must fit well inside the container's memory request.
        assert _bytes(size.shared_buffers) * 4 <= _k8s_bytes(size.memory_request) * 2
        assert _k8s_bytes(size.memory_request) <= _k8s_bytes(size.memory_limit)


def test_unknown_size_is_a_clear_error() -> None:
    assert size_class_of("medium").name == "medium"
    with pytest.raises(UnknownSize, match="small, medium, large"):
        size_class_of("huge")
    with pytest.raises(ValueError):
        size_class_of("../small")
