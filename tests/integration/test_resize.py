"""Size classes and resize (generation handoff) with real computes and real clients."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import psycopg
import pytest

from pgwake.up import Up
from tests.helpers import proxy_settings, run, running_up
from wakeup.api import ControlAPIError, ControlClient, CreatedEndpoint, Resize
from wakeup.provisioners.base import ProvisionerError, Tier
from wakeup.provisioners.local import LocalProvisioner
from wakeup.sizes import size_class_of

PSQL = shutil.which("psql") or "psql"
PGWAKE = str(Path(sys.executable).with_name("pgwake"))
PHASES = ("freeze", "drain", "stop", "start", "unfreeze")


@pytest.fixture(scope="module")
async def rstack(pg_bin: Path) -> AsyncIterator[Up]:
    async with running_up("pgwake-resize-", pg_bin) as up:
        yield up


def _client(up: Up) -> ControlClient:
    assert up.client is not None
    return up.client


async def psql(url: str, sql: str) -> str:
    code, out, err = await run(PSQL, "-X", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql, url)
    assert code == 0, err
    return out.strip()


async def show(url: str, name: str) -> str:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        row = await (await conn.execute(f"show {name}")).fetchone()
        assert row is not None
        return str(row[0])


async def wait_for_state(client: ControlClient, endpoint_id: str, state: str) -> None:
    # The control plane's state is visible only through the API: poll it, with a deadline.
    async with asyncio.timeout(30):
        while (await client.get_endpoint(endpoint_id)).state != state:  # noqa: ASYNC110
            await asyncio.sleep(0.02)


def pgdata_of(up: Up, compute_id: str) -> Path:
    assert up.control is not None
    return up.control.provisioner.compute_dir(compute_id, Tier.DURABLE) / "pgdata"


async def compute_id_of(up: Up, endpoint_id: str) -> str:
    assert up.control is not None and up.control.store is not None
    row = await up.control.store.get_endpoint(endpoint_id)
    assert row is not None and row.compute_id is not None
    return row.compute_id


def postmasters_on(pgdata: Path) -> list[int]:
    """Live postmasters serving `pgdata`: only a postmaster keeps `-D <pgdata>` in its
    command line (its children rewrite theirs to `postgres: …`, but a child caught
    between its fork and that rewrite still shows its parent's: it is no postmaster)."""
    wanted = str(pgdata).encode()
    found: dict[int, int] = {}  # pid → parent pid
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat", "rb") as f:
                state, ppid = f.read().rsplit(b")", 1)[1].split()[:2]
        except OSError:
            continue
        if state == b"Z":
            continue  # exited, not yet reaped: it holds no data directory
        if b"-D" in argv and wanted in argv:
            found[int(entry)] = int(ppid)
    return [pid for pid, ppid in found.items() if ppid not in found]


class PostmasterWatch:
    """Scans /proc in a thread for the whole of a race; remembers the most postmasters
    seen at once on one data directory."""

    def __init__(self, pgdata: Path):
        self.pgdata = pgdata
        self.most = 0
        self.scans = 0
        self.seen: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = postmasters_on(self.pgdata)
            self.seen.update(pids)
            self.most = max(self.most, len(pids))
            self.scans += 1

    def __enter__(self) -> PostmasterWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


async def test_create_with_size_applies_its_settings(rstack: Up) -> None:
    client = _client(rstack)
    ep = await client.create_endpoint(size="medium")
    assert ep.size == "medium"
    assert (await client.get_endpoint(ep.id)).size == "medium"
    async with await psycopg.AsyncConnection.connect(ep.url_no_sni) as conn:
        values = {}
        for name in ("shared_buffers", "max_connections", "work_mem"):
            row = await (await conn.execute(f"show {name}")).fetchone()
            assert row is not None
            values[name] = row[0]
    medium = size_class_of("medium")
    assert values == {
        "shared_buffers": medium.shared_buffers,
        "max_connections": str(medium.max_connections),
        "work_mem": medium.work_mem,
    }
    # The size survives a suspend: the next wake starts the compute with it again.
    await client.suspend(ep.id)
    assert await show(ep.url_no_sni, "shared_buffers") == "128MB"


async def test_unknown_size_is_a_400_with_a_message(rstack: Up) -> None:
    client = _client(rstack)
    with pytest.raises(ControlAPIError) as info:
        await client.create_endpoint(size="huge")
    assert info.value.status == 400 and info.value.code == "invalid_size"
    assert "small, medium, large" in info.value.message
    ep = await client.create_endpoint()
    with pytest.raises(ControlAPIError) as info:
        await client.resize(ep.id, "../small")
    assert info.value.status == 400 and info.value.code == "invalid_size"
    assert (await client.get_endpoint(ep.id)).generation == 1
    # Resizing to the size it has already is not a handoff.
    same = await client.resize(ep.id, "small")
    assert same.phases == {} and same.generation == 1 and same.endpoint.state == "active"


async def test_resize_new_connections_see_the_new_size(rstack: Up) -> None:
    client = _client(rstack)
    ep = await client.create_endpoint()
    await psql(ep.url_no_sni, "create table kept (v int); insert into kept values (1)")
    assert await psql(ep.url_no_sni, "show shared_buffers") == "32MB"
    before = await client.get_endpoint(ep.id)

    resized = await client.resize(ep.id, "medium")

    assert resized.previous_size == "small" and resized.size == "medium"
    assert resized.generation == before.generation + 1
    assert resized.endpoint.state == "active"
    assert set(resized.phases) == set(PHASES)
    assert resized.pinned_at_deadline == 0
    shown = await client.get_endpoint(ep.id)
    assert (shown.size, shown.generation, shown.state) == ("medium", before.generation + 1,
                                                           "active")
    # New connections with three real clients: psql, psycopg, asyncpg.
    assert await psql(ep.url_no_sni, "show shared_buffers") == "128MB"
    assert await show(ep.url_no_sni, "work_mem") == "8MB"
    conn = await asyncpg.connect(ep.url_no_sni)
    try:
        assert await conn.fetchval("show max_connections") == "200"
        assert await conn.fetchval("select v from kept") == 1  # same storage
    finally:
        await conn.close()
    # Each phase's time is on the control plane's /metrics.
    assert rstack.control is not None
    async with httpx.AsyncClient(base_url=rstack.control.api_url) as http:
        text = (await http.get("/metrics")).text
    for phase in PHASES:
        assert f'pgwake_handoff_phase_seconds_count{{phase="{phase}"}}' in text
    assert "pgwake_handoff_duration_seconds_count" in text


async def test_resize_of_a_suspended_endpoint_applies_at_the_next_wake(rstack: Up) -> None:
    client = _client(rstack)
    ep = await client.create_endpoint()
    await client.suspend(ep.id)
    resized = await client.resize(ep.id, "medium")
    assert resized.phases == {} and resized.endpoint.state == "suspended"
    assert resized.generation == 2
    assert await show(ep.url_no_sni, "shared_buffers") == "128MB"


async def test_connects_during_the_freeze_wait_for_the_new_generation(rstack: Up) -> None:
    """An open transaction is pinned: the drain waits for it; a new connect made
    meanwhile is neither refused nor let into the old generation."""
    client = _client(rstack)
    ep = await client.create_endpoint()
    await psql(ep.url_no_sni, "create table t (v int)")
    busy = await psycopg.AsyncConnection.connect(ep.url_no_sni)
    try:
        await busy.execute("insert into t values (1)")  # transaction open: pinned
        resize = asyncio.create_task(client.resize(ep.id, "medium", drain_seconds=60))
        await wait_for_state(client, ep.id, "handoff")
        newcomer = asyncio.create_task(show(ep.url_no_sni, "shared_buffers"))
        # The pinned session still works on the old generation during the drain.
        await busy.execute("insert into t values (2)")
        assert not resize.done() and not newcomer.done()
        await busy.commit()  # no longer pinned: the handoff goes on
        resized = await resize
        assert resized.pinned_at_deadline == 0
        assert await newcomer == "128MB"
    finally:
        await busy.close()
    assert await psql(ep.url_no_sni, "select sum(v) from t") == "3"  # the commit survived


@pytest.mark.parametrize(
    ("pin", "held"),
    [
        ("begin; insert into t values (1)", "an open transaction"),
        ("select pg_advisory_lock(42)", "advisory locks"),
        ("create temp table scratch (v int)", "temporary tables"),
    ],
    ids=["transaction", "advisory_lock", "temp_table"],
)
async def test_pinned_sessions_end_with_57P01_at_the_deadline(
    rstack: Up, pin: str, held: str
) -> None:
    client = _client(rstack)
    ep = await client.create_endpoint()
    await psql(ep.url_no_sni, "create table t (v int)")
    pinned = await psycopg.AsyncConnection.connect(ep.url_no_sni, autocommit=True)
    try:
        for statement in pin.split("; "):
            await pinned.execute(statement)
        resized = await client.resize(ep.id, "medium", drain_seconds=0.5)
        assert resized.pinned_at_deadline == 1
        with pytest.raises(psycopg.OperationalError) as info:
            await pinned.execute("select 1")
        # The proxy says why, in place of PostgreSQL's "administrator command".
        assert info.value.sqlstate == "57P01"
        assert info.value.diag.message_primary == (
            f'terminating connection because endpoint "{ep.id}" is being resized;'
            f" it held {held}"
        )
    finally:
        await pinned.close()
    assert await show(ep.url_no_sni, "shared_buffers") == "128MB"
    assert await psql(ep.url_no_sni, "select count(*) from t") == "0"  # never committed


async def test_never_two_writers_under_racing_resize_wake_suspend(rstack: Up) -> None:
    client = _client(rstack)
    assert rstack.control is not None and rstack.control.control is not None
    ep = await client.create_endpoint()
    await psql(ep.url_no_sni, "create table w (v int)")
    pgdata = pgdata_of(rstack, await compute_id_of(rstack, ep.id))
    sizes = ["medium", "small", "large", "medium"]

    acknowledged: set[int] = set()

    async def writer() -> None:
        """A client that keeps writing through the proxy across everything."""
        for i in range(40):
            try:
                async with await psycopg.AsyncConnection.connect(ep.url_no_sni) as conn:
                    await conn.execute("insert into w values (%s)", (i,))
                acknowledged.add(i)
            except psycopg.OperationalError:
                pass  # a suspend or handoff may end a session: allowed, not a lost commit

    with PostmasterWatch(pgdata) as watch:
        ops = [client.resize(ep.id, size, drain_seconds=1) for size in sizes]
        ops += [client.wake(ep.id) for _ in range(4)]
        ops += [client.suspend(ep.id) for _ in range(3)]
        results = await asyncio.gather(writer(), *ops, return_exceptions=True)
    assert watch.scans > 0 and watch.seen, "the watch never saw the compute"
    assert watch.most == 1, f"two postmasters on one data directory: {watch.seen}"
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors
    final = await client.get_endpoint(ep.id)
    # The resizes run one at a time in whatever order they arrive; one that finds the
    # endpoint at its size already is a no-op (no new generation).
    changed = [r for r in results if isinstance(r, Resize) and r.previous_size != r.size]
    assert final.generation == 1 + len(changed)
    assert final.state in ("active", "suspended")
    assert await show(ep.url_no_sni, "shared_buffers") == size_class_of(final.size).shared_buffers
    stored = await psql(ep.url_no_sni, "select string_agg(v::text, ',') from w")
    # Every acknowledged commit is there (an ended session's commit may be too).
    assert acknowledged <= {int(v) for v in stored.split(",") if v}
    assert len(postmasters_on(pgdata)) == 1


async def test_provisioner_refuses_a_second_postmaster(rstack: Up) -> None:
    """The handoff's start (adopt=False) and a second provisioner over the same storage
    (a second pgwake) both refuse while the data directory's postmaster lives."""
    client = _client(rstack)
    assert rstack.control is not None
    ep = await client.create_endpoint()
    compute_id = await compute_id_of(rstack, ep.id)
    pgdata = pgdata_of(rstack, compute_id)
    [running] = postmasters_on(pgdata)
    provisioner = rstack.control.provisioner
    with pytest.raises(ProvisionerError, match=f"pid {running}.*refusing"):
        await provisioner.start(compute_id, Tier.DURABLE, size=size_class_of("large"),
                                adopt=False)
    other = LocalProvisioner(provisioner.settings)
    await other.prepare()
    try:
        with pytest.raises(ProvisionerError, match="refusing to start a second"):
            await other.start(compute_id, Tier.DURABLE, adopt=False)
    finally:
        other._running.clear()  # it adopted nothing; do not let close() stop ours
        await other.close()
    assert postmasters_on(pgdata) == [running]
    assert await show(ep.url_no_sni, "shared_buffers") == "32MB"


async def test_warm_pool_hands_out_small_only(pg_bin: Path) -> None:
    async with running_up("pgwake-resize-pool-", pg_bin, pool_size=1,
                          pool_check_interval=0.2) as up:
        assert up.control is not None and up.control.pool is not None
        pool = up.control.pool
        await pool.wait_until(lambda: len(pool.ready) == 1, timeout=60)
        client = _client(up)
        medium: CreatedEndpoint = await client.create_endpoint(size="medium")
        assert medium.cold_start == "pool_miss"  # a small pooled compute is not medium
        assert await show(medium.url_no_sni, "shared_buffers") == "128MB"
        await pool.wait_until(lambda: len(pool.ready) == 1, timeout=60)
        small = await client.create_endpoint()
        assert small.cold_start == "pool_hit" and small.size == "small"
        assert await show(small.url_no_sni, "shared_buffers") == "32MB"


async def test_session_open_across_a_resize_sees_the_new_size(rstack: Up) -> None:
    client = _client(rstack)
    ep = await client.create_endpoint()
    async with await psycopg.AsyncConnection.connect(ep.url_no_sni, autocommit=True) as conn:
        await conn.execute("set application_name = 'kept-across-resize'")
        row = await (await conn.execute("show shared_buffers")).fetchone()
        assert row == ("32MB",)
        await client.resize(ep.id, "medium")
        row = await (await conn.execute("show shared_buffers")).fetchone()
        assert row == ("128MB",)
        row = await (await conn.execute("show application_name")).fetchone()
        assert row == ("kept-across-resize",)


async def test_drain_waits_for_a_fresh_pinned_report_from_the_proxies(rstack: Up) -> None:
    """Proxies that track pinning report it on /v1/activity; the drain waits for a
    report newer than the freeze that says nothing is pinned."""
    client = _client(rstack)
    ep = await client.create_endpoint()
    # Before the freeze this proxy has a session on the endpoint; what it holds after
    # the freeze is unknown until it reports again.
    await client.report_activity("proxy-a", {ep.id: 1}, ttl=60, pinned={ep.id: 0})
    resize = asyncio.create_task(client.resize(ep.id, "medium", drain_seconds=60))
    await wait_for_state(client, ep.id, "handoff")
    await client.report_activity("proxy-a", {ep.id: 1}, ttl=60, pinned={ep.id: 1})
    assert not resize.done()
    shown = await client.get_endpoint(ep.id)
    assert (shown.state, shown.pinned, shown.connections) == ("handoff", 1, 1)
    # Nothing pinned any more, and the session is known to be movable (parkable).
    await client.report_activity("proxy-a", {ep.id: 1}, ttl=60, pinned={ep.id: 0},
                                 parkable={ep.id: 1})
    resized = await resize
    assert resized.pinned_at_deadline == 0 and resized.size == "medium"
    await client.report_activity("proxy-a", {}, ttl=60, pinned={})


async def test_restart_during_a_handoff_leaves_no_postmaster_behind(rstack: Up) -> None:
    """pgwake dies mid-handoff (old generation in its smart shutdown, a session still
    on it): the next pgwake stops it, and the endpoint wakes at its recorded size."""
    from wakeup.control import ControlPlane, ControlSettings
    from wakeup.state import State

    client = _client(rstack)
    assert rstack.control is not None and rstack.control.control is not None
    plane = rstack.control.control
    ep = await client.create_endpoint()
    compute_id = await compute_id_of(rstack, ep.id)
    pgdata = pgdata_of(rstack, compute_id)
    async with await psycopg.AsyncConnection.connect(ep.url_no_sni) as held:
        # In a transaction, so pinned: an idle movable session would park and move on
        # (once surveyed, which takes a second: that would make the test one of timing).
        await held.execute("select 1")
        await plane.store.set_state(ep.id, State.HANDOFF)
        assert await plane.provisioner.refuse_new_connections(compute_id)
        info = plane.provisioner.live_postmaster(compute_id, Tier.DURABLE)
        assert info is not None and info.status == "stopping"  # smart shutdown began
        restarted = LocalProvisioner(plane.provisioner.settings)
        await restarted.prepare()
        await ControlPlane(plane.store, restarted, ControlSettings()).recover()
        assert postmasters_on(pgdata) == []
        assert (await client.get_endpoint(ep.id)).state == "suspended"
        with pytest.raises(psycopg.OperationalError):
            await held.execute("select 1")
    assert await show(ep.url_no_sni, "shared_buffers") == "32MB"
    assert len(postmasters_on(pgdata)) == 1


async def test_cli_create_size_resize_and_show(rstack: Up) -> None:
    assert rstack.control is not None and rstack.api_key_file is not None
    env = {"PGWAKE_API_URL": rstack.control.api_url,
           "PGWAKE_API_KEY": rstack.api_key_file.read_text().strip()}

    async def cli(*args: str) -> tuple[int, str, str]:
        return await run(PGWAKE, "endpoint", *args, env=env)

    code, out, err = await cli("create", "--size", "medium", "--json")
    assert code == 0, err
    created = json.loads(out)
    assert created["size"] == "medium"
    assert await show(created["url_no_sni"], "shared_buffers") == "128MB"

    code, out, err = await cli("resize", created["id"], "small", "--json")
    assert code == 0, err
    resized = json.loads(out)
    assert (resized["previous_size"], resized["size"], resized["generation"]) == (
        "medium", "small", 2)
    assert set(resized["phases"]) == set(PHASES)

    code, out, err = await cli("show", created["id"], "--json")
    assert code == 0, err
    shown = json.loads(out)
    assert (shown["size"], shown["generation"], shown["state"]) == ("small", 2, "active")
    assert await show(created["url_no_sni"], "shared_buffers") == "32MB"

    code, out, err = await cli("resize", created["id"], "medium")
    assert code == 0, err
    assert "small → medium, generation 3" in out

    code, out, err = await run(PGWAKE, "status", env=env)
    assert code == 0, err
    [line] = [line for line in out.splitlines() if created["id"] in line]
    assert "medium" in line and "active" in line

    code, out, err = await cli("resize", created["id"], "gigantic")
    assert code != 0 and "small, medium, large" in err + out
    code, out, err = await cli("create", "--size", "tiny")
    assert code != 0 and "small, medium, large" in err + out


async def test_a_new_generation_that_cannot_start_leaves_the_endpoint_suspended(
    rstack: Up,
) -> None:
    """A real start failure (postgres rejects a setting) after the old generation is gone:
    a clear 503, the endpoint suspended at the new size, its data intact, no postmaster;
    the next connect starts it once the setting is fixed."""
    import dataclasses

    client = _client(rstack)
    assert rstack.control is not None
    provisioner = rstack.control.provisioner
    ep = await client.create_endpoint()
    await psql(ep.url_no_sni, "create table kept (v int); insert into kept values (5)")
    pgdata = pgdata_of(rstack, await compute_id_of(rstack, ep.id))
    good = provisioner.settings
    provisioner.settings = dataclasses.replace(
        good, extra_settings=(*good.extra_settings, ("work_mem", "-1"))
    )
    try:
        with pytest.raises(ControlAPIError) as info:
            await client.resize(ep.id, "medium")
    finally:
        provisioner.settings = good
    assert info.value.status == 503 and info.value.code == "handoff_failed"
    assert "suspended" in info.value.message
    shown = await client.get_endpoint(ep.id)
    assert (shown.state, shown.size, shown.generation) == ("suspended", "medium", 2)
    assert postmasters_on(pgdata) == []
    assert await psql(ep.url_no_sni, "select v from kept") == "5"
    assert await show(ep.url_no_sni, "shared_buffers") == "128MB"


async def test_freeze_holds_at_every_proxy_even_one_with_a_stale_cache(rstack: Up) -> None:
    """Two proxies without shared state (no invalidation reaches the second): both have
    the old address cached; connects made on either during the drain are served by the
    new generation, never by the old one."""
    from proxy.app import ProxyServer

    client = _client(rstack)
    assert rstack.proxy is not None
    other = ProxyServer(
        proxy_settings(listen_host="127.0.0.1", listen_port=0),
        control=client,
        server_tls=rstack.proxy.state.server_tls,
    )
    await other.start()
    try:
        ep = await client.create_endpoint()
        urls = [ep.url_no_sni,
                ep.url_no_sni.replace(f":{rstack.proxy_port}/", f":{other.port}/")]
        for url in urls:  # both proxies cache the first generation's address
            assert await show(url, "shared_buffers") == "32MB"
        pinned = await psycopg.AsyncConnection.connect(ep.url_no_sni)
        try:
            await pinned.execute("select 1")  # a transaction is open: the drain waits
            resize = asyncio.create_task(client.resize(ep.id, "medium", drain_seconds=60))
            await wait_for_state(client, ep.id, "handoff")
            newcomers = [asyncio.create_task(show(url, "shared_buffers")) for url in urls]
            await pinned.commit()
            await resize
        finally:
            await pinned.close()
        assert await asyncio.gather(*newcomers) == ["128MB", "128MB"]
    finally:
        await other.drain(timeout=1)


async def test_a_handoff_cut_short_never_hands_out_the_frozen_generation(rstack: Up) -> None:
    """The handoff is cancelled during its drain (the old generation already refuses
    new connections): the endpoint is suspended, not left `handoff` or served by a
    postmaster that is shutting down; the next connect starts it at the old size."""
    client = _client(rstack)
    assert rstack.control is not None and rstack.control.control is not None
    plane = rstack.control.control
    ep = await client.create_endpoint()
    pgdata = pgdata_of(rstack, await compute_id_of(rstack, ep.id))
    async with await psycopg.AsyncConnection.connect(ep.url_no_sni) as pinned:
        await pinned.execute("select 1")  # open transaction: the drain waits
        handoff = asyncio.create_task(plane.resize(ep.id, size_class_of("medium"),
                                                   drain_timeout=60))
        await wait_for_state(client, ep.id, "handoff")
        handoff.cancel()
        with pytest.raises(asyncio.CancelledError):
            await handoff
        shown = await client.get_endpoint(ep.id)
        assert (shown.state, shown.size, shown.generation) == ("suspended", "small", 1)
        assert postmasters_on(pgdata) == []
        with pytest.raises(psycopg.OperationalError):
            await pinned.execute("select 1")
    assert await show(ep.url_no_sni, "shared_buffers") == "32MB"


async def test_a_session_querying_through_a_resize_is_moved_not_cut(rstack: Up) -> None:
    """A client that keeps querying while its endpoint is resized: the proxy holds the
    session at an idle point from the freeze on, so it parks when the old generation
    stops and its next query runs on the new one. No error, settings kept."""
    client = _client(rstack)
    ep = await client.create_endpoint()
    async with await psycopg.AsyncConnection.connect(ep.url_no_sni, autocommit=True) as conn:
        await conn.execute("set application_name = 'busy-through-resize'")
        resize = asyncio.create_task(client.resize(ep.id, "medium"))
        answers = []
        while not resize.done():  # the client's own pace: a query, then the next
            cur = await conn.execute("show shared_buffers")
            answers.append((await cur.fetchone())[0])  # type: ignore[index]
        await resize
        cur = await conn.execute("show shared_buffers")
        assert await cur.fetchone() == ("128MB",)
        cur = await conn.execute("show application_name")
        assert await cur.fetchone() == ("busy-through-resize",)
    assert answers and set(answers) <= {"32MB", "128MB"}
