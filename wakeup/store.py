"""Control DB access (PostgreSQL through asyncpg): endpoints, roles, computes; migrations."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg

from wakeup.state import State

# Append-only: a released migration is never edited, a new one is added.
MIGRATIONS: list[str] = [
    """
    create table endpoints (
        id              text primary key,
        name            text not null,
        tier            text not null,
        state           text not null,
        generation      integer not null default 1,
        wakes           integer not null default 0,
        config_version  integer not null default 1,
        database        text not null,
        owner_role      text not null,
        compute_id      text,
        address         text,
        created_at      timestamptz not null default now(),
        last_active     timestamptz not null default now(),
        suspended_at    timestamptz,
        expires_at      timestamptz
    );
    create table roles (
        endpoint_id text not null references endpoints(id) on delete cascade,
        name        text not null,
        verifier    text not null,
        primary key (endpoint_id, name)
    );
    create table computes (
        id                      text primary key,
        endpoint_id             text references endpoints(id) on delete set null,
        tier                    text not null,
        state                   text not null,
        address                 text,
        applied_config_version  integer not null default 0,
        created_at              timestamptz not null default now(),
        started_at              timestamptz
    );
    create index computes_endpoint on computes (endpoint_id);
    """,
    # Warm pool: pool items are compute rows with no endpoint (state pool_starting,
    # then pooled), per tier and compute size class.
    """
    alter table computes add column size_class text not null default 'small';
    -- The verifier of the password generated for a pooled compute (installed at fill
    -- time: ALTER ROLE … PASSWORD costs a PBKDF2 run on the compute, not on a claim).
    alter table computes add column pool_verifier text;
    create index computes_pool on computes (tier, size_class, created_at)
        where endpoint_id is null and state = 'pooled';
    """,
    # Size classes (wakeup/sizes.py): what the endpoint's next compute start uses.
    """
    alter table endpoints add column size text not null default 'small';
    """,
]


@dataclass(frozen=True)
class EndpointRow:
    id: str
    name: str
    tier: str
    state: State
    generation: int
    wakes: int
    config_version: int
    database: str
    owner_role: str
    compute_id: str | None
    address: str | None
    created_at: dt.datetime
    last_active: dt.datetime
    suspended_at: dt.datetime | None
    expires_at: dt.datetime | None
    size: str = "small"

    @classmethod
    def from_record(cls, r: Mapping[str, Any]) -> EndpointRow:
        values = dict(r)
        values["state"] = State(values["state"])
        return cls(**values)


@dataclass(frozen=True)
class ComputeRow:
    id: str
    endpoint_id: str | None
    tier: str
    state: str
    address: str | None
    applied_config_version: int


@dataclass(frozen=True)
class ClaimedCompute:
    id: str
    address: str
    verifier: str  # installed on the compute's placeholder role when it was pooled


@dataclass(frozen=True)
class PoolItem:
    """A warm-pool compute: started (or starting), no endpoint yet."""

    id: str
    tier: str
    size_class: str
    state: str  # pool_starting | pooled
    address: str | None
    created_at: dt.datetime


class Store:
    """Thin typed queries; the pool is created by `open()` (constructors do no I/O)."""

    def __init__(self, dsn: str | None = None, **connect_kwargs: Any):
        self._dsn = dsn
        self._connect_kwargs = connect_kwargs
        self._pool: asyncpg.Pool | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("Store.open() was not called")
        return self._pool

    async def open(self, timeout: float = 30.0) -> None:
        self._pool = await asyncpg.create_pool(
            self._dsn, min_size=1, max_size=10, timeout=timeout, **self._connect_kwargs
        )
        await self.migrate()

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def ping(self, timeout: float = 2.0) -> bool:
        try:
            async with self.pool.acquire(timeout=timeout) as conn:
                return bool(await conn.fetchval("select 1", timeout=timeout))
        except (OSError, asyncpg.PostgresError, TimeoutError, asyncpg.InterfaceError):
            return False

    async def migrate(self) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            # One pgwake process at a time applies migrations.
            await conn.execute("select pg_advisory_xact_lock(7072617765)")
            await conn.execute(
                "create table if not exists schema_migrations "
                "(version integer primary key, applied_at timestamptz not null default now())"
            )
            done = {r["version"] for r in await conn.fetch("select version from schema_migrations")}
            for version, sql in enumerate(MIGRATIONS, start=1):
                if version not in done:
                    await conn.execute(sql)
                    await conn.execute(
                        "insert into schema_migrations (version) values ($1)", version
                    )

    # -- endpoints ----------------------------------------------------------------

    async def insert_endpoint(
        self,
        *,
        endpoint_id: str,
        name: str,
        tier: str,
        database: str,
        role: str,
        verifier: str,
        compute_id: str,
        expires_at: dt.datetime | None,
        size: str = "small",
    ) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "insert into endpoints (id, name, tier, state, database, owner_role, compute_id,"
                " expires_at, size) values ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                endpoint_id, name, tier, State.STARTING.value, database, role, compute_id,
                expires_at, size,
            )
            await conn.execute(
                "insert into roles (endpoint_id, name, verifier) values ($1, $2, $3)",
                endpoint_id, role, verifier,
            )
            await conn.execute(
                "insert into computes (id, endpoint_id, tier, state, size_class)"
                " values ($1, $2, $3, 'stopped', $4)",
                compute_id, endpoint_id, tier, size,
            )

    async def get_endpoint(self, endpoint_id: str) -> EndpointRow | None:
        r = await self.pool.fetchrow(
            "select * from endpoints where id = $1 and state <> 'deleted'", endpoint_id
        )
        return EndpointRow.from_record(r) if r else None

    async def list_endpoints(self) -> list[EndpointRow]:
        rows = await self.pool.fetch(
            "select * from endpoints where state <> 'deleted' order by created_at, id"
        )
        return [EndpointRow.from_record(r) for r in rows]

    async def set_state(self, endpoint_id: str, state: State) -> None:
        suspended = "now()" if state is State.SUSPENDED else "suspended_at"
        await self.pool.execute(
            f"update endpoints set state = $2, suspended_at = {suspended} where id = $1",
            endpoint_id, state.value,
        )

    async def mark_started(
        self, endpoint_id: str, compute_id: str, address: str, *, counted: bool
    ) -> EndpointRow:
        """The compute answers: record where, count the wake, and restart the idle clock.

        One statement (atomic by itself): on the wake path, between the postmaster
        being ready and the client being let in, so one round trip, not four."""
        r = await self.pool.fetchrow(
            "with compute as ("
            " update computes set state = 'running', address = $3, started_at = now()"
            " where id = $2)"
            " update endpoints set state = 'active', address = $3, last_active = now(),"
            " wakes = wakes + $4 where id = $1 returning *",
            endpoint_id, compute_id, address, 1 if counted else 0,
        )
        return EndpointRow.from_record(r)

    async def mark_suspended(self, endpoint_id: str, compute_id: str | None) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            if compute_id is not None:
                await conn.execute(
                    "update computes set state = 'stopped', address = null where id = $1",
                    compute_id,
                )
            await conn.execute(
                "update endpoints set state = 'suspended', address = null,"
                " suspended_at = now() where id = $1 and state <> 'deleted'",
                endpoint_id,
            )

    async def commit_generation(self, endpoint_id: str, size: str) -> EndpointRow:
        """The old generation is gone: the endpoint's next compute is generation + 1 at
        `size`. Recorded before the start, so a crash in between still starts the new
        size (recover() leaves the endpoint suspended; the next wake starts it)."""
        async with self.pool.acquire() as conn, conn.transaction():
            r = await conn.fetchrow(
                "update endpoints set size = $2, generation = generation + 1"
                " where id = $1 and state <> 'deleted' returning *",
                endpoint_id, size,
            )
            await conn.execute(
                "update computes set size_class = $2 where id = $1", r["compute_id"], size
            )
        return EndpointRow.from_record(r)

    async def touch(self, endpoint_id: str) -> None:
        await self.pool.execute(
            "update endpoints set last_active = now() where id = $1", endpoint_id
        )

    async def touch_many(self, last_active: dict[str, float]) -> None:
        """Move endpoints' idle clocks forward to the given Unix times (never back,
        never past now): one statement for a whole activity report."""
        if not last_active:
            return
        ids = list(last_active)
        await self.pool.execute(
            "update endpoints e set last_active = least(now(), to_timestamp(r.at))"
            " from unnest($1::text[], $2::float8[]) as r(id, at)"
            " where e.id = r.id and e.last_active < least(now(), to_timestamp(r.at))",
            ids, [float(last_active[i]) for i in ids],
        )

    async def mark_deleted(self, endpoint_id: str) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "update computes set state = 'deleted', address = null where endpoint_id = $1",
                endpoint_id,
            )
            await conn.execute("delete from roles where endpoint_id = $1", endpoint_id)
            await conn.execute(
                "update endpoints set state = 'deleted', address = null where id = $1",
                endpoint_id,
            )

    # -- roles --------------------------------------------------------------------

    async def get_verifier(self, endpoint_id: str, role: str) -> str | None:
        value: str | None = await self.pool.fetchval(
            "select verifier from roles where endpoint_id = $1 and name = $2", endpoint_id, role
        )
        return value

    async def list_roles(self, endpoint_id: str) -> dict[str, str]:
        rows = await self.pool.fetch(
            "select name, verifier from roles where endpoint_id = $1 order by name", endpoint_id
        )
        return {r["name"]: r["verifier"] for r in rows}

    async def set_verifier(self, endpoint_id: str, role: str, verifier: str) -> int:
        """Create or change a role; bumps the endpoint's config version (returned)."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "insert into roles (endpoint_id, name, verifier) values ($1, $2, $3)"
                " on conflict (endpoint_id, name) do update set verifier = excluded.verifier",
                endpoint_id, role, verifier,
            )
            version: int = await conn.fetchval(
                "update endpoints set config_version = config_version + 1 where id = $1"
                " returning config_version",
                endpoint_id,
            )
        return version

    # -- computes -----------------------------------------------------------------

    async def get_compute(self, compute_id: str) -> ComputeRow | None:
        r = await self.pool.fetchrow(
            "select id, endpoint_id, tier, state, address, applied_config_version"
            " from computes where id = $1",
            compute_id,
        )
        return ComputeRow(**dict(r)) if r else None

    async def running_computes(self) -> list[ComputeRow]:
        rows = await self.pool.fetch(
            "select id, endpoint_id, tier, state, address, applied_config_version"
            " from computes where state = 'running'"
        )
        return [ComputeRow(**dict(r)) for r in rows]

    async def all_compute_ids(self) -> set[str]:
        rows = await self.pool.fetch("select id from computes where state <> 'deleted'")
        return {r["id"] for r in rows}

    async def set_applied_config(self, compute_id: str, version: int) -> None:
        await self.pool.execute(
            "update computes set applied_config_version = $2 where id = $1", compute_id, version
        )

    async def counts_by_state(self) -> dict[str, int]:
        rows = await self.pool.fetch(
            "select state, count(*) as n from computes where state <> 'deleted' group by state"
        )
        return {r["state"]: r["n"] for r in rows}

    # -- warm pool ------------------------------------------------------------------

    async def insert_pool_compute(self, compute_id: str, tier: str, size_class: str) -> None:
        await self.pool.execute(
            "insert into computes (id, tier, size_class, state)"
            " values ($1, $2, $3, 'pool_starting')",
            compute_id, tier, size_class,
        )

    async def mark_pooled(self, compute_id: str, address: str, verifier: str) -> bool:
        """The pooled compute is started and has its placeholders; False if it was retired."""
        done = await self.pool.fetchval(
            "update computes set state = 'pooled', address = $2, started_at = now(),"
            " applied_config_version = 0, pool_verifier = $3"
            " where id = $1 and endpoint_id is null and state = 'pool_starting' returning id",
            compute_id, address, verifier,
        )
        return done is not None

    async def set_pool_address(self, compute_id: str, address: str) -> bool:
        """A pooled compute started again (after a restart of pgwake) answers here."""
        done = await self.pool.fetchval(
            "update computes set address = $2, started_at = now()"
            " where id = $1 and endpoint_id is null and state = 'pooled' returning id",
            compute_id, address,
        )
        return done is not None

    async def pool_items(self) -> list[PoolItem]:
        rows = await self.pool.fetch(
            "select id, tier, size_class, state, address, created_at from computes"
            " where endpoint_id is null and state in ('pool_starting', 'pooled')"
            " order by created_at, id"
        )
        return [PoolItem(**dict(r)) for r in rows]

    async def retire_pool_compute(self, compute_id: str) -> bool:
        """Remove an unclaimed pool item; False if a claim got it first."""
        done = await self.pool.fetchval(
            "delete from computes where id = $1 and endpoint_id is null"
            " and state in ('pool_starting', 'pooled') returning id",
            compute_id,
        )
        return done is not None

    async def claim_pool_compute(
        self,
        *,
        endpoint_id: str,
        name: str,
        tier: str,
        size_class: str,
        database: str,
        role: str,
        expires_at: dt.datetime | None,
    ) -> ClaimedCompute | None:
        """Claim a pooled compute and create the endpoint on it: one statement.

        SKIP LOCKED: concurrent creates neither wait for each other nor get the same
        compute. The owner role gets the verifier installed when the compute was
        pooled. An empty pool inserts nothing and returns None.
        """
        r = await self.pool.fetchrow(
            "with claimed as ("
            "  update computes set endpoint_id = $1, state = 'running'"
            "  where state = 'pooled' and id = ("
            "    select id from computes where endpoint_id is null and state = 'pooled'"
            "    and tier = $3 and size_class = $4"
            "    order by created_at limit 1 for update skip locked)"
            "  returning id, address, pool_verifier"
            "), endpoint as ("
            "  insert into endpoints (id, name, tier, state, database, owner_role,"
            "    compute_id, expires_at, size)"
            "  select $1, $2, $3, 'starting', $5, $6, claimed.id, $7, $4 from claimed"
            "  returning id"
            "), owner as ("
            "  insert into roles (endpoint_id, name, verifier)"
            "  select endpoint.id, $6, claimed.pool_verifier from endpoint, claimed"
            ") select id, address, pool_verifier from claimed",
            endpoint_id, name, tier, size_class, database, role, expires_at,
        )
        if r is None:
            return None
        return ClaimedCompute(r["id"], r["address"], r["pool_verifier"])

    async def replace_verifier(self, endpoint_id: str, role: str, verifier: str) -> None:
        """Set a role's verifier without a config version bump (the caller applies it)."""
        await self.pool.execute(
            "update roles set verifier = $3 where endpoint_id = $1 and name = $2",
            endpoint_id, role, verifier,
        )

    async def finish_claim(
        self, endpoint_id: str, compute_id: str, address: str, config_version: int
    ) -> EndpointRow:
        """The claimed compute has the endpoint's config: the endpoint is active."""
        r = await self.pool.fetchrow(
            "with compute as ("
            "  update computes set applied_config_version = $4, pool_verifier = null"
            "  where id = $2"
            ") update endpoints set state = 'active', address = $3, last_active = now(),"
            " wakes = wakes + 1 where id = $1 returning *",
            endpoint_id, compute_id, address, config_version,
        )
        return EndpointRow.from_record(r)
