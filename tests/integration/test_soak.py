"""Soak: sessions of four kinds of client live through 100 cycles of suspend, wake,
resize and compute kill -9 while idle, writing between the cycles, and never notice.

psql (one process, fed through its stdin), psycopg 3 preparing every statement
server-side (prepare_threshold=0), asyncpg (which prepares every statement) and a
pool of 10 asyncpg connections held open by an app-like loop. After every cycle
each client writes and checks that its SET values and prepared statements are
still in force; at the end every acknowledged commit is in the table. Each step
waits for an event (the proxy's survey finished, its parked-session count, the
operation's return), never for time to pass.
"""

from __future__ import annotations

import asyncio
import shutil
import time

import asyncpg
import psycopg

from pgwake.up import Up
from tests.integration.test_reattach import postmaster_of, proxied
from tests.integration.test_shared_state import kill_process_tree
from wakeup.sizes import size_class_of

CYCLES = 100
SESSIONS = 13  # psql, psycopg, asyncpg, and a pool of 10
DEADLINE = 60.0
PSQL = shutil.which("psql") or "psql"


class Psql:
    """One interactive psql session: commands in through stdin, each followed by an
    \\echo marker so the answer's end is an event on stdout."""

    def __init__(self, proc: asyncio.subprocess.Process):
        self.proc = proc
        self.markers = 0

    @classmethod
    async def open(cls, url: str) -> Psql:
        proc = await asyncio.create_subprocess_exec(
            PSQL, "-X", "-At", "-v", "ON_ERROR_STOP=1", url,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        return cls(proc)

    async def run(self, sql: str) -> list[str]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.markers += 1
        marker = f"--pgwake-soak-{self.markers}--"
        # The semicolon sends the statement; psql would hold it in its buffer otherwise.
        self.proc.stdin.write(f"{sql};\n\\qecho {marker}\n".encode())
        await self.proc.stdin.drain()
        lines = []
        async with asyncio.timeout(DEADLINE):
            while True:
                line = (await self.proc.stdout.readline()).decode()
                assert line, f"psql exited: {lines}"
                if line.rstrip("\n") == marker:
                    # Errors come on the merged stderr; ON_ERROR_STOP ends psql at
                    # the first.
                    assert not any("ERROR" in seen or "FATAL" in seen for seen in lines), lines
                    return lines
                lines.append(line.rstrip("\n"))

    async def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"\\q\n")
        self.proc.stdin.close()
        async with asyncio.timeout(DEADLINE):
            await self.proc.wait()


async def test_soak_100_cycles_of_suspend_wake_resize_and_kill(stack: Up) -> None:
    assert stack.client is not None and stack.proxy is not None
    assert stack.control is not None and stack.control.control is not None
    client, plane, proxy = stack.client, stack.control.control, stack.proxy
    registry, parked_total = proxy.state.registry, proxy.state.metrics.sessions_parked_total
    started = time.perf_counter()
    ep = await client.create_endpoint()
    committed: set[int] = set()

    psql = await Psql.open(ep.url_no_sni)
    pg3 = await psycopg.AsyncConnection.connect(ep.url_no_sni, autocommit=True,
                                                prepare_threshold=0)
    apg = await asyncpg.connect(**proxied(stack, ep))  # type: ignore[arg-type]
    # asyncpg's pool runs RESET ALL on release: its setting comes with the startup
    # packet, which a re-login sends again.
    pool_settings = proxied(stack, ep)
    pool_settings["server_settings"] = {"options": f"endpoint={ep.id}",
                                        "statement_timeout": "123s"}
    pool = await asyncpg.create_pool(**pool_settings, min_size=10, max_size=10)  # type: ignore[arg-type]
    try:
        await apg.execute("create table soak (id int primary key, who text)")
        assert await psql.run("set work_mem = '3MB'") == ["SET"]
        assert await psql.run("prepare soak_ins(int) as insert into soak values ($1, 'psql')"
                              " returning id") == ["PREPARE"]
        await pg3.execute("set application_name = 'soak-pg3'")
        await apg.execute("set lock_timeout = '42s'")
        apg_insert = await apg.prepare("insert into soak values ($1, 'asyncpg')")

        async def write_round(cycle: int) -> None:
            base = cycle * 100
            assert await psql.run(f"execute soak_ins({base})") == [str(base), "INSERT 0 1"]
            committed.add(base)
            assert await psql.run("show work_mem") == ["3MB"]
            await pg3.execute("insert into soak values (%s, 'psycopg')", (base + 1,))
            committed.add(base + 1)
            cur = await pg3.execute("show application_name")
            assert await cur.fetchone() == ("soak-pg3",)
            await apg_insert.fetch(base + 2)
            committed.add(base + 2)
            assert await apg.fetchval("show lock_timeout") == "42s"

            async def app_request(i: int) -> None:
                async with pool.acquire() as conn:
                    stmt = await conn.prepare("insert into soak values ($1, 'pool')")
                    await stmt.fetch(base + 10 + i)
                    committed.add(base + 10 + i)
                    assert await conn.fetchval("show statement_timeout") == "123s"

            await asyncio.gather(*(app_request(i) for i in range(20)))

        async def all_movable() -> None:
            """Ask the compute about every session now (rather than after survey_after)."""
            async with asyncio.timeout(DEADLINE):
                while True:
                    reasons = await registry.survey(ep.id, timeout=DEADLINE)
                    if len(reasons) == SESSIONS and not any(reasons.values()):
                        return
                    await asyncio.sleep(0.02)  # a session still finishing its round

        async def parked(count: float) -> None:
            try:
                async with asyncio.timeout(DEADLINE):
                    while parked_total._value.get() < count:  # noqa: ASYNC110
                        await asyncio.sleep(0.01)  # a counter has nothing to await
            except TimeoutError:
                raise AssertionError(
                    f"parked {parked_total._value.get()} of {count}: {registry.counts()}"
                ) from None

        await write_round(0)
        sizes = ["medium", "small"]
        kinds: dict[str, int] = {}
        for cycle in range(1, CYCLES + 1):
            await all_movable()
            before = parked_total._value.get()
            kind = ("suspend", "suspend+wake", "resize", "kill")[cycle % 4]
            kinds[kind] = kinds.get(kind, 0) + 1
            if kind.startswith("suspend"):
                assert await plane.suspend(ep.id, grace=0.0)
                await parked(before + SESSIONS)
                if kind == "suspend+wake":
                    await client.wake(ep.id)  # the sessions find it awake
            elif kind == "resize":
                resized = await client.resize(ep.id, sizes[(kinds[kind] - 1) % 2])
                assert resized.generation == 1 + kinds[kind]
                assert resized.pinned_at_deadline == 0
                await parked(before + SESSIONS)
                # A session opened before the resize sees the new size.
                assert await apg.fetchval("show shared_buffers") == size_class_of(
                    resized.size).shared_buffers
            else:
                backend = await apg.fetchval("select pg_backend_pid()")
                await all_movable()
                before = parked_total._value.get()
                kill_process_tree(postmaster_of(backend))
                await parked(before + SESSIONS)
            await write_round(cycle)

        rows = await apg.fetch("select id from soak")
        assert {r["id"] for r in rows} == committed  # no lost commit, nothing extra
        assert len(committed) == (CYCLES + 1) * 23
        shown = await client.get_endpoint(ep.id)
        assert shown.generation == 1 + kinds["resize"]
        print(f"soak: {CYCLES} cycles {kinds} in {time.perf_counter() - started:.1f} s")
    finally:
        await pool.close()
        await apg.close()
        await pg3.close()
        await psql.close()
