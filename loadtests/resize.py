"""Resize (generation handoff) under a live client: wall time and the longest stall it sees.

A separate client process (a stock psycopg 3, default settings) runs
`select current_setting('shared_buffers')` every 50 ms on one connection
through the proxy; when a query fails it reconnects and goes on (and counts the
error, which is what an application would have seen). The harness resizes the
endpoint back and forth between `small` and `medium` and reports, per resize:

- api_ms: `POST /v1/endpoints/{id}/resize` until it answers (the new generation
  serves by then), with the control plane's own phase times;
- serving_ms: the API call until the client's first answer from the new
  generation (its shared_buffers changed);
- stall_ms: the longest gap between two successful answers in the resize's
  window, minus the 50 ms interval: what the client felt;
- errors: failed queries or connects the client saw.

Run: python -m loadtests.resize [--resizes N] [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import psycopg

from loadtests.stack import running_stack
from loadtests.stats import plot_bars, print_table, summary, write_result

INTERVAL = 0.05


# -- the client process ---------------------------------------------------------------


async def client_loop(url: str) -> None:
    """Print one JSON line per query: when it was due, when it answered, what it saw."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    conn: psycopg.AsyncConnection[Any] | None = None
    next_due = time.monotonic()
    while not stop.is_set():
        due = next_due
        record: dict[str, Any] = {"due": due}
        try:
            if conn is None or conn.closed:
                conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
                record["connected"] = True
            cur = await conn.execute("select current_setting('shared_buffers')")
            row = await cur.fetchone()
            record["value"] = row[0] if row else None
        except psycopg.Error as exc:
            record["error"] = f"{getattr(exc, 'sqlstate', None)}: {str(exc).strip()[:200]}"
            if conn is not None:
                await conn.close()
            conn = None
        record["done"] = time.monotonic()
        sys.stdout.write(json.dumps(record) + "\n")
        sys.stdout.flush()
        next_due = max(due + INTERVAL, time.monotonic())
        try:
            async with asyncio.timeout(max(0.0, next_due - time.monotonic())):
                await stop.wait()
        except TimeoutError:
            pass
    if conn is not None:
        await conn.close()


# -- the harness ----------------------------------------------------------------------


class ClientProcess:
    def __init__(self, url: str):
        self.url = url
        self.records: list[dict[str, Any]] = []
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "loadtests.resize", "--client", self.url,
            stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
        )
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for line in self.proc.stdout:
            self.records.append(json.loads(line))
            self._changed.set()

    async def wait_for(self, predicate: Any, timeout: float = 60) -> dict[str, Any]:
        """The first record from now on for which `predicate(record)` holds."""
        start = len(self.records)
        async with asyncio.timeout(timeout):
            while True:
                for record in self.records[start:]:
                    if predicate(record):
                        return record
                start = len(self.records)
                self._changed.clear()
                await self._changed.wait()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(self.proc.wait(), 30)
        if self._reader is not None:
            await self._reader


def window_stats(records: list[dict[str, Any]], start: float, end: float) -> dict[str, Any]:
    """The longest gap between successful answers that overlaps [start, end]."""
    ok = [r["done"] for r in records if "error" not in r]
    errors = [r for r in records if "error" in r and start <= r["done"] <= end]
    gaps = [
        (b - a) for a, b in itertools.pairwise(ok) if b >= start and a <= end
    ]
    stall = max(gaps, default=0.0) - INTERVAL
    return {"stall_ms": round(max(0.0, stall) * 1000, 1), "errors": len(errors),
            "error_samples": sorted({e["error"] for e in errors})[:3]}


async def measure(resizes: int, drain: float) -> dict[str, Any]:
    async with running_stack() as stack:
        ep = await stack.client.create_endpoint(size="small")
        client = ClientProcess(ep.url_no_sni)
        await client.start()
        rows: list[dict[str, Any]] = []
        try:
            await client.wait_for(lambda r: r.get("value") == "32MB")
            for i in range(resizes):
                target, shown = ("medium", "128MB") if i % 2 == 0 else ("small", "32MB")
                # Let the client settle on the current generation first.
                await client.wait_for(lambda r: "value" in r)
                started = time.monotonic()
                resized = await stack.client.resize(ep.id, target, drain_seconds=drain)
                answered = time.monotonic()
                seen = await client.wait_for(lambda r, v=shown: r.get("value") == v)
                # One more interval of answers, so the gap after the first new one counts.
                await client.wait_for(lambda r, t=seen["done"]: r["done"] > t + INTERVAL)
                rows.append({
                    "resize": f"{resized.previous_size}→{resized.size}",
                    "generation": resized.generation,
                    "api_ms": round((answered - started) * 1000, 1),
                    "serving_ms": round((seen["done"] - started) * 1000, 1),
                    **{f"{k}_ms": round(v * 1000, 1) for k, v in resized.phases.items()},
                    **window_stats(client.records, started, seen["done"]),
                })
        finally:
            await client.stop()
    return {
        "scenario": "resize under a client querying every 50 ms (separate process, psycopg)",
        "resizes": rows,
        "api_ms": summary([r["api_ms"] for r in rows]),
        "serving_ms": summary([r["serving_ms"] for r in rows]),
        "stall_ms": summary([r["stall_ms"] for r in rows]),
        "client_errors": sum(r["errors"] for r in rows),
        "queries": len(client.records),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.resize")
    parser.add_argument("--resizes", type=int, default=10)
    parser.add_argument("--drain", type=float, default=10.0, help="drain deadline, seconds")
    parser.add_argument("--out", type=Path, default=Path("loadtests/results"))
    parser.add_argument("--quick", action="store_true", help="a short run (2 resizes)")
    parser.add_argument("--client", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client:
        asyncio.run(client_loop(args.client))
        return 0
    result = asyncio.run(measure(2 if args.quick else args.resizes, args.drain))
    path = write_result(args.out, "resize", result)
    plot_bars(
        args.out / "resize.png", "resize: longest stall a 50 ms query loop saw",
        {f"{i + 1}: {r['resize']}": r["stall_ms"] for i, r in enumerate(result["resizes"])},
        "ms",
    )
    columns = ["resize", "generation", "api_ms", "serving_ms", "stall_ms", "errors",
               "freeze_ms", "drain_ms", "stop_ms", "start_ms", "unfreeze_ms"]
    print_table("resize under a 50 ms query loop", result["resizes"], columns)
    print(f"\nwall time (API) {result['api_ms']}\nto new generation serving "
          f"{result['serving_ms']}\nlongest client stall {result['stall_ms']}\n"
          f"client errors {result['client_errors']} of {result['queries']} queries")
    for row in result["resizes"]:
        if row["error_samples"]:
            print(f"  {row['resize']}: {row['error_samples']}")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
