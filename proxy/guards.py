"""Connection-storm guards: one session budget per endpoint with a queue, a per-compute
connect gate.

The budget is the compute's own: `max_connections` minus its reserved slots, as
the control plane's wake answer says (nothing to tune per deployment). With
Redis every replica draws from the same budget (leases in shared state, renewed
while held and expiring if a replica dies); in one process, or while Redis is
away, each replica keeps to the budget on its own. Past the budget new sessions
queue, first come first served on this replica, until their deadline and then
get 53300. The gate bounds concurrent connect+login attempts to one compute, so
a herd of 500 clients does not make postgres fork 500 backends at once. The live
counts double as the activity report.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import random
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from proxy.errors import ClientError, Kind
from proxy.shared import LocalShared, SharedState
from wakeup.api import ComputeAddress

log = logging.getLogger(__name__)

# A compute that does not say its budget: PostgreSQL's defaults (100 − 3 reserved).
DEFAULT_BUDGET = 97
# Shared leases live this long unless renewed; renewed three times per period.
LEASE_TTL = 15.0
# A freed lease goes straight to the next session queued on this replica (no Redis
# round trip) at most this many times in a row; then it goes back to the shared
# budget, so that other replicas' queues get their turn.
LOCAL_HANDOVERS = 8
# A queue re-checks the shared budget at least this often, in case the news of a
# slot freed on another replica was lost.
RECHECK_SLICE = 0.25


@dataclass(eq=False)
class _Endpoint:
    live: int = 0  # sessions of this replica holding a slot
    busy: int = 0  # acquires in progress (they hold this object across awaits)
    taking: int = 0  # calls to the shared budget in flight
    budget: int = DEFAULT_BUDGET  # the latest the compute told us
    queue: collections.deque[asyncio.Future[Slot]] = field(default_factory=collections.deque)
    leases: set[str] = field(default_factory=set)
    pump: asyncio.Task[None] | None = None
    # Slots that sessions of this replica were asked to give up (evicted to make
    # room) and have not released yet: the queue waits for these already.
    promised: int = 0

    @property
    def idle(self) -> bool:
        return (self.live <= 0 and self.busy == 0 and self.taking == 0 and not self.queue
                and self.pump is None)


@dataclass(eq=False)
class Slot:
    """One session's place under its endpoint's budget; `lease` names it in Redis."""

    endpoint_id: str
    lease: str | None
    state: _Endpoint = field(repr=False)
    handovers: int = 0  # sessions on this replica that held the lease before this one


class ConnectionGuards:
    def __init__(
        self,
        *,
        shared: SharedState | None = None,
        endpoint_cap: int | None = None,
        queue_timeout: float = 10.0,
        connect_concurrency: int = 32,
    ):
        self.shared: SharedState = shared if shared is not None else LocalShared()
        self.endpoint_cap = endpoint_cap  # an operator's override of every compute's budget
        self.queue_timeout = queue_timeout
        self.connect_concurrency = connect_concurrency
        self._endpoints: dict[str, _Endpoint] = {}
        self._gates: dict[ComputeAddress, asyncio.Semaphore] = {}
        self._leases = itertools.count(1)
        self._replica = secrets.token_hex(6)
        self._background: set[asyncio.Task[None]] = set()
        self._drops: dict[str, list[str]] = {}  # leases to give back, per endpoint
        self._flushing: set[str] = set()
        self._renewer: asyncio.Task[None] | None = None
        self.queued_total = 0
        self.refused_total = 0
        self.compute_full_total = 0  # logins the compute refused with 53300, then retried
        # Set when an endpoint goes from no sessions to one: report it right away.
        self.became_busy = asyncio.Event()
        # Called with the endpoint when a session starts to queue for one of its slots:
        # something may make room (proxy/evict.py parks an idle session).
        self.make_room: Callable[[str], None] | None = None

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        self._renewer = asyncio.create_task(self._renew(), name="slot-leases")

    async def close(self) -> None:
        """Stop renewing and queueing; lease drops in flight finish (each has a Redis
        deadline), so a replica that stops cleanly gives its slots back at once."""
        stopping = [t for t in (self._renewer, *(e.pump for e in self._endpoints.values()))
                    if t is not None]
        for task in stopping:
            task.cancel()
        await asyncio.gather(*stopping, *self._background, return_exceptions=True)

    async def _renew(self) -> None:
        """Keep this replica's leases alive; they lapse within LEASE_TTL if it dies."""
        while True:
            await asyncio.sleep(LEASE_TTL / 3)  # a period, not a synchronisation
            for endpoint_id, state in list(self._endpoints.items()):
                if state.leases:
                    await self.shared.renew_slots(endpoint_id, sorted(state.leases), LEASE_TTL)

    # -- counts ------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        return {k: e.live for k, e in self._endpoints.items() if e.live}

    def live(self, endpoint_id: str) -> int:
        state = self._endpoints.get(endpoint_id)
        return state.live if state is not None else 0

    def budget(self, endpoint_id: str) -> int:
        state = self._endpoints.get(endpoint_id)
        return state.budget if state is not None else self._cap(None)

    def _cap(self, budget: int | None) -> int:
        return self.endpoint_cap or budget or DEFAULT_BUDGET

    def _state(self, endpoint_id: str, budget: int | None) -> _Endpoint:
        state = self._endpoints.get(endpoint_id)
        if state is None:
            state = self._endpoints[endpoint_id] = _Endpoint()
        if budget is not None or self.endpoint_cap:
            state.budget = self._cap(budget)
        return state

    # -- slots -------------------------------------------------------------------------
    #
    # Redis sees at most one take in flight per endpoint from the queue (plus one
    # from an uncontended arrival), however large the herd: the queue's server takes
    # as many leases as it has waiters in one call, and releases go back in batches.

    async def acquire(
        self, endpoint_id: str, budget: int | None = None, *, timeout: float | None = None
    ) -> Slot:
        """Take a session slot for the endpoint, queueing up to the deadline."""
        state = self._state(endpoint_id, budget)
        state.busy += 1
        try:
            return await self._acquire(endpoint_id, state, timeout)
        finally:
            state.busy -= 1
            self._forget_if_idle(endpoint_id, state)

    async def _acquire(self, endpoint_id: str, state: _Endpoint, timeout: float | None) -> Slot:
        if not state.queue and not state.taking:
            slots = await self._take(endpoint_id, state, 1)
            if slots:
                return slots[0]
        self.queued_total += 1
        waiter: asyncio.Future[Slot] = asyncio.get_running_loop().create_future()
        state.queue.append(waiter)
        self._pump(endpoint_id, state)
        if self.make_room is not None:
            self.make_room(endpoint_id)
        wait = self.queue_timeout if timeout is None else min(timeout, self.queue_timeout)
        try:
            async with asyncio.timeout(max(wait, 0.0)):
                return await waiter  # the queue's server hands a slot over (already counted)
        except TimeoutError:
            if waiter.done() and not waiter.cancelled():
                return waiter.result()  # the slot arrived just as the deadline did
            self.refused_total += 1
            raise ClientError(
                Kind.TOO_MANY,
                f'too many connections to endpoint "{endpoint_id}" '
                f"(its compute admits {state.budget})",
                hint="Close idle connections or use a connection pool.",
            ) from None
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release(waiter.result())  # handed over just as we gave up: pass it on
            raise
        finally:
            with contextlib.suppress(ValueError):
                state.queue.remove(waiter)

    async def try_acquire(self, endpoint_id: str, budget: int | None = None) -> Slot | None:
        """Take a slot only if one is free right now (nobody queued, no take under way):
        for work done early."""
        state = self._state(endpoint_id, budget)
        if state.queue or state.taking:
            return None
        state.busy += 1
        try:
            slots = await self._take(endpoint_id, state, 1)
        finally:
            state.busy -= 1
            self._forget_if_idle(endpoint_id, state)
        return slots[0] if slots else None

    async def _take(self, endpoint_id: str, state: _Endpoint, want: int) -> list[Slot]:
        want = min(want, state.budget - state.live)  # never more than the whole budget here
        if want <= 0:
            return []
        leases = [f"{self._replica}:{next(self._leases)}" for _ in range(want)]
        state.taking += 1
        try:
            taken = await self.shared.take_slots(endpoint_id, leases, state.budget, LEASE_TTL)
        except asyncio.CancelledError:
            # Given up mid-call: the leases may be in Redis already. Give them back now
            # rather than let them hold slots until they lapse.
            self._drop_later(endpoint_id, leases)
            raise
        finally:
            state.taking -= 1
        names: list[str | None]
        if taken is None:
            # No shared budget (in process, or Redis away): this replica's count decides.
            names = [None] * max(0, min(want, state.budget - state.live))
        else:
            names = list(leases[:taken])
            state.leases.update(leases[:taken])
        if names and state.live == 0:
            self.became_busy.set()
        state.live += len(names)
        return [Slot(endpoint_id, name, state) for name in names]

    def shortfall(self, endpoint_id: str) -> int:
        """Sessions of this replica queued for a slot of the endpoint, less the slots
        already promised to come free (`promise`)."""
        state = self._endpoints.get(endpoint_id)
        if state is None:
            return 0
        return sum(1 for waiter in state.queue if not waiter.done()) - state.promised

    def promise(self, endpoint_id: str) -> None:
        """A session of the endpoint was just asked to give its slot up (it releases
        it soon): the queue counts on it."""
        state = self._endpoints.get(endpoint_id)
        if state is not None:
            state.promised += 1

    def release(self, slot: Slot) -> None:
        state = slot.state
        if state.promised > 0:
            state.promised -= 1  # any slot coming free keeps a promise
        if slot.lease is None or slot.handovers < LOCAL_HANDOVERS:
            while state.queue:
                waiter = state.queue.popleft()
                if not waiter.done():
                    # The slot passes on; the count stays.
                    waiter.set_result(
                        Slot(slot.endpoint_id, slot.lease, state, slot.handovers + 1))
                    return
        state.live -= 1
        if slot.lease is not None:
            state.leases.discard(slot.lease)
            self._drop_later(slot.endpoint_id, [slot.lease])
        else:
            self.shared.announce_slot(slot.endpoint_id)
        self._forget_if_idle(slot.endpoint_id, state)

    def _forget_if_idle(self, endpoint_id: str, state: _Endpoint) -> None:
        """Drop an endpoint's entry once nothing here holds or wants a slot; an entry in
        use is never dropped, so every slot returns to the object that counted it."""
        if state.idle and self._endpoints.get(endpoint_id) is state:
            del self._endpoints[endpoint_id]

    def _drop_later(self, endpoint_id: str, leases: list[str]) -> None:
        """Give leases back without making the caller wait (release runs in cleanup);
        the leases released meanwhile go back together in one call."""
        pending = self._drops.setdefault(endpoint_id, [])
        pending.extend(leases)
        if endpoint_id not in self._flushing:
            self._flushing.add(endpoint_id)
            task = asyncio.get_running_loop().create_task(self._flush_drops(endpoint_id))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _flush_drops(self, endpoint_id: str) -> None:
        try:
            while leases := self._drops.pop(endpoint_id, None):
                await self.shared.drop_slots(endpoint_id, leases)
        finally:
            self._flushing.discard(endpoint_id)

    def _pump(self, endpoint_id: str, state: _Endpoint) -> None:
        if state.pump is None:
            state.pump = asyncio.get_running_loop().create_task(
                self._serve_queue(endpoint_id, state), name=f"slot-queue:{endpoint_id}")

    async def _serve_queue(self, endpoint_id: str, state: _Endpoint) -> None:
        """Hand slots to this replica's queue in order, as they come free anywhere."""
        try:
            while state.queue:
                freed = self.shared.slot_waiter(endpoint_id)
                waiting = sum(1 for waiter in state.queue if not waiter.done())
                slots = await self._take(endpoint_id, state, max(1, waiting))
                if not slots:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(RECHECK_SLICE * random.uniform(0.5, 1.5)):
                            await freed.wait()
                    continue
                for slot in slots:
                    while state.queue:
                        waiter = state.queue.popleft()
                        if not waiter.done():
                            waiter.set_result(slot)
                            break
                    else:
                        self.release(slot)  # everyone queued gave up meanwhile
        finally:
            state.pump = None
            self._forget_if_idle(endpoint_id, state)

    async def compute_full(self, endpoint_id: str, attempt: int, deadline: float) -> bool:
        """The compute itself said 53300 at login (sessions it has that we do not
        count: another proxy without Redis, direct clients). Wait for a slot to come
        free or a jittered backoff, whichever is first; False when the deadline
        leaves no time for another try."""
        self.compute_full_total += 1
        loop = asyncio.get_running_loop()
        pause = min(0.5, 0.01 * 2**attempt) * random.uniform(0.5, 1.5)
        if loop.time() + pause >= deadline:
            return False
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(pause):
                await self.shared.slot_waiter(endpoint_id).wait()
        return True

    @contextlib.asynccontextmanager
    async def connecting(self, address: ComputeAddress) -> AsyncIterator[None]:
        """Bound concurrent connect+login attempts to one compute."""
        gate = self._gates.get(address)
        if gate is None:
            gate = self._gates[address] = asyncio.Semaphore(self.connect_concurrency)
        # Gates are kept: there are as many as compute addresses (a bounded port range).
        async with gate:
            yield
