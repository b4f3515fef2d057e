"""One pgwake per data directory, and start-up failures that say what to change
(real `pgwake up` / `pgwake control` processes)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from tests.helpers import make_data_dir, run
from tests.integration.test_cli_lifecycle import PGWAKE, UpProcess, data_dir_kept, psql

__all__ = ["data_dir_kept"]  # the fixture, shared with the lifecycle tests


def _ports(up: UpProcess) -> tuple[int, int]:
    banner = "".join(up.output)
    proxy = re.search(r"proxy\s+[\d.]+:(\d+)", banner)
    api = re.search(r"control API\s+http://[\d.]+:(\d+)", banner)
    assert proxy and api, banner
    return int(proxy.group(1)), int(api.group(1))


def _refused(code: int, err: str) -> None:
    assert code != 0
    assert "Traceback" not in err, err
    assert len(err.strip().splitlines()) <= 3, err


async def test_second_instance_on_a_data_dir_exits_naming_the_first(
    data_dir_kept: Path, pg_bin: Path
) -> None:
    up = UpProcess(data_dir_kept, pg_bin)
    await up.start()
    try:
        proxy_port, api_port = _ports(up)
        assert up.proc is not None
        for command in (["up", "--listen", "127.0.0.1:0", "--api", "127.0.0.1:0",
                         "--pg-bin", str(pg_bin)],
                        ["control", "--api", "127.0.0.1:0", "--pg-bin", str(pg_bin)]):
            code, _out, err = await run(PGWAKE, *command, "--data-dir", str(data_dir_kept),
                                       timeout=30)
            _refused(code, err)
            assert "already running" in err, err
            assert f"pid {up.proc.pid}" in err and f":{proxy_port}" in err, err
            assert f":{api_port}" in err, err
        # The first instance's state is untouched and it still serves.
        assert json.loads((data_dir_kept / "pgwake.json").read_text())["pid"] == up.proc.pid
        created = json.loads(await up.cli("endpoint", "create", "--json"))
        assert await psql(created["url"], "select 7") == "7"
    finally:
        assert await up.stop() == 0


async def test_an_address_in_use_is_named_with_the_flag_to_change(
    data_dir_kept: Path, pg_bin: Path
) -> None:
    up = UpProcess(data_dir_kept, pg_bin)
    await up.start()
    other = make_data_dir()
    try:
        proxy_port, api_port = _ports(up)
        for flags, address, flag in (
            (["--listen", f"127.0.0.1:{proxy_port}", "--api", "127.0.0.1:0"],
             f"127.0.0.1:{proxy_port}", "--listen"),
            (["--listen", "127.0.0.1:0", "--api", f"127.0.0.1:{api_port}"],
             f"127.0.0.1:{api_port}", "--api"),
        ):
            code, _out, err = await run(PGWAKE, "up", *flags, "--data-dir", str(other),
                                       "--pg-bin", str(pg_bin), timeout=60)
            _refused(code, err)
            assert address in err and "in use" in err and f"{flag} HOST:PORT" in err, err
        # Nothing of the refused start is left holding the directory.
        code, _out, err = await run(PGWAKE, "control", "--api", f"127.0.0.1:{api_port}",
                                   "--data-dir", str(other), timeout=60)
        _refused(code, err)
        assert f"127.0.0.1:{api_port}" in err and "--api HOST:PORT" in err, err
    finally:
        assert await up.stop() == 0
        shutil.rmtree(other, ignore_errors=True)
