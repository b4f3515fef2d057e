"""The janitor: suspends idle durable endpoints and deletes expired ephemeral ones."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging

from wakeup.control import ControlPlane, EndpointNotFound
from wakeup.provisioners.base import Tier
from wakeup.state import State

log = logging.getLogger(__name__)


class Janitor:
    """One periodic loop for all background upkeep, instead of a timer per endpoint."""

    def __init__(self, control: ControlPlane, *, interval: float | None = None):
        self.control = control
        idle = min(control.settings.idle_timeout, control.settings.ephemeral_ttl)
        # Check often enough that an endpoint is suspended (or an ephemeral one
        # deleted) within ~1.25× its timeout.
        self.interval = interval if interval is not None else min(max(idle / 4, 0.5), 30.0)
        self.ticks = 0  # passes made (tests wait on it instead of on time)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.tick()
            except Exception:
                log.exception("janitor tick failed")
            self.ticks += 1
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval)

    async def tick(self) -> None:
        now = dt.datetime.now(dt.UTC)
        idle_timeout = self.control.settings.idle_timeout
        for endpoint in await self.control.list():
            if endpoint.tier == Tier.EPHEMERAL:
                if endpoint.expires_at is not None and endpoint.expires_at <= now:
                    log.info("ephemeral endpoint %s expired; deleting it", endpoint.id)
                    with contextlib.suppress(EndpointNotFound):
                        await self.control.delete(endpoint.id)
                continue
            if endpoint.state is not State.ACTIVE:
                continue
            # Sessions the proxies can park (idle, holding nothing that cannot move)
            # do not keep a compute up: idle means no activity, not no connections.
            parkable = self.control.reported_parkable(endpoint.id)
            if self.control.reported_connections(endpoint.id) > parkable:
                # A proxy has a client on it that holds the compute (logging in,
                # running a query, pinned, or not yet known to be movable): busy.
                await self.control.store.touch(endpoint.id)
                continue
            # Proxies report activity once per interval: wait that much longer before
            # trusting that no news means no activity.
            if (now - endpoint.last_active).total_seconds() < (
                idle_timeout + self.control.activity_lag()
            ):
                continue
            # A suspend candidate by the proxies' reports: ask the compute itself (one
            # admin connection, only now, not every tick) before stopping it.
            connections = await self.control.connection_count(endpoint)
            if connections is None:
                continue
            if connections > parkable:
                # Backends no proxy vouches for (another client, or news not yet
                # reported): not idle.
                await self.control.store.touch(endpoint.id)
                continue
            with contextlib.suppress(EndpointNotFound):
                await self.control.suspend(
                    endpoint.id, only_if_idle_since=endpoint.last_active.timestamp()
                )
