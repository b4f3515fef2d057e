"""RSS per idle TLS client session: pgwake's proxy process next to PgBouncer's.

A `pgwake up` process with default settings (the native data plane when built), and
one with `--data-plane python` (the fallback, so the gain is visible; `--no-python-path`
skips it); N client sessions (TLS, SCRAM,
asyncpg) log in to one endpoint from several client processes and stay idle.
Past the compute's connection budget each login parks the longest-idle session
(proxy/evict.py), so the sessions hold no backend. The proxy process's RSS
(/proc/PID/status VmRSS) is read before the first session (after one warm-up
connect) and once all are logged in and idle: (RSS − baseline) / N. Then a
sample of the sessions runs a query each, to show they all still work.

The same N clients then log in to PgBouncer (transaction pooling with a small
pool, client TLS with the same certificate) in front of the same compute, and
PgBouncer's RSS is measured the same way. Budget (issue 12): ≤ 15 KiB per
session above the idle baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import resource
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from loadtests.stack import BenchStack, running_stack
from loadtests.stats import print_table, write_result
from loadtests.throughput import PgBouncer

# Logins in flight per client process: enough to keep the proxy busy, few enough
# that no login waits near its handshake deadline on a 2-core machine.
IN_FLIGHT = 16
# RSS is read this many times, a second apart, once the sessions are idle: the
# largest reading counts (memory given back later would flatter the figure).
RSS_READINGS = 3


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def settled_rss(pid: int) -> int:
    readings = []
    for _ in range(RSS_READINGS):
        await asyncio.sleep(1.0)  # a reading interval, not a synchronisation
        readings.append(rss_kib(pid))
    return max(readings)


# -- the client processes ---------------------------------------------------------------


async def _client(spec: dict[str, Any]) -> None:
    """Log `count` sessions in and hold them; then obey commands on stdin."""
    import asyncpg

    kwargs: dict[str, Any] = {
        "host": spec["host"], "port": spec["port"], "user": spec["user"],
        "password": spec["password"], "database": spec["database"], "ssl": "require",
        "timeout": 60, "statement_cache_size": 0,
    }
    if spec.get("options"):
        kwargs["server_settings"] = {"options": spec["options"]}
    gate = asyncio.Semaphore(IN_FLIGHT)
    failures: list[str] = []

    async def login() -> asyncpg.Connection | None:
        async with gate:
            try:
                return await asyncpg.connect(**kwargs)
            except Exception as exc:  # counted and reported: the figure needs them all
                failures.append(repr(exc))
                return None

    conns = [c for c in await asyncio.gather(*(login() for _ in range(spec["count"])))
             if c is not None]
    print(json.dumps({"logged_in": len(conns), "failed": len(failures),
                      "errors": sorted(set(failures))[:5]}), flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := (await reader.readline()).decode().strip():
        command, _, arg = line.partition(" ")
        if command == "check":
            every = max(1, int(arg))
            sample = conns[::every]

            async def query(conn: asyncpg.Connection) -> bool:
                async with gate:
                    try:
                        return bool(await conn.fetchval("select 1", timeout=60) == 1)
                    except Exception as exc:
                        failures.append(repr(exc))
                        return False

            ok = sum(await asyncio.gather(*(query(c) for c in sample)))
            print(json.dumps({"checked": len(sample), "ok": ok,
                              "errors": sorted(set(failures))[-5:]}), flush=True)
        elif command == "close":
            break
    await asyncio.gather(*(c.close(timeout=10) for c in conns), return_exceptions=True)


def client_main() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(_client(json.loads(sys.argv[1])))


class Clients:
    """Client processes holding `sessions` idle sessions between them."""

    def __init__(self, spec: dict[str, Any], sessions: int, processes: int) -> None:
        self.spec = spec
        self.counts = [sessions // processes + (i < sessions % processes)
                       for i in range(processes)]
        self.procs: list[asyncio.subprocess.Process] = []

    async def log_in(self, timeout: float) -> dict[str, Any]:
        bootstrap = "from loadtests.idlemem import client_main; client_main()"
        for count in self.counts:
            if count:
                self.procs.append(await asyncio.create_subprocess_exec(
                    sys.executable, "-c", bootstrap, json.dumps({**self.spec, "count": count}),
                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                ))
        return _merge(await asyncio.wait_for(self._replies(), timeout))

    async def check(self, every: int, timeout: float) -> dict[str, Any]:
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(f"check {every}\n".encode())
        return _merge(await asyncio.wait_for(self._replies(), timeout))

    async def _replies(self) -> list[dict[str, Any]]:
        async def one(proc: asyncio.subprocess.Process) -> dict[str, Any]:
            assert proc.stdout is not None
            line = await proc.stdout.readline()
            if not line:
                raise RuntimeError(f"client process {proc.pid} exited")
            reply: dict[str, Any] = json.loads(line)
            return reply

        return list(await asyncio.gather(*(one(p) for p in self.procs)))

    async def close(self) -> None:
        for proc in self.procs:
            if proc.stdin is not None and proc.returncode is None:
                with contextlib.suppress(ConnectionError):
                    proc.stdin.write(b"close\n")
        for proc in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), 120)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def _merge(replies: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for reply in replies:
        for key, value in reply.items():
            if isinstance(value, list):
                merged[key] = sorted(set(merged.get(key, [])) | set(value))[:5]
            else:
                merged[key] = merged.get(key, 0) + value
    return merged


async def session_metrics(stack: BenchStack) -> dict[str, float]:
    """The proxy's own count of its sessions by state, and of those parked to make
    room (its /metrics on the API port)."""
    async with httpx.AsyncClient(timeout=30) as http:
        reply = await http.get(f"{stack.api_url}/metrics",
                               headers={"Authorization": f"Bearer {stack.api_key}"})
    reply.raise_for_status()
    found: dict[str, float] = {}
    for line in reply.text.splitlines():
        if match := SESSIONS_RE.match(line):
            found[match.group(1)] = float(match.group(2))
        elif line.startswith("pgwake_sessions_evicted_total "):
            found["evicted_total"] = float(line.split()[1])
    return found


SESSIONS_RE = re.compile(r'pgwake_sessions\{state="(\w+)"\} ([0-9.e+]+)')


async def measure(pid: int, spec: dict[str, Any], sessions: int, processes: int,
                  login_timeout: float, stack: BenchStack | None = None) -> dict[str, Any]:
    """One server process's RSS per idle session, and the sessions' health after."""
    baseline = await settled_rss(pid)
    clients = Clients(spec, sessions, processes)
    states: dict[str, float] = {}
    try:
        started = time.perf_counter()
        logged = await clients.log_in(login_timeout)
        login_s = time.perf_counter() - started
        loaded = await settled_rss(pid)
        if stack is not None:
            states = await session_metrics(stack)
        check = await clients.check(max(1, sessions // 200), login_timeout)
    finally:
        await clients.close()
    per_session = (loaded - baseline) / max(1, logged["logged_in"])
    return {
        **({"proxy_sessions": states} if stack is not None else {}),
        "baseline_rss_kib": baseline, "rss_kib": loaded,
        "rss_kib_per_session": round(per_session, 2),
        "logged_in": logged["logged_in"], "login_failures": logged["failed"],
        "login_errors": logged.get("errors", []), "login_seconds": round(login_s, 1),
        "sample_checked": check["checked"], "sample_ok": check["ok"],
        "sample_errors": check.get("errors", []),
    }


async def warm_endpoint(stack: BenchStack, login_timeout: float
                        ) -> tuple[Any, dict[str, Any]]:
    """A new endpoint and the clients' spec for it, after one warm-up login (its compute
    is up, its address and role cached)."""
    ep = await stack.client.create_endpoint()
    spec = {"host": "127.0.0.1", "port": stack.proxy_port, "user": ep.user,
            "password": ep.password, "database": ep.database, "options": f"endpoint={ep.id}"}
    warm = Clients(spec, 1, 1)
    await warm.log_in(login_timeout)
    await warm.close()
    return ep, spec


async def run_python_path(sessions: int, processes: int, login_timeout: float
                          ) -> dict[str, Any]:
    """The same sessions through a `pgwake up` on the Python data path."""
    async with running_stack("--data-plane", "python") as stack:
        _ep, spec = await warm_endpoint(stack, login_timeout)
        figures = await measure(stack.pid, spec, sessions, processes, login_timeout, stack)
    print(f"  pgwake (Python path): {figures['rss_kib_per_session']} KiB per idle session",
          flush=True)
    return figures


async def run(sessions: int, processes: int, python_path: bool) -> dict[str, Any]:
    login_timeout = 120 + sessions * 0.05
    python = await run_python_path(sessions, processes, login_timeout) if python_path else None
    async with running_stack() as stack:
        ep, spec = await warm_endpoint(stack, login_timeout)
        pgwake = await measure(stack.pid, spec, sessions, processes, login_timeout, stack)
        print(f"  pgwake: {pgwake['rss_kib_per_session']} KiB per idle session", flush=True)
        address = (await stack.client.get_endpoint(ep.id)).address
        assert address is not None
        bouncer = PgBouncer(stack, int(address.rpartition(":")[2]), ep.password, ep.user,
                            pool_mode="transaction", max_client_conn=sessions + 100,
                            pool_size=10)
        await bouncer.start()
        try:
            assert bouncer.proc is not None
            bouncer_spec = {**spec, "port": bouncer.port, "database": "main", "options": ""}
            warm = Clients(bouncer_spec, 1, 1)
            await warm.log_in(login_timeout)
            await warm.close()
            pgbouncer = await measure(bouncer.proc.pid, bouncer_spec, sessions, processes,
                                      login_timeout)
        finally:
            bouncer.stop()
        print(f"  pgbouncer: {pgbouncer['rss_kib_per_session']} KiB per idle session",
              flush=True)
    return {
        "benchmark": f"{sessions} idle TLS client sessions (asyncpg, SCRAM) to one endpoint "
                     f"from {processes} client processes; server process RSS (VmRSS) above "
                     "its idle baseline, per session",
        "sessions": sessions,
        "pgwake": pgwake,
        "pgbouncer": {**pgbouncer, "pool_mode": "transaction", "pool_size": 10},
        "pgwake_vs_pgbouncer": round(
            pgwake["rss_kib_per_session"] / max(pgbouncer["rss_kib_per_session"], 0.01), 3),
        **({"pgwake_python": python} if python is not None else {}),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests idlemem")
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--processes", type=int, default=4, help="client processes")
    parser.add_argument("--out", type=Path, default=Path("loadtests/results"))
    parser.add_argument("--quick", action="store_true", help="200 sessions")
    parser.add_argument("--python-path", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure pgwake on its Python data path (--data-plane python)")
    args = parser.parse_args(argv)
    if args.quick:
        args.sessions = 200
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # pgwake up and PgBouncer inherit it
    result = asyncio.run(run(args.sessions, args.processes, args.python_path))
    path = write_result(args.out, "idlemem", result)
    servers = ["pgwake", *(["pgwake_python"] if "pgwake_python" in result else []), "pgbouncer"]
    rows = [
        {"server": name, "KiB/session": result[name]["rss_kib_per_session"],
         "baseline KiB": result[name]["baseline_rss_kib"], "RSS KiB": result[name]["rss_kib"],
         "logged in": result[name]["logged_in"], "failed": result[name]["login_failures"],
         "sample ok": f"{result[name]['sample_ok']}/{result[name]['sample_checked']}"}
        for name in servers
    ]
    print_table("RSS per idle TLS session", rows,
                ["server", "KiB/session", "baseline KiB", "RSS KiB", "logged in", "failed",
                 "sample ok"])
    print(json.dumps(result, indent=2))
    print(f"results: {path}")
    failed = any(result[name]["login_failures"] or result[name]["sample_ok"]
                 != result[name]["sample_checked"] for name in servers)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
