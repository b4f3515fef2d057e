"""A suspended endpoint's start: how the compute is spawned (as whom, without copying pgwake's
memory) and what the control DB says about it once the start succeeded or failed."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import psycopg
import pytest

from pgwake.up import Up
from tests.helpers import run
from wakeup.api import ControlAPIError, CreatedEndpoint
from wakeup.provisioners.base import Tier
from wakeup.provisioners.local import LocalProvisioner
from wakeup.provisioners.pgbin import RunAs, resolve_run_as
from wakeup.provisioners.process import read_postmaster_pid
from wakeup.state import State

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="postgres runs as another account only "
                             "when pgwake runs as root")
needs_setpriv = pytest.mark.skipif(shutil.which("setpriv") is None, reason="no setpriv here")


def provisioner(up: Up) -> LocalProvisioner:
    assert up.control is not None and isinstance(up.control.provisioner, LocalProvisioner)
    return up.control.provisioner


async def compute_pgdata(up: Up, ep_id: str) -> Path:
    assert up.control is not None and up.control.store is not None
    row = await up.control.store.get_endpoint(ep_id)
    assert row is not None and row.compute_id is not None
    return provisioner(up).compute_dir(row.compute_id, Tier(row.tier)) / "pgdata"


async def first_row(up: Up, ep: CreatedEndpoint) -> tuple[int]:
    async with await psycopg.AsyncConnection.connect(ep.url_no_sni) as conn:
        row = await (await conn.execute("select 1")).fetchone()
        assert row is not None
        return row  # type: ignore[return-value]


def runs_program(pid: int, program: str) -> bool:
    return Path(f"/proc/{pid}/exe").resolve() == Path(program).resolve()


def status_fields(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


@as_root
async def test_a_woken_compute_runs_as_the_postgres_account_with_nothing_left_of_root(
    stack: Up,
) -> None:
    assert stack.client is not None
    run_as = provisioner(stack).run_as
    assert run_as is not None
    ep = await stack.client.create_endpoint()
    await stack.client.suspend(ep.id)
    assert await first_row(stack, ep) == (1,)  # woken by the connection
    info = read_postmaster_pid(await compute_pgdata(stack, ep.id))
    assert info is not None
    # The pid pgwake spawned is the postmaster itself (the account switch exec'd it).
    binaries = provisioner(stack).binaries
    assert binaries is not None
    assert runs_program(info.pid, binaries.program("postgres"))
    fields = status_fields(info.pid)
    # Real, effective, saved and filesystem ids: none of them root, so root cannot be
    # taken back; no supplementary groups (root's), no capabilities in any set.
    assert fields["Uid"].split() == [str(run_as.uid)] * 4
    assert fields["Gid"].split() == [str(run_as.gid)] * 4
    assert fields["Groups"] == ""
    for caps in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
        assert int(fields[caps], 16) == 0, caps


SPAWN_AS = """
import sys
from wakeup.provisioners.pgbin import RunAs
from wakeup.provisioners.process import spawn
run_as = RunAs("postgres", int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] or None)
ballast = bytearray(64 << 20)  # a parent with memory worth not copying
proc = spawn(["/bin/true"], run_as)
assert proc.wait() == 0
"""


@as_root
@needs_setpriv
async def test_spawning_as_another_account_does_not_copy_pgwakes_memory() -> None:
    """fork() copies the parent's page tables (milliseconds for a pgwake process, on every
    wake); vfork() does not. Popen switches ids itself only by fork, so the switch is
    setpriv's: what strace sees pgwake do is a clone with CLONE_VM|CLONE_VFORK."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("no strace here")
    run_as = resolve_run_as(None)
    assert isinstance(run_as, RunAs) and run_as.setpriv is not None
    code, _, err = await run(
        strace, "-qq", "-e", "trace=clone,clone3,fork,vfork", "-e", "signal=none",
        sys.executable, "-c", SPAWN_AS, str(run_as.uid), str(run_as.gid), run_as.setpriv,
    )
    assert code == 0, err
    spawns = [line for line in err.splitlines()
              if line.split("(", 1)[0].strip() in ("clone", "clone3", "fork", "vfork")]
    assert spawns, err
    for line in spawns:
        assert line.startswith("vfork(") or ("CLONE_VM" in line and "CLONE_VFORK" in line), line


async def test_a_start_that_fails_leaves_the_endpoint_suspended_and_the_next_one_works(
    stack: Up,
) -> None:
    assert stack.client is not None and stack.control is not None
    control = stack.control.control
    assert control is not None and control.store is not None
    ep = await stack.client.create_endpoint()
    await stack.client.suspend(ep.id)
    conf = (await compute_pgdata(stack, ep.id)) / "postgresql.conf"
    good = conf.read_text()
    conf.write_text(good + "\nshared_buffers = 'not a size'\n")  # postgres exits at once
    try:
        with pytest.raises(ControlAPIError) as failed:
            await stack.client.wake(ep.id)
        assert failed.value.code == "wake_failed"
        # STARTING was written while postgres tried to start; the failure's own record
        # comes after it, whatever the order the two finished in.
        row = await control.store.get_endpoint(ep.id)
        assert row is not None and row.state is State.SUSPENDED and row.address is None
        assert row.compute_id is not None
        compute = await control.store.get_compute(row.compute_id)
        assert compute is not None and compute.state == "stopped"
    finally:
        conf.write_text(good)
    wakes = (await stack.client.get_endpoint(ep.id)).wakes
    woken = await stack.client.wake(ep.id)
    assert woken.cold_start == "resumed"
    row = await control.store.get_endpoint(ep.id)
    assert row is not None and row.state is State.ACTIVE and row.address == woken.address
    assert row.wakes == wakes + 1
    assert row.compute_id is not None
    compute = await control.store.get_compute(row.compute_id)
    assert compute is not None and (compute.state, compute.address) == ("running", woken.address)
    assert await first_row(stack, ep) == (1,)
