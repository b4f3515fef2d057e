"""Every option of every `pgwake` command reads PGWAKE_<OPTION> (DESIGN's contract)."""

from __future__ import annotations

from typing import Any

from pgwake.cli import cli, env_name


def _options(command: Any, path: str = "pgwake") -> list[tuple[str, Any]]:
    found = [(path, p) for p in command.params if p.param_type_name == "option"]
    for name, sub in getattr(command, "commands", {}).items():
        found += _options(sub, f"{path} {name}")
    return found


def test_every_option_reads_pgwake_option_from_the_environment() -> None:
    options = [(path, p) for path, p in _options(cli()) if p.name != "help"]
    assert len(options) > 40
    wrong = [
        f"{path} {p.opts[0]}: {p.envvar!r}"
        for path, p in options
        if p.envvar != env_name(next(o for o in p.opts if o.startswith("--")))
    ]
    assert not wrong, "\n".join(wrong)
    # The same option has the same variable in every command that takes it.
    assert env_name("--data-dir") == "PGWAKE_DATA_DIR"
    assert env_name("--pool-size") == "PGWAKE_POOL_SIZE"
