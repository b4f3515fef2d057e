"""The benchmark harness runs end to end in its short mode: JSON results and PNG plots.

Timing figures are produced here, never asserted (the machines are noisy).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.helpers import run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


async def harness(out: Path, *args: str) -> str:
    code, stdout, stderr = await run(
        sys.executable, "-m", "loadtests", *args, "--quick", "--out", str(out), timeout=600
    )
    assert code == 0, stdout + stderr
    return stdout


@pytest.mark.timeout(600)
async def test_connect_warm_quick(tmp_path: Path) -> None:
    out = await harness(tmp_path, "connect", "--scenario", "warm")
    result = json.loads((tmp_path / "connect-warm.json").read_text())
    assert set(result["stats"]) == {"direct TLS+SCRAM", "pgwake TLS+SCRAM"}
    assert all(s["n"] == 10 for s in result["stats"].values())
    assert result["p50_ratio_proxy_vs_direct"] > 0
    assert (tmp_path / "connect-warm.png").read_bytes().startswith(PNG_MAGIC)
    assert "pgwake / direct" in out


@pytest.mark.timeout(600)
async def test_throughput_quick(tmp_path: Path) -> None:
    out = await harness(tmp_path, "throughput")
    result = json.loads((tmp_path / "throughput.json").read_text())
    assert set(result["tps_median"]) == {
        "direct plain", "direct TLS", "pgwake plain", "pgwake TLS", "pgbouncer plain",
        "pgbouncer TLS",
    }
    assert all(tps > 0 for tps in result["tps_median"].values())
    assert (tmp_path / "throughput.png").read_bytes().startswith(PNG_MAGIC)
    assert "PgBouncer TLS" in out


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    ("scenario", "result_file"),
    [("suspended", "connect-suspended"), ("herd", "connect-herd"), ("pool", "create")],
)
async def test_connect_scenarios_quick(tmp_path: Path, scenario: str, result_file: str) -> None:
    await harness(tmp_path, "connect", "--scenario", scenario)
    result = json.loads((tmp_path / f"{result_file}.json").read_text())
    assert result["machine"]["cpus"] >= 1
    if scenario == "suspended":
        assert result["cold"]["stats"]
    if scenario == "herd":
        assert result["herd"]["errors"] == 0 and result["herd"]["wakes"] == 1
    if scenario == "pool":
        assert result["cold_start"]["warm_pool"] == {"pool_hit": 10}
    assert (tmp_path / f"{result_file}.png").read_bytes().startswith(PNG_MAGIC)


@pytest.mark.timeout(600)
async def test_authtiming_quick(tmp_path: Path) -> None:
    out = await harness(tmp_path, "authtiming")
    stats = json.loads((tmp_path / "auth-timing.json").read_text())["stats_ms"]
    assert stats["real:server_first"]["n"] == stats["unknown:server_first"]["n"] == 50
    assert stats["real:auth_failed"]["n"] == stats["unknown:auth_failed"]["n"] == 10
    assert "real role vs unknown role" in out
