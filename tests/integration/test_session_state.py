"""What the proxy knows of each spliced session, read from the wire: attached, pinned, busy."""

from __future__ import annotations

import psycopg

from pgwake.up import Up
from proxy.sessionstate import SessionCounts, pin_reasons


async def test_counts_follow_transactions_and_copy(stack: Up) -> None:
    assert stack.client is not None and stack.proxy is not None
    proxy = stack.proxy
    ep = await stack.client.create_endpoint()
    async with await psycopg.AsyncConnection.connect(ep.url_no_sni, autocommit=True) as conn:
        await conn.execute("create table t (v int)")
        assert proxy.session_counts()[ep.id] == SessionCounts(attached=1)
        await conn.execute("begin")
        await conn.execute("insert into t values (1)")
        assert proxy.session_counts()[ep.id] == SessionCounts(attached=1, pinned=1)
        (splice,) = proxy.state.registry._by_endpoint[ep.id]
        assert pin_reasons(splice) == ["transaction"]
        await conn.execute("commit")
        assert proxy.session_counts()[ep.id] == SessionCounts(attached=1)
        async with conn.cursor() as cur, cur.copy("copy t from stdin") as copy:
            await copy.write_row((2,))
            # The CopyInResponse has passed the proxy: the session is mid-COPY.
            assert pin_reasons(splice) == ["copy"]
            assert proxy.session_counts()[ep.id].busy == 1
        assert proxy.session_counts()[ep.id] == SessionCounts(attached=1)

