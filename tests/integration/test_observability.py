"""What operators see: /metrics families and labels, the connection log, /readyz."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pgwake.up import Up
from tests.helpers import running_up


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def value(data: Samples, name: str, **labels: str) -> float:
    return data.get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape(up: Up) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    assert up.control is not None
    async with httpx.AsyncClient(base_url=up.control.api_url) as http:
        response = await http.get("/metrics")
        assert response.status_code == 200
        return samples(response.text)


async def test_metrics_after_a_wake_and_a_warm_connect(stack: Up) -> None:
    assert stack.client is not None
    ep = await stack.client.create_endpoint()
    await stack.client.suspend(ep.id)
    before = await scrape(stack)

    async with await psycopg.AsyncConnection.connect(ep.url_no_sni) as conn:  # wakes
        await conn.execute("select 1")
    async with await psycopg.AsyncConnection.connect(ep.url_no_sni) as conn:  # warm, cached
        await conn.execute("select 1")
    after = await scrape(stack)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    hist = "pgwake_connect_latency_seconds_count"
    assert delta(hist, cold_start="resumed", outcome="ok", excluded="none") == 1
    assert delta(hist, cold_start="resumed", outcome="ok", excluded="client") == 1
    assert delta(hist, cold_start="warm", outcome="ok", excluded="none") == 1
    assert delta("pgwake_wake_duration_seconds_count", cold_start="resumed") == 1
    assert delta("pgwake_wake_phase_seconds_count", phase="start") == 1
    assert delta("pgwake_cache_requests_total", cache="address", outcome="hit") == 1
    assert delta("pgwake_connections_total", outcome="ok") == 2
    assert delta("pgwake_bytes_total", direction="from_compute") > 0
    assert value(after, "pgwake_computes", state="running") >= 1
    # Bounded label sets: no endpoint ids anywhere in the exposition.
    assert not any(ep.id in str(key) for key in after)


async def test_auth_failure_is_logged_and_counted(
    stack: Up, caplog: pytest.LogCaptureFixture
) -> None:
    assert stack.client is not None
    ep = await stack.client.create_endpoint()
    before = value(await scrape(stack), "pgwake_errors_total", sqlstate="28P01")
    bad = ep.url_no_sni.replace(ep.password, "wrong")
    with caplog.at_level(logging.INFO, logger="pgwake.connections"):
        with pytest.raises(psycopg.OperationalError):
            await psycopg.AsyncConnection.connect(bad)
    lines = [r.getMessage() for r in caplog.records if r.name == "pgwake.connections"]
    assert any("sqlstate=28P01" in line and ep.id in line for line in lines), lines
    after = value(await scrape(stack), "pgwake_errors_total", sqlstate="28P01")
    assert after == before + 1


async def test_client_visible_timing(stack: Up) -> None:
    assert stack.client is not None
    ep = await stack.client.create_endpoint()
    url = ep.url_no_sni.replace("options=endpoint%3D", "options=pgwake_timing%3Don%20endpoint%3D")
    # The option is the proxy's and is stripped: the compute would refuse an
    # unknown command-line option, so a working session shows it never saw it.
    async with await psycopg.AsyncConnection.connect(url) as conn:
        timing = conn.info.parameter_status("pgwake.timing")
        assert timing is not None and "total=" in timing and "wake=" in timing
        assert conn.info.parameter_status("pgwake.cold_start") in ("warm", "cached", "resumed")
        cur = await conn.execute("select 1")
        assert await cur.fetchone() == (1,)


@pytest.fixture
async def own_stack(pg_bin: Path) -> AsyncIterator[Up]:
    async with running_up("pgwake-ready-", pg_bin) as up:
        yield up


async def test_readyz_follows_the_control_db(own_stack: Up) -> None:
    assert own_stack.control is not None and own_stack.control.controldb is not None
    async with httpx.AsyncClient(base_url=own_stack.control.api_url) as http:
        ready = await http.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["checks"] == {
            "control_db": True, "proxy_listening": True, "certificates": True
        }
        await own_stack.control.controldb.stop()
        unready = await http.get("/readyz")
        assert unready.status_code == 503
        assert unready.json()["checks"]["control_db"] is False
        assert (await http.get("/healthz")).status_code == 200
        await own_stack.control.controldb.start()
        assert (await http.get("/readyz")).status_code == 200


async def test_dashboard_uses_only_exported_metrics(stack: Up) -> None:
    import json
    import re

    dashboard = json.loads(
        (Path(__file__).parents[2] / "deploy" / "grafana" / "pgwake-dashboard.json").read_text()
    )
    used = {
        re.sub(r"_(bucket|count|sum)$", "", name)
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"pgwake_[a-z_]+", target["expr"])
    }
    assert stack.control is not None
    async with httpx.AsyncClient(base_url=stack.control.api_url) as http:
        exposition = (await http.get("/metrics")).text
    exported = {
        family.name for family in text_string_to_metric_families(exposition)
    } | {f"{family.name}_total" for family in text_string_to_metric_families(exposition)}
    assert used <= exported, used - exported


async def test_pgwake_proxy_serves_its_own_metrics(stack: Up) -> None:
    import asyncio
    import signal
    import sys

    assert stack.client is not None
    ep = await stack.client.create_endpoint()
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).with_name("pgwake")), "proxy", "--listen", "127.0.0.1:0",
        "--data-dir", str(stack.settings.data_dir), "--metrics", "127.0.0.1:0",
        "--log-level", "warning",
        stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(60):
            listening = (await proc.stdout.readline()).decode()
            metrics_line = (await proc.stdout.readline()).decode()
        port = int(listening.rsplit(":", 1)[1])
        metrics_url = metrics_line.split(" on ", 1)[1].strip()
        conninfo = ep.url_no_sni.replace(f":{stack.proxy_port}/", f":{port}/")
        async with await psycopg.AsyncConnection.connect(conninfo) as conn:
            await conn.execute("select 1")
        async with httpx.AsyncClient() as http:
            response = await http.get(metrics_url)
        assert response.status_code == 200
        data = samples(response.text)
        assert value(data, "pgwake_connect_latency_seconds_count",
                     cold_start="warm", outcome="ok", excluded="none") == 1
        assert value(data, "pgwake_connections_active") == 0
        # Probes for load balancers and Kubernetes (deploy/ points its proxy at them).
        base = metrics_url.rsplit("/", 1)[0]
        async with httpx.AsyncClient() as http:
            assert (await http.get(base + "/healthz")).status_code == 200
            ready = await http.get(base + "/readyz")
            assert (ready.status_code, ready.text) == (200, "ready\n")
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 60)
