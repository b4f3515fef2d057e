"""The URLs `endpoint create --json` prints work as given with drivers other than libpq."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pgwake.up import Up
from tests.helpers import run

PGWAKE = str(Path(sys.executable).with_name("pgwake"))

# asyncpg in its own process on the stock asyncio loop. `*.localhost` names do not
# resolve on this machine; where they do (systemd-resolved, macOS: RFC 6761) they
# are 127.0.0.1, and the resolver stand-in below answers just that for them.
ASYNCPG_CLIENT = r"""
import asyncio, socket, sys
import asyncpg

real_getaddrinfo = socket.getaddrinfo

def localhost_resolver_standin(host, *args, **kwargs):
    if isinstance(host, str) and host.endswith(".localhost"):
        host = "127.0.0.1"
    return real_getaddrinfo(host, *args, **kwargs)

socket.getaddrinfo = localhost_resolver_standin

async def main():
    conn = await asyncpg.connect(sys.argv[1], timeout=30)
    try:
        print(await conn.fetchval("select current_setting('application_name') || ':' || 42"))
    finally:
        await conn.close()

asyncio.run(main())
"""


async def test_asyncpg_connects_with_the_sni_url_as_given(stack: Up) -> None:
    code, out, err = await run(
        PGWAKE, "endpoint", "create", "--json", "--data-dir", str(stack.settings.data_dir)
    )
    assert code == 0, err
    created = json.loads(out)
    assert "hostaddr=" in created["url"]  # the keyword asyncpg used to forward
    # Server settings in the URL still reach the compute; client-side keywords do not.
    for url, expected in ((created["url"] + "&application_name=web", "web:42"),
                          (created["url_no_sni"], ":42")):
        code, out, err = await run(sys.executable, "-c", ASYNCPG_CLIENT, url)
        assert code == 0, err
        assert out.strip() == expected
