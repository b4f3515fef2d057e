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



async def test_the_compute_is_asked_on_the_sessions_own_backend(stack: Up) -> None:
    """Temp tables, advisory locks, WITH HOLD cursors and LISTEN pin; SET values and
    prepared statements (SQL and protocol-level) are captured; the client never
    sees the proxy's query."""
    assert stack.client is not None and stack.proxy is not None
    registry = stack.proxy.state.registry
    ep = await stack.client.create_endpoint()
    pinning = {
        "temp_tables": "create temp table scratch (v int)",
        "advisory_locks": "select pg_advisory_lock(42)",
        "holdable_cursors": "declare held cursor with hold for select 1",
        "listen": "listen jobs",
    }
    conns = {}
    try:
        for reason, sql in pinning.items():
            conns[reason] = conn = await psycopg.AsyncConnection.connect(
                ep.url_no_sni, autocommit=True
            )
            await conn.execute(sql)
        movable = await psycopg.AsyncConnection.connect(
            ep.url_no_sni, autocommit=True, prepare_threshold=0
        )
        conns["movable"] = movable
        await movable.execute("set work_mem = '7MB'")
        await movable.execute("prepare plus_one(int) as select $1 + 1")
        await movable.execute("select %s::int * 2", (21,))  # protocol-level, named by psycopg

        reasons = await registry.survey(ep.id, timeout=30)
        by_reason = {tuple(r) for r in reasons.values()}
        assert by_reason == {(reason,) for reason in pinning} | {()}
        # The movable one, asked and idle, is parkable.
        assert stack.proxy.session_counts()[ep.id] == SessionCounts(attached=5, pinned=4,
                                                                    parkable=1)

        (movable_splice,) = [s for s, r in reasons.items() if not r]
        snapshot = registry.snapshot(movable_splice)
        assert snapshot is not None
        assert snapshot.settings["work_mem"] == "7MB"
        by_name = {p.name: p for p in snapshot.prepared}
        assert by_name["plus_one"].from_sql and by_name["plus_one"].parameter_types == (23,)
        protocol = {p.statement: p for p in snapshot.prepared if not p.from_sql}
        # The compute tells the resolved types of a protocol-level Parse too.
        assert len(protocol["select $1::int * 2"].parameter_types) == 1

        # The session goes on as if nothing happened; the next request makes the
        # snapshot stale.
        cur = await movable.execute("execute plus_one(41)")
        assert await cur.fetchone() == (42,)
        cur = await movable.execute("select %s::int * 2", (4,))
        assert await cur.fetchone() == (8,)
        assert registry.snapshot(movable_splice) is None
        # Dropping the pin frees the session at the next survey.
        await conns["temp_tables"].execute("drop table scratch")
        await conns["temp_tables"].execute("discard temp")
        reasons = await registry.survey(ep.id, timeout=30)
        assert sorted(tuple(r) for r in reasons.values()).count(()) == 2
    finally:
        for conn in conns.values():
            await conn.close()
