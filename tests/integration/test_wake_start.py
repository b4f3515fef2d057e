"""A suspended endpoint's start: how the compute is spawned (as whom, without copying pgwake's
memory), what the control DB says about it once the start succeeded or failed, and how the
address reaches the proxy that asked (pushed once the compute is ready, ahead of the answer)."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from pathlib import Path

import psycopg
import pytest

from pgwake.up import Up
from tests.helpers import run, running_up
from tests.integration.test_shared_state import (  # noqa: F401 (fixtures)
    Relay,
    rstack,
    select_one,
    side_proxy,
)
from wakeup.api import ControlAPIError, ControlClient, CreatedEndpoint
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


class AnswerHoldingRelay(Relay):
    """A TCP relay in front of the real control API that passes requests at once but
    holds the answer on any connection that asked for a wake, until `release` is set."""

    def __init__(self, target_port: int):
        super().__init__(target_port)
        self.release = asyncio.Event()
        self.holding = 0  # wake answers waiting for `release` right now

    async def before_answer(self, requests: list[bytes]) -> None:
        if self.release.is_set() or not any(b"/wake " in data for data in requests):
            return
        self.holding += 1
        try:
            await self.release.wait()
        finally:
            self.holding -= 1


async def test_a_woken_address_reaches_the_in_process_proxy_before_the_wake_answer(
    pg_bin: Path,
) -> None:
    """The compute is ready before the control DB has recorded it and before the control
    API's answer has travelled back: the proxy of `pgwake up` is told at once and lets
    its client in. Here the answer is held until the client has its first row, so the
    connect can only succeed through the push."""
    async with running_up("pgwake-push-", pg_bin) as up:
        assert up.client is not None and up.control is not None and up.proxy is not None
        relay = AnswerHoldingRelay(up.control.api_port)
        await relay.start()
        key = (up.settings.data_dir / "api_key").read_text().strip()
        wake = up.proxy.state.wake
        direct, wake.control = wake.control, ControlClient(f"http://127.0.0.1:{relay.port}", key)
        try:
            ep = await up.client.create_endpoint()
            await up.client.suspend(ep.id)
            async with asyncio.timeout(60):  # only a broken push gets here
                assert await first_row(up, ep) == (1,)
            assert relay.holding == 1  # the control API's answer is still on its way
            assert wake.wake_calls == 1
            shown = await up.client.get_endpoint(ep.id)
            assert shown.state == "active"
        finally:
            relay.release.set()
            await wake.control.aclose()
            wake.control = direct
            await relay.stop()


async def test_a_woken_address_reaches_a_split_proxy_through_redis_before_the_wake_answer(
    rstack: Up,  # noqa: F811
) -> None:
    """The same for a proxy in another process: the control plane puts the woken address
    in Redis and says so on the channel, and the proxy waiting on its wake call takes it."""
    assert rstack.client is not None and rstack.control is not None
    relay = AnswerHoldingRelay(rstack.control.api_port)
    await relay.start()
    key = (rstack.settings.data_dir / "api_key").read_text().strip()
    control = ControlClient(f"http://127.0.0.1:{relay.port}", key)
    proxy = await side_proxy(rstack, control, redis_url=rstack.settings.redis_url)
    try:
        ep = await rstack.client.create_endpoint()
        await select_one(proxy.port, ep)  # the verifier is in this proxy's cache now
        await rstack.client.suspend(ep.id)
        async with asyncio.timeout(60):  # only a broken push gets here
            await select_one(proxy.port, ep)
        assert relay.holding == 1
        assert proxy.state.wake.wake_calls == 1
        cached = await proxy.shared.get_address(ep.id)
        assert cached is not None and cached.budget is not None
    finally:
        relay.release.set()
        await proxy.drain(timeout=2.0)
        await control.aclose()
        await relay.stop()


REFUSE_STARTING = """
create or replace function pgwake_test_refuse_starting() returns trigger
language plpgsql as $$
begin
    if new.id = tg_argv[0] and new.state = 'starting' then
        raise exception 'the test refuses this write';
    end if;
    return new;
end $$;
create trigger pgwake_test_refuse_starting before update on endpoints for each row
    execute function pgwake_test_refuse_starting('{endpoint}');
"""


async def test_a_control_db_failure_during_the_boot_leaves_no_compute_running(
    stack: Up,
) -> None:
    """The control DB's share of a start runs while postgres boots; when it fails, the
    compute that went on starting is stopped rather than left running unrecorded."""
    assert stack.client is not None and stack.control is not None
    control = stack.control.control
    assert control is not None and control.store is not None
    ep = await stack.client.create_endpoint()
    await stack.client.suspend(ep.id)
    data = await compute_pgdata(stack, ep.id)
    await control.store.pool.execute(REFUSE_STARTING.format(endpoint=ep.id))
    try:
        with pytest.raises(ControlAPIError) as failed:
            await stack.client.wake(ep.id)
        assert failed.value.code == "wake_failed"
        assert read_postmaster_pid(data) is None  # stopped, not left behind
        row = await control.store.get_endpoint(ep.id)
        assert row is not None and row.state is State.SUSPENDED
    finally:
        await control.store.pool.execute(
            "drop trigger pgwake_test_refuse_starting on endpoints"
        )
    assert (await stack.client.wake(ep.id)).cold_start == "resumed"
    assert await first_row(stack, ep) == (1,)
