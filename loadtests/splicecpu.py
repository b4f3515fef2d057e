"""Proxy CPU per transaction and tps: pgwake's data path(s) next to PgBouncer, or two
source trees side by side.

Default mode (issue 12's figures): for each data path asked for
(`--data-plane python|native|both`, passed to `pgwake up --data-plane`) a `pgwake
up` process with default settings (plus --allow-plaintext for the plain rows), and
PgBouncer in session mode in front of the first one's compute. pgbench -S with
client TLS and plain runs against each, and directly against the compute, in
interleaved rounds (the order reversed every other round); each server process's
CPU time (utime + stime of all its threads, from /proc; pgwake's control plane
idles meanwhile) is divided by the transactions pgbench reports. Results: CPU per
transaction (and how much of it is system time: the kernel's work for the reads
and writes, which any proxy pays) and its ratio to PgBouncer's in the same round
(paired), tps and its ratio to direct plain. A `pgwake` that refuses `--data-plane`
is reported as such.

Two yardsticks run in the same rounds, in front of the same compute as PgBouncer:
PgBouncer in transaction mode (its usual deployment; pool of 8), and "reference C
splice TLS", the minimal single-thread epoll + OpenSSL splice of refsplice.c
(compiled here at run time; skipped with a note when there is no compiler or no
OpenSSL headers). Issue 12 quotes ≈ 0.55–0.65 × PgBouncer for such a splice: its
row checks that figure on the machine at hand. Every CPU ratio is to session-mode
PgBouncer in the same round.

`--tree NAME=DIR` (twice): the same measurement, client TLS, for two source trees
(a splice change's cost; budget after ≤ 1.05 × before).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import statistics
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from loadtests import refsplice
from loadtests.stack import BenchStack, running_stack, tls_capable_bindir
from loadtests.stats import print_table, write_result
from loadtests.throughput import PgBouncer, find_program, pgbench_figure

TXNS_RE = re.compile(r"number of transactions actually processed: (\d+)")


def cpu_split(pid: int) -> tuple[float, float]:
    """A process's (user, system) CPU seconds, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def cpu_seconds(pid: int) -> float:
    return sum(cpu_split(pid))


async def pgbench_txns(pgbench: str, env: dict[str, str], seconds: int, clients: int) -> int:
    return int(await pgbench_figure(pgbench, env, seconds, clients, TXNS_RE))


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


DATA_PLANES = {"python": ["python"], "native": ["native"], "both": ["python", "native"]}


class DataPlaneRefused(Exception):
    """`pgwake up` would not start with the data path asked for."""


@contextlib.asynccontextmanager
async def plane_stack(plane: str, bindir: Path, index: int, flag: bool = True
                      ) -> AsyncIterator[BenchStack]:
    base = 40000 + (os.getpid() % 20) * 1000 + index * 400
    try:
        async with running_stack(
            "--allow-plaintext", *(("--data-plane", plane) if flag else ()), bindir=bindir,
            env={"PGWAKE_PORT_RANGE": f"{base}-{base + 399}"},
        ) as stack:
            yield stack
    except RuntimeError as exc:
        if "pgwake up exited" in str(exc):
            raise DataPlaneRefused(str(exc).partition("\n")[2].strip()[-600:]) from None
        raise


def no_such_option(why: str) -> bool:
    return "No such option" in why and "--data-plane" in why


async def run_planes(planes: list[str], rounds: int, seconds: int, clients: int,
                     scale: int) -> dict[str, Any]:
    bindir = tls_capable_bindir()
    pgbench = find_program("pgbench", bindir)
    refused: dict[str, str] = {}
    notes: dict[str, str] = {}
    # target name → (pid whose CPU counts, or 0 for none; pgbench environment)
    targets: dict[str, tuple[int, dict[str, str]]] = {}
    async with contextlib.AsyncExitStack() as exits:
        first: tuple[BenchStack, dict[str, str]] | None = None
        for index, plane in enumerate(planes):
            try:
                stack = await exits.enter_async_context(plane_stack(plane, bindir, index))
            except DataPlaneRefused as exc:
                refused[plane] = str(exc)
                print(f"  pgwake up --data-plane {plane} refused to start:\n{exc}", flush=True)
                if not (plane == "python" and no_such_option(str(exc))):
                    continue
                # A pgwake without the option has one data path, the Python one.
                notes[plane] = "pgwake up has no --data-plane option: ran without it"
                del refused[plane]
                stack = await exits.enter_async_context(
                    plane_stack(plane, bindir, index, flag=False))
            env = await prepare(stack, pgbench, scale)
            first = first or (stack, env)
            for mode in ("plain", "TLS"):
                sslmode = "require" if mode == "TLS" else "disable"
                targets[f"pgwake {plane} {mode}"] = (stack.pid, {**env, "PGSSLMODE": sslmode})
        if first is None:
            return {"refused": refused, "notes": notes}
        stack, env = first
        endpoint = await stack.client.get_endpoint(env["PGOPTIONS"].partition("=")[2])
        assert endpoint.address is not None
        compute_port = int(endpoint.address.rpartition(":")[2])
        bouncer = PgBouncer(stack, compute_port, env["PGPASSWORD"], env["PGUSER"])
        await bouncer.start()
        exits.callback(bouncer.stop)
        plain = {k: v for k, v in env.items() if k != "PGOPTIONS"}
        targets["direct plain"] = (0, {**plain, "PGPORT": str(compute_port),
                                       "PGSSLMODE": "disable"})
        # Transaction pooling: 8 server connections serve pgbench's 8 clients. The compute
        # also holds session-mode PgBouncer's 8 and takes pgwake's and the reference's.
        txn_bouncer = PgBouncer(stack, compute_port, env["PGPASSWORD"], env["PGUSER"],
                                pool_mode="transaction", pool_size=8, name="pgbouncer-txn")
        await txn_bouncer.start()
        exits.callback(txn_bouncer.stop)
        for label, one in (("pgbouncer", bouncer), ("pgbouncer txn", txn_bouncer)):
            assert one.proc is not None
            for mode, sslmode in (("plain", "disable"), ("TLS", "require")):
                targets[f"{label} {mode}"] = (
                    one.proc.pid, {**plain, "PGPORT": str(one.port), "PGSSLMODE": sslmode})
        try:
            binary = await refsplice.build(stack.data_dir)
        except refsplice.RefSpliceUnavailable as exc:
            notes[refsplice.NAME] = f"not measured: {exc}"
            print(f"  {refsplice.NAME}: not measured: {exc}", flush=True)
        else:
            ref = await exits.enter_async_context(refsplice.running(
                binary, compute_port, stack.server_cert, stack.server_key))
            targets[f"{refsplice.NAME} TLS"] = (
                ref.pid, {**plain, "PGPORT": str(ref.port), "PGSSLMODE": "require"})
        per_txn: dict[str, list[float]] = {name: [] for name, (pid, _) in targets.items() if pid}
        # The kernel's share (system time) apart: it is the floor any proxy pays for
        # its reads and writes, whatever its own code costs.
        sys_per_txn: dict[str, list[float]] = {name: [] for name in per_txn}
        tps: dict[str, list[float]] = {name: [] for name in targets}
        for round_no in range(rounds):
            names = list(targets) if round_no % 2 == 0 else list(reversed(targets))
            for name in names:
                pid, target_env = targets[name]
                user0, sys0 = cpu_split(pid) if pid else (0.0, 0.0)
                txns = await pgbench_txns(pgbench, target_env, seconds, clients)
                tps[name].append(txns / seconds)
                line = f"  round {round_no + 1}/{rounds} {name:<22} {txns / seconds:8.0f} tps"
                if pid:
                    user1, sys1 = cpu_split(pid)
                    per_txn[name].append((user1 - user0 + sys1 - sys0) / txns * 1e6)
                    sys_per_txn[name].append((sys1 - sys0) / txns * 1e6)
                    line += (f" {per_txn[name][-1]:7.2f} µs CPU/txn"
                             f" ({sys_per_txn[name][-1]:.2f} system)")
                print(line, flush=True)
    tps_median = {name: statistics.median(values) for name, values in tps.items()}
    cpu_median = {name: statistics.median(values) for name, values in per_txn.items()}
    sys_median = {name: statistics.median(values) for name, values in sys_per_txn.items()}

    def paired(name: str) -> float:
        """Median over rounds of this target's CPU/txn ÷ session-mode PgBouncer's, same mode
        (plain, TLS) and round."""
        bouncer_rounds = per_txn["pgbouncer " + name.rpartition(" ")[2]]
        return round(statistics.median(
            mine / theirs for mine, theirs in zip(per_txn[name], bouncer_rounds, strict=True)
        ), 3)

    return {
        "benchmark": f"pgbench -S -c {clients} -j 2 -T {seconds}, scale {scale}, "
                     f"{rounds} interleaved rounds; server process CPU per transaction",
        "data_planes": planes,
        "refused": refused,
        "notes": notes,
        "cpu_us_per_txn_rounds": per_txn,
        "cpu_us_per_txn_median": cpu_median,
        "cpu_vs_pgbouncer_paired": {name: paired(name) for name in per_txn},
        "system_us_per_txn_rounds": sys_per_txn,
        "system_us_per_txn_median": sys_median,
        "tps_rounds": tps,
        "tps_median": tps_median,
        "tps_vs_direct_plain": {name: round(value / tps_median["direct plain"], 3)
                                for name, value in tps_median.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests splicecpu")
    parser.add_argument("--tree", action="append", metavar="NAME=DIR",
                        help="compare source trees instead (give two: before=DIR after=DIR)")
    parser.add_argument("--data-plane", choices=sorted(DATA_PLANES), default="both",
                        help="pgwake's data path(s) to measure next to PgBouncer")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("loadtests/results"))
    parser.add_argument("--quick", action="store_true", help="2 rounds of 3 s, scale 1")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds, args.scale = 2, 3, 1
    if not args.tree:
        return _main_planes(args)
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


def _main_planes(args: argparse.Namespace) -> int:
    planes = DATA_PLANES[args.data_plane]
    result = asyncio.run(run_planes(planes, args.rounds, args.seconds, args.clients, args.scale))
    path = write_result(args.out, "splicecpu", result)
    for plane, note in result["notes"].items():
        print(f"\n{plane}: {note}")
    for plane, why in result["refused"].items():
        print(f"\npgwake up refused --data-plane {plane} (not measured):\n{why}")
    if "tps_median" not in result:
        print(f"no data path could be measured; results: {path}")
        return 1
    rows = [
        {"path": name, "tps": round(tps), "× direct plain": result["tps_vs_direct_plain"][name],
         "µs CPU/txn": round(result["cpu_us_per_txn_median"][name], 2)
         if name in result["cpu_us_per_txn_median"] else "-",
         "of it system": round(result["system_us_per_txn_median"][name], 2)
         if name in result["system_us_per_txn_median"] else "-",
         "CPU × PgBouncer": result["cpu_vs_pgbouncer_paired"].get(name, "-")}
        for name, tps in result["tps_median"].items()
    ]
    print_table("server CPU per transaction and tps (medians; CPU ratio to session-mode "
                "PgBouncer, paired per round)",
                rows, ["path", "tps", "× direct plain", "µs CPU/txn", "of it system",
                       "CPU × PgBouncer"])
    print(json.dumps({k: result[k] for k in ("cpu_us_per_txn_median", "system_us_per_txn_median",
                                             "cpu_vs_pgbouncer_paired",
                                             "tps_median", "tps_vs_direct_plain", "refused",
                                             "notes")},
                     indent=2))
    print(f"results: {path}")
    return 0
