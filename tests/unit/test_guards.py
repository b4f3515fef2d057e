"""Session slots under an endpoint's budget, in one process (no Redis): the budget comes
from the compute, the queue is served in order, and counts never drift."""

from __future__ import annotations

import asyncio

import pytest

from proxy.errors import ClientError
from proxy.guards import DEFAULT_BUDGET, ConnectionGuards


async def test_the_computes_budget_is_the_cap() -> None:
    guards = ConnectionGuards(queue_timeout=0.0)
    slots = [await guards.acquire("ep", 3) for _ in range(3)]
    with pytest.raises(ClientError) as refused:
        await guards.acquire("ep", 3)
    assert refused.value.sqlstate == "53300" and "admits 3" in refused.value.message
    assert guards.live("ep") == 3
    for slot in slots:
        guards.release(slot)
    assert guards.counts() == {}


async def test_an_unknown_budget_is_postgresqls_default_and_an_override_wins() -> None:
    assert ConnectionGuards().budget("ep") == DEFAULT_BUDGET
    guards = ConnectionGuards(endpoint_cap=5)
    slot = await guards.acquire("ep", 40)
    assert guards.budget("ep") == 5
    guards.release(slot)


async def test_queue_is_served_in_order_as_slots_free() -> None:
    guards = ConnectionGuards()
    first = await guards.acquire("ep", 1)
    order: list[int] = []

    async def queued(i: int) -> None:
        slot = await guards.acquire("ep", 1)
        order.append(i)
        guards.release(slot)

    waiting = [asyncio.create_task(queued(i)) for i in range(5)]
    await asyncio.sleep(0)  # let them all queue
    assert guards.queued_total == 5
    guards.release(first)
    await asyncio.gather(*waiting)
    assert order == [0, 1, 2, 3, 4]
    assert guards.counts() == {}
    await guards.close()


async def test_counts_do_not_drift_when_the_last_slot_leaves_during_an_acquire() -> None:
    """A slot released while another acquire is queued on the same entry: the entry stays,
    and both slots return to it."""
    guards = ConnectionGuards()
    held = await guards.acquire("ep", 1)
    later = asyncio.create_task(guards.acquire("ep", 1))
    await asyncio.sleep(0)
    guards.release(held)
    slot = await later
    assert guards.live("ep") == 1
    guards.release(slot)
    assert guards.live("ep") == 0 and guards.counts() == {}
    again = await guards.acquire("ep", 1)
    assert guards.live("ep") == 1
    guards.release(again)
    await guards.close()


async def test_a_queued_client_that_gives_up_passes_nothing_on() -> None:
    guards = ConnectionGuards()
    held = await guards.acquire("ep", 1)
    gave_up = asyncio.create_task(guards.acquire("ep", 1))
    await asyncio.sleep(0)
    gave_up.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gave_up
    guards.release(held)
    slot = await asyncio.wait_for(guards.acquire("ep", 1), 30)
    assert guards.live("ep") == 1
    guards.release(slot)
    await guards.close()


async def test_a_session_that_queues_asks_for_room_and_promises_count() -> None:
    """make_room hears of each session that starts to queue; the shortfall is the queue
    less the slots promised to come free, and any release keeps a promise."""
    guards = ConnectionGuards()
    asked: list[str] = []
    guards.make_room = asked.append
    held = [await guards.acquire("ep", 2) for _ in range(2)]
    assert asked == [] and guards.shortfall("ep") == 0
    waiting = [asyncio.create_task(guards.acquire("ep", 2)) for _ in range(2)]
    await asyncio.sleep(0)  # let them queue
    assert asked == ["ep", "ep"] and guards.shortfall("ep") == 2
    guards.promise("ep")
    assert guards.shortfall("ep") == 1
    guards.release(held[0])  # the promised slot: handed to the first in line
    assert guards.shortfall("ep") == 1
    first = await waiting[0]
    guards.release(held[1])
    second = await waiting[1]
    assert guards.shortfall("ep") == 0
    guards.release(first)
    guards.release(second)
    assert guards.counts() == {}
    await guards.close()
