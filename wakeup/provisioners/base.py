"""The provisioner interface every compute backend implements (local processes, Kubernetes)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol

from wakeup.api import ComputeAddress

__all__ = ["AdminTarget", "ComputeAddress", "Provisioner", "ProvisionerError", "Tier"]


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


class Provisioner(Protocol):
    # True when computes keep running while the control plane restarts (pods): a
    # clean shutdown of the control plane then leaves them up for the next one.
    outlives_control_plane: bool

    async def prepare(self) -> None:
        """Find binaries, build templates; called once before anything else."""

    async def create(self, compute_id: str, tier: Tier) -> None:
        """Give a compute its storage (a data directory cloned from the template)."""

    async def start(self, compute_id: str, tier: Tier) -> ComputeAddress:
        """Start the compute and return once it accepts connections."""

    async def stop(self, compute_id: str, *, smart: float = 0.0) -> None:
        """Fast shutdown (after `smart` s of smart shutdown, if given). Storage survives."""

    async def destroy(self, compute_id: str, tier: Tier) -> None:
        """Stop if running and delete the storage."""

    async def status(self, compute_id: str, tier: Tier) -> ComputeAddress | None:
        """The address of a running compute (also one adopted after a restart), else None."""

    def admin_target(self, compute_id: str, tier: Tier) -> AdminTarget:
        """Superuser access for applying config."""

    def is_running(self, compute_id: str) -> bool:
        """Whether the compute runs now (from memory or a cache: no I/O)."""

    def known_computes(self, tier: Tier) -> list[str]:
        """Computes that have storage or a process/pod, known to the control DB or not."""

    async def stop_orphan(self, compute_id: str, tier: Tier) -> None:
        """Stop a compute the control DB does not know; its storage stays."""

    async def close(self) -> None:
        """Release the provisioner; stop the computes unless they outlive the control plane."""
