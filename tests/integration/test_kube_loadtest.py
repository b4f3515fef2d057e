"""The kube-standin benchmark runs end to end (its short mode) from separate processes;
a wake through the stand-in costs exactly one API call, the pod create."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.test_loadtests import PNG_MAGIC, harness


@pytest.mark.timeout(900)
async def test_kube_standin_scenario_quick(tmp_path: Path) -> None:
    stdout = await harness(tmp_path, "connect", "--scenario", "kube-standin")
    assert "API calls per wake" in stdout
    result = json.loads((tmp_path / "kube.json").read_text())
    assert set(result["stats"]) == {"kube-standin pool hit", "kube-standin suspended",
                                    "local pool hit", "local suspended"}
    assert all(s["n"] == 5 for s in result["stats"].values())
    assert result["api_calls_per_wake"] == [{"create pods": 1}] * 5
    assert (tmp_path / "kube.png").read_bytes().startswith(PNG_MAGIC)
