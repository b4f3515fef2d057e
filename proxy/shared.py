"""Shared proxy state: address cache, wake locks, rate buckets, cancel keys, invalidations.

One interface, two implementations. `LocalShared` keeps everything in this
process (`pgwake up` without `--redis`). `RedisShared` shares it between proxy
replicas through Redis and keeps a `LocalShared` underneath: when Redis fails
it logs a warning, counts the error and answers from the local state
(per-replica behaviour), and goes back to Redis after a short pause. A Redis
problem never refuses a client connection by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from proxy import redis_scripts as scripts
from wakeup.api import INVALIDATION_CHANNEL, ComputeAddress

log = logging.getLogger(__name__)

KEY_PREFIX = "pgwake:"
# After a Redis error, skip Redis for this long before trying it again.
REDIS_RETRY_AFTER = 1.0
# Redis connections per replica: the wake path's pool, and cancel keys' own.
WAKE_POOL_SIZE = 32
CANCEL_POOL_SIZE = 8


@dataclass(frozen=True)
class CachedAddress:
    address: ComputeAddress
    generation: int
    budget: int | None = None  # client sessions the compute admits (from the wake answer)


@dataclass(frozen=True)
class SharedCancel:
    """Where a client's cancel key leads: the compute and its own (PID, secret)."""

    address: ComputeAddress
    pid: int
    secret: bytes


class SharedState(Protocol):
    """What the wake path and cancel keys need from state shared across replicas."""

    errors: int  # backend (Redis) errors seen; a metric

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def get_address(self, endpoint_id: str) -> CachedAddress | None: ...
    async def put_address(self, endpoint_id: str, value: CachedAddress, ttl: float) -> None: ...
    async def invalidate(self, endpoint_id: str) -> None: ...
    def stale_address(self, endpoint_id: str, max_age: float) -> CachedAddress | None: ...
    async def try_lock(self, endpoint_id: str, token: str, expiry: float) -> bool: ...
    async def unlock(self, endpoint_id: str, token: str) -> None: ...
    def waiter(self, endpoint_id: str) -> asyncio.Event: ...
    async def wait_woken(self, endpoint_id: str, timeout: float) -> None: ...
    async def take_token(self, bucket: str, rate: float, burst: float) -> float: ...
    async def put_cancel(self, key: str, target: SharedCancel, ttl: float) -> bool: ...
    async def get_cancel(self, key: str) -> SharedCancel | None: ...
    async def drop_cancel(self, key: str) -> None: ...
    # Session slots: one connection budget per endpoint, shared by every replica.
    # take_slots takes as many of `leases` (in order) as the budget has room for and
    # says how many; None when there is no shared budget (in process, or Redis
    # unavailable): the caller then keeps to the budget on its own.
    async def take_slots(self, endpoint_id: str, leases: list[str], budget: int,
                         ttl: float) -> int | None: ...
    async def drop_slots(self, endpoint_id: str, leases: list[str]) -> None: ...
    async def renew_slots(self, endpoint_id: str, leases: list[str], ttl: float) -> None: ...
    def slot_waiter(self, endpoint_id: str) -> asyncio.Event: ...
    def announce_slot(self, endpoint_id: str | None) -> None: ...


def jittered(ttl: float) -> float:
    """TTL ±10 %, so entries written together do not expire together."""
    return ttl * random.uniform(0.9, 1.1)


class LocalShared:
    """The in-process implementation (one replica, or Redis unavailable)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.errors = 0
        self._addresses: dict[str, tuple[float, CachedAddress]] = {}
        # The last address seen per endpoint and when, kept past its TTL for when the
        # control plane cannot be asked; any invalidation drops it.
        self._last_known: dict[str, tuple[float, CachedAddress]] = {}
        self._locks: dict[str, tuple[float, str]] = {}
        self._woken: dict[str, asyncio.Event] = {}
        self._buckets: dict[str, tuple[float, float]] = {}  # tokens, last refill
        self._cancels: dict[str, tuple[float, SharedCancel]] = {}
        self._slot_freed: dict[str, asyncio.Event] = {}
        # Told of each endpoint whose address was invalidated (however the news came:
        # in process, by Redis, or in an activity answer).
        self.on_forget: list[Callable[[str], None]] = []

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self.announce(None)

    # The address cache.

    async def get_address(self, endpoint_id: str) -> CachedAddress | None:
        entry = self._addresses.get(endpoint_id)
        if entry is None:
            return None
        if entry[0] <= self.clock():
            del self._addresses[endpoint_id]
            return None
        return entry[1]

    async def put_address(self, endpoint_id: str, value: CachedAddress, ttl: float) -> None:
        self.keep(endpoint_id, value, ttl)
        self.announce(endpoint_id)

    def keep(self, endpoint_id: str, value: CachedAddress, ttl: float) -> None:
        now = self.clock()
        self._addresses[endpoint_id] = (now + ttl, value)
        self._last_known[endpoint_id] = (now, value)

    async def invalidate(self, endpoint_id: str) -> None:
        self.forget(endpoint_id)

    def stale_address(self, endpoint_id: str, max_age: float) -> CachedAddress | None:
        entry = self._last_known.get(endpoint_id)
        if entry is None:
            return None
        if self.clock() - entry[0] > max_age:
            del self._last_known[endpoint_id]
            return None
        return entry[1]

    def forget_older(self, endpoint_id: str, age: float) -> None:
        """Drop the endpoint's address if it was stored more than `age` seconds ago (a
        late invalidation must not drop an address cached after it)."""
        entry = self._last_known.get(endpoint_id)
        if entry is not None and self.clock() - entry[0] >= age:
            self.forget(endpoint_id)

    def forget(self, endpoint_id: str | None) -> None:
        """Drop a cached address (all of them for None), stale copies included."""
        if endpoint_id is None:
            self._addresses.clear()
            self._last_known.clear()
        else:
            self._addresses.pop(endpoint_id, None)
            self._last_known.pop(endpoint_id, None)
            for listener in self.on_forget:
                listener(endpoint_id)

    # The wake lock: one wake per endpoint; others wait to be told it is done.

    async def try_lock(self, endpoint_id: str, token: str, expiry: float) -> bool:
        now = self.clock()
        held = self._locks.get(endpoint_id)
        if held is not None and held[0] > now and held[1] != token:
            return False
        self._locks[endpoint_id] = (now + expiry, token)
        return True

    async def unlock(self, endpoint_id: str, token: str) -> None:
        held = self._locks.get(endpoint_id)
        if held is not None and held[1] == token:
            del self._locks[endpoint_id]
        self.announce(endpoint_id)

    def waiter(self, endpoint_id: str) -> asyncio.Event:
        event = self._woken.get(endpoint_id)
        if event is None:
            event = self._woken[endpoint_id] = asyncio.Event()
        return event

    async def wait_woken(self, endpoint_id: str, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self.waiter(endpoint_id).wait()

    def announce(self, endpoint_id: str | None) -> None:
        """Wake everyone waiting on this endpoint's wake (all endpoints for None)."""
        if endpoint_id is None:
            events = list(self._woken.values())
            self._woken.clear()
        else:
            event = self._woken.pop(endpoint_id, None)
            events = [event] if event is not None else []
        for event in events:
            event.set()

    # Token buckets: 0.0 means a token was taken, else seconds until one is due.

    async def take_token(self, bucket: str, rate: float, burst: float) -> float:
        now = self.clock()
        tokens, last = self._buckets.get(bucket, (burst, now))
        tokens = min(burst, tokens + (now - last) * rate)
        if tokens >= 1.0:
            self._buckets[bucket] = (tokens - 1.0, now)
            return 0.0
        self._buckets[bucket] = (tokens, now)
        return (1.0 - tokens) / rate

    # Cancel keys: `key` names a (PID, secret) pair; False when it is taken already.

    async def put_cancel(self, key: str, target: SharedCancel, ttl: float) -> bool:
        now = self.clock()
        entry = self._cancels.get(key)
        if entry is not None and entry[0] > now:
            return False
        self._cancels[key] = (now + ttl, target)
        return True

    async def get_cancel(self, key: str) -> SharedCancel | None:
        entry = self._cancels.get(key)
        if entry is None or entry[0] <= self.clock():
            return None
        return entry[1]

    async def drop_cancel(self, key: str) -> None:
        self._cancels.pop(key, None)

    # Session slots: in one process the guards' own count is the whole budget.

    async def take_slots(self, endpoint_id: str, leases: list[str], budget: int,
                         ttl: float) -> int | None:
        return None

    async def drop_slots(self, endpoint_id: str, leases: list[str]) -> None:
        self.announce_slot(endpoint_id)

    async def renew_slots(self, endpoint_id: str, leases: list[str], ttl: float) -> None:
        return None

    def slot_waiter(self, endpoint_id: str) -> asyncio.Event:
        event = self._slot_freed.get(endpoint_id)
        if event is None:
            event = self._slot_freed[endpoint_id] = asyncio.Event()
        return event

    def announce_slot(self, endpoint_id: str | None) -> None:
        """A session slot came free (any endpoint's for None): queued sessions try again."""
        if endpoint_id is None:
            events = list(self._slot_freed.values())
            self._slot_freed.clear()
        else:
            event = self._slot_freed.pop(endpoint_id, None)
            events = [event] if event is not None else []
        for event in events:
            event.set()




class RedisShared:
    """Redis-backed shared state, with a local fallback and a local L1 address cache."""

    def __init__(self, url: str, *, clock: Callable[[], float] = time.monotonic):
        import redis.asyncio as aioredis

        self.url = url
        self.clock = clock
        self.local = LocalShared(clock)
        self.errors = 0
        self.degraded = False
        self._retry_at = 0.0
        # Bounded pools that queue callers (briefly) instead of failing them: one
        # for the wake path (addresses, locks, buckets, session slots), a small one
        # for cancel keys, so that cancels can never starve a wake of connections.
        # Named, so `CLIENT LIST` shows which pool a connection belongs to.
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=WAKE_POOL_SIZE, timeout=0.5, socket_connect_timeout=0.5,
            socket_timeout=0.5, client_name="pgwake-proxy",
        )
        cancel_pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=CANCEL_POOL_SIZE, timeout=0.25, socket_connect_timeout=0.5,
            socket_timeout=0.5, client_name="pgwake-proxy-cancel",
        )
        self._pool: Any = pool
        self._cancel_pool: Any = cancel_pool
        self._redis: Any = aioredis.Redis(connection_pool=pool)
        self._cancel_redis: Any = aioredis.Redis(connection_pool=cancel_pool)
        self.cancel_drops = 0  # cancel-key calls that failed (busy pool, slow or no Redis)
        self._listener: asyncio.Task[None] | None = None
        self.subscribed = asyncio.Event()

    # -- plumbing ----------------------------------------------------------------------

    def _usable(self) -> bool:
        return not self.degraded or self.clock() >= self._retry_at

    def _failed(self, what: str, exc: BaseException) -> None:
        self.errors += 1
        self._retry_at = self.clock() + REDIS_RETRY_AFTER
        if not self.degraded:
            log.warning("redis unavailable (%s: %r); per-replica state until it returns",
                        what, exc)
        self.degraded = True

    def _ok(self) -> None:
        if self.degraded:
            log.warning("redis is back; sharing proxy state again")
            # Invalidations may have been missed while away: trust nothing cached.
            self.local.forget(None)
        self.degraded = False

    async def _call(
        self, what: str, fn: Callable[[], Any], *, degrades: bool = True
    ) -> tuple[bool, Any]:
        if not self._usable():
            return False, None
        try:
            result = await fn()
        except (OSError, TimeoutError, _redis_errors()) as exc:
            if not degrades:
                # A cancel-key call: dropped and counted. Whether Redis is really gone
                # is for the wake path's own calls to find out, so a flood that makes
                # cancel calls slow or busy never sends the wake path to local state.
                self.cancel_drops += 1
                return False, None
            self._failed(what, exc)
            return False, None
        self._ok()
        return True, result

    async def start(self) -> None:
        self._listener = asyncio.create_task(self._listen(), name="redis-invalidations")

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        await self.local.close()
        with contextlib.suppress(Exception):
            await self._redis.aclose()
        with contextlib.suppress(Exception):
            await self._cancel_redis.aclose()
        for pool in (self._pool, self._cancel_pool):
            with contextlib.suppress(Exception):
                await pool.disconnect()

    async def _listen(self) -> None:
        """Follow the invalidation channel; resubscribe with backoff when Redis goes away."""
        delay = 0.1
        while True:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(INVALIDATION_CHANNEL)
                self.subscribed.set()
                delay = 0.1
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True,
                                                       timeout=30.0)
                    if message is not None and message.get("type") == "message":
                        self._on_event(message["data"])
            except asyncio.CancelledError:
                raise
            except (OSError, TimeoutError, _redis_errors()) as exc:
                self.subscribed.clear()
                self._failed("subscribe", exc)
                self.local.forget(None)
                self.local.announce(None)  # waiters re-check rather than wait for a lost event
                self.local.announce_slot(None)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 2.0)

    def _on_event(self, data: bytes) -> None:
        kind, _, endpoint_id = data.decode(errors="replace").partition(":")
        if kind == "slot":
            self.local.announce_slot(endpoint_id)
            return
        if kind == "invalidate":
            self.local.forget(endpoint_id)
        self.local.announce(endpoint_id)

    # -- the interface -----------------------------------------------------------------

    async def get_address(self, endpoint_id: str) -> CachedAddress | None:
        hit = await self.local.get_address(endpoint_id)
        if hit is not None:
            return hit
        key = KEY_PREFIX + "addr:" + endpoint_id
        ok, raw = await self._call("get", lambda: self._redis.get(key))
        if not ok or raw is None:
            return None
        try:
            data = json.loads(raw)
            budget = data.get("budget")
            value = CachedAddress(ComputeAddress.parse(data["address"]), int(data["generation"]),
                                  None if budget is None else int(budget))
            ttl_left = float(data["expires"]) - time.time()
        except (ValueError, KeyError, TypeError):
            return None
        if ttl_left > 0:
            self.local.keep(endpoint_id, value, ttl_left)
        return value

    async def put_address(self, endpoint_id: str, value: CachedAddress, ttl: float) -> None:
        await self.local.put_address(endpoint_id, value, ttl)
        body = json.dumps({"address": str(value.address), "generation": value.generation,
                           "budget": value.budget, "expires": time.time() + ttl})
        await self._call("set", lambda: self._redis.set(
            KEY_PREFIX + "addr:" + endpoint_id, body, px=max(1, int(ttl * 1000))))
        await self._call("publish", lambda: self._redis.publish(
            INVALIDATION_CHANNEL, f"woken:{endpoint_id}"))

    async def invalidate(self, endpoint_id: str) -> None:
        self.local.forget(endpoint_id)

        async def both() -> None:
            await self._redis.delete(KEY_PREFIX + "addr:" + endpoint_id)
            await self._redis.publish(INVALIDATION_CHANNEL, f"invalidate:{endpoint_id}")

        await self._call("invalidate", both)

    async def try_lock(self, endpoint_id: str, token: str, expiry: float) -> bool:
        ok, taken = await self._call("lock", lambda: self._redis.set(
            KEY_PREFIX + "wakelock:" + endpoint_id, token, nx=True, px=max(1, int(expiry * 1000))))
        if not ok:
            return await self.local.try_lock(endpoint_id, token, expiry)
        return bool(taken)

    async def unlock(self, endpoint_id: str, token: str) -> None:
        await self.local.unlock(endpoint_id, token)

        async def release() -> None:
            await self._redis.eval(scripts.UNLOCK, 1, KEY_PREFIX + "wakelock:" + endpoint_id, token)
            # Waiters elsewhere re-check: the address is cached, or the wake failed.
            await self._redis.publish(INVALIDATION_CHANNEL, f"unlocked:{endpoint_id}")

        await self._call("unlock", release)

    def stale_address(self, endpoint_id: str, max_age: float) -> CachedAddress | None:
        return self.local.stale_address(endpoint_id, max_age)

    def waiter(self, endpoint_id: str) -> asyncio.Event:
        return self.local.waiter(endpoint_id)

    async def wait_woken(self, endpoint_id: str, timeout: float) -> None:
        await self.local.wait_woken(endpoint_id, timeout)

    async def take_token(self, bucket: str, rate: float, burst: float) -> float:
        now_ms = int(time.time() * 1000)
        ok, wait_ms = await self._call("bucket", lambda: self._redis.eval(
            scripts.TAKE_TOKEN, 1, KEY_PREFIX + "bucket:" + bucket, now_ms, rate, burst))
        if not ok:
            return await self.local.take_token(bucket, rate, burst)
        return float(wait_ms) / 1000.0

    # Cancel keys go through their own small pool (`_cancel_redis`): a flood of
    # CancelRequests can fill that pool, never the one the wake path uses, and a
    # cancel that finds it busy is dropped without marking Redis unavailable.

    async def put_cancel(self, key: str, target: SharedCancel, ttl: float) -> bool:
        if not await self.local.put_cancel(key, target, ttl):
            return False
        body = json.dumps({"address": str(target.address), "pid": target.pid,
                           "secret": target.secret.hex()})
        ok, stored = await self._call("cancel-set", lambda: self._cancel_redis.set(
            f"{KEY_PREFIX}cancel:{key}", body, px=max(1, int(ttl * 1000)), nx=True),
            degrades=False)
        if ok and not stored:
            await self.local.drop_cancel(key)  # another replica holds this pair
            return False
        return True

    async def get_cancel(self, key: str) -> SharedCancel | None:
        hit = await self.local.get_cancel(key)
        if hit is not None:
            return hit
        name = f"{KEY_PREFIX}cancel:{key}"
        ok, raw = await self._call("cancel-get", lambda: self._cancel_redis.get(name),
                                   degrades=False)
        if not ok or raw is None:
            return None
        try:
            data = json.loads(raw)
            return SharedCancel(ComputeAddress.parse(data["address"]), int(data["pid"]),
                                bytes.fromhex(data["secret"]))
        except (ValueError, KeyError, TypeError):
            return None

    async def drop_cancel(self, key: str) -> None:
        await self.local.drop_cancel(key)
        await self._call("cancel-del",
                         lambda: self._cancel_redis.delete(f"{KEY_PREFIX}cancel:{key}"),
                         degrades=False)


    # Session slots.

    @staticmethod
    def _slots_key(endpoint_id: str) -> str:
        return KEY_PREFIX + "slots:" + endpoint_id

    async def take_slots(self, endpoint_id: str, leases: list[str], budget: int,
                         ttl: float) -> int | None:
        ok, taken = await self._call("slot", lambda: self._redis.eval(
            scripts.TAKE_SLOTS, 1, self._slots_key(endpoint_id), budget, max(1, int(ttl * 1000)),
            *leases))
        return int(taken) if ok else None

    async def drop_slots(self, endpoint_id: str, leases: list[str]) -> None:
        self.local.announce_slot(endpoint_id)
        await self._call("slot-drop", lambda: self._redis.eval(
            scripts.DROP_SLOTS, 1, self._slots_key(endpoint_id), INVALIDATION_CHANNEL,
            f"slot:{endpoint_id}", *leases))

    async def renew_slots(self, endpoint_id: str, leases: list[str], ttl: float) -> None:
        if leases:
            await self._call("slot-renew", lambda: self._redis.eval(
                scripts.RENEW_SLOTS, 1, self._slots_key(endpoint_id), max(1, int(ttl * 1000)),
                *leases))

    def slot_waiter(self, endpoint_id: str) -> asyncio.Event:
        return self.local.slot_waiter(endpoint_id)

    def announce_slot(self, endpoint_id: str | None) -> None:
        self.local.announce_slot(endpoint_id)


def _redis_errors() -> type[Exception]:
    import redis.exceptions

    return redis.exceptions.RedisError


def open_shared(redis_url: str | None) -> SharedState:
    return RedisShared(redis_url) if redis_url else LocalShared()
