"""Can a stranger tell a real role from an unknown one by timing the proxy's SCRAM replies?

A prober that knows no password connects over TLS (SNI), sends a StartupMessage,
and times the proxy's first two replies: the AuthenticationSASL request (timed
from the StartupMessage) and the server-first message (timed from the
SASLInitialResponse). Then it hangs up, as a prober would: no failed login is
recorded, so the front door's failure limits do not stop the run. A smaller
series completes the login with a made-up proof and times the 28P01, within
the per-role failure budget. Last, a flood of connects with new ~9 KB user
names measures what they cost the `pgwake up` process in memory (RSS). Samples
alternate between the endpoint's real role and an unknown name, against an
awake endpoint (its compute running, as when an attacker probes a live
database). Run it with `python -m loadtests authtiming [--samples 250] [--quick]`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import ssl
import time
from pathlib import Path
from typing import Any

from loadtests.connect import timed_connect
from loadtests.stack import running_stack
from loadtests.stats import print_table, summary, write_result
from proxy.pgwire import messages
from proxy.pgwire.codec import MessageReader

DOMAIN = "pgwake.localhost"


async def _read_message(
    reader: asyncio.StreamReader, parser: MessageReader
) -> tuple[bytes, bytes]:
    while (message := parser.next_message()) is None:
        data = await reader.read(65536)
        if not data:
            raise ConnectionError("proxy closed the connection")
        parser.feed(data)
    return message


async def probe(
    port: int, endpoint_id: str, user: str, tls: ssl.SSLContext, *, source: str | None = None
) -> tuple[float, float, float | None]:
    """(StartupMessage → AuthenticationSASL, SASLInitialResponse → server-first,
    a made-up proof → the 28P01, when `source` is given), seconds."""
    local = (source, 0) if source is not None else None
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=local)
    try:
        writer.write(messages.ssl_request())
        await writer.drain()
        assert await reader.readexactly(1) == b"S"
        await writer.start_tls(tls, server_hostname=f"{endpoint_id}.{DOMAIN}")
        parser = MessageReader()
        started = time.perf_counter()
        writer.write(messages.startup_message({"user": user, "database": "main"}, (3, 0)))
        kind, body = await _read_message(reader, parser)
        first = time.perf_counter() - started
        assert kind == b"R" and body[:4] == b"\x00\x00\x00\x0a", (kind, body)
        nonce = base64.b64encode(os.urandom(18)).decode()
        client_first = f"n,,n=,r={nonce}".encode()
        started = time.perf_counter()
        writer.write(messages.sasl_initial_response("SCRAM-SHA-256", client_first))
        kind, body = await _read_message(reader, parser)
        second = time.perf_counter() - started
        assert kind == b"R" and body[:4] == b"\x00\x00\x00\x0b", (kind, body)
        if source is None:
            return first, second, None
        server_nonce = dict(p.split("=", 1) for p in body[4:].decode().split(","))["r"]
        proof = base64.b64encode(os.urandom(32)).decode()
        started = time.perf_counter()
        writer.write(messages.sasl_response(f"c=biws,r={server_nonce},p={proof}".encode()))
        kind, body = await _read_message(reader, parser)
        third = time.perf_counter() - started
        assert kind == b"E" and b"28P01" in body, (kind, body)
        return first, second, third
    finally:
        writer.transport.abort()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def first_reply(port: int, endpoint_id: str, user: str, tls: ssl.SSLContext) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(messages.ssl_request())
        await writer.drain()
        assert await reader.readexactly(1) == b"S"
        await writer.start_tls(tls, server_hostname=f"{endpoint_id}.{DOMAIN}")
        writer.write(messages.startup_message({"user": user, "database": "main"}, (3, 0)))
        kind, _ = await _read_message(reader, MessageReader())
        return kind
    finally:
        writer.transport.abort()


async def name_flood(
    port: int, endpoint_id: str, names: int, tls: ssl.SSLContext, pid: int
) -> dict[str, Any]:
    """`names` connects, each with a new ~9 KB user name; the proxy's RSS before and after."""
    before = rss_kib(pid)
    queue = iter(range(names))
    kinds: dict[str, int] = {}

    async def worker() -> None:
        for index in queue:
            kind = await first_reply(port, endpoint_id, f"n{index}_" + "x" * 8990, tls)
            kinds[kind.decode()] = kinds.get(kind.decode(), 0) + 1

    await asyncio.gather(*(worker() for _ in range(16)))
    after = rss_kib(pid)
    return {"names": names, "replies": kinds, "rss_before_kib": before,
            "rss_after_kib": after, "rss_growth_kib": after - before}


async def run(samples: int, final_samples: int, names: int) -> dict[str, Any]:
    async with running_stack() as stack:
        ep = await stack.client.create_endpoint()
        await timed_connect(ep.url)  # awake, the real role's verifier cached
        tls = ssl.create_default_context()
        tls.check_hostname = False
        tls.verify_mode = ssl.CERT_NONE
        series: dict[str, list[float]] = {
            "real:sasl_request": [], "unknown:sasl_request": [],
            "real:server_first": [], "unknown:server_first": [],
        }
        for _ in range(10):  # warm both paths (TLS session setup, caches)
            await probe(stack.proxy_port, ep.id, ep.user, tls)
            await probe(stack.proxy_port, ep.id, "mallory", tls)
        for index in range(samples * 2):
            who, user = ("real", ep.user) if index % 2 == 0 else ("unknown", "mallory")
            first, second, _ = await probe(stack.proxy_port, ep.id, user, tls)
            series[f"{who}:sasl_request"].append(first * 1000)
            series[f"{who}:server_first"].append(second * 1000)
        # A completed wrong login counts against the front door's failure budgets
        # (per address: each sample comes from its own loopback address; per role:
        # a burst of 30), so this series is small, as it is for an attacker.
        for index in range(final_samples * 2):
            who, user = ("real", ep.user) if index % 2 == 0 else ("unknown", "mallory")
            source = f"127.0.{1 + index // 250}.{1 + index % 250}"
            _, _, third = await probe(stack.proxy_port, ep.id, user, tls, source=source)
            assert third is not None
            series.setdefault(f"{who}:auth_failed", []).append(third * 1000)
        flood = None
        if names:
            pid = json.loads((stack.data_dir / "pgwake.json").read_text())["pid"]
            flood = await name_flood(stack.proxy_port, ep.id, names, tls, pid)
    stats = {label: summary(values) for label, values in series.items()}
    return {"samples_per_role": samples, "final_samples_per_role": final_samples,
            "stats_ms": stats, "name_flood": flood}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=250)
    parser.add_argument("--final-samples", type=int, default=25,
                        help="completed wrong logins per role (at most the per-role burst)")
    parser.add_argument("--out", type=Path, default=Path("loadtests/results"))
    parser.add_argument("--names", type=int, default=7500,
                        help="then connect with this many new ~9 KB user names; report RSS")
    parser.add_argument("--quick", action="store_true",
                        help="a short run (50 and 10 samples, 200 names)")
    args = parser.parse_args(argv)
    if args.quick:
        args.samples, args.final_samples, args.names = 50, 10, 200
    result = asyncio.run(run(args.samples, args.final_samples, args.names))
    print_table(
        "SCRAM reply timing, real role vs unknown role (ms)",
        [{"series": k, **v} for k, v in result["stats_ms"].items()],
        ["series", "n", "p50_ms", "p90_ms", "p99_ms", "max_ms"],
    )
    if result["name_flood"] is not None:
        print("name flood:", json.dumps(result["name_flood"]))
    path = write_result(args.out, "auth-timing", result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
