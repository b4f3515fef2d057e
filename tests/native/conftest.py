"""Fixtures of the native tests: the C trackers, built from the worktree's sources."""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest

from tests.native.nativebuild import build_tracker_harness


@pytest.fixture(scope="session")
def tracker_harness(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    return build_tracker_harness(tmp_path_factory.mktemp("tracker"))


@pytest.fixture(scope="session", params=["harness", "extension"])
def c_trackers(request: pytest.FixtureRequest, tracker_harness: ModuleType) -> ModuleType:
    """A module with the C FrontendTracker/BackendTracker: the test-only build of
    tracker.c (always), and the installed proxy._dataplane when it is built."""
    if request.param == "harness":
        return tracker_harness
    try:
        module = importlib.import_module("proxy._dataplane")
    except ImportError as exc:
        pytest.skip(f"proxy._dataplane is not built ({exc}); the harness build covers tracker.c")
    return module
