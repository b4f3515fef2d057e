"""Instant databases: `POST /v1/endpoints` + connect + first row, warm pool vs empty pool.

Side by side in one run: pool hits (a compute already started, claimed and
renamed), pool misses (template clone + start on demand) and the raw cost of
`initdb` + start of a PostgreSQL server on this machine. Budget: pool hit
p50 ≤ 25 ms (public platforms: ~950 ms).

    python -m loadtests.create [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg

from loadtests.stack import BenchStack, bench_dir, pg_bindir, running_stack
from loadtests.stats import plot_cdf, print_table, summary, write_result
from wakeup.api import CreatedEndpoint
from wakeup.provisioners.local import ADMIN_USER
from wakeup.provisioners.pgbin import find_binaries, resolve_run_as
from wakeup.provisioners.process import PostgresProcess, ServerOptions, run_checked

POOL_READY = re.compile(rb"^pgwake_pool_ready (\S+)$", re.M)


async def pool_ready(stack: BenchStack) -> int:
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=10) as http:
        match = POOL_READY.search((await http.get("/metrics")).content)
    return int(float(match.group(1))) if match else 0


async def wait_pool_full(stack: BenchStack, size: int, within: float = 120.0) -> None:
    """Between measured runs (not timed): let the background refill finish."""
    step = 0.02
    for _ in range(int(within / step)):
        if await pool_ready(stack) >= size:
            return
        await asyncio.sleep(step)  # another process's pool: /metrics is all we can watch
    raise TimeoutError(f"the warm pool did not refill to {size} within {within:.0f} s")


async def create_and_query(stack: BenchStack) -> tuple[float, float, CreatedEndpoint]:
    """Milliseconds for the whole (create + connect + first row) and for the create."""
    started = time.perf_counter()
    ep = await stack.client.create_endpoint()
    created = time.perf_counter()
    conn = await psycopg.AsyncConnection.connect(ep.url)  # SNI, verify-full
    try:
        cur = await conn.execute("select 1")
        await cur.fetchone()
        done = time.perf_counter()
    finally:
        await conn.close()
    return (done - started) * 1000, (created - started) * 1000, ep


async def create_runs(stack: BenchStack, runs: int, pool_size: int) -> dict[str, Any]:
    totals: list[float] = []
    creates: list[float] = []
    server: list[float] = []
    kinds: dict[str, int] = {}
    for _ in range(runs):
        if pool_size:
            await wait_pool_full(stack, pool_size)
        ms, create_ms, ep = await create_and_query(stack)
        totals.append(ms)
        creates.append(create_ms)
        server.append(ep.create_seconds * 1000)
        kinds[ep.cold_start] = kinds.get(ep.cold_start, 0) + 1
        await stack.client.delete_endpoint(ep.id)  # keep the machine as it was (not timed)
    return {"total_ms": totals, "create_ms": creates, "server_create_ms": server,
            "cold_start": kinds}


async def raw_initdb_start(runs: int) -> dict[str, list[float]]:
    """What a create costs without pgwake's template and pool: initdb, then start."""
    binaries = find_binaries(pg_bindir())
    run_as = resolve_run_as(None)
    initdb_ms: list[float] = []
    start_ms: list[float] = []
    for i in range(runs):
        directory = bench_dir("pgwake-raw-")
        if run_as is not None:
            run_as.chown(directory)
        try:
            pgdata = directory / "pgdata"
            started = time.perf_counter()
            await run_checked(
                [binaries.program("initdb"), "-D", str(pgdata), "-U", ADMIN_USER,
                 "--auth-local=trust", "-E", "UTF8", "--locale=C", "--no-instructions"],
                run_as, timeout=300,
            )
            initdb_ms.append((time.perf_counter() - started) * 1000)
            proc = PostgresProcess(
                binaries,
                ServerOptions(pgdata=pgdata, port=39000 + i, socket_dir=directory,
                              log_path=directory / "postgres.log", listen=""),
                run_as,
            )
            started = time.perf_counter()
            await proc.start(60)
            start_ms.append((time.perf_counter() - started) * 1000)
            await proc.stop(30)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    total = [a + b for a, b in zip(initdb_ms, start_ms, strict=True)]
    return {"initdb_ms": initdb_ms, "start_ms": start_ms, "total_ms": total}


async def measure(warm_runs: int, cold_runs: int, raw_runs: int, pool_size: int) -> dict[str, Any]:
    async with running_stack("--pool-size", str(pool_size)) as stack:
        await wait_pool_full(stack, pool_size)
        for _ in range(3):  # warm the client, the proxy and the control API (not counted)
            *_, ep = await create_and_query(stack)
            await stack.client.delete_endpoint(ep.id)
        hit = await create_runs(stack, warm_runs, pool_size)
    async with running_stack() as stack:  # no pool: every create starts a compute
        *_, ep = await create_and_query(stack)
        await stack.client.delete_endpoint(ep.id)
        miss = await create_runs(stack, cold_runs, 0)
    raw = await raw_initdb_start(raw_runs)
    series = {
        "pool hit: create+connect+row": hit["total_ms"],
        "pool hit: POST /v1/endpoints": hit["create_ms"],
        "pool hit: server-side create": hit["server_create_ms"],
        "empty pool: create+connect+row": miss["total_ms"],
        "empty pool: POST /v1/endpoints": miss["create_ms"],
        "empty pool: server-side create": miss["server_create_ms"],
        "raw initdb + start": raw["total_ms"],
        "raw initdb": raw["initdb_ms"],
        "raw start": raw["start_ms"],
    }
    stats = {label: summary(values) for label, values in series.items()}
    hit_p50 = stats["pool hit: create+connect+row"]["p50_ms"]
    return {
        "scenario": "create",
        "pool_size": pool_size,
        "runs": {"warm_pool": warm_runs, "empty_pool": cold_runs, "raw": raw_runs},
        "cold_start": {"warm_pool": hit["cold_start"], "empty_pool": miss["cold_start"]},
        "stats": stats,
        "budget": {"pool_hit_p50_ms": 25.0, "met": hit_p50 <= 25.0},
        "ratio_raw_initdb_start_vs_pool_hit_p50": round(
            stats["raw initdb + start"]["p50_ms"] / hit_p50, 1
        ),
        "samples_ms": series,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.create")
    parser.add_argument("--warm-runs", type=int, default=50)
    parser.add_argument("--cold-runs", type=int, default=10)
    parser.add_argument("--raw-runs", type=int, default=5)
    parser.add_argument("--pool-size", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("loadtests/results"))
    parser.add_argument("--quick", action="store_true", help="a short run (10 / 3 / 1 runs)")
    args = parser.parse_args(argv)
    warm, cold, raw = (10, 3, 1) if args.quick else (args.warm_runs, args.cold_runs, args.raw_runs)
    result = asyncio.run(measure(warm, cold, raw, args.pool_size))
    path = write_result(args.out, "create", result)
    plot_cdf(args.out / "create.png", "POST /v1/endpoints + connect + first row",
             {k: v for k, v in result["samples_ms"].items() if "create+connect" in k})
    rows = [{"what": k, **v} for k, v in result["stats"].items()]
    print_table("create + connect + select 1 (ms)", rows,
                ["what", "n", "p50_ms", "p90_ms", "p99_ms", "max_ms"])
    print(f"\ncold starts: {result['cold_start']}")
    hit = result["stats"]["pool hit: create+connect+row"]["p50_ms"]
    verdict = "met" if result["budget"]["met"] else "MISSED"
    ratio = result["ratio_raw_initdb_start_vs_pool_hit_p50"]
    print(f"pool hit p50 {hit:.1f} ms (budget ≤ 25 ms: {verdict});"
          f" raw initdb + start p50 is {ratio}× that")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
