"""Make room under an endpoint's connection budget by parking idle sessions.

A login (or a parked session's re-attach) that finds its endpoint's budget in
use queues for a slot. If this proxy holds idle sessions of that endpoint, each
keeping a backend, an application's pool of idle connections would lock the
newcomer out until 53300, though a parked session needs no backend at all. So
for every session queued, the evictor parks the endpoint's longest-idle
movable session on this proxy: it asks the compute (on the session's own
backend) about idle sessions whose snapshot is stale, ends the chosen one's
backend with Terminate, and the session parks exactly as when its compute goes
away; its freed slot goes to the queue, and its next message re-attaches with
its settings and prepared statements. Pinned sessions (an open transaction,
temp tables, advisory locks, …) are never chosen, and only sessions idle
outside a transaction with nothing outstanding are, so no acknowledged commit
and no running statement is touched.
"""

from __future__ import annotations

import asyncio
import logging

from proxy.guards import ConnectionGuards
from proxy.metrics import ProxyMetrics
from proxy.nativesplice import AnySplice
from proxy.sessionstate import SessionRegistry

log = logging.getLogger(__name__)

# While sessions still queue and no session can be parked (all busy or pinned),
# look again this often: a session that goes idle meanwhile can make room.
RETRY_EVERY = 0.1


class Evictor:
    """One per proxy: a task per endpoint while its queue is short of slots."""

    def __init__(
        self,
        registry: SessionRegistry,
        guards: ConnectionGuards,
        metrics: ProxyMetrics,
        *,
        probe_timeout: float,
    ) -> None:
        self.registry = registry
        self.guards = guards
        self.metrics = metrics
        self.probe_timeout = probe_timeout
        self._running: dict[str, asyncio.Task[None]] = {}

    def make_room(self, endpoint: str) -> None:
        """A session started to queue for a slot of `endpoint` (guards' hook)."""
        if endpoint not in self._running:
            task = asyncio.get_running_loop().create_task(
                self._make_room(endpoint), name=f"evict:{endpoint}"
            )
            self._running[endpoint] = task
            task.add_done_callback(lambda _: self._running.pop(endpoint, None))

    async def close(self) -> None:
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _make_room(self, endpoint: str) -> None:
        try:
            # Sessions found unmovable, or that refused to park, in this pass: not
            # asked again until a pause, so a pass always ends.
            passed: set[AnySplice] = set()
            while (need := self.guards.shortfall(endpoint)) > 0:
                if not await self._park_some(endpoint, need, passed):
                    passed.clear()
                    await asyncio.sleep(RETRY_EVERY)  # a period: nothing to await
        except Exception:
            log.exception("making room on endpoint %s failed", endpoint)

    async def _park_some(self, endpoint: str, need: int, passed: set[AnySplice]) -> bool:
        """Try to park `need` of the endpoint's longest-idle movable sessions; False
        when no idle session here is left to try in this pass."""
        registry = self.registry
        chosen: list[AnySplice] = []
        for splice in registry.idle_sessions(endpoint):
            if len(chosen) == need:
                break
            if splice in passed:
                continue
            snapshot = registry.snapshot(splice)
            if snapshot is not None and registry.pin_reasons(splice):
                passed.add(splice)  # pinned, and known so since its last request
                continue
            chosen.append(splice)
        if not chosen:
            return False
        # The compute's word on each (concurrently, each on its own backend) where the
        # last one is stale: a session's pins can change with any request.
        await asyncio.gather(*(
            registry.ask(endpoint, splice, timeout=self.probe_timeout)
            for splice in chosen if registry.snapshot(splice) is None
        ))
        parked = 0
        for splice in chosen:
            passed.add(splice)
            if self.guards.shortfall(endpoint) <= 0:
                break  # slots came free meanwhile
            # False: it became busy, pinned, or ended meanwhile.
            if await splice.evict_soon(self.probe_timeout):
                self.guards.promise(endpoint)
                self.metrics.sessions_evicted_total.inc()
                parked += 1
        if parked:
            log.info("endpoint %s: parked %d idle session(s) to make room", endpoint, parked)
        return True
