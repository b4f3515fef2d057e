"""Fixtures of the native tests: the C trackers, built from the worktree's sources,
and an engine with test certificates."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from types import ModuleType

import pytest

from tests.native.engine_support import Certificates, EventWaiter, make_certificates
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


@pytest.fixture
def engine() -> Iterator[EventWaiter]:
    """A two-thread engine with its event waiter (the engine tests' default)."""
    dataplane = pytest.importorskip("proxy._dataplane")
    ew = EventWaiter(dataplane.Engine(2))
    yield ew
    ew.close()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))
