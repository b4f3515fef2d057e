"""Re-attach latency: a parked session's next query → first row, next to a fresh
connect + first row to the same suspended endpoint (interleaved in one run).

The client (psycopg, stock settings) runs in this process; `pgwake up` in its own.
Each re-attach sample: a held session runs a query, idles past the proxy's
survey (`survey_after`, default 1 s), the endpoint is suspended through the API
(the session parks), and the held session's next `select 1` is timed. Each
fresh sample: suspend, then connect + `select 1` on a new connection.
Budget: re-attach p50 ≤ 1.0 × fresh connect p50.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

import psycopg

from loadtests.stack import running_stack
from loadtests.stats import plot_cdf, print_table, summary, write_result

# The proxy surveys a session once it has been idle this long (ProxySettings.survey_after);
# waiting a little more lets the survey's own cadence (half of it) come round.
SURVEY_WAIT = 1.8


async def first_row(conn: psycopg.AsyncConnection[Any]) -> None:
    cur = await conn.execute("select 1")
    await cur.fetchone()


async def run(samples: int) -> dict[str, Any]:
    async with running_stack() as stack:
        ep = await stack.client.create_endpoint()
        held = await psycopg.AsyncConnection.connect(ep.url_no_sni, autocommit=True)
        reattach_ms: list[float] = []
        fresh_ms: list[float] = []
        try:
            await held.execute("set work_mem = '7MB'")
            for index in range(samples):
                # Re-attach.
                await first_row(held)
                await asyncio.sleep(SURVEY_WAIT)  # idle, as a pooled connection is
                await stack.client.suspend(ep.id)
                started = time.perf_counter()
                await first_row(held)
                reattach_ms.append((time.perf_counter() - started) * 1000)
                # Fresh connect to the suspended endpoint.
                await asyncio.sleep(SURVEY_WAIT)
                await stack.client.suspend(ep.id)
                started = time.perf_counter()
                async with await psycopg.AsyncConnection.connect(ep.url_no_sni) as conn:
                    await first_row(conn)
                fresh_ms.append((time.perf_counter() - started) * 1000)
                print(f"  {index + 1}/{samples} re-attach {reattach_ms[-1]:7.1f} ms  "
                      f"fresh connect {fresh_ms[-1]:7.1f} ms", flush=True)
            cur = await held.execute("show work_mem")
            assert await cur.fetchone() == ("7MB",), "the session lost its SET value"
        finally:
            await held.close()
    re, fresh = summary(reattach_ms), summary(fresh_ms)
    return {
        "benchmark": "parked session → first row vs fresh connect → first row, "
                     "suspended durable endpoint, psycopg, interleaved",
        "reattach": re,
        "fresh_connect": fresh,
        "samples_ms": {"reattach": reattach_ms, "fresh_connect": fresh_ms},
        "p50_ratio": round(re["p50_ms"] / fresh["p50_ms"], 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests reattach")
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("loadtests/results"))
    parser.add_argument("--quick", action="store_true", help="5 samples")
    args = parser.parse_args(argv)
    if args.quick:
        args.samples = 5
    result = asyncio.run(run(args.samples))
    path = write_result(args.out, "reattach", result)
    plot_cdf(args.out / "reattach.png", result["benchmark"], result["samples_ms"])
    rows = [{"path": name, **result[name]} for name in ("reattach", "fresh_connect")]
    print_table("suspended endpoint → first row (ms)", rows,
                ["path", "n", "p50_ms", "p90_ms", "p99_ms", "max_ms"])
    print(f"\nre-attach p50 / fresh connect p50: {result['p50_ratio']:.3f}  (budget ≤ 1.0)")
    print(f"results: {path}")
    return 0
