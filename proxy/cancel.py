"""Cancel keys: clients get proxy keys; a CancelRequest is forwarded to the right compute."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
from dataclasses import dataclass

from proxy.pgwire import messages
from proxy.shared import SharedCancel, SharedState
from wakeup.api import ComputeAddress

log = logging.getLogger(__name__)

CANCEL_CONNECT_TIMEOUT = 5.0


@dataclass(frozen=True)
class CancelTarget:
    address: ComputeAddress
    pid: int
    secret: bytes


@dataclass(frozen=True)
class ProxyKey:
    pid: int
    secret: bytes


# A session's key lives in shared state this long at most (released at its end).
CANCEL_KEY_TTL = 7 * 24 * 3600.0


class CancelMap:
    """Proxy key → compute key: this replica's sessions in memory, and every
    replica's in the shared state, so a CancelRequest may reach any proxy."""

    def __init__(self, shared: SharedState | None = None) -> None:
        self._targets: dict[int, tuple[bytes, CancelTarget]] = {}
        self._shared = shared

    def __len__(self) -> int:
        return len(self._targets)

    async def issue(self, target: CancelTarget, *, long_secret: bool) -> ProxyKey:
        """A fresh key for a session. Protocol 3.2 clients accept 32-byte secrets."""
        while True:
            pid = secrets.randbelow(2**31 - 1) + 1
            if pid not in self._targets:
                break
        secret = secrets.token_bytes(32 if long_secret else 4)
        self._targets[pid] = (secret, target)
        if self._shared is not None:
            await self._shared.put_cancel(
                pid, SharedCancel(target.address, target.pid, target.secret, secret),
                CANCEL_KEY_TTL,
            )
        return ProxyKey(pid, secret)

    async def retarget(self, key: ProxyKey, target: CancelTarget) -> None:
        """The session behind `key` moved to another backend (a re-attach): the
        key the client holds now cancels there."""
        self._targets[key.pid] = (key.secret, target)
        if self._shared is not None:
            await self._shared.put_cancel(
                key.pid, SharedCancel(target.address, target.pid, target.secret, key.secret),
                CANCEL_KEY_TTL,
            )

    async def release(self, key: ProxyKey) -> None:
        self._targets.pop(key.pid, None)
        if self._shared is not None:
            await self._shared.drop_cancel(key.pid)

    async def lookup(self, pid: int, secret: bytes) -> CancelTarget | None:
        entry = self._targets.get(pid)
        if entry is not None:
            return entry[1] if hmac.compare_digest(entry[0], secret) else None
        if self._shared is None:
            return None
        remote = await self._shared.get_cancel(pid)
        if remote is None or not hmac.compare_digest(remote.proxy_secret, secret):
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
