"""The wake path under load: shared state through a real Redis, two proxy processes,
suspends and crashes under traffic, Redis and control-API outages, paced cache refills."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import ssl
import statistics
import struct
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import psycopg
import pytest
import redis.asyncio as aioredis
from prometheus_client import generate_latest

from pgwake.up import Up
from proxy.app import ProxyServer
from proxy.shared import RedisShared
from tests.helpers import proxy_settings, running_up
from tests.servers import RedisServer, free_port, raise_open_file_limit
from tls.context import ServerTLS
from wakeup.api import ControlClient, CreatedEndpoint
from wakeup.provisioners.base import Tier

DEADLINE = 60.0


@pytest.fixture(scope="module")
async def rstack(pg_bin: Path, redis_server: RedisServer) -> AsyncIterator[Up]:
    """`pgwake up --redis`: control plane + proxy in process, state in Redis."""
    raise_open_file_limit()
    base = 30000 + (os.getpid() % 200) * 50
    async with running_up(
        "pgwake-shared-", pg_bin, redis_url=redis_server.url, port_range=(base, base + 49)
    ) as up:
        yield up


class Progress:
    """Counts finished client loops; lets the test await a count (no polling)."""

    def __init__(self) -> None:
        self.count = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    def step(self) -> None:
        self.count += 1
        for target, future in self._waiters:
            if self.count >= target and not future.done():
                future.set_result(None)

    async def reach(self, target: int) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((target, future))
        if self.count >= target:
            return
        async with asyncio.timeout(DEADLINE):
            await future


def kill_process_tree(pid: int) -> None:
    """SIGKILL a postmaster and its backends together, as when a compute's machine dies."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                children.append(int(stat.parent.name))
    for victim in [pid, *children]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)


def conninfo(port: int, ep: CreatedEndpoint) -> dict[str, object]:
    return {
        "host": "127.0.0.1", "port": port, "user": ep.user, "password": ep.password,
        "dbname": ep.database, "sslmode": "require", "options": f"endpoint={ep.id}",
        "connect_timeout": 30,
    }


async def select_one(port: int, ep: CreatedEndpoint) -> float:
    started = time.perf_counter()
    async with await psycopg.AsyncConnection.connect(**conninfo(port, ep)) as conn:
        cur = await conn.execute("select 1")
        assert await cur.fetchone() == (1,)
    return time.perf_counter() - started


async def asyncpg_select_one(port: int, ep: CreatedEndpoint) -> None:
    """asyncpg, for the SQLSTATE of a failed connect (libpq does not expose it)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    conn = await asyncpg.connect(
        host="127.0.0.1", port=port, user=ep.user, password=ep.password,
        database=ep.database, ssl=ctx, server_settings={"options": f"endpoint={ep.id}"},
        timeout=30,
    )
    try:
        assert await conn.fetchval("select 1") == 1
    finally:
        await conn.close()


async def start_proxy_process(up: Up, redis_url: str, *extra: str) -> tuple[
    asyncio.subprocess.Process, int
]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from pgwake.cli import main; main()", "proxy",
        "--listen", "127.0.0.1:0", "--data-dir", str(up.settings.data_dir),
        "--redis", redis_url, "--log-level", "warning", *extra,
        stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    async with asyncio.timeout(DEADLINE):
        line = (await proc.stdout.readline()).decode()
    assert "listening on" in line, line
    return proc, int(line.rsplit(":", 1)[1])


async def stop_process(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(DEADLINE):
            await proc.wait()


# The herd's clients run in their own processes, as a benchmark's do. In this one they
# would share the event loop with the in-process control plane, and libpq's TLS and
# SCRAM work (PBKDF2, computed inside the connect poll) for 500 clients stalls that loop
# for seconds on a busy machine: the wake then waits on a control API that cannot
# answer, and every client reaches the proxy's 10 s handshake deadline.
HERD_CLIENT = r"""
import asyncio, json, sys, time
import psycopg

async def one(conninfo):
    started = time.perf_counter()
    try:
        async with await psycopg.AsyncConnection.connect(**conninfo) as conn:
            cur = await conn.execute("select 1")
            assert await cur.fetchone() == (1,)
    except Exception as exc:
        return repr(exc)
    return time.perf_counter() - started

async def main():
    conninfos = json.loads(sys.stdin.read())
    print(json.dumps(await asyncio.gather(*(one(c) for c in conninfos))))

asyncio.run(main())
"""


async def herd_from_client_processes(
    ports: list[int], ep: CreatedEndpoint, processes: int = 4
) -> list[float | str]:
    """Connect + select 1 once per port, all at once, from `processes` client processes
    (like pgbench -j: one loop cannot do 500 clients' crypto fast on a busy machine);
    latencies, or errors as strings."""
    # Client-side deadlines mean "broken" here too (libpq's default is none at all).
    conninfos = [{**conninfo(port, ep), "connect_timeout": 240} for port in ports]

    async def client_process(share: list[dict[str, object]]) -> list[float | str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", HERD_CLIENT, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            async with asyncio.timeout(DEADLINE * 4):
                out, _ = await proc.communicate(json.dumps(share).encode())
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode == 0
        results: list[float | str] = json.loads(out)
        assert len(results) == len(share)
        return results

    shares = await asyncio.gather(
        *(client_process(conninfos[i::processes]) for i in range(processes))
    )
    return [result for share in shares for result in share]


async def test_herd_of_500_over_two_proxy_processes_wakes_once(rstack: Up) -> None:
    assert rstack.client is not None
    ep = await rstack.client.create_endpoint()
    # Default caps: the proxies share the compute's own connection budget. What this
    # test checks is one wake for a herd, not how the proxy polices slow clients
    # (tests/integration/test_frontdoor*.py do): 500 clients' TLS and SCRAM on a loaded
    # 2-core machine take longer than the default per-client deadlines, so these only
    # catch a broken proxy here.
    patient = ["--handshake-timeout", "120", "--startup-timeout", "120", "--tls-timeout",
               "120", "--auth-step-timeout", "120", "--endpoint-queue-timeout", "120"]
    procs = [await start_proxy_process(rstack, rstack.settings.redis_url or "", *patient)
             for _ in range(2)]
    try:
        await select_one(procs[0][1], ep)  # both proxies reach it; the role is known
        await rstack.client.suspend(ep.id)
        before = (await rstack.client.get_endpoint(ep.id)).wakes
        ports = [procs[i % 2][1] for i in range(500)]
        started = time.perf_counter()
        results = await herd_from_client_processes(ports, ep)
        elapsed = time.perf_counter() - started
        errors = [r for r in results if isinstance(r, str)]
        assert not errors, f"{len(errors)} failed, first: {errors[0]}"
        times = sorted(r for r in results if isinstance(r, float))
        after = await rstack.client.get_endpoint(ep.id)
        assert after.wakes == before + 1
        p50 = statistics.median(times)
        p99 = times[int(len(times) * 0.99) - 1]
        print(f"\n500-connection herd over 2 proxy processes: p50 {p50 * 1000:.0f} ms, "
              f"p99 {p99 * 1000:.0f} ms, all done in {elapsed:.2f} s, wakes +1")
    finally:
        for proc, _ in procs:
            await stop_process(proc)


async def test_suspend_while_20_clients_loop_shows_no_errors(rstack: Up) -> None:
    assert rstack.client is not None
    ep = await rstack.client.create_endpoint()
    port = rstack.proxy_port
    stop = asyncio.Event()
    progress = Progress()
    errors: list[BaseException] = []

    async def loop_client() -> None:
        while not stop.is_set():
            try:
                await select_one(port, ep)
                progress.step()
            except Exception as exc:
                errors.append(exc)
                progress.step()

    before = (await rstack.client.get_endpoint(ep.id)).wakes
    clients = [asyncio.create_task(loop_client()) for _ in range(20)]
    try:
        for _ in range(2):
            await progress.reach(progress.count + 40)
            suspended = await rstack.client.suspend(ep.id)
            assert suspended.state == "suspended"
        await progress.reach(progress.count + 40)
    finally:
        stop.set()
        await asyncio.gather(*clients)
    assert not errors, f"{len(errors)} client-visible errors, first: {errors[0]!r}"
    assert (await rstack.client.get_endpoint(ep.id)).wakes >= before + 2


async def test_sigkilled_compute_under_cached_address(rstack: Up) -> None:
    assert rstack.client is not None and rstack.control is not None
    ep = await rstack.client.create_endpoint()
    port = rstack.proxy_port
    inflight = await psycopg.AsyncConnection.connect(**conninfo(port, ep))
    try:
        await inflight.execute("select 1")
        store, provisioner = rstack.control.store, rstack.control.provisioner
        assert store is not None
        row = await store.get_endpoint(ep.id)
        assert row is not None and row.compute_id is not None
        pgdata = provisioner.compute_dir(row.compute_id, Tier.DURABLE) / "pgdata"
        pidfile = pgdata / "postmaster.pid"
        kill_process_tree(int(pidfile.read_text().split()[0]))
        # The session in flight fails cleanly and promptly, with a SQLSTATE.
        with pytest.raises(psycopg.OperationalError) as info:
            async with asyncio.timeout(10):
                await inflight.execute("select 1")
        # 57P01 when the dying backend says so itself, 08006 from the proxy when
        # it was killed before it could: never a bare "connection closed".
        assert info.value.sqlstate in ("57P01", "08006"), repr(info.value)
    finally:
        await inflight.close()
    before = (await rstack.client.get_endpoint(ep.id)).wakes
    async with asyncio.timeout(rstack.settings.wake_timeout):
        await select_one(port, ep)  # the cached address is dead: re-wake, served
    assert (await rstack.client.get_endpoint(ep.id)).wakes == before + 1


async def test_redis_outage_degrades_then_sharing_resumes(
    rstack: Up, redis_server: RedisServer
) -> None:
    assert rstack.client is not None and rstack.proxy is not None
    shared = rstack.proxy.shared
    assert isinstance(shared, RedisShared)
    ep = await rstack.client.create_endpoint()
    port = rstack.proxy_port
    await select_one(port, ep)
    errors_before = shared.errors
    await redis_server.stop()
    try:
        await rstack.client.suspend(ep.id)  # its invalidation cannot be published
        for _ in range(3):
            await select_one(port, ep)  # a wake, then cached: all served
            await shared.invalidate(ep.id)
        assert shared.errors > errors_before
        assert shared.degraded
        # Operators see it on /metrics, not only in the log.
        exposition = generate_latest(rstack.registry).decode()
        assert "pgwake_shared_state_degraded 1.0" in exposition
        assert f"pgwake_shared_state_errors_total {float(shared.errors)}" in exposition
    finally:
        await redis_server.start()
    async with asyncio.timeout(DEADLINE):
        await shared.subscribed.wait()  # the listener is back on the channel
    await rstack.client.suspend(ep.id)
    async with asyncio.timeout(DEADLINE):
        while shared.degraded:  # the pause after an error passes; then Redis is used again
            await shared.invalidate(ep.id)
            if shared.degraded:
                await asyncio.sleep(0.2)
    await select_one(port, ep)
    check = aioredis.from_url(redis_server.url)
    try:
        assert await check.exists(f"pgwake:addr:{ep.id}") == 1  # shared again
    finally:
        await check.aclose()


class Relay:
    """A TCP relay in front of the real control API, so the API can 'go down' and return."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = free_port()
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in list(self.writers):
            writer.transport.abort()
        await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers.add(up_writer)
        seen: list[bytes] = []  # this connection's requests so far (for `before_answer`)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                       answers: bool) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    if answers:
                        await self.before_answer(seen)
                    else:
                        seen.append(data)
                    dst.write(data)
                    await dst.drain()
            dst.close()

        try:
            await asyncio.gather(pipe(reader, up_writer, False), pipe(up_reader, writer, True))
        finally:
            self.writers.discard(writer)
            self.writers.discard(up_writer)

    async def before_answer(self, requests: list[bytes]) -> None:
        """Called before each chunk of an answer is passed on (a subclass may hold it)."""


class CountingControl(ControlClient):
    """The real control client, recording when each wake call goes out."""

    def __init__(self, *args: object, **kwargs: object):
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.wake_times: list[float] = []

    async def wake(self, endpoint_id: str, *, timeout: float | None = None):  # type: ignore[no-untyped-def]
        self.wake_times.append(time.monotonic())
        return await super().wake(endpoint_id, timeout=timeout)


async def side_proxy(up: Up, control: ControlClient, **settings: object) -> ProxyServer:
    assert up.certs is not None
    tls = await asyncio.to_thread(ServerTLS.load, [up.certs.server])
    proxy = ProxyServer(proxy_settings(listen_port=0, **settings),  # type: ignore[arg-type]
                        control=control, server_tls=tls)
    await proxy.start()
    return proxy


async def test_control_api_down_cached_endpoints_stay_reachable(rstack: Up) -> None:
    assert rstack.client is not None and rstack.control is not None
    relay = Relay(rstack.control.api_port)
    await relay.start()
    key = (rstack.settings.data_dir / "api_key").read_text().strip()
    control = ControlClient(f"http://127.0.0.1:{relay.port}", key, timeout=2.0)
    proxy = await side_proxy(rstack, control, negative_cache_ttl=0.05)
    try:
        cached, other = await rstack.client.create_endpoint(), await rstack.client.create_endpoint()
        await select_one(proxy.port, cached)
        await select_one(proxy.port, other)  # role cached; then its compute goes away
        await rstack.client.suspend(other.id)
        await proxy.state.wake.invalidate(other.id)
        await relay.stop()
        await select_one(proxy.port, cached)  # cached address: still served
        with pytest.raises(asyncpg.PostgresError) as failed:
            await asyncpg_select_one(proxy.port, other)
        assert failed.value.sqlstate == "57P03"
        assert "control plane unavailable" in str(failed.value)
        await relay.start()
        async with asyncio.timeout(DEADLINE):
            while True:  # the short negative-cache entry may still answer once
                try:
                    await asyncpg_select_one(proxy.port, other)
                    break
                except asyncpg.PostgresError as exc:
                    assert exc.sqlstate == "57P03"
    finally:
        await proxy.drain(timeout=2.0)
        await control.aclose()
        with contextlib.suppress(Exception):
            await relay.stop()


async def test_cache_expiry_for_many_endpoints_is_paced(rstack: Up) -> None:
    assert rstack.client is not None and rstack.control is not None
    key = (rstack.settings.data_dir / "api_key").read_text().strip()
    control = CountingControl(rstack.control.api_url, key)
    rate, burst = 4.0, 2.0
    proxy = await side_proxy(rstack, control, control_rate=rate, control_burst=burst,
                             redis_url=rstack.settings.redis_url)
    try:
        endpoints = [await rstack.client.create_endpoint() for _ in range(8)]
        for ep in endpoints:
            await select_one(proxy.port, ep)
        control.wake_times.clear()
        # Every cached address expires at the same moment.
        from proxy.shared import RedisShared as Shared

        shared = proxy.shared
        assert isinstance(shared, Shared)
        shared.local.forget(None)
        check = aioredis.from_url(rstack.settings.redis_url or "")
        try:
            for ep in endpoints:
                await check.delete(f"pgwake:addr:{ep.id}")
        finally:
            await check.aclose()
        await asyncio.gather(*(select_one(proxy.port, ep) for ep in endpoints))
        times = control.wake_times
        assert len(times) == len(endpoints)
        # No window of one second holds more calls than the bucket allows.
        worst = max(sum(1 for t in times if start <= t < start + 1.0) for start in times)
        assert worst <= burst + rate, f"{worst} control-API calls within one second"
        assert times[-1] - times[0] >= (len(times) - burst - 1) / rate
    finally:
        await proxy.drain(timeout=2.0)
        await control.aclose()


async def test_cancel_request_reaches_any_replica(rstack: Up) -> None:
    """The client's session is on proxy A; its CancelRequest lands on proxy B."""
    assert rstack.client is not None
    ep = await rstack.client.create_endpoint()
    proc, other_port = await start_proxy_process(rstack, rstack.settings.redis_url or "")
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    conn = await asyncpg.connect(
        host="127.0.0.1", port=rstack.proxy_port, user=ep.user, password=ep.password,
        database=ep.database, ssl=ctx, server_settings={"options": f"endpoint={ep.id}"},
    )
    try:
        # The proxy key the client was given (asyncpg keeps it on its protocol object).
        pid = conn._protocol.backend_pid
        secret = conn._protocol.backend_secret
        query = asyncio.create_task(conn.execute("select pg_sleep(30)"))
        await asyncio.sleep(0.2)  # let the query reach the compute
        started = time.perf_counter()
        _, writer = await asyncio.open_connection("127.0.0.1", other_port)
        writer.write(struct.pack("!iiii", 16, 80877102, pid, secret))
        await writer.drain()
        writer.close()
        with pytest.raises(asyncpg.QueryCanceledError):
            await asyncio.wait_for(query, 10)
        assert time.perf_counter() - started < 5
    finally:
        await conn.close()
        await stop_process(proc)
