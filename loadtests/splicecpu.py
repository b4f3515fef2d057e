"""Proxy CPU per transaction, two source trees side by side (a splice change's cost).

Each tree runs its own `pgwake up` process (PYTHONPATH puts the tree first), with
its own endpoint on the same PostgreSQL binaries; pgbench -S with client TLS runs
against each in interleaved rounds, and the `pgwake up` process's CPU time
(utime + stime from /proc, the control plane idles meanwhile) is divided by the
transactions pgbench reports. Budget for a splice change: after ≤ 1.05 × before.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import statistics
from pathlib import Path
from typing import Any

from loadtests.stack import BenchStack, running_stack, tls_capable_bindir
from loadtests.stats import print_table, write_result
from loadtests.throughput import find_program

TXNS_RE = re.compile(r"number of transactions actually processed: (\d+)")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def pgbench_txns(pgbench: str, env: dict[str, str], seconds: int, clients: int) -> int:
    proc = await asyncio.create_subprocess_exec(
        pgbench, "-S", "-n", "-c", str(clients), "-j", "2", "-T", str(seconds),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **env},
    )
    out, err = await asyncio.wait_for(proc.communicate(), seconds + 120)
    match = TXNS_RE.search(out.decode())
    if proc.returncode != 0 or match is None:
        raise RuntimeError(f"pgbench failed ({proc.returncode}): {err.decode()[-500:]}")
    return int(match.group(1))


async def prepare(stack: BenchStack, pgbench: str, scale: int) -> dict[str, str]:
    ep = await stack.client.create_endpoint()
    env = {"PGUSER": ep.user, "PGPASSWORD": ep.password, "PGDATABASE": ep.database,
           "PGHOST": "127.0.0.1", "PGPORT": str(stack.proxy_port),
           "PGOPTIONS": f"endpoint={ep.id}", "PGSSLMODE": "require"}
    init = await asyncio.create_subprocess_exec(
        pgbench, "-i", "-q", "-s", str(scale), env={**os.environ, **env},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    _, err = await init.communicate()
    if init.returncode != 0:
        raise RuntimeError(f"pgbench -i failed: {err.decode()}")
    return env


async def run(trees: dict[str, Path], rounds: int, seconds: int, clients: int,
              scale: int) -> dict[str, Any]:
    bindir = tls_capable_bindir()
    pgbench = find_program("pgbench", bindir)
    per_txn: dict[str, list[float]] = {name: [] for name in trees}
    tps: dict[str, list[float]] = {name: [] for name in trees}
    async with contextlib.AsyncExitStack() as exits:
        stacks: dict[str, tuple[BenchStack, dict[str, str]]] = {}
        for index, (name, tree) in enumerate(trees.items()):
            base = 40000 + (os.getpid() % 20) * 1000 + index * 400
            stack = await exits.enter_async_context(running_stack(
                bindir=bindir,
                env={"PYTHONPATH": str(tree), "PGWAKE_PORT_RANGE": f"{base}-{base + 399}"},
            ))
            stacks[name] = (stack, await prepare(stack, pgbench, scale))
        for round_no in range(rounds):
            names = list(trees) if round_no % 2 == 0 else list(reversed(trees))
            for name in names:
                stack, env = stacks[name]
                before = cpu_seconds(stack.pid)
                txns = await pgbench_txns(pgbench, env, seconds, clients)
                used = cpu_seconds(stack.pid) - before
                per_txn[name].append(used / txns * 1e6)
                tps[name].append(txns / seconds)
                print(f"  round {round_no + 1}/{rounds} {name:<10} {txns / seconds:8.0f} tps "
                      f"{used / txns * 1e6:7.2f} µs CPU/txn", flush=True)
    median = {name: statistics.median(values) for name, values in per_txn.items()}
    first = next(iter(trees))
    return {
        "benchmark": f"pgbench -S -c {clients} -j 2 -T {seconds}, client TLS, "
                     f"{rounds} interleaved rounds; proxy process CPU per transaction",
        "trees": {name: str(tree) for name, tree in trees.items()},
        "cpu_us_per_txn_rounds": per_txn,
        "cpu_us_per_txn_median": median,
        "tps_rounds": tps,
        "ratio_to_first": {name: round(value / median[first], 3) for name, value in median.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests splicecpu")
    parser.add_argument("--tree", action="append", required=True, metavar="NAME=DIR",
                        help="a source tree to run (give two: before=DIR after=DIR)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("loadtests/results"))
    parser.add_argument("--quick", action="store_true", help="2 rounds of 3 s, scale 1")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds, args.scale = 2, 3, 1
    trees = {}
    for item in args.tree:
        name, _, directory = item.partition("=")
        trees[name] = Path(directory).resolve()
    result = asyncio.run(run(trees, args.rounds, args.seconds, args.clients, args.scale))
    path = write_result(args.out, "splicecpu", result)
    rows = [{"tree": name, "µs CPU/txn": round(value, 2), "× first": result["ratio_to_first"][name]}
            for name, value in result["cpu_us_per_txn_median"].items()]
    print_table("proxy CPU per transaction (median)", rows, ["tree", "µs CPU/txn", "× first"])
    print(f"results: {path}")
    return 0
