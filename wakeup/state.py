"""Endpoint lifecycle as a pure transition table (no I/O)."""

from __future__ import annotations

import enum


class State(enum.StrEnum):
    STARTING = "starting"
    ACTIVE = "active"
    SUSPENDING = "suspending"
    SUSPENDED = "suspended"
    HANDOFF = "handoff"
    DELETED = "deleted"


class ColdStart(enum.StrEnum):
    WARM = "warm"  # already running
    RESUMED = "resumed"  # a suspended compute was started on its own storage
    POOL_HIT = "pool_hit"
    POOL_MISS = "pool_miss"


class IllegalTransition(Exception):
    def __init__(self, current: State, target: State):
        super().__init__(f"endpoint is {current}, cannot become {target}")
        self.current = current
        self.target = target


# What may follow what. Waking from `suspending` is not refused: the caller
# waits for the suspend to finish (it holds the endpoint's lock) and then the
# endpoint is `suspended`, from where `starting` is legal.
TRANSITIONS: dict[State, frozenset[State]] = {
    State.STARTING: frozenset({State.ACTIVE, State.SUSPENDED, State.DELETED}),
    State.ACTIVE: frozenset({State.SUSPENDING, State.HANDOFF, State.STARTING, State.DELETED}),
    State.SUSPENDING: frozenset({State.SUSPENDED, State.DELETED}),
    State.SUSPENDED: frozenset({State.STARTING, State.DELETED}),
    State.HANDOFF: frozenset({State.ACTIVE, State.SUSPENDED, State.DELETED}),
    State.DELETED: frozenset(),
}


def check_transition(current: State, target: State) -> None:
    if target not in TRANSITIONS[current]:
        raise IllegalTransition(current, target)


def needs_start(current: State, compute_running: bool) -> bool:
    """Whether a wake must start a compute (an `active` endpoint whose process died does)."""
    if current is State.ACTIVE:
        return not compute_running
    return current in (State.SUSPENDED, State.STARTING, State.SUSPENDING)
