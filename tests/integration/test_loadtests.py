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
        # Measured by a separate user process, next to the raw start, with the breakdown.
        stats = result["cold"]["stats"]
        assert stats["pgwake suspended (separate process)"]["n"] >= 1
        assert stats["raw postgres start"]["n"] >= 1
        # And next to a raw start with the compute's own settings (its size class).
        assert stats["raw postgres start, compute's settings"]["n"] >= 1
        assert result["cold"]["p50_ratio_wake_vs_raw_start_compute_settings"] > 0
        assert "wake" in result["cold"]["wake_ready_parts_p50_ms"]
    if scenario == "herd":
        assert result["herd"]["errors"] == 0 and result["herd"]["wakes"] == 1
    if scenario == "pool":
        assert result["cold_start"]["warm_pool"] == {"pool_hit": 10}
        # POST (urllib) + first row (psycopg, url_no_sni) from a separate process.
        # (At the user's pace the pool may lag on a loaded machine: figures are of hits.)
        kinds = result["cold_start"]["user_process"]
        assert sum(kinds.values()) == 10 and kinds.get("pool_hit", 0) >= 1, kinds
        assert result["stats"]["user process: POST+first row"]["n"] == kinds["pool_hit"]
    assert (tmp_path / f"{result_file}.png").read_bytes().startswith(PNG_MAGIC)


@pytest.mark.timeout(600)
async def test_resize_quick(tmp_path: Path) -> None:
    out = await harness(tmp_path, "resize")
    result = json.loads((tmp_path / "resize.json").read_text())
    assert [r["resize"] for r in result["resizes"]] == ["small→medium", "medium→small"]
    assert [r["generation"] for r in result["resizes"]] == [2, 3]
    assert all(r["serving_ms"] > 0 and r["api_ms"] > 0 for r in result["resizes"])
    assert result["queries"] > 0
    assert (tmp_path / "resize.png").read_bytes().startswith(PNG_MAGIC)
    assert "longest client stall" in out


NO_MATPLOTLIB = (
    "import runpy, sys; sys.modules['matplotlib'] = None; "  # as if it were not installed
    "runpy.run_module('loadtests', run_name='__main__', alter_sys=True)"
)


@pytest.mark.timeout(600)
async def test_runs_without_matplotlib_and_with_pgwake_settings_in_the_environment(
    tmp_path: Path,
) -> None:
    # A user's shell may export PGWAKE_API_KEY (and other options): the benchmark still
    # starts its own pgwake with default settings and finds its key.
    env = {"PGWAKE_API_KEY": "pgw_from_the_users_shell", "PGWAKE_POOL_SIZE": "3"}
    code, stdout, stderr = await run(
        sys.executable, "-c", NO_MATPLOTLIB, "connect", "--scenario", "warm", "--quick",
        "--out", str(tmp_path), env=env, timeout=600,
    )
    assert code == 0, stdout + stderr
    assert "matplotlib is not installed" in stderr and ".[loadtests]" in stderr
    assert json.loads((tmp_path / "connect-warm.json").read_text())["stats"]
    assert not (tmp_path / "connect-warm.png").exists()


@pytest.mark.timeout(600)
async def test_authtiming_quick(tmp_path: Path) -> None:
    out = await harness(tmp_path, "authtiming")
    stats = json.loads((tmp_path / "auth-timing.json").read_text())["stats_ms"]
    assert stats["real:server_first"]["n"] == stats["unknown:server_first"]["n"] == 50
    assert stats["real:auth_failed"]["n"] == stats["unknown:auth_failed"]["n"] == 10
    assert "real role vs unknown role" in out


@pytest.mark.timeout(600)
async def test_idlemem_quick(tmp_path: Path) -> None:
    """200 idle TLS sessions through one proxy process, then through PgBouncer: all log
    in, every one answers a query afterwards, and each server's RSS is reported."""
    out = await harness(tmp_path, "idlemem")
    result = json.loads((tmp_path / "idlemem.json").read_text())
    assert result["sessions"] == 200
    for server in ("pgwake", "pgwake_python", "pgbouncer"):
        figures = result[server]
        assert figures["logged_in"] == 200 and figures["login_failures"] == 0
        assert figures["sample_ok"] == figures["sample_checked"] == 200
        assert figures["rss_kib"] > 0 and figures["baseline_rss_kib"] > 0
    # Past the compute's budget (97 by default) the proxy parked sessions to make room.
    states = result["pgwake"]["proxy_sessions"]
    assert states["attached"] + states["parked"] == 200
    assert states["parked"] >= 200 - 97 and states["evicted_total"] >= states["parked"]
    assert "RSS per idle TLS session" in out


@pytest.mark.timeout(900)
async def test_splicecpu_quick_with_both_data_planes(tmp_path: Path) -> None:
    """Server CPU per transaction and tps, plain and TLS, for pgwake's data paths,
    PgBouncer (session and transaction mode) and the reference C splice in one run; a
    data path the CLI refuses is reported, not hidden."""
    out = await harness(tmp_path, "splicecpu", "--data-plane", "both")
    result = json.loads((tmp_path / "splicecpu.json").read_text())
    cpu, tps = result["cpu_us_per_txn_median"], result["tps_vs_direct_plain"]
    for name in ("pgwake python plain", "pgwake python TLS", "pgbouncer plain",
                 "pgbouncer TLS", "pgbouncer txn plain", "pgbouncer txn TLS"):
        assert cpu[name] > 0 and tps[name] > 0
        assert result["cpu_vs_pgbouncer_paired"][name] > 0
    # The test environment has a compiler and libssl-dev (./dev test installs them).
    assert cpu["reference C splice TLS"] > 0, result["notes"]
    assert result["cpu_vs_pgbouncer_paired"]["reference C splice TLS"] > 0
    assert tps["direct plain"] == 1.0
    if "pgwake native TLS" not in cpu:
        assert result["refused"]["native"]
        assert "refused --data-plane native" in out
