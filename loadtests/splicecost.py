"""The splice's own Python cost per pgbench -S transaction, two splice.py side by side.

No sockets and no server: each tree's Splice gets transports whose write does
nothing, and one pgbench -S exchange (a Query one way; RowDescription, DataRow,
CommandComplete, ReadyForQuery the other) is pushed through both sides' data_received,
many times; the minimum over repeats is the cost. Machine load barely moves it,
unlike end-to-end CPU per transaction (loadtests splicecpu), which it complements.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import sys
import timeit
from pathlib import Path
from types import ModuleType
from typing import Any

from proxy.pgwire import messages
from proxy.pgwire.codec import frame

QUERY = frame(b"Q", b"SELECT abalance FROM pgbench_accounts WHERE aid = 12345;\x00")
ANSWER = (
    frame(b"T", b"\x00\x01abalance\x00" + bytes(18))
    + frame(b"D", b"\x00\x01\x00\x00\x00\x0512345")
    + frame(b"C", b"SELECT 1\x00")
    + messages.ready_for_query(b"I")
)


class _NullTransport:
    def write(self, data: bytes) -> None:
        pass

    def get_extra_info(self, name: str) -> None:
        return None

    def is_closing(self) -> bool:
        return False


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


async def measure(path: Path, name: str, number: int, repeat: int) -> float:
    module = _load(f"splicecost_{name}", path)
    splice = module.Splice(_NullTransport(), _NullTransport())
    client, compute = splice._client_side, splice._compute_side
    client.write = compute.write = _NullTransport().write
    if hasattr(compute, "may_park"):
        compute.may_park = True  # as in a session that may park

    def transaction() -> None:
        client.data_received(QUERY)
        compute.data_received(ANSWER)

    best: float = min(timeit.repeat(transaction, number=number, repeat=repeat)) / number
    return best * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests splicecost")
    parser.add_argument("--splice", action="append", required=True, metavar="NAME=PATH",
                        help="a splice.py to measure (give two: before=…/proxy/splice.py)")
    parser.add_argument("--number", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args(argv)
    results: dict[str, Any] = {}
    for item in args.splice:
        name, _, path = item.partition("=")
        results[name] = asyncio.run(measure(Path(path), name, args.number, args.repeat))
    first = next(iter(results))
    for name, value in results.items():
        print(f"{name:<10} {value:6.3f} µs per transaction "
              f"({value - results[first]:+.3f} µs against {first})")
    return 0
