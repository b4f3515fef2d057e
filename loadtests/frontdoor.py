"""Good clients' connect time with and without a crowd stalled in the startup phase.

A slowloris crowd (1000 by default) holds connections at every point of the
startup phase: silent after connect, half a length word, SSLRequest and then no
TLS handshake, TLS done and then no StartupMessage. Each slot reconnects as soon
as the proxy drops it at its deadline, so the crowd stays the same size all run.
Good clients (TLS + SCRAM + `select 1`) are timed alone, then with the crowd, then
alone again, in one run against one `pgwake up` process. Run it with
`python -m loadtests.frontdoor [--stalled 1000] [--iterations 100] [--quick]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ssl
import time
from pathlib import Path
from typing import Any

from loadtests.connect import timed_connect
from loadtests.stack import raise_fd_limit, running_stack
from loadtests.stats import plot_cdf, print_table, summary, write_result
from proxy.pgwire import messages

STALL_KINDS = ("silent", "partial_length", "ssl_no_handshake", "tls_no_startup")


class StalledCrowd:
    """`size` connections stalled in the startup phase; optionally reconnecting when dropped."""

    def __init__(self, port: int, size: int, *, reconnect: bool, host: str = "127.0.0.1"):
        self.port, self.size, self.reconnect, self.host = port, size, reconnect, host
        self.open = 0
        self.dropped = 0  # times the proxy closed a stalled connection (its deadline)
        self.failed = 0  # connects that did not get through (backlog, refused)
        self.full = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._tls = ssl.create_default_context()
        self._tls.check_hostname = False
        self._tls.verify_mode = ssl.CERT_NONE

    async def __aenter__(self) -> StalledCrowd:
        for index in range(self.size):
            kind = STALL_KINDS[index % len(STALL_KINDS)]
            self._tasks.append(asyncio.create_task(self._slot(kind), name=f"stall-{index}"))
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def wait_full(self, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            await self.full.wait()

    async def wait_all_dropped(self, timeout: float) -> None:
        """Without reconnecting: until the proxy has closed every stalled connection."""
        async with asyncio.timeout(timeout):
            await asyncio.gather(*self._tasks)

    async def _slot(self, kind: str) -> None:
        while True:
            try:
                reader, writer = await asyncio.open_connection(self.host, self.port)
            except OSError:
                self.failed += 1
                if not self.reconnect:
                    return
                await asyncio.sleep(0.05)  # back off like a client would, then retry
                continue
            try:
                await self._stall(kind, reader, writer)
                self.open += 1
                if self.open >= self.size:
                    self.full.set()
                try:
                    # Stalled: we send nothing more and wait for the proxy to give up on us.
                    while await reader.read(4096):
                        pass
                except (ConnectionError, ssl.SSLError):
                    pass
                self.open -= 1
                self.dropped += 1
            except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
                self.failed += 1
            finally:
                writer.transport.abort()
            if not self.reconnect:
                return

    async def _stall(
        self, kind: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if kind == "partial_length":
            writer.write(b"\0\0")
        elif kind in ("ssl_no_handshake", "tls_no_startup"):
            writer.write(messages.ssl_request())
            await writer.drain()
            if await reader.readexactly(1) != b"S":
                raise ConnectionError("proxy did not accept SSLRequest")
            if kind == "tls_no_startup":
                await writer.start_tls(self._tls)
        await writer.drain()


async def measure(conninfo: str, iterations: int) -> list[float]:
    return [await timed_connect(conninfo) for _ in range(iterations)]


async def run(stalled: int, iterations: int) -> dict[str, Any]:
    raise_fd_limit()
    async with running_stack() as stack:
        ep = await stack.client.create_endpoint()
        conninfo = (
            f"host={ep.id}.pgwake.localhost "
            f"hostaddr=127.0.0.1 port={stack.proxy_port} user={ep.user} "
            f"password={ep.password} dbname={ep.database} sslmode=verify-full "
            f"sslrootcert={stack.ca_file}"
        )
        await measure(conninfo, 5)  # warm: the compute is up, caches are filled
        alone = await measure(conninfo, iterations)
        started = time.perf_counter()
        async with StalledCrowd(stack.proxy_port, stalled, reconnect=True) as crowd:
            await crowd.wait_full(120)
            filled_s = time.perf_counter() - started
            crowded = await measure(conninfo, iterations)
            held_at_end = crowd.open
            dropped, failed = crowd.dropped, crowd.failed
        after = await measure(conninfo, iterations)
    series = {"alone": alone, f"with {stalled} stalled": crowded, "alone again": after}
    stats = {label: summary(values) for label, values in series.items()}
    ratio = stats[f"with {stalled} stalled"]["p50_ms"] / stats["alone"]["p50_ms"]
    return {
        "scenario": "frontdoor-stalled-crowd",
        "stalled": stalled,
        "iterations": iterations,
        "crowd": {"filled_in_s": round(filled_s, 2), "held_at_end": held_at_end,
                  "dropped_by_deadline": dropped, "connect_failures": failed,
                  "kinds": list(STALL_KINDS)},
        "stats": stats,
        "p50_ratio_crowded_vs_alone": round(ratio, 3),
        "samples_ms": series,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.frontdoor")
    parser.add_argument("--stalled", type=int, default=1000)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("loadtests/results"))
    parser.add_argument("--quick", action="store_true", help="a short run (20 iterations)")
    args = parser.parse_args(argv)
    iterations = 20 if args.quick else args.iterations
    result = asyncio.run(run(args.stalled, iterations))
    path = write_result(args.out, "frontdoor-stalled", result)
    with contextlib.suppress(Exception):  # the plot is a convenience; the JSON is the result
        plot_cdf(args.out / "frontdoor-stalled.png",
                 f"Good clients' connect time, {args.stalled} stalled", result["samples_ms"])
    rows = [{"run": k, **v} for k, v in result["stats"].items()]
    print_table("connect + select 1, good clients (ms)", rows,
                ["run", "n", "p50_ms", "p90_ms", "p99_ms", "max_ms"])
    print(f"\ncrowd: {result['crowd']}")
    print(f"with crowd / alone (p50): {result['p50_ratio_crowded_vs_alone']:.3f}")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
