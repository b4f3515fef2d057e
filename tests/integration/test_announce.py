"""A new endpoint's first connect asks the control API nothing; a suspend empties every
proxy's address cache, with or without Redis."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

from pgwake.up import Up
from tests.integration.test_shared_state import (  # noqa: F401 (fixtures)
    rstack,
    select_one,
    side_proxy,
)
from wakeup.api import ControlClient


class RecordingControl(ControlClient):
    """The real client, noting each call's path (a spy, not a fake)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.paths: list[str] = []

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        self.paths.append(f"{method} {path}")
        return await super()._call(method, path, **kwargs)


def lookups(paths: list[str]) -> list[str]:
    return [p for p in paths if p.endswith("/wake") or "/roles/" in p]


async def test_first_connect_to_a_new_endpoint_asks_nothing(
    stack: Up, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert stack.client is not None and stack.proxy is not None
    seen: list[str] = []
    real_call = stack.client._call

    async def spy(method: str, path: str, **kwargs: Any) -> Any:
        seen.append(f"{method} {path}")
        return await real_call(method, path, **kwargs)

    monkeypatch.setattr(stack.proxy.control, "_call", spy)
    ep = await stack.client.create_endpoint()
    seen.clear()
    async with await psycopg.AsyncConnection.connect(ep.url_no_sni) as conn:
        cur = await conn.execute("select 1")
        assert await cur.fetchone() == (1,)
    assert lookups(seen) == []


async def test_suspend_empties_the_in_process_proxy_cache(stack: Up) -> None:
    assert stack.client is not None and stack.proxy is not None
    ep = await stack.client.create_endpoint()
    async with await psycopg.AsyncConnection.connect(ep.url_no_sni) as conn:
        await conn.execute("select 1")
    assert await stack.proxy.shared.get_address(ep.id) is not None
    await stack.client.suspend(ep.id)
    # No Redis here: the control plane told the proxy in its own process.
    assert await stack.proxy.shared.get_address(ep.id) is None


async def test_split_proxy_finds_a_new_endpoints_address_in_redis(rstack: Up) -> None:  # noqa: F811
    assert rstack.client is not None and rstack.control is not None
    key = (rstack.settings.data_dir / "api_key").read_text().strip()
    control = RecordingControl(rstack.control.api_url, key)
    proxy = await side_proxy(rstack, control, redis_url=rstack.settings.redis_url)
    try:
        ep = await rstack.client.create_endpoint()
        await select_one(proxy.port, ep)
        # The address came from the shared state; only the verifier was fetched
        # (verifiers are not put in Redis).
        assert [p for p in control.paths if p.endswith("/wake")] == []
    finally:
        await proxy.drain(timeout=2.0)
        await control.aclose()


async def test_suspend_reaches_a_split_proxy_without_redis(stack: Up) -> None:
    assert stack.client is not None and stack.control is not None
    key = (stack.settings.data_dir / "api_key").read_text().strip()
    control = ControlClient(stack.control.api_url, key)
    # Its own process state, no Redis: only the control API connects it to the suspend.
    proxy = await side_proxy(stack, control, activity_interval=0.1)
    try:
        ep = await stack.client.create_endpoint()
        await select_one(proxy.port, ep)
        assert await proxy.shared.get_address(ep.id) is not None
        await stack.client.suspend(ep.id)
        async with asyncio.timeout(30):  # the next activity report's answer drops it
            while await proxy.shared.get_address(ep.id) is not None:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        await select_one(proxy.port, ep)  # and the next connect wakes it
    finally:
        await proxy.drain(timeout=2.0)
        await control.aclose()
