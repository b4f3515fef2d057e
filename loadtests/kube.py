"""Kubernetes provisioner through the API stand-in, side by side with the local provisioner.

One run, separate processes: the stand-in API server (it runs pods' PostgreSQL),
a `pgwake up --provisioner kubernetes` and a `pgwake up` (local), and this
client with psycopg. Measured: pool-hit create + first row, suspended → first
row (both through the proxy with TLS), and the API calls each wake costs.

    python -m loadtests.kube [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from loadtests.create import create_and_query, wait_pool_full
from loadtests.stack import BenchStack, pg_bindir, running_stack
from loadtests.stats import plot_cdf, print_table, summary, write_result
from loadtests.wake import first_row

ROOT = Path(__file__).resolve().parents[1]


@contextlib.asynccontextmanager
async def standin_process() -> AsyncIterator[dict[str, str]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.kube_standin", "--pg-bin", str(pg_bindir()),
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(120):
            line = await proc.stdout.readline()
        if not line:
            raise RuntimeError("the Kubernetes stand-in exited")
        yield json.loads(line)
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 120)


async def api_calls(info: dict[str, str]) -> list[dict[str, str]]:
    async with httpx.AsyncClient(timeout=10) as http:
        calls: list[dict[str, str]] = (await http.get(info["calls"])).json()
        return calls


async def pool_hits(stack: BenchStack, runs: int) -> list[float]:
    totals = []
    for _ in range(runs):
        await wait_pool_full(stack, 1)
        ms, _, ep = await create_and_query(stack)
        if ep.cold_start != "pool_hit":
            raise RuntimeError(f"expected a pool hit, got {ep.cold_start}")
        totals.append(ms)
        await stack.client.delete_endpoint(ep.id)  # not timed
    return totals


async def suspended(stack: BenchStack, cycles: int,
                    info: dict[str, str] | None) -> tuple[list[float], list[dict[str, int]]]:
    ep = await stack.client.create_endpoint()
    await first_row(ep.url_no_sni)
    await wait_pool_full(stack, 1)  # no refill may run during the measured wakes
    samples: list[float] = []
    per_wake: list[dict[str, int]] = []
    for _ in range(cycles):
        await stack.client.suspend(ep.id)
        before = len(await api_calls(info)) if info else 0
        started = time.perf_counter()
        await first_row(ep.url_no_sni)
        samples.append((time.perf_counter() - started) * 1000)
        if info:
            counts: dict[str, int] = {}
            for call in (await api_calls(info))[before:]:
                key = f"{call['verb']} {call['resource']}"
                counts[key] = counts.get(key, 0) + 1
            per_wake.append(counts)
    await stack.client.delete_endpoint(ep.id)
    return samples, per_wake


async def measure(runs: int, cycles: int) -> dict[str, Any]:
    series: dict[str, list[float]] = {}
    async with standin_process() as info:
        kube_args = ("--pool-size", "1", "--provisioner", "kubernetes",
                     "--namespace", info["namespace"], "--kubeconfig", info["kubeconfig"],
                     "--admin-cidr", "127.0.0.1/32", "--client-cidr", "127.0.0.1/32")
        async with running_stack(*kube_args) as kube:
            series["kube-standin pool hit"] = await pool_hits(kube, runs)
            series["kube-standin suspended"], per_wake = await suspended(kube, cycles, info)
    async with running_stack("--pool-size", "1") as local:
        series["local pool hit"] = await pool_hits(local, runs)
        series["local suspended"], _ = await suspended(local, cycles, None)
    return {"runs": runs, "cycles": cycles,
            "stats": {name: summary(values) for name, values in series.items()},
            "api_calls_per_wake": per_wake, "samples_ms": series}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.kube")
    parser.add_argument("--out", type=Path, default=Path("loadtests/results"))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    runs, cycles = (5, 5) if args.quick else (30, 30)
    result = asyncio.run(measure(runs, cycles))
    rows = [{"scenario": name, **stats} for name, stats in result["stats"].items()]
    print_table("Kubernetes stand-in vs local (ms, create/connect + first row)", rows,
                ["scenario", *next(iter(result["stats"].values())).keys()])
    distinct = {json.dumps(c, sort_keys=True) for c in result["api_calls_per_wake"]}
    print("API calls per wake:", ", ".join(sorted(distinct)))
    write_result(args.out, "kube", result)
    plot_cdf(args.out / "kube.png", "Kubernetes stand-in vs local", result["samples_ms"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
