"""`python -m tests.kube_standin --pg-bin DIR`: the Kubernetes API stand-in as its own process.

Prints `kube stand-in on URL kubeconfig PATH` once it serves, runs until SIGTERM
(then stops every pod). GET /standin/calls returns the request counts, so a
benchmark in another process can count API calls per wake.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from pathlib import Path

from aiohttp import web

from tests.kube_standin.harness import NAMESPACE, running_standin


async def serve(pg_bin: Path) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with running_standin(pg_bin) as standin:
        async def calls(request: web.Request) -> web.Response:
            return web.json_response(
                [{"verb": v, "resource": r, "name": n} for v, r, n in standin.call_log]
            )

        app = web.Application()
        app.router.add_get("/standin/calls", calls)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        assert site._server is not None
        calls_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        kubeconfig = standin.kubeconfig(standin.root / "kubeconfig", NAMESPACE)
        print(json.dumps({"url": standin.url, "kubeconfig": str(kubeconfig),
                          "namespace": NAMESPACE,
                          "calls": f"http://127.0.0.1:{calls_port}/standin/calls"}),
              flush=True)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.kube_standin")
    parser.add_argument("--pg-bin", type=Path, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.pg_bin))


if __name__ == "__main__":
    main()
