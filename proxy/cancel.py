"""Cancel keys: clients get the compute's real PID with a proxy-made secret; a
CancelRequest is forwarded to the compute whose (PID, secret) pair it names.

The PID is passed through because applications compare it with
`pg_backend_pid()`, `pg_stat_activity.pid` and NotificationResponse PIDs. Only
the secret is the proxy's own, so a client never learns the compute's secret,
and the lookup is keyed on PID and secret together: equal PIDs on different
computes are different keys. CancelRequests are paced per source address before
any lookup reaches shared state, so a flood of made-up keys costs this replica a
dict lookup each and Redis nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from time import monotonic

from proxy.pgwire import messages
from proxy.ratelimit import BucketSpec, TokenBuckets
from proxy.shared import SharedCancel, SharedState
from wakeup.api import ComputeAddress

log = logging.getLogger(__name__)

CANCEL_CONNECT_TIMEOUT = 5.0
# A session's key lives in shared state this long at most (released at its end).
CANCEL_KEY_TTL = 7 * 24 * 3600.0
# CancelRequests per source address: a client cancels a handful of queries a
# second at most; PostgreSQL answers nothing either way, so a dropped one is
# indistinguishable from a key that matched no running query.
CANCEL_RATE = 20.0
CANCEL_BURST = 40.0
# Lookups in shared state in flight at once, all sources together: one flood from
# many addresses cannot take more than this of the Redis pool set aside for cancels.
# Half the cancel pool: the other half stays free for sessions writing their keys.
CANCEL_LOOKUPS_IN_FLIGHT = 4
CANCEL_LOOKUP_WAIT = 0.25


@dataclass(frozen=True)
class CancelTarget:
    address: ComputeAddress
    pid: int
    secret: bytes


@dataclass(frozen=True)
class ProxyKey:
    pid: int
    secret: bytes


def key_id(pid: int, secret: bytes) -> str:
    """The lookup key for a (PID, secret) pair: fixed length whatever the secret's
    length (protocol 3.2 secrets are up to 256 bytes), and no secret in the clear."""
    # PIDs are unsigned 32-bit on the wire; a client may send any of them.
    return hashlib.sha256((pid & 0xFFFFFFFF).to_bytes(4, "big") + secret).hexdigest()[:40]


class CancelMap:
    """(PID, proxy secret) → compute key: this replica's sessions in memory, and every
    replica's in the shared state, so a CancelRequest may reach any proxy."""

    def __init__(
        self,
        shared: SharedState | None = None,
        *,
        rate: float = CANCEL_RATE,
        burst: float = CANCEL_BURST,
        clock: Callable[[], float] = monotonic,
    ) -> None:
        self._targets: dict[str, CancelTarget] = {}
        self._shared = shared
        self._per_source = TokenBuckets(BucketSpec(rate, burst), max_keys=50_000, clock=clock)
        self._lookups = asyncio.Semaphore(CANCEL_LOOKUPS_IN_FLIGHT)
        self.rate_limited = 0  # CancelRequests dropped before any lookup (a metric)

    def __len__(self) -> int:
        return len(self._targets)

    async def issue(self, target: CancelTarget, *, long_secret: bool) -> ProxyKey:
        """The key a session's client is told: the compute's PID and a fresh secret.
        Protocol 3.2 clients accept 32-byte secrets; 3.0 ones get 4 bytes, as from
        PostgreSQL. A secret is drawn again in the rare case its pair is taken."""
        while True:
            secret = secrets.token_bytes(32 if long_secret else 4)
            ident = key_id(target.pid, secret)
            if ident in self._targets:
                continue
            if self._shared is None or await self._shared.put_cancel(
                ident, SharedCancel(target.address, target.pid, target.secret), CANCEL_KEY_TTL
            ):
                break
        self._targets[ident] = target
        return ProxyKey(target.pid, secret)

    async def retarget(self, key: ProxyKey, target: CancelTarget) -> None:
        """The session behind `key` moved to another backend (a re-attach): the
        key the client holds now cancels there."""
        ident = key_id(key.pid, key.secret)
        self._targets[ident] = target
        if self._shared is not None:
            # put_cancel never overwrites (a pair is one session's): replace it.
            await self._shared.drop_cancel(ident)
            await self._shared.put_cancel(
                ident, SharedCancel(target.address, target.pid, target.secret), CANCEL_KEY_TTL
            )

    async def release(self, key: ProxyKey) -> None:
        ident = key_id(key.pid, key.secret)
        self._targets.pop(ident, None)
        if self._shared is not None:
            await self._shared.drop_cancel(ident)

    def admit(self, source: str) -> bool:
        """Whether a CancelRequest from this address may be looked up now."""
        if self._per_source.take(source) > 0:
            self.rate_limited += 1
            return False
        return True

    async def lookup(self, pid: int, secret: bytes) -> CancelTarget | None:
        ident = key_id(pid, secret)
        target = self._targets.get(ident)
        if target is not None or self._shared is None:
            return target
        try:
            async with asyncio.timeout(CANCEL_LOOKUP_WAIT):
                await self._lookups.acquire()
        except TimeoutError:
            self.rate_limited += 1
            return None  # a flood from many addresses: shed it rather than queue it
        try:
            remote = await self._shared.get_cancel(ident)
        finally:
            self._lookups.release()
        if remote is None:
            return None
        return CancelTarget(remote.address, remote.pid, remote.secret)


async def send_cancel(target: CancelTarget) -> None:
    """Open a connection to the compute, send its own CancelRequest, wait for it to close."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(CANCEL_CONNECT_TIMEOUT):
            reader, writer = await asyncio.open_connection(target.address.host, target.address.port)
            writer.write(messages.cancel_request(target.pid, target.secret))
            await writer.drain()
            await reader.read()  # the server closes without answering
    except (OSError, TimeoutError) as exc:
        log.warning("forwarding a cancel request to %s failed: %s", target.address, exc)
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
