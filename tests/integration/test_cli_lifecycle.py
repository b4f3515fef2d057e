"""The README's story with the real CLI: `pgwake up` as a process, endpoint commands, restart."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest

from tests.helpers import make_data_dir, run

PGWAKE = str(Path(sys.executable).with_name("pgwake"))
PSQL = shutil.which("psql") or "psql"


class UpProcess:
    def __init__(self, data_dir: Path, pg_bin: Path, idle_timeout: float = 3600,
                 env: dict[str, str] | None = None):
        self.env = env or {}
        self.data_dir = data_dir
        self.pg_bin = pg_bin
        self.idle_timeout = idle_timeout
        self.proc: asyncio.subprocess.Process | None = None
        self.output: list[str] = []

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            PGWAKE, "up", "--listen", "127.0.0.1:0", "--api", "127.0.0.1:0",
            "--idle-timeout", str(self.idle_timeout),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL,
            env={**os.environ, "PGWAKE_DATA_DIR": str(self.data_dir),
                 "PGWAKE_PG_BIN": str(self.pg_bin), **self.env},
        )
        assert self.proc.stdout is not None
        async with asyncio.timeout(60):
            while True:
                line = (await self.proc.stdout.readline()).decode()
                assert line, "pgwake up exited:\n" + "".join(self.output)
                self.output.append(line)
                if "Ctrl-C stops" in line:
                    break
        self._drain = asyncio.create_task(self._read_rest())

    async def _read_rest(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for line in self.proc.stdout:
            self.output.append(line.decode())

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = await asyncio.wait_for(self.proc.wait(), 60)
        await self._drain
        return code

    async def cli(self, *args: str) -> str:
        code, out, err = await run(PGWAKE, *args, env={"PGWAKE_DATA_DIR": str(self.data_dir)})
        assert code == 0, err + out
        return out


@pytest.fixture
async def data_dir_kept() -> AsyncIterator[Path]:
    path = make_data_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def psql(url: str, sql: str) -> str:
    code, out, err = await run(PSQL, url, "-X", "-Atq", "-v", "ON_ERROR_STOP=1", "-c", sql)
    assert code == 0, err
    return out.strip()


async def test_user_story_with_cli_and_restart(data_dir_kept: Path, pg_bin: Path) -> None:
    up = UpProcess(data_dir_kept, pg_bin)
    await up.start()
    try:
        banner = "".join(up.output)
        key_file = data_dir_kept / "api_key"
        assert str(key_file) in banner and "dev CA" in banner
        assert key_file.stat().st_mode & 0o777 == 0o600

        created = json.loads(await up.cli("endpoint", "create", "--json"))
        assert {"id", "url", "url_no_sni", "user", "password"} <= created.keys()
        assert "sslmode=verify-full" in created["url"] and "sslrootcert=" in created["url"]
        assert "options=endpoint%3D" + created["id"] in created["url_no_sni"]
        assert "sslmode=require" in created["url_no_sni"]

        await psql(created["url_no_sni"], "create table kv (k text primary key, v int)")
        await psql(created["url"], "insert into kv values ('a', 1), ('b', 2)")

        await up.cli("endpoint", "suspend", created["id"])
        listing = await up.cli("endpoint", "list")
        assert created["id"] in listing and "suspended" in listing
        shown = json.loads(await up.cli("endpoint", "show", created["id"], "--json"))
        assert shown["state"] == "suspended" and shown["generation"] == 1 and shown["wakes"] == 1

        assert await psql(created["url"], "select sum(v) from kv") == "3"
        status = json.loads(await up.cli("status", "--json"))
        (mine,) = [e for e in status["endpoints"] if e["id"] == created["id"]]
        assert mine["state"] == "active" and "connections" in mine
        assert status["pool"]["classes"] == []
        table = await up.cli("status")
        assert created["id"] in table and "warm pool: off" in table
        shown = json.loads(await up.cli("endpoint", "show", created["id"], "--json"))
        assert shown["state"] == "active" and shown["wakes"] == 2
    finally:
        assert await up.stop() == 0
    assert "draining" in "".join(up.output)

    # Same data dir, new process: endpoints and their data are still there.
    again = UpProcess(data_dir_kept, pg_bin)
    await again.start()
    try:
        shown = json.loads(await again.cli("endpoint", "show", created["id"], "--json"))
        assert shown["state"] == "suspended"
        # The port may differ after a restart; the id and password do not.
        url = json.loads(await again.cli("endpoint", "show", created["id"], "--json"))["url_no_sni"]
        url = url.replace("app@", f"app:{created['password']}@")
        assert await psql(url, "select string_agg(k, ',' order by k) from kv") == "a,b"
        async with await psycopg.AsyncConnection.connect(url) as conn:
            cur = await conn.execute("select count(*) from kv")
            assert await cur.fetchone() == (2,)
        await again.cli("endpoint", "delete", created["id"])
        listing = await again.cli("endpoint", "list", "--json")
        assert created["id"] not in listing
    finally:
        assert await again.stop(signal.SIGINT) == 0


async def test_crash_restart_adopts_running_computes(data_dir_kept: Path, pg_bin: Path) -> None:
    up = UpProcess(data_dir_kept, pg_bin)
    await up.start()
    created = json.loads(await up.cli("endpoint", "create", "--json"))
    await psql(created["url_no_sni"], "create table t as select 1 as x")
    await up.stop(signal.SIGKILL)  # pgwake crashes; its computes keep running

    again = UpProcess(data_dir_kept, pg_bin)
    await again.start()
    try:
        shown = json.loads(await again.cli("endpoint", "show", created["id"], "--json"))
        assert shown["state"] == "active", "the running compute is found again"
        url = shown["url_no_sni"].replace("app@", f"app:{created['password']}@")
        assert await psql(url, "select x from t") == "1"
        assert shown["wakes"] == 1, "adopted, not restarted"
    finally:
        await again.stop()
    # A clean stop leaves no postgres of this data dir running.
    code, out, _ = await run("pgrep", "-f", str(data_dir_kept))
    assert code == 1, out
