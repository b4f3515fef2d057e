"""Generation handoff (resize): freeze, drain, stop the old generation, start the new, unfreeze.

The steps and their order are the pure table in `wakeup.state` (HandoffPhase,
HandoffRun); this module performs them. The caller holds the endpoint's
lifecycle lock for the whole handoff, which is what makes it safe:

- **freeze**: the endpoint is `handoff`; every proxy's cached address is
  invalidated, and the old postmaster begins a *smart* shutdown, so a proxy
  that missed the invalidation and connects to the old address gets 57P03 and
  wakes again. Every wake (the proxies' connect path) queues behind the lock
  and is answered with the new generation's address: new connects wait, they
  are not refused (up to the proxy's wake budget, then 57P03, retryable).
- **drain**: open sessions go on working on the old generation. We wait until
  no session is *pinned* (holds state that cannot move to another backend),
  up to the drain deadline. Two sources say so: the proxies' activity reports
  (`Activity.pinned`, from the proxies that track it: temp tables, WITH HOLD
  cursors, LISTEN, unfinished extended-protocol or COPY exchanges), and the
  compute itself, asked over the admin socket: a client backend inside a
  transaction or running a statement, or holding an advisory lock, or owning
  temporary tables in the endpoint's database. The drain also runs a CHECKPOINT
  on the old generation, so the stop's shutdown checkpoint is short.
- **stop**: fast shutdown of the old postmaster. Unpinned idle sessions lose
  their backend at an idle point, where the proxy re-attaches them to the new
  generation. Sessions still pinned at the deadline are ended by that fast
  shutdown: PostgreSQL sends them FATAL 57P01 "terminating connection due to
  administrator command" (the endpoint's `handoff` state and the control
  plane's log say it was a resize). The step ends only when postmaster.pid no
  longer names a live process.
- **start**: the new generation on the same storage with the new size class;
  the provisioner refuses to start if any postmaster is alive on the data
  directory, so there are never two writers.
- **unfreeze**: the endpoint is `active` at generation + 1; queued wakes get
  the new address.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import asyncpg

from wakeup.computeconfig import admin_connect
from wakeup.provisioners.base import ProvisionerError, Tier
from wakeup.sizes import SizeClass
from wakeup.state import HandoffPhase, HandoffRun
from wakeup.store import EndpointRow

if TYPE_CHECKING:
    from wakeup.control import ControlPlane

log = logging.getLogger(__name__)

# How often the compute is asked whether sessions are still pinned. There is no
# event to wait for on the compute's side; proxy reports wake the wait at once.
DRAIN_POLL = 0.05

# Client backends that must not be cut: inside a transaction or a statement, or
# holding an advisory lock, or owning temporary tables (pg_temp_N is the
# backend's proc number, which pg_stat_get_backend_idset() returns since PG 16).
PINNED_BACKENDS_SQL = """
select count(*) from pg_stat_activity a
where a.backend_type = 'client backend' and a.usename <> $1 and a.pid <> pg_backend_pid()
  and (a.state is distinct from 'idle'
       or a.backend_xid is not null
       or exists (select 1 from pg_locks l where l.pid = a.pid and l.locktype = 'advisory')
       or exists (
         select 1 from pg_stat_get_backend_idset() as b(id)
         join pg_namespace n on n.nspname = 'pg_temp_' || b.id
         join pg_class c on c.relnamespace = n.oid
         where pg_stat_get_backend_pid(b.id) = a.pid))
"""


class HandoffFailed(RuntimeError):
    """The new generation did not start; the endpoint is suspended at the new size."""


@dataclass(frozen=True)
class HandoffResult:
    endpoint: EndpointRow
    previous_size: str
    durations: dict[str, float]  # seconds per phase
    total: float
    pinned_at_deadline: int  # sessions still pinned when the drain deadline passed


class GenerationHandoff:
    """One resize of one endpoint. The caller holds the endpoint's lifecycle lock."""

    def __init__(
        self, control: ControlPlane, endpoint: EndpointRow, size: SizeClass,
        drain_timeout: float,
    ):
        self.control = control
        self.endpoint = endpoint
        self.size = size
        self.drain_timeout = drain_timeout
        self.run_state = HandoffRun(control.clock())
        self._admin_user = ""

    def _advance(self, target: HandoffPhase) -> None:
        ended, took = self.run_state.advance(target, self.control.clock())
        self.control.metrics.handoff_phase.labels(ended.value).observe(took)
        log.info("handoff of %s: %s took %.3fs", self.endpoint.id, ended.value, took)

    async def run(self) -> HandoffResult:
        try:
            return await self._run()
        except HandoffFailed:
            raise
        except BaseException:
            # Cut short (the control DB failed, the task was cancelled): the old
            # generation may be in its smart shutdown, which cannot be undone, and
            # must not be handed out again. Stop whatever runs; the next wake starts
            # the endpoint afresh at its recorded size.
            if not self.run_state.finished:
                await self._abandon()
            raise

    async def _abandon(self) -> None:
        ep = self.endpoint
        assert ep.compute_id is not None
        log.error("handoff of %s cut short in %s; endpoint suspended", ep.id,
                  self.run_state.phase.value)
        try:
            await self.control.provisioner.stop(ep.compute_id)
            await self.control.store.mark_suspended(ep.id, ep.compute_id)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            # recover() settles a `handoff` endpoint at the next start of pgwake.
            log.error("handoff of %s: cleanup failed too: %s", ep.id, exc)

    async def _run(self) -> HandoffResult:
        control, ep = self.control, self.endpoint
        assert ep.compute_id is not None
        tier = Tier(ep.tier)
        store = control.store
        # -- freeze: from here no wake answers with the old generation's address
        # (in memory at once, then in the control DB), and once the endpoint shows
        # `handoff` the old postmaster refuses every new connection.
        control.frozen.add(ep.id)
        try:
            admin = await self._admin_connection(ep, tier)
            try:
                await control.provisioner.refuse_new_connections(ep.compute_id)
                await store.set_state(ep.id, self.run_state.endpoint_state())
                await control.invalidate(ep.id)
                frozen_at = control.clock()
                self._advance(HandoffPhase.DRAIN)
                # -- drain
                pinned = await self._drain(admin, frozen_at)
            finally:
                if admin is not None:
                    admin.terminate()
        finally:
            control.frozen.discard(ep.id)  # the endpoint's state says `handoff` now
        if pinned:
            log.warning(
                "handoff of %s: %d pinned session(s) still open after %.1fs; the old"
                " generation's fast shutdown ends them with 57P01",
                ep.id, pinned, self.drain_timeout,
            )
        self._advance(HandoffPhase.STOP)
        # -- stop
        await control.provisioner.stop(ep.compute_id)
        alive = control.provisioner.live_postmaster(ep.compute_id, tier)
        if alive is not None:
            # stop() escalates to SIGKILL; a postmaster that survives it is not
            # ours to replace. Never start a second writer next to it.
            await store.mark_suspended(ep.id, ep.compute_id)
            self._advance(HandoffPhase.FAILED)
            raise HandoffFailed(
                f"the old generation of {ep.id} (pid {alive.pid}) did not exit"
            )
        committed = await store.commit_generation(ep.id, self.size.name)
        self._advance(HandoffPhase.START)
        # -- start
        try:
            address = await control.provisioner.start(
                ep.compute_id, tier, size=self.size, adopt=False
            )
            await control.apply_config_if_changed(committed)
        except (ProvisionerError, OSError, asyncpg.PostgresError) as exc:
            log.error("handoff of %s: the new generation did not start: %s", ep.id, exc)
            await control.provisioner.stop(ep.compute_id)
            await store.mark_suspended(ep.id, ep.compute_id)
            self._advance(HandoffPhase.FAILED)
            raise HandoffFailed(
                f"the new generation of {ep.id} did not start; it is suspended at size"
                f" {self.size.name} and the next connection starts it"
            ) from exc
        self._advance(HandoffPhase.UNFREEZE)
        # -- unfreeze
        endpoint = await store.mark_started(ep.id, ep.compute_id, str(address), counted=False)
        self._advance(HandoffPhase.DONE)
        durations = {phase.value: took for phase, took in self.run_state.durations.items()}
        total = control.clock() - self.run_state.started
        control.metrics.handoff_duration.observe(total)
        return HandoffResult(endpoint, ep.size, durations, total, pinned)

    async def _admin_connection(
        self, ep: EndpointRow, tier: Tier
    ) -> asyncpg.Connection | None:
        """Opened before the smart shutdown begins: after it, no new connection is let in."""
        assert ep.compute_id is not None
        if not self.control.provisioner.is_running(ep.compute_id):
            return None  # the old generation died on its own: nothing to drain
        target = self.control.provisioner.admin_target(ep.compute_id, tier)
        self._admin_user = target.user
        try:
            return await admin_connect(dataclasses.replace(target, database=ep.database))
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            log.warning("handoff of %s: cannot ask the compute about sessions: %s", ep.id, exc)
            return None

    async def _drain(self, admin: asyncpg.Connection | None, frozen_at: float) -> int:
        """Wait until nothing is pinned or the deadline passes; the pinned count then."""
        control, ep = self.control, self.endpoint
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.drain_timeout
        if admin is not None:
            # A checkpoint now, while the old generation still serves, leaves the
            # stop's shutdown checkpoint little to write: clients stall for the stop
            # and the start only, not for flushing what they dirtied.
            try:
                await admin.execute("checkpoint", timeout=max(0.001, self.drain_timeout))
            except (OSError, TimeoutError, asyncpg.PostgresError,
                    asyncpg.InterfaceError) as exc:
                log.info("handoff of %s: early checkpoint skipped: %s", ep.id, exc)
        while True:
            pinned = control.reported_unmovable(ep.id, since=frozen_at)
            if admin is not None and not admin.is_closed():
                try:
                    # The same sessions seen from two sides (every client backend is
                    # some proxy's session): the larger count, not the sum.
                    pinned = max(pinned, int(
                        await admin.fetchval(PINNED_BACKENDS_SQL, self._admin_user, timeout=5)
                    ))
                except (OSError, TimeoutError, asyncpg.PostgresError,
                        asyncpg.InterfaceError) as exc:
                    # The old generation went away (every session ended under the
                    # smart shutdown, or a crash): nothing is left to wait for.
                    log.info("handoff of %s: compute stopped answering: %s", ep.id, exc)
                    admin = None
            remaining = deadline - loop.time()
            if pinned == 0 or remaining <= 0:
                return pinned
            await control.activity_changed(min(remaining, DRAIN_POLL))
