"""Wake latency: suspended → connect → first row through pgwake, next to a raw PostgreSQL
start on the same data directory (interleaved in one run; twice: with the directory's own
config, and with the compute's size-class settings, which boot faster); and the
500-client herd on one suspended endpoint through two `pgwake proxy` processes sharing a
real Redis. The raw starts spawn postgres as pgwake does (through setpriv when root), and
their client is plaintext: the wake's figure includes TLS to the proxy, theirs none.

The suspended connects are measured by a separate user process (psycopg over TLS,
url_no_sni), alternating with the harness's own client, on a stack with default
settings (no Redis). Budgets: cold connect p50 ≤ 1.25 × the raw start, p99 ≤ 120 ms;
herd p99 ≤ 1 s, exactly one wake.
Run: python -m loadtests.wake [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

from loadtests.stack import BenchStack, bench_env, raise_fd_limit, running_stack
from loadtests.stats import plot_cdf, print_table, summary, write_result
from wakeup.provisioners.pgbin import RunAs
from wakeup.provisioners.process import spawn, wait_pid_exit
from wakeup.sizes import DEFAULT_SIZE, size_class_of

RAW_AS_COMPUTE = "raw postgres start, compute's settings"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def first_row(conninfo: str) -> None:
    async with await psycopg.AsyncConnection.connect(conninfo) as conn:
        cur = await conn.execute("select 1")
        await cur.fetchone()


async def raw_start_ms(
    pgdata: Path, bindir: Path, user: str, password: str, db: str,
    settings: tuple[tuple[str, str], ...] = (),
) -> float:
    """Start postgres on the data dir directly (its own config, plus `settings`), connect
    + first row, stop (fast).

    Spawned as pgwake spawns a compute (wakeup.provisioners.process.spawn: as the data
    directory's owner through setpriv when we are root), so the figure is postgres's
    start and not this harness's fork: a fork of this process to switch user would
    add its page-table copy (~4 ms) to the baseline.
    """
    owner = await asyncio.to_thread(pgdata.stat)
    run_as = (RunAs("owner", owner.st_uid, owner.st_gid, shutil.which("setpriv"))
              if os.geteuid() == 0 else None)
    port = free_port()
    sockdir = Path(tempfile.mkdtemp(prefix="pgwake-raw-", dir="/tmp"))
    os.chown(sockdir, owner.st_uid, owner.st_gid)
    conninfo = (f"host=127.0.0.1 port={port} user={user} password={password} dbname={db} "
                "sslmode=disable connect_timeout=5")
    started = time.perf_counter()
    proc = spawn(
        [str(bindir / "postgres"), "-D", str(pgdata), "-p", str(port), "-k", str(sockdir),
         "-c", "listen_addresses=127.0.0.1",
         *(arg for key, value in settings for arg in ("-c", f"{key}={value}"))],
        run_as, stderr=subprocess.DEVNULL,
    )
    try:
        async with asyncio.timeout(30):
            while True:  # what a client does while a database starts: try again
                try:
                    await first_row(conninfo)
                    break
                except psycopg.OperationalError:
                    await asyncio.sleep(0.001)
        return (time.perf_counter() - started) * 1000
    finally:
        proc.send_signal(signal.SIGINT)
        if not await wait_pid_exit(proc, 30):
            proc.kill()
            proc.wait()
        shutil.rmtree(sockdir, ignore_errors=True)


async def cold(stack: BenchStack, cycles: int) -> dict[str, Any]:
    from loadtests.create import parts_p50, user_client
    from wakeup.provisioners.pgbin import embedded_bindir

    bindir = embedded_bindir()
    assert bindir is not None
    ep = await stack.client.create_endpoint()
    address = (await stack.client.get_endpoint(ep.id)).address
    assert address is not None
    pgdata = stack.compute_dir(address) / "pgdata"
    series: dict[str, list[float]] = {
        "raw postgres start": [], RAW_AS_COMPUTE: [],
        "pgwake suspended (separate process)": [], "pgwake suspended (harness client)": [],
    }
    # The data directory's own config (initdb's shared_buffers = 128MB) boots a few ms
    # slower than a compute, which runs its size class's settings (32MB for `small`):
    # the second baseline starts postgres with exactly those.
    compute_settings = size_class_of(DEFAULT_SIZE).postgres_settings()
    timings: list[Any] = []
    await first_row(ep.url_no_sni)
    for i in range(cycles):
        await stack.client.suspend(ep.id)
        baselines = [("raw postgres start", ()), (RAW_AS_COMPUTE, compute_settings)]
        for label, settings in baselines[i % 2:] + baselines[:i % 2]:
            series[label].append(await raw_start_ms(
                pgdata, bindir, ep.user, ep.password, ep.database, settings
            ))
        if i % 2 == 0:
            # A user's program: its own process, psycopg over TLS, url_no_sni.
            [sample] = await user_client("connect", ep.url_no_sni, "--timing")
            series["pgwake suspended (separate process)"].append(sample["total_ms"])
            timings.append(sample["proxy_timing"])
        else:
            started = time.perf_counter()
            await first_row(ep.url_no_sni)
            series["pgwake suspended (harness client)"].append(
                (time.perf_counter() - started) * 1000
            )
    stats = {k: summary(v) for k, v in series.items()}
    ratio = (stats["pgwake suspended (separate process)"]["p50_ms"]
             / stats["raw postgres start"]["p50_ms"])
    ratio_as_compute = (stats["pgwake suspended (separate process)"]["p50_ms"]
                        / stats[RAW_AS_COMPUTE]["p50_ms"])
    return {"cycles": cycles, "stats": stats, "samples_ms": series,
            "p50_ratio_wake_vs_raw_start": round(ratio, 3),
            "p50_ratio_wake_vs_raw_start_compute_settings": round(ratio_as_compute, 3),
            "wake_ready_parts_p50_ms": parts_p50(timings)}


async def start_redis() -> tuple[asyncio.subprocess.Process, str]:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind",
        "127.0.0.1", "--save", "", "--appendonly", "no",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    async with asyncio.timeout(30):
        while b"Ready to accept connections" not in await proc.stdout.readline():
            if proc.returncode is not None:
                raise RuntimeError("redis-server exited")
    return proc, f"redis://127.0.0.1:{port}/0"


async def herd(stack: BenchStack, redis_url: str, clients: int) -> dict[str, Any]:
    procs = []
    ports = []
    try:
        for _ in range(2):
            proc = await asyncio.create_subprocess_exec(
                str(Path(sys.executable).with_name("pgwake")), "proxy", "--listen",
                "127.0.0.1:0", "--data-dir", str(stack.data_dir), "--redis", redis_url,
                "--log-level", "warning",
                stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
                env=bench_env(),
            )
            procs.append(proc)
            assert proc.stdout is not None
            line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
            ports.append(int(line.rsplit(":", 1)[1]))
        ep = await stack.client.create_endpoint()
        info = (f"host=127.0.0.1 user={ep.user} password={ep.password} dbname={ep.database} "
                f"sslmode=require options=endpoint={ep.id} connect_timeout=30")
        await first_row(f"{info} port={ports[0]}")
        await stack.client.suspend(ep.id)
        before = (await stack.client.get_endpoint(ep.id)).wakes

        async def one(port: int) -> float:
            started = time.perf_counter()
            await first_row(f"{info} port={port}")
            return (time.perf_counter() - started) * 1000

        results = await asyncio.gather(*(one(ports[i % 2]) for i in range(clients)),
                                       return_exceptions=True)
        times = [r for r in results if isinstance(r, float)]
        wakes = (await stack.client.get_endpoint(ep.id)).wakes - before
        # The same herd again, now that the endpoint is awake: what the clients, the
        # proxies and the per-endpoint cap cost without any wake in the way.
        warm_results = await asyncio.gather(*(one(ports[i % 2]) for i in range(clients)),
                                            return_exceptions=True)
        warm_times = [r for r in warm_results if isinstance(r, float)]
        return {"clients": clients, "errors": len(results) - len(times), "wakes": wakes,
                "stats": summary(times), "samples_ms": times,
                "warm_stats": summary(warm_times), "warm_samples_ms": warm_times,
                "warm_errors": len(warm_results) - len(warm_times)}
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                await asyncio.wait_for(proc.wait(), 60)


async def run(cycles: int, clients: int, only: str = "both") -> dict[str, Any]:
    raise_fd_limit()
    cold_result: dict[str, Any] | None = None
    herd_result: dict[str, Any] | None = None
    if only in ("both", "suspended"):
        async with running_stack() as stack:  # default settings: no Redis
            cold_result = await cold(stack, cycles)
    if only == "suspended":
        return {"cold": cold_result, "herd": None}
    redis, url = await start_redis()
    try:
        async with running_stack("--redis", url) as stack:
            if only in ("both", "herd"):
                herd_result = await herd(stack, url, clients)
    finally:
        redis.terminate()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(redis.wait(), 30)
    return {"cold": cold_result, "herd": herd_result}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.wake")
    parser.add_argument("--cycles", type=int, default=30)
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--out", type=Path, default=Path("loadtests/results"))
    parser.add_argument("--quick", action="store_true", help="10 cycles, 100 clients")
    parser.add_argument("--only", choices=["both", "suspended", "herd"], default="both")
    args = parser.parse_args(argv)
    cycles, clients = (10, 100) if args.quick else (args.cycles, args.clients)
    result = asyncio.run(run(cycles, clients, args.only))
    name = "wake" if args.only == "both" else f"connect-{args.only}"
    path = write_result(args.out, name, result)
    series: dict[str, list[float]] = {}
    if result["cold"] is not None:
        rows = [{"path": k, **v} for k, v in result["cold"]["stats"].items()]
        print_table(f"suspended → connect → first row, {cycles} cycles (ms)", rows,
                    ["path", "n", "p50_ms", "p90_ms", "p99_ms", "max_ms"])
        series.update(result["cold"].get("samples_ms", {}))
        print(f"\nwake p50 / raw start p50: {result['cold']['p50_ratio_wake_vs_raw_start']:.3f}"
              " (budget ≤ 1.25)")
        print("wake p50 / raw start p50 with the compute's settings: "
              f"{result['cold']['p50_ratio_wake_vs_raw_start_compute_settings']:.3f}")
        parts = result["cold"]["wake_ready_parts_p50_ms"]
        print(f"wake, proxy's ready breakdown (p50 ms): {parts}")
    herd_result = result["herd"]
    if herd_result is not None:
        print_table(f"herd: {clients} clients, 2 proxy processes, shared Redis (ms)",
                    [{"errors": herd_result["errors"], "wakes": herd_result["wakes"],
                      **herd_result["stats"]}],
                    ["n", "errors", "wakes", "p50_ms", "p90_ms", "p99_ms", "max_ms"])
        print_table("same herd, endpoint already awake (ms)",
                    [{"errors": herd_result["warm_errors"], **herd_result["warm_stats"]}],
                    ["n", "errors", "p50_ms", "p90_ms", "p99_ms", "max_ms"])
        series[f"herd, {clients} clients"] = herd_result["samples_ms"]
        series["herd again, awake"] = herd_result["warm_samples_ms"]
    plot_cdf(args.out / f"{name}.png", "Connect + first row to a suspended endpoint", series)
    print("\nbudgets: suspended p50 ≤ 1.25 × raw start, p99 ≤ 120 ms;"
          " herd p99 ≤ 1000 ms, 1 wake, 0 errors")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
