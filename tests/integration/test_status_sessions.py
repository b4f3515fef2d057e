"""`pgwake status` shows each endpoint's client sessions by state: attached, parked, pinned."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import psycopg

from pgwake.up import Up
from tests.helpers import run
from tests.integration.test_reattach import suspend

PGWAKE = str(Path(sys.executable).with_name("pgwake"))
DEADLINE = 30.0


async def test_status_shows_sessions_attached_parked_and_pinned(stack: Up) -> None:
    assert stack.client is not None and stack.proxy is not None
    assert stack.control is not None and stack.api_key_file is not None
    env = {"PGWAKE_API_URL": stack.control.api_url,
           "PGWAKE_API_KEY": stack.api_key_file.read_text().strip(), "COLUMNS": "250"}
    client, registry = stack.client, stack.proxy.state.registry
    parking, pinning = await client.create_endpoint(), await client.create_endpoint()
    conns = [await psycopg.AsyncConnection.connect(ep.url_no_sni, autocommit=True)
             for ep in (parking, parking, pinning, pinning)]
    try:
        await conns[2].execute("create temp table scratch (v int)")  # pinned
        await registry.survey(parking.id, timeout=DEADLINE)
        await registry.survey(pinning.id, timeout=DEADLINE)
        await suspend(stack, parking)  # its two idle, movable sessions park
        expected = {parking.id: {"attached": 0, "parked": 2, "pinned": 0},
                    pinning.id: {"attached": 2, "parked": 0, "pinned": 1}}

        async def shown() -> dict[str, dict[str, int]]:
            code, out, err = await run(PGWAKE, "status", "--json", env=env)
            assert code == 0, err
            return {e["id"]: e["sessions"] for e in json.loads(out)["endpoints"]
                    if e["id"] in expected}

        # The proxy reports every second: the control plane's view catches up.
        async with asyncio.timeout(DEADLINE):
            while await shown() != expected:  # noqa: ASYNC110
                await asyncio.sleep(0.2)

        code, out, err = await run(PGWAKE, "status", env=env)
        assert code == 0, err
        header = next(line for line in out.splitlines() if "attached" in line)
        columns = [c.strip() for c in header.strip("┃│ ").split("┃" if "┃" in header else "│")]
        rows = {}
        for line in out.splitlines():
            cells = [c.strip() for c in line.strip("┃│ ").split("│")]
            if cells and cells[0] in expected:
                rows[cells[0]] = dict(zip(columns, cells, strict=False))
        for endpoint_id, sessions in expected.items():
            assert {k: int(rows[endpoint_id][k]) for k in sessions} == sessions
        # The parked sessions re-attach on their next message and show so.
        for conn in conns[:2]:
            await conn.execute("select 1")
        async with asyncio.timeout(DEADLINE):
            while (await shown())[parking.id] != {  # noqa: ASYNC110
                    "attached": 2, "parked": 0, "pinned": 0}:
                await asyncio.sleep(0.2)
    finally:
        for conn in conns:
            await conn.close()
