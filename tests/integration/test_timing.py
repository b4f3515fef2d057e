"""The connect-time breakdown adds up: log line, pgwake.timing and phase metrics agree."""

from __future__ import annotations

import asyncio
import logging
import re

import httpx
import psycopg
import pytest

from pgwake.up import Up
from proxy.timing import PHASES

PART = re.compile(r"(\w+)=([\d.]+)ms")


def timing_url(url_no_sni: str) -> str:
    return url_no_sni.replace("options=endpoint%3D", "options=pgwake_timing%3Don%20endpoint%3D")


async def connect_timed(url: str) -> dict[str, float]:
    async with await psycopg.AsyncConnection.connect(timing_url(url)) as conn:
        timing = conn.info.parameter_status("pgwake.timing")
        cur = await conn.execute("select 1")
        assert await cur.fetchone() == (1,)
    assert timing is not None
    return {name: float(value) for name, value in PART.findall(timing)}


def assert_adds_up(parts: dict[str, float], total: float) -> None:
    # Each part is printed to 0.01 ms: the sum may differ from the total by rounding only.
    assert abs(sum(parts.values()) - total) <= 0.01 * (len(parts) + 1), (parts, total)


async def test_first_and_woken_connections_break_down_completely(
    stack: Up, caplog: pytest.LogCaptureFixture
) -> None:
    assert stack.client is not None
    ep = await stack.client.create_endpoint()
    with caplog.at_level(logging.INFO, logger="pgwake.connections"):
        first = await connect_timed(ep.url_no_sni)
        await stack.client.suspend(ep.id)
        woken = await connect_timed(ep.url_no_sni)
        # Each line is written when its session ends on the proxy's side.
        assert stack.proxy is not None
        if stack.proxy.state.sessions:
            await asyncio.wait(set(stack.proxy.state.sessions), timeout=30)
    for seen in (first, woken):
        total = seen.pop("total")
        assert {"tls", "startup", "verifier", "auth", "queue", "wake", "compute",
                "finish"} <= set(seen), seen
        assert set(seen) <= set(PHASES)
        assert_adds_up(seen, total)
    # The wake is where a woken connection waited (the compute was started then).
    assert woken["wake"] > first["wake"]
    # The connection log says the same, for the same connections.
    lines = [r.getMessage() for r in caplog.records
             if r.name == "pgwake.connections" and ep.id in r.getMessage()]
    assert len(lines) == 2, lines
    for line in lines:
        fields = dict(re.findall(r"(\w+)_ms=([\d.]+)", line))
        ready = float(fields.pop("ready"))
        assert set(fields) <= set(PHASES), fields
        assert_adds_up({k: float(v) for k, v in fields.items()}, ready)


async def test_phase_metrics_add_up(stack: Up) -> None:
    assert stack.client is not None and stack.control is not None
    ep = await stack.client.create_endpoint()

    async def scrape() -> dict[str, float]:
        async with httpx.AsyncClient(base_url=stack.control.api_url) as http:  # type: ignore[union-attr]
            text = (await http.get("/metrics")).text
        sums: dict[str, float] = {}
        for name, labels, value in re.findall(r"^(pgwake_connect_\w+_sum)\{([^}]*)\} (\S+)$",
                                              text, re.M):
            if name == "pgwake_connect_phase_seconds_sum" or (
                'excluded="none"' in labels and 'outcome="ok"' in labels
            ):
                sums[name] = sums.get(name, 0.0) + float(value)
        return sums

    before = await scrape()
    for _ in range(3):
        async with await psycopg.AsyncConnection.connect(ep.url_no_sni) as conn:
            await conn.execute("select 1")
    after = await scrape()

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    total = delta("pgwake_connect_latency_seconds_sum")
    assert total > 0
    assert abs(delta("pgwake_connect_phase_seconds_sum") - total) < 1e-4
