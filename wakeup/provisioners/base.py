"""The provisioner interface every compute backend implements (local processes, Kubernetes)."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from wakeup.api import ComputeAddress
from wakeup.sizes import SizeClass

__all__ = [
    "AdminTarget", "ComputeAddress", "Provisioner", "ProvisionerError", "RunningServer", "Tier",
    "connection_budget",
]

# PostgreSQL's own defaults for the settings that decide how many clients get in.
_PG_DEFAULTS = {"max_connections": 100, "superuser_reserved_connections": 3,
                "reserved_connections": 0}


def connection_budget(settings: Mapping[str, str | int]) -> int:
    """Client sessions a compute admits: `max_connections` minus the slots PostgreSQL
    keeps for superusers (the control plane's admin) and for `pg_use_reserved_connections`.
    Proxies share this budget, so a herd never meets "remaining connection slots are
    reserved" at the compute."""

    def value(name: str) -> int:
        return int(settings.get(name, _PG_DEFAULTS[name]))

    budget = (value("max_connections") - value("superuser_reserved_connections")
              - value("reserved_connections"))
    return max(1, budget)


class Tier(enum.StrEnum):
    DURABLE = "durable"
    EPHEMERAL = "ephemeral"


class ProvisionerError(Exception):
    """A compute could not be created, started or stopped; the message is operator-facing."""


@dataclass(frozen=True)
class AdminTarget:
    """How the control plane reaches a compute as its superuser (never through the proxy)."""

    host: str  # a Unix socket directory or an IP
    port: int
    user: str
    database: str = "postgres"
    # None over a private Unix socket (local); a generated per-compute password over
    # the network (Kubernetes).
    password: str | None = field(default=None, repr=False)


class RunningServer(Protocol):
    """What a provisioner knows of a live server process (local: its postmaster.pid)."""

    @property
    def pid(self) -> int: ...

    @property
    def status(self) -> str: ...


class Provisioner(Protocol):
    # True when computes keep running while the control plane restarts (pods): a
    # clean shutdown of the control plane then leaves them up for the next one.
    outlives_control_plane: bool
    # True when an ephemeral compute's storage survives a stop (a local memory-backed
    # directory does; a pod's memory volume goes with the pod): a resize must not
    # start the next generation on empty storage.
    ephemeral_survives_stop: bool

    async def prepare(self) -> None:
        """Find binaries, build templates; called once before anything else."""

    async def create(self, compute_id: str, tier: Tier) -> None:
        """Give a compute its storage (a data directory cloned from the template)."""

    async def start(
        self, compute_id: str, tier: Tier, *, size: SizeClass | None = None,
        adopt: bool = True,
    ) -> ComputeAddress:
        """Start the compute with the size class's settings (None: the default class)
        and return once it accepts connections. `adopt=False` (a generation handoff):
        a compute still running is an error, never reused; a second server on one
        storage is refused in every case."""

    async def refuse_new_connections(self, compute_id: str) -> bool:
        """Freeze: open sessions go on, new connections are refused with 57P03. True
        once that holds; False when the compute was not frozen (not running, or not
        reachable): a handoff then relies on the control plane's own freeze."""

    def live_postmaster(self, compute_id: str, tier: Tier) -> RunningServer | None:
        """A server still running on the compute's storage, in any state (starting,
        ready, shutting down). A handoff starts the next generation only once this is
        None: never two writers on one data directory."""

    async def stop(self, compute_id: str, *, smart: float = 0.0) -> None:
        """Fast shutdown (after `smart` s of smart shutdown, if given). Storage survives."""

    async def destroy(self, compute_id: str, tier: Tier) -> None:
        """Stop if running and delete the storage."""

    async def status(self, compute_id: str, tier: Tier) -> ComputeAddress | None:
        """The address of a running compute (also one adopted after a restart), else None."""

    def admin_target(self, compute_id: str, tier: Tier) -> AdminTarget:
        """Superuser access for applying config."""

    def connection_budget(self, size: SizeClass) -> int:
        """Client sessions a compute of this size admits (`connection_budget` of its
        settings)."""

    def is_running(self, compute_id: str) -> bool:
        """Whether the compute runs now (from memory or a cache: no I/O)."""

    def known_computes(self, tier: Tier) -> list[str]:
        """Computes that have storage or a process/pod, known to the control DB or not."""

    async def stop_orphan(self, compute_id: str, tier: Tier) -> None:
        """Stop a compute the control DB does not know; its storage stays."""

    async def close(self) -> None:
        """Release the provisioner; stop the computes unless they outlive the control plane."""
