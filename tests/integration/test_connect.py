"""A user connects through the proxy with real clients: psql, asyncpg, psycopg 3."""

from __future__ import annotations

import asyncio
import shutil
import ssl

import asyncpg
import httpx
import psycopg
import pytest

from pgwake.up import Up
from tests.helpers import run
from wakeup.api import CreatedEndpoint

PSQL = shutil.which("psql") or "psql"


@pytest.fixture
async def endpoint(stack: Up) -> CreatedEndpoint:
    assert stack.client is not None
    return await stack.client.create_endpoint()


def sni_kwargs(stack: Up, ep: CreatedEndpoint) -> dict[str, object]:
    assert stack.certs is not None
    return {
        "host": f"{ep.id}.pgwake.localhost",
        "hostaddr": "127.0.0.1",
        "port": stack.proxy_port,
        "user": ep.user,
        "password": ep.password,
        "dbname": ep.database,
        "sslmode": "verify-full",
        "sslrootcert": str(stack.certs.ca.cert),
    }


async def psql(url: str, sql: str) -> str:
    code, out, err = await run(PSQL, url, "-X", "-Atq", "-v", "ON_ERROR_STOP=1", "-c", sql)
    assert code == 0, err
    return out.strip()


async def test_psql_both_url_forms_and_data_survives_suspend(
    stack: Up, endpoint: CreatedEndpoint
) -> None:
    assert stack.client is not None
    await psql(endpoint.url_no_sni, "create table notes (id int primary key, body text)")
    await psql(endpoint.url, "insert into notes select g, 'n' || g from generate_series(1, 100) g")
    assert await psql(endpoint.url_no_sni, "select count(*) from notes") == "100"

    before = await stack.client.get_endpoint(endpoint.id)
    suspended = await stack.client.suspend(endpoint.id)
    assert suspended.state == "suspended"
    # The next connection wakes the compute; the client only waits.
    assert await psql(endpoint.url, "select sum(id) from notes") == "5050"
    after = await stack.client.get_endpoint(endpoint.id)
    assert after.state == "active"
    assert after.wakes == before.wakes + 1


async def test_psycopg_sni_verify_full(stack: Up, endpoint: CreatedEndpoint) -> None:
    async with await psycopg.AsyncConnection.connect(**sni_kwargs(stack, endpoint)) as conn:
        cur = await conn.execute("select current_user, current_database(), 6 * 7")
        assert await cur.fetchone() == ("app", "main", 42)
        assert conn.info.pgconn.ssl_in_use


async def test_psycopg_no_sni_url(stack: Up, endpoint: CreatedEndpoint) -> None:
    async with await psycopg.AsyncConnection.connect(endpoint.url_no_sni) as conn:
        cur = await conn.execute("select 1")
        assert await cur.fetchone() == (1,)


async def test_asyncpg_options_routing(stack: Up, endpoint: CreatedEndpoint) -> None:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    conn = await asyncpg.connect(
        host="127.0.0.1",
        port=stack.proxy_port,
        user=endpoint.user,
        password=endpoint.password,
        database=endpoint.database,
        ssl=ctx,
        server_settings={"options": f"endpoint={endpoint.id}"},
    )
    try:
        await conn.execute("create table t (v text)")
        await conn.executemany("insert into t values ($1)", [("a",), ("b",)])
        assert await conn.fetchval("select string_agg(v, ',' order by v) from t") == "a,b"
    finally:
        await conn.close()


async def test_wrong_password_is_28P01(stack: Up, endpoint: CreatedEndpoint) -> None:
    kwargs = sni_kwargs(stack, endpoint) | {"password": "not-the-password"}
    with pytest.raises(psycopg.OperationalError) as info:
        await psycopg.AsyncConnection.connect(**kwargs)
    assert 'password authentication failed for user "app"' in str(info.value)
    bad_url = endpoint.url_no_sni.replace(endpoint.password, "nope")
    code, _, err = await run(PSQL, bad_url, "-c", "select 1")
    assert code != 0 and "password authentication failed" in err


async def test_unknown_role_fails_like_a_wrong_password(
    stack: Up, endpoint: CreatedEndpoint
) -> None:
    kwargs = sni_kwargs(stack, endpoint) | {"user": "mallory"}
    with pytest.raises(psycopg.OperationalError) as info:
        await psycopg.AsyncConnection.connect(**kwargs)
    assert 'password authentication failed for user "mallory"' in str(info.value)


async def test_unknown_endpoint_is_3D000(stack: Up) -> None:
    assert stack.certs is not None
    ctx = ssl.create_default_context(cafile=str(stack.certs.ca.cert))
    ctx.check_hostname = False
    with pytest.raises(asyncpg.InvalidCatalogNameError) as info:
        await asyncpg.connect(
            host="127.0.0.1", port=stack.proxy_port, user="app", password="x",
            database="main", ssl=ctx, server_settings={"options": "endpoint=ep-doesnotexist"},
        )
    assert "ep-doesnotexist" in str(info.value)


async def test_plaintext_is_refused_with_hint(stack: Up, endpoint: CreatedEndpoint) -> None:
    kwargs = sni_kwargs(stack, endpoint) | {"sslmode": "disable", "host": "127.0.0.1"}
    kwargs.pop("hostaddr")
    kwargs["options"] = f"endpoint={endpoint.id}"
    with pytest.raises(psycopg.OperationalError) as info:
        await psycopg.AsyncConnection.connect(**kwargs)
    assert "sslmode=require" in str(info.value)
    # asyncpg exposes the SQLSTATE directly.
    with pytest.raises(asyncpg.PostgresError) as ainfo:
        await asyncpg.connect(
            host="127.0.0.1", port=stack.proxy_port, user="app", password=endpoint.password,
            database="main", ssl=False, server_settings={"options": f"endpoint={endpoint.id}"},
        )
    assert ainfo.value.sqlstate == "08P01"
    assert "sslmode=require" in (ainfo.value.hint or "")


async def test_no_endpoint_given_explains_how(stack: Up, endpoint: CreatedEndpoint) -> None:
    url = endpoint.url_no_sni.split("&options=")[0]
    code, _, err = await run(PSQL, url, "-c", "select 1")
    assert code != 0
    assert "no endpoint given" in err and "options=endpoint" in err


async def test_concurrent_connects_to_suspended_endpoint_wake_once(
    stack: Up, endpoint: CreatedEndpoint
) -> None:
    assert stack.client is not None
    await stack.client.suspend(endpoint.id)
    before = (await stack.client.get_endpoint(endpoint.id)).wakes

    async def one(i: int) -> int:
        async with await psycopg.AsyncConnection.connect(endpoint.url_no_sni) as conn:
            cur = await conn.execute("select %s::int", (i,))
            row = await cur.fetchone()
            assert row is not None
            return int(row[0])

    results = await asyncio.gather(*(one(i) for i in range(50)))
    assert sorted(results) == list(range(50))
    assert (await stack.client.get_endpoint(endpoint.id)).wakes == before + 1


async def test_cancel_running_query_through_proxy(stack: Up, endpoint: CreatedEndpoint) -> None:
    async with await psycopg.AsyncConnection.connect(**sni_kwargs(stack, endpoint)) as conn:
        for cancel in (conn.cancel, conn.cancel_safe):
            query = asyncio.create_task(conn.execute("select pg_sleep(30)"))
            await asyncio.sleep(0.2)  # let the query reach the compute
            loop = asyncio.get_running_loop()
            started = loop.time()
            if cancel is conn.cancel:
                await asyncio.to_thread(cancel)  # classic PQcancel: a plaintext CancelRequest
            else:
                await conn.cancel_safe()  # libpq 17+: the CancelRequest travels over TLS
            with pytest.raises(psycopg.errors.QueryCanceled):
                await query
            assert loop.time() - started < 1.0
            await conn.rollback()
        cur = await conn.execute("select 'still usable'")
        assert await cur.fetchone() == ("still usable",)


async def test_control_api_requires_the_key(stack: Up) -> None:
    assert stack.control is not None
    async with httpx.AsyncClient(base_url=stack.control.api_url) as http:
        assert (await http.get("/v1/endpoints")).status_code == 401
        wrong = await http.get("/v1/endpoints", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert wrong.json()["error"]["code"] == "unauthorized"
        assert (await http.post("/v1/endpoints", json={})).status_code == 401
        assert (await http.get("/healthz")).status_code == 200
        ready = await http.get("/readyz")
        assert ready.status_code == 200 and ready.json()["checks"]["control_db"] is True
