"""Cancel keys: clients get proxy keys; a CancelRequest is forwarded to the right compute."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
from dataclasses import dataclass

from proxy.pgwire import messages
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


class CancelMap:
    """Proxy key → compute key. In-process; shared through Redis in multi-replica setups."""

    def __init__(self) -> None:
        self._targets: dict[int, tuple[bytes, CancelTarget]] = {}

    def __len__(self) -> int:
        return len(self._targets)

    def issue(self, target: CancelTarget, *, long_secret: bool) -> ProxyKey:
        """A fresh key for a session. Protocol 3.2 clients accept 32-byte secrets."""
        while True:
            pid = secrets.randbelow(2**31 - 1) + 1
            if pid not in self._targets:
                break
        secret = secrets.token_bytes(32 if long_secret else 4)
        self._targets[pid] = (secret, target)
        return ProxyKey(pid, secret)

    def release(self, key: ProxyKey) -> None:
        self._targets.pop(key.pid, None)

    def lookup(self, pid: int, secret: bytes) -> CancelTarget | None:
        entry = self._targets.get(pid)
        if entry is None or not hmac.compare_digest(entry[0], secret):
            return None
        return entry[1]


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
