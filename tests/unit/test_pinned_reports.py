"""How the control plane reads the proxies' pinned-session reports during a drain."""

from __future__ import annotations

from pathlib import Path

from wakeup.control import ControlPlane, ControlSettings
from wakeup.provisioners.local import LocalProvisioner, LocalSettings
from wakeup.store import Store


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def plane(clock: Clock) -> ControlPlane:
    provisioner = LocalProvisioner(LocalSettings(root=Path("/nonexistent"),
                                                 ephemeral_root=Path("/nonexistent")))
    return ControlPlane(Store(), provisioner, ControlSettings(), clock=clock)


async def test_fresh_reports_are_summed_and_expire() -> None:
    clock = Clock()
    cp = plane(clock)
    await cp.record_activity("a", {"ep-1": 3}, ttl=5, pinned={"ep-1": 1},
                             parkable={"ep-1": 2})
    await cp.record_activity("b", {"ep-1": 2, "ep-2": 1}, ttl=5, pinned={"ep-1": 2},
                             parkable={"ep-2": 1})
    assert cp.pinned_sessions("ep-1") == 3
    assert cp.reported_unmovable("ep-1", since=clock.now) == 3
    assert cp.reported_unmovable("ep-2", since=clock.now) == 0
    clock.now += 6
    assert cp.pinned_sessions("ep-1") == 0
    assert cp.reported_unmovable("ep-1", since=clock.now - 10) == 0


async def test_a_report_older_than_the_freeze_counts_until_renewed() -> None:
    clock = Clock()
    cp = plane(clock)
    # Before the freeze every session was idle and known to be movable.
    await cp.record_activity("a", {"ep-1": 2}, ttl=30, pinned={}, parkable={"ep-1": 2})
    await cp.record_activity("quiet", {"ep-2": 4}, ttl=30, pinned={}, parkable={"ep-2": 4})
    frozen = clock.now + 1
    clock.now = frozen + 0.5
    # "a" had sessions on ep-1 and has not spoken since the freeze: unknown, so 1.
    assert cp.reported_unmovable("ep-1", since=frozen) == 1
    assert cp.reported_unmovable("ep-2", since=frozen) == 1  # "quiet" has sessions there
    # No proxy has a session on ep-3: nothing to wait for.
    assert cp.reported_unmovable("ep-3", since=frozen) == 0
    await cp.record_activity("a", {"ep-1": 2}, ttl=30, pinned={"ep-1": 0},
                             parkable={"ep-1": 2})
    assert cp.reported_unmovable("ep-1", since=frozen) == 0


async def test_proxies_that_do_not_track_pinning_are_not_waited_for() -> None:
    clock = Clock()
    cp = plane(clock)
    await cp.record_activity("old-proxy", {"ep-1": 5}, ttl=30)  # no `pinned` field at all
    assert cp.reported_unmovable("ep-1", since=clock.now + 1) == 0
    assert cp.reported_connections("ep-1") == 5


async def test_sessions_still_connecting_are_not_waited_for() -> None:
    """A proxy that counts its sessions with a backend (`unmovable`): one still in its
    connect path holds a connection slot but nothing on the old generation."""
    clock = Clock()
    cp = plane(clock)
    await cp.record_activity("a", {"ep-1": 3}, ttl=30, pinned={}, parkable={"ep-1": 1},
                             unmovable={})
    assert cp.reported_unmovable("ep-1", since=clock.now) == 0
    await cp.record_activity("a", {"ep-1": 3}, ttl=30, pinned={"ep-1": 1},
                             parkable={"ep-1": 1}, unmovable={"ep-1": 1})
    assert cp.reported_unmovable("ep-1", since=clock.now) == 1
    # Without the field, connections not known to be parkable are waited for.
    await cp.record_activity("a", {"ep-1": 3}, ttl=30, pinned={}, parkable={"ep-1": 1})
    assert cp.reported_unmovable("ep-1", since=clock.now) == 2
