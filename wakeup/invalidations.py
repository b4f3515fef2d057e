"""Publishes address invalidations to proxies over Redis pub/sub (suspend, delete)."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from wakeup.api import INVALIDATION_CHANNEL

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

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._redis.aclose()
