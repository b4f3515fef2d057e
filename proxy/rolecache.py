"""The proxy's cache of role verifiers: bounded, keyed by validated names only, stale-tolerant.

Bounded three ways: a key is an endpoint id and a role name that both passed
the control API's own rules (at most 63 characters each, never raw client
input), the table holds at most `max_entries` (least recently used go first),
and an entry is answered from for `ttl` seconds (stale after that).

Positive and negative answers are treated alike on purpose. A shorter life
for "no such role" would let a stranger tell real roles from unknown ones by
timing (a hit answers faster than a fetch): wait past the short TTL, ask
again, and only the unknown name pays for a fetch. Instead every entry used
after `refresh_after` seconds is re-checked in the background, so a new role
or a new password is seen within seconds of traffic, and a negative answer
is small (one shared object; the key is its only cost).

While the control plane is unreachable, an expired entry is served for up to
`max_stale` seconds more (counted as "stale"), and the control plane is
re-asked at most every `outage_retry` seconds so that a hanging API does not
hold every connect for its timeout. The first answer after it is back
replaces the stale one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from proxy.errors import ClientError, Kind, control_plane_unavailable
from proxy.scram import ScramSecret, parse_verifier
from wakeup.api import ControlAPIError, ControlClient, valid_endpoint_id, valid_role_name

log = logging.getLogger(__name__)

ROLE_NOT_FOUND = "role_not_found"
ENDPOINT_NOT_FOUND = "endpoint_not_found"

Key = tuple[str, str]  # (endpoint id, role name), both validated


@dataclass(frozen=True)
class RoleSecret:
    secret: ScramSecret | None  # None: no such role (answered with a mock exchange)


# Every negative answer is this one object: an unknown name costs its key, nothing more.
UNKNOWN_ROLE = RoleSecret(None)


class _Entry:
    __slots__ = ("answer", "expired", "fetched")

    def __init__(self, answer: RoleSecret, fetched: float) -> None:
        self.answer = answer
        self.fetched = fetched
        self.expired = False  # set by invalidate(): fetch afresh, but keep it for an outage


class _Unavailable(Exception):
    """The control plane did not answer (down, timeout, 5xx)."""


class RoleCache:
    """Verifiers fetched from the control API; one fetch per key at a time."""

    def __init__(
        self,
        control: ControlClient,
        ttl: float,
        *,
        refresh_after: float = 5.0,
        max_entries: int = 10_000,
        max_stale: float = 600.0,
        outage_retry: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        count: Callable[[str], None] = lambda outcome: None,
    ):
        self.control = control
        self.ttl = ttl
        self.refresh_after = min(refresh_after, ttl)
        self.max_entries = max_entries
        self.max_stale = max_stale
        self.outage_retry = outage_retry
        self.clock = clock
        self.count = count  # outcome of each lookup: hit | miss | stale
        self._entries: OrderedDict[Key, _Entry] = OrderedDict()
        self._inflight: dict[Key, asyncio.Task[RoleSecret]] = {}
        self._down_until = float("-inf")
        self.stale_served = 0

    def __len__(self) -> int:
        return len(self._entries)

    def invalidate(self, endpoint_id: str, role: str) -> None:
        """Fetch afresh next time (a failed login: the password may have just changed).
        The old answer stays, to be served should the control plane be unreachable."""
        entry = self._entries.get((endpoint_id, role))
        if entry is not None:
            entry.expired = True

    def put(self, endpoint_id: str, role: str, verifier: str) -> None:
        """A verifier the control plane pushed (a new endpoint): no fetch on first connect."""
        if not (valid_endpoint_id(endpoint_id) and valid_role_name(role)):
            return
        try:
            secret = parse_verifier(verifier)
        except ValueError:
            return
        self._store((endpoint_id, role), RoleSecret(secret))

    async def get(self, endpoint_id: str, role: str, *, timeout: float) -> RoleSecret:
        if not (valid_endpoint_id(endpoint_id) and valid_role_name(role)):
            # The front door refuses these first; a name that cannot exist is never a key.
            return UNKNOWN_ROLE
        key = (endpoint_id, role)
        now = self.clock()
        entry = self._entries.get(key)
        if entry is not None and not entry.expired and now - entry.fetched < self.ttl:
            self._entries.move_to_end(key)
            if now - entry.fetched >= self.refresh_after:
                self._fetch_task(key, timeout)  # re-check in the background, alike for all
            self.count("hit")
            return entry.answer
        if now < self._down_until:
            stale = self._stale(key, now)
            if stale is not None:
                return stale
        try:
            # Shielded: one client giving up must not cancel the fetch others wait on.
            answer = await asyncio.shield(self._fetch_task(key, timeout))
        except _Unavailable:
            stale = self._stale(key, self.clock())
            if stale is not None:
                return stale
            raise control_plane_unavailable(endpoint_id) from None
        self.count("miss")
        return answer

    def _stale(self, key: Key, now: float) -> RoleSecret | None:
        entry = self._entries.get(key)
        if entry is None or now - entry.fetched >= self.ttl + self.max_stale:
            return None
        self._entries.move_to_end(key)
        self.stale_served += 1
        self.count("stale")
        return entry.answer

    def _fetch_task(self, key: Key, timeout: float) -> asyncio.Task[RoleSecret]:
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(self._fetch(key, timeout), name=f"role-fetch:{key[0]}")
            self._inflight[key] = task
            task.add_done_callback(lambda t: self._fetched(key, t))
        return task

    def _fetched(self, key: Key, task: asyncio.Task[RoleSecret]) -> None:
        self._inflight.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved: a background refresh may have no waiter

    async def _fetch(self, key: Key, timeout: float) -> RoleSecret:
        endpoint_id, role = key
        try:
            answer = await self.control.get_role(endpoint_id, role, timeout=timeout)
        except ControlAPIError as exc:
            if exc.code == ROLE_NOT_FOUND:
                return self._store(key, UNKNOWN_ROLE)
            if exc.code == ENDPOINT_NOT_FOUND:
                self._entries.pop(key, None)
                raise ClientError(
                    Kind.UNKNOWN_ENDPOINT, f'endpoint "{endpoint_id}" does not exist'
                ) from None
            if exc.unavailable:
                log.warning("role lookup for %s: control plane unavailable: %s", endpoint_id, exc)
                self._down_until = self.clock() + self.outage_retry
                raise _Unavailable from exc
            log.error("unexpected control API answer for a role of %s: %s", endpoint_id, exc)
            raise ClientError(
                Kind.INTERNAL, f'could not look up a role of endpoint "{endpoint_id}"'
            ) from None
        try:
            return self._store(key, RoleSecret(parse_verifier(answer.verifier)))
        except ValueError:
            # Not a SCRAM verifier (e.g. md5): we cannot authenticate this role.
            return self._store(key, UNKNOWN_ROLE)

    def _store(self, key: Key, answer: RoleSecret) -> RoleSecret:
        self._down_until = float("-inf")  # it answered: the outage, if any, is over
        self._entries[key] = _Entry(answer, self.clock())
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return answer

    async def close(self) -> None:
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
