"""What `pgwake up` tells a newcomer: the command to run next works as printed, and
which PostgreSQL binaries (and version) it picked."""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
from pathlib import Path

from tests.helpers import run
from tests.integration.test_cli_lifecycle import UpProcess, data_dir_kept

__all__ = ["data_dir_kept"]


def _path_without_the_venv() -> str:
    venv_bin = str(Path(sys.executable).parent)
    return os.pathsep.join(
        p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != venv_bin
    )


async def test_banner_names_the_binaries_and_a_command_that_runs_as_printed(
    data_dir_kept: Path, pg_bin: Path
) -> None:
    # As after `./dev up`: the virtualenv's bin directory is not on PATH.
    path = _path_without_the_venv()
    up = UpProcess(data_dir_kept, pg_bin, env={"PATH": path})
    await up.start()
    try:
        banner = "".join(up.output)
        version = re.search(r"PostgreSQL\s+(\d+\.\d+) in (\S+) \(--pg-bin\)", banner)
        assert version, banner
        assert Path(version.group(2)) == pg_bin
        code, out, _ = await run(str(pg_bin / "postgres"), "--version")
        assert code == 0 and out.split()[-1] == version.group(1)

        line = next(x for x in banner.splitlines() if x.startswith("Create a database:"))
        argv = shlex.split(line.split(":", 1)[1])
        assert argv[1:3] == ["endpoint", "create"], line
        code, out, err = await run(*argv, "--json", env={"PATH": path,
                                                          "PGWAKE_DATA_DIR": "/nonexistent"})
        assert code == 0, err
        assert json.loads(out)["id"].startswith("ep-")
    finally:
        assert await up.stop() == 0
