"""Applying an endpoint's config (roles, database) to its compute over the admin socket."""

from __future__ import annotations

import re
from collections.abc import Mapping

import asyncpg

from wakeup.provisioners.base import AdminTarget

# Role and database names we create are ours to choose; keep them boring.
NAME_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    # standard_conforming_strings is on in every supported PostgreSQL.
    return "'" + value.replace("'", "''") + "'"


async def admin_connect(target: AdminTarget, timeout: float = 10.0) -> asyncpg.Connection:
    return await asyncpg.connect(
        host=target.host,
        port=target.port,
        user=target.user,
        password=target.password,
        database=target.database,
        timeout=timeout,
        server_settings={"application_name": "pgwake-control"},
    )


async def apply_config(
    target: AdminTarget, *, database: str, owner: str, roles: Mapping[str, str]
) -> None:
    """Make the compute's roles and database match the control DB (idempotent)."""
    for name in (database, owner, *roles):
        if not NAME_RE.fullmatch(name):
            raise ValueError(f"invalid role or database name {name!r}")
    conn = await admin_connect(target)
    try:
        existing = {
            r["rolname"] for r in await conn.fetch("select rolname from pg_roles")
        }
        for role, verifier in roles.items():
            verb = "alter" if role in existing else "create"
            # A SCRAM verifier given as the password is stored as is: the compute
            # learns no plaintext, and the proxy can log in with the ClientKey.
            await conn.execute(
                f"{verb} role {quote_ident(role)} with login password {quote_literal(verifier)}"
            )
        has_db = await conn.fetchval("select 1 from pg_database where datname = $1", database)
        if not has_db:
            await conn.execute(
                f"create database {quote_ident(database)} owner {quote_ident(owner)}"
            )
    finally:
        await conn.close()


async def count_client_connections(target: AdminTarget, timeout: float = 5.0) -> int:
    """Client sessions on the compute, not counting our own admin connection."""
    conn = await admin_connect(target, timeout)
    try:
        n: int = await conn.fetchval(
            "select count(*) from pg_stat_activity"
            " where backend_type = 'client backend' and usename <> $1",
            target.user,
            timeout=timeout,
        )
        return n
    finally:
        await conn.close()


# A pooled compute carries a login-less role and a database under these names
# until a claim renames them to the endpoint's.
PLACEHOLDER = "pgwake_pool"


async def prepare_placeholders(conn: asyncpg.Connection, verifier: str) -> None:
    """On a fresh pooled compute: the placeholder role (its future password already
    installed, but no login yet) and a database it owns."""
    await conn.execute(
        f"create role {quote_ident(PLACEHOLDER)} nologin password {quote_literal(verifier)}"
    )
    # CREATE DATABASE refuses to run in a multi-statement query, hence its own call.
    await conn.execute(
        f"create database {quote_ident(PLACEHOLDER)} owner {quote_ident(PLACEHOLDER)}"
    )


def claim_sql(*, database: str, owner: str, passwords: Mapping[str, str]) -> str:
    """One multi-statement query (one round trip, one transaction) that turns the
    placeholders into the endpoint's database and owner, lets the owner log in and
    sets the verifiers in `passwords` (empty when the pooled one is kept: each
    ALTER ROLE … PASSWORD costs the compute a PBKDF2 run)."""
    for name in (database, owner, *passwords):
        if not NAME_RE.fullmatch(name) or name == PLACEHOLDER:
            raise ValueError(f"invalid role or database name {name!r}")
    statements = [
        f"alter role {quote_ident(PLACEHOLDER)} rename to {quote_ident(owner)}",
        f"alter role {quote_ident(owner)} login",
        f"alter database {quote_ident(PLACEHOLDER)} rename to {quote_ident(database)}",
    ]
    for role, verifier in passwords.items():
        verb = "alter" if role == owner else "create"
        statements.append(
            f"{verb} role {quote_ident(role)} with login password {quote_literal(verifier)}"
        )
    return ";\n".join(statements)
