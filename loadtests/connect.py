"""Connect latency to an *active* endpoint: through pgwake vs straight to the compute.

Both sides do the same work (TLS + SCRAM-SHA-256 + `select 1`), interleaved in
one run so machine noise hits both alike. Budget: pgwake ≤ 1.15 × direct.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import psycopg

from loadtests.stack import BenchStack, running_stack, tls_capable_bindir
from loadtests.stats import plot_cdf, print_table, summary, write_result
from wakeup.computeconfig import admin_connect
from wakeup.provisioners.base import AdminTarget
from wakeup.provisioners.local import ADMIN_USER

BASELINE = "baseline pgwake"


async def enable_compute_tls(stack: BenchStack, ep_id: str) -> str:
    """Give the compute the proxy's certificate so the direct baseline is TLS too."""
    address = (await stack.client.get_endpoint(ep_id)).address
    assert address is not None
    compute = stack.compute_dir(address)
    pgdata = compute / "pgdata"
    owner = pgdata.stat()
    for source, name in ((stack.server_cert, "bench.crt"), (stack.server_key, "bench.key")):
        target = pgdata / name
        shutil.copyfile(source, target)
        target.chmod(0o600)
        os.chown(target, owner.st_uid, owner.st_gid)
    port = int(address.rpartition(":")[2])
    conn = await admin_connect(AdminTarget(str(compute / "s"), port, ADMIN_USER))
    try:
        await conn.execute("alter system set ssl = on")
        await conn.execute("alter system set ssl_cert_file = 'bench.crt'")
        await conn.execute("alter system set ssl_key_file = 'bench.key'")
        await conn.execute("select pg_reload_conf()")
    finally:
        await conn.close()
    return address


async def timed_connect(conninfo: str) -> float:
    started = time.perf_counter()
    conn = await psycopg.AsyncConnection.connect(conninfo)
    try:
        cur = await conn.execute("select 1")
        await cur.fetchone()
    finally:
        await conn.close()
    return (time.perf_counter() - started) * 1000


async def warm(
    iterations: int, compare_tree: Path | None = None, compare_python: Path | None = None
) -> dict[str, Any]:
    # Both paths measured against the same compute, so it must speak TLS itself.
    async with contextlib.AsyncExitStack() as stacks:
        stack = await stacks.enter_async_context(running_stack(bindir=tls_capable_bindir()))
        ep = await stack.client.create_endpoint()
        address = await enable_compute_tls(stack, ep.id)
        host, _, port = address.rpartition(":")
        direct = (
            f"host={host} port={port} user={ep.user} password={ep.password} "
            f"dbname={ep.database} sslmode=require"
        )
        paths = [("direct TLS+SCRAM", direct), ("pgwake TLS+SCRAM", ep.url_no_sni)]
        if compare_tree is not None:
            # The other tree's pgwake, its own stack, the same kind of compute: both
            # proxies and the direct path take turns in one run.
            other = await stacks.enter_async_context(running_stack(
                bindir=tls_capable_bindir(), source_tree=compare_tree, python=compare_python,
                port_block=1,
            ))
            baseline = await other.client.create_endpoint()
            paths.append((f"{BASELINE} TLS+SCRAM", baseline.url_no_sni))
        for _, conninfo in paths:  # warm every path (caches, TLS session setup)
            for _ in range(3):
                await timed_connect(conninfo)
        series: dict[str, list[float]] = {label: [] for label, _ in paths}
        for i in range(iterations):
            order = paths[i % len(paths):] + paths[:i % len(paths)]
            for label, conninfo in order:
                series[label].append(await timed_connect(conninfo))
    stats = {label: summary(values) for label, values in series.items()}
    direct_p50 = stats["direct TLS+SCRAM"]["p50_ms"]
    ratio = stats["pgwake TLS+SCRAM"]["p50_ms"] / direct_p50
    result = {"scenario": "warm", "iterations": iterations, "stats": stats,
              "p50_ratio_proxy_vs_direct": round(ratio, 3), "samples_ms": series}
    if compare_tree is not None:
        result["compare_tree"] = str(compare_tree)
        result["compare_python"] = str(compare_python or sys.executable)
        result["p50_ratio_baseline_vs_direct"] = round(
            stats[f"{BASELINE} TLS+SCRAM"]["p50_ms"] / direct_p50, 3
        )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests connect --scenario warm")
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("loadtests/results"))
    parser.add_argument("--quick", action="store_true", help="a short run (10 iterations)")
    parser.add_argument(
        "--compare-tree", type=Path, default=None,
        help="also measure the pgwake of another source tree (e.g. a `git worktree` of an "
             "older commit) in the same run, as 'baseline'",
    )
    parser.add_argument(
        "--compare-python", type=Path, default=None,
        help="the Python that runs --compare-tree (an environment with that tree's "
             "dependencies; default: this one)",
    )
    args = parser.parse_args(argv)
    iterations = 10 if args.quick else args.iterations
    # The client side; each stack is its own process.
    result = asyncio.run(warm(iterations, args.compare_tree, args.compare_python))
    path = write_result(args.out, "connect-warm", result)
    plot_cdf(args.out / "connect-warm.png", "Connect + first row, active endpoint",
             result["samples_ms"])
    rows = [{"path": k, **v} for k, v in result["stats"].items()]
    print_table("connect + select 1 to an active endpoint (ms)", rows,
                ["path", "n", "p50_ms", "p90_ms", "p99_ms", "max_ms"])
    print(f"\npgwake / direct (p50): {result['p50_ratio_proxy_vs_direct']:.3f}  (budget ≤ 1.15)")
    if "p50_ratio_baseline_vs_direct" in result:
        print(f"{BASELINE} ({result['compare_tree']}) / direct (p50): "
              f"{result['p50_ratio_baseline_vs_direct']:.3f}")
    print(f"results: {path}")
    return 0
