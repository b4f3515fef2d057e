"""`python -m loadtests <command>`: the benchmark harness's one entry point."""

from __future__ import annotations

import argparse
import importlib
import sys

# connect scenario → (module with `main(argv)`, extra argv). Each writes JSON + PNG
# under --out and prints a table; --quick makes a short run.
CONNECT_SCENARIOS: dict[str, tuple[str, list[str]]] = {
    "warm": ("loadtests.connect", []),
    "suspended": ("loadtests.wake", ["--only", "suspended"]),
    "herd": ("loadtests.wake", ["--only", "herd"]),
    "pool": ("loadtests.create", []),
    # Pool hit and suspended wake through the Kubernetes API stand-in, next to local.
    "kube-standin": ("loadtests.kube", []),
    "reattach": ("loadtests.reattach", []),
}
COMMANDS: dict[str, tuple[str, list[str]]] = {
    "throughput": ("loadtests.throughput", []),
    "frontdoor": ("loadtests.frontdoor", []),
    "resize": ("loadtests.resize", []),
    "authtiming": ("loadtests.authtiming", []),
    "splicecpu": ("loadtests.splicecpu", []),
    "splicecost": ("loadtests.splicecost", []),
    "idlemem": ("loadtests.idlemem", []),
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
        module, extra = CONNECT_SCENARIOS[chosen.scenario]
    else:
        module, extra = COMMANDS[args.command]
    result: int = importlib.import_module(module).main([*extra, *rest])
    return result


if __name__ == "__main__":
    raise SystemExit(main())
