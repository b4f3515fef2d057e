"""Compute size classes: the one table of PostgreSQL settings and Kubernetes resources per size.

An endpoint has one size class (`small`, `medium`, `large`), chosen at create
time and changed by a resize (a generation handoff). Every provisioner reads
this table and nothing else:

| size   | sh_buf | max_conn | work_mem| maint_mem | cache | CPU req/lim | mem req/lim   | ramdisk |
|--------|--------|----------|---------|-----------|-------|-------------|---------------|---------|
| small  | 32MB   | 100      | 4MB     | 32MB      | 256MB | 250m / 1    | 256Mi / 512Mi | 256Mi   |
| medium | 128MB  | 200      | 8MB     | 128MB     | 1GB   | 1 / 2       | 1Gi / 2Gi     | 1Gi     |
| large  | 512MB  | 400      | 16MB    | 256MB     | 4GB   | 2 / 4       | 4Gi / 8Gi     | 4Gi     |

(sh_buf = shared_buffers, max_conn = max_connections, maint_mem =
maintenance_work_mem, cache = effective_cache_size, ramdisk = the size limit
of the memory-backed emptyDir that holds an ephemeral compute's data
directory on Kubernetes.)

Why these numbers: shared_buffers is about a quarter of the memory request
(PostgreSQL's usual advice), the memory limit leaves room for
`max_connections` backends of a few MB each plus `work_mem` for the few that
sort at once, and `effective_cache_size` tells the planner about the page
cache the limit allows. The warm pool holds `small` computes only unless a
pool size is configured for another class.

The ramdisk is half the memory limit: a memory-backed emptyDir's pages are
charged to the pod's memory limit (the kubelet also caps the volume at that
limit), so the other half stays for shared_buffers and the backends. An
ephemeral compute that writes more than that (data plus WAL) gets "No space
left on device" from PostgreSQL, never an OOM kill.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

SizeName = Literal["small", "medium", "large"]
DEFAULT_SIZE: SizeName = "small"


class UnknownSize(ValueError):
    def __init__(self, name: str):
        super().__init__(f"unknown size class {name!r}: use one of {', '.join(SIZES)}")
        self.name = name


@dataclass(frozen=True)
class SizeClass:
    name: SizeName
    shared_buffers: str
    max_connections: int
    work_mem: str
    maintenance_work_mem: str
    effective_cache_size: str
    cpu_request: str
    cpu_limit: str
    memory_request: str
    memory_limit: str
    ephemeral_storage: str  # Kubernetes: sizeLimit of the ephemeral tier's in-memory data volume

    def postgres_settings(self) -> tuple[tuple[str, str], ...]:
        """`-c name=value` pairs for the postmaster (they override postgresql.conf)."""
        return (
            ("shared_buffers", self.shared_buffers),
            ("max_connections", str(self.max_connections)),
            ("work_mem", self.work_mem),
            ("maintenance_work_mem", self.maintenance_work_mem),
            ("effective_cache_size", self.effective_cache_size),
        )

    def kubernetes_resources(self) -> dict[str, dict[str, str]]:
        """The compute container's `resources` (a Pod spec fragment)."""
        return {
            "requests": {"cpu": self.cpu_request, "memory": self.memory_request},
            "limits": {"cpu": self.cpu_limit, "memory": self.memory_limit},
        }


SIZES: dict[str, SizeClass] = {
    size.name: size
    for size in (
        SizeClass("small", "32MB", 100, "4MB", "32MB", "256MB", "250m", "1", "256Mi", "512Mi",
                  "256Mi"),
        SizeClass("medium", "128MB", 200, "8MB", "128MB", "1GB", "1", "2", "1Gi", "2Gi", "1Gi"),
        SizeClass("large", "512MB", 400, "16MB", "256MB", "4GB", "2", "4", "4Gi", "8Gi", "4Gi"),
    )
}


def size_class_of(name: str) -> SizeClass:
    """The size class called `name`; UnknownSize (a ValueError) for anything else."""
    size = SIZES.get(name)
    if size is None:
        raise UnknownSize(name)
    return size
