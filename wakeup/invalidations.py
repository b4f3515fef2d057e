"""Tells proxies over Redis about addresses: invalid (suspend, delete), or ready (create)."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from typing import Any

from wakeup.api import INVALIDATION_CHANNEL

# How long a pushed address stays in the shared cache (the proxies' default TTL).
ANNOUNCED_ADDRESS_TTL = 60.0

log = logging.getLogger(__name__)


class RedisInvalidations:
    """Drops the shared cached address and tells every proxy to drop its own copy."""

    def __init__(self, url: str):
        import redis.asyncio as aioredis

        self._redis: Any = aioredis.from_url(
            url, socket_connect_timeout=0.5, socket_timeout=0.5
        )
        self.published = 0

    async def __call__(self, endpoint_id: str) -> None:
        # Same key layout as proxy/shared.py (the proxy owns it; this is its one writer here).
        await self._redis.delete(f"pgwake:addr:{endpoint_id}")
        await self._redis.publish(INVALIDATION_CHANNEL, f"invalidate:{endpoint_id}")
        self.published += 1

    async def announce(
        self, endpoint_id: str, address: str, generation: int, budget: int | None = None
    ) -> None:
        """A new endpoint's address (and its compute's connection budget), in the shared
        cache before any proxy asks for it."""
        body = json.dumps({"address": address, "generation": generation, "budget": budget,
                           "expires": time.time() + ANNOUNCED_ADDRESS_TTL})
        await self._redis.set(f"pgwake:addr:{endpoint_id}", body,
                              px=int(ANNOUNCED_ADDRESS_TTL * 1000))
        await self._redis.publish(INVALIDATION_CHANNEL, f"woken:{endpoint_id}")

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._redis.aclose()
