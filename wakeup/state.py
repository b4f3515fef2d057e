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


class HandoffPhase(enum.StrEnum):
    """The steps of a generation handoff (resize), in order; see wakeup/handoff.py."""

    FREEZE = "freeze"  # endpoint `handoff`: wakes queue, cached addresses dropped
    DRAIN = "drain"  # wait for pinned sessions to finish (or the deadline)
    STOP = "stop"  # the old generation's postmaster exits; its postmaster.pid is gone
    START = "start"  # the new generation on the same storage, with the new size class
    UNFREEZE = "unfreeze"  # endpoint `active` again at generation + 1
    DONE = "done"
    FAILED = "failed"  # the new generation did not start: the endpoint is `suspended`


# One table: a handoff only moves forward, and only a step that can fail may
# lead to FAILED. Nothing leads from STOP back to the old generation: once the
# old postmaster is gone the new size is the endpoint's size.
HANDOFF_TRANSITIONS: dict[HandoffPhase, frozenset[HandoffPhase]] = {
    HandoffPhase.FREEZE: frozenset({HandoffPhase.DRAIN}),
    HandoffPhase.DRAIN: frozenset({HandoffPhase.STOP}),
    HandoffPhase.STOP: frozenset({HandoffPhase.START, HandoffPhase.FAILED}),
    HandoffPhase.START: frozenset({HandoffPhase.UNFREEZE, HandoffPhase.FAILED}),
    HandoffPhase.UNFREEZE: frozenset({HandoffPhase.DONE}),
    HandoffPhase.DONE: frozenset(),
    HandoffPhase.FAILED: frozenset(),
}

# The endpoint state each handoff phase implies (the control DB shows it).
HANDOFF_ENDPOINT_STATE: dict[HandoffPhase, State] = {
    HandoffPhase.FREEZE: State.HANDOFF,
    HandoffPhase.DRAIN: State.HANDOFF,
    HandoffPhase.STOP: State.HANDOFF,
    HandoffPhase.START: State.HANDOFF,
    HandoffPhase.UNFREEZE: State.ACTIVE,
    HandoffPhase.DONE: State.ACTIVE,
    HandoffPhase.FAILED: State.SUSPENDED,
}


class IllegalHandoffStep(Exception):
    def __init__(self, current: HandoffPhase, target: HandoffPhase):
        super().__init__(f"handoff is at {current}, cannot go to {target}")
        self.current = current
        self.target = target


class HandoffRun:
    """One handoff's progress and the time each phase took (pure: the caller gives `now`)."""

    def __init__(self, now: float):
        self.phase = HandoffPhase.FREEZE
        self.started = now
        self._phase_started = now
        self.durations: dict[HandoffPhase, float] = {}

    def advance(self, target: HandoffPhase, now: float) -> tuple[HandoffPhase, float]:
        """Move to `target`; returns the phase that ended and how long it took."""
        if target not in HANDOFF_TRANSITIONS[self.phase]:
            raise IllegalHandoffStep(self.phase, target)
        ended, took = self.phase, max(0.0, now - self._phase_started)
        self.durations[ended] = took
        self.phase = target
        self._phase_started = now
        return ended, took

    @property
    def finished(self) -> bool:
        return not HANDOFF_TRANSITIONS[self.phase]

    def endpoint_state(self) -> State:
        return HANDOFF_ENDPOINT_STATE[self.phase]
