"""`python -m loadtests <command>`: the benchmark harness's one entry point."""

from __future__ import annotations

import argparse
import importlib
import sys

# scenario → module with a `main(argv)`; each writes JSON + PNG under --out and prints a table.
CONNECT_SCENARIOS = {
    "warm": "loadtests.connect",
}
COMMANDS = {
    "throughput": "loadtests.throughput",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m loadtests",
        description="pgwake benchmarks. Common options: --out DIR (results), --quick (short run).",
    )
    parser.add_argument("command", choices=["connect", *COMMANDS])
    args, rest = parser.parse_known_args(argv)
    if args.command == "connect":
        sub = argparse.ArgumentParser(prog="python -m loadtests connect")
        sub.add_argument("--scenario", choices=sorted(CONNECT_SCENARIOS), required=True)
        chosen, rest = sub.parse_known_args(rest)
        module = CONNECT_SCENARIOS[chosen.scenario]
    else:
        module = COMMANDS[args.command]
    result: int = importlib.import_module(module).main(rest)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
