"""pgbench -S side by side: direct, through pgwake, through PgBouncer; plaintext and TLS.

All six paths hit the same compute and run interleaved in one run (round-robin,
several rounds), so drift in the machine affects each alike. PgBouncer runs in
session mode, its client side with the same certificate as pgwake.
Budget: pgwake+TLS ≥ 1.0 × PgBouncer+TLS.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import socket
import statistics
import subprocess
from pathlib import Path
from typing import Any

from loadtests.connect import enable_compute_tls
from loadtests.stack import BenchStack, running_stack, tls_capable_bindir
from loadtests.stats import plot_bars, print_table, write_result

TPS_RE = re.compile(r"tps = ([0-9.]+) \((?:without initial connection time|excluding)")


def find_program(name: str, bindir: Path) -> str:
    candidate = bindir / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} not found: install it (e.g. apt-get install {name})")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class PgBouncer:
    """PgBouncer in front of the compute (session mode unless told; runs as the postgres
    user). Its files go in `name` under the stack's directory: two PgBouncers need two."""

    def __init__(self, stack: BenchStack, compute_port: int, password: str, user: str, *,
                 pool_mode: str = "session", max_client_conn: int = 500, pool_size: int = 50,
                 name: str = "pgbouncer"):
        self.pool_mode = pool_mode
        self.max_client_conn = max_client_conn
        self.pool_size = pool_size
        self.dir = stack.data_dir / name
        self.port = free_port()
        self.compute_port = compute_port
        self.password = password
        self.user = user
        self.stack = stack
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self, timeout: float = 30.0) -> None:
        self.dir.mkdir(exist_ok=True)
        owner = (self.stack.data_dir / "computes").stat()
        shutil.copyfile(self.stack.server_cert, self.dir / "server.crt")
        shutil.copyfile(self.stack.server_key, self.dir / "server.key")
        (self.dir / "userlist.txt").write_text(f'"{self.user}" "{self.password}"\n')
        (self.dir / "pgbouncer.ini").write_text(
            f"""[databases]
main = host=127.0.0.1 port={self.compute_port} dbname=main

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {self.dir}/userlist.txt
pool_mode = {self.pool_mode}
max_client_conn = {self.max_client_conn}
default_pool_size = {self.pool_size}
client_tls_sslmode = allow
client_tls_cert_file = {self.dir}/server.crt
client_tls_key_file = {self.dir}/server.key
ignore_startup_parameters = extra_float_digits,options
logfile = {self.dir}/pgbouncer.log
"""
        )
        for path in [self.dir, *self.dir.iterdir()]:
            os.chown(path, owner.st_uid, owner.st_gid)
            path.chmod(0o700 if path.is_dir() else 0o600)
        # PgBouncer refuses to run as root; run it as the computes' owner.
        # Its stderr goes to a file: it logs every login there too, and a pipe nobody
        # reads would fill and stop it (at a few hundred logins).
        with (self.dir / "stderr.log").open("wb") as stderr:
            self.proc = subprocess.Popen(  # noqa: ASYNC220 (fork+exec, returns at once)
                [find_program("pgbouncer", Path("/usr/sbin")), str(self.dir / "pgbouncer.ini")],
                user=owner.st_uid, group=owner.st_gid, extra_groups=[],
                stdout=subprocess.DEVNULL, stderr=stderr, stdin=subprocess.DEVNULL,
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # PgBouncer announces nothing on stderr we can rely on; its port accepting is the signal.
        while True:
            if self.proc.poll() is not None:
                err = (self.dir / "stderr.log").read_text(errors="replace")
                raise RuntimeError(f"pgbouncer exited: {err[-2000:]}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                return
            except OSError:
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


async def pgbench_figure(pgbench_bin: str, env: dict[str, str], seconds: int, clients: int,
                         figure: re.Pattern[str]) -> str:
    """One select-only pgbench run; the group of `figure` in its report."""
    proc = await asyncio.create_subprocess_exec(
        pgbench_bin, "-S", "-n", "-c", str(clients), "-j", "2", "-T", str(seconds),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **env},
    )
    out, err = await asyncio.wait_for(proc.communicate(), seconds + 120)
    match = figure.search(out.decode())
    if proc.returncode != 0 or match is None:
        raise RuntimeError(f"pgbench failed ({proc.returncode}): {err.decode()[-500:]}")
    return match.group(1)


async def pgbench(pgbench_bin: str, env: dict[str, str], seconds: int, clients: int) -> float:
    return float(await pgbench_figure(pgbench_bin, env, seconds, clients, TPS_RE))


async def run(rounds: int, seconds: int, clients: int, scale: int) -> dict[str, Any]:
    bindir = tls_capable_bindir()
    pgbench_bin = find_program("pgbench", bindir)
    async with running_stack("--allow-plaintext", bindir=bindir) as stack:
        ep = await stack.client.create_endpoint()
        address = await enable_compute_tls(stack, ep.id)
        compute_port = int(address.rpartition(":")[2])
        base = {"PGUSER": ep.user, "PGPASSWORD": ep.password, "PGDATABASE": ep.database,
                "PGHOST": "127.0.0.1"}
        direct = {**base, "PGPORT": str(compute_port)}
        init = await asyncio.create_subprocess_exec(
            pgbench_bin, "-i", "-q", "-s", str(scale), env={**os.environ, **direct,
                                                          "PGSSLMODE": "disable"},
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )
        _, err = await init.communicate()
        if init.returncode != 0:
            raise RuntimeError(f"pgbench -i failed: {err.decode()}")
        bouncer = PgBouncer(stack, compute_port, ep.password, ep.user)
        await bouncer.start()
        try:
            via_proxy = {**base, "PGPORT": str(stack.proxy_port), "PGOPTIONS": f"endpoint={ep.id}"}
            via_bouncer = {**base, "PGPORT": str(bouncer.port)}
            targets = {
                "direct plain": {**direct, "PGSSLMODE": "disable"},
                "direct TLS": {**direct, "PGSSLMODE": "require"},
                "pgwake plain": {**via_proxy, "PGSSLMODE": "disable"},
                "pgwake TLS": {**via_proxy, "PGSSLMODE": "require"},
                "pgbouncer plain": {**via_bouncer, "PGSSLMODE": "disable"},
                "pgbouncer TLS": {**via_bouncer, "PGSSLMODE": "require"},
            }
            tps: dict[str, list[float]] = {name: [] for name in targets}
            for round_no in range(rounds):
                names = list(targets)
                if round_no % 2:
                    names.reverse()
                for name in names:
                    value = await pgbench(pgbench_bin, targets[name], seconds, clients)
                    tps[name].append(value)
                    print(f"  round {round_no + 1}/{rounds} {name:<16} {value:9.0f} tps",
                          flush=True)
        finally:
            bouncer.stop()
    median = {name: statistics.median(values) for name, values in tps.items()}
    ratios = {name: round(value / median["direct plain"], 3) for name, value in median.items()}
    return {
        "benchmark": f"pgbench -S -c {clients} -j 2 -T {seconds}, {rounds} interleaved rounds",
        "scale": scale,
        "tps_rounds": tps,
        "tps_median": median,
        "ratio_to_direct_plain": ratios,
        "pgwake_tls_vs_pgbouncer_tls": round(median["pgwake TLS"] / median["pgbouncer TLS"], 3),
        "pgwake_plain_vs_pgbouncer_plain": round(
            median["pgwake plain"] / median["pgbouncer plain"], 3
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests throughput")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("loadtests/results"))
    parser.add_argument("--quick", action="store_true", help="1 round of 2 s, scale 1")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds, args.scale = 1, 2, 1
    print(f"throughput: {args.rounds} rounds × 6 paths × {args.seconds} s …", flush=True)
    result = asyncio.run(run(args.rounds, args.seconds, args.clients, args.scale))
    path = write_result(args.out, "throughput", result)
    plot_bars(args.out / "throughput.png", result["benchmark"], result["tps_median"], "tps")
    rows = [{"path": k, "tps": v, "× direct plain": result["ratio_to_direct_plain"][k]}
            for k, v in result["tps_median"].items()]
    print_table("pgbench -S, median tps", rows, ["path", "tps", "× direct plain"])
    print(f"\npgwake TLS / PgBouncer TLS: {result['pgwake_tls_vs_pgbouncer_tls']:.3f}"
          "  (budget ≥ 1.0)")
    print(f"pgwake plain / PgBouncer plain: {result['pgwake_plain_vs_pgbouncer_plain']:.3f}")
    print(f"results: {path}")
    return 0
