"""The proxy server: listener, live-session registry, drain on shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket

from proxy.auth import RoleCache
from proxy.cancel import CancelMap
from proxy.session import ProxyState, Session, mock_key_from
from proxy.settings import ProxySettings
from proxy.wake import AddressCache, WakeClient
from tls.context import ServerTLS
from wakeup.api import ControlClient

log = logging.getLogger(__name__)


class ProxyServer:
    """Accepts connections and runs a Session per connection until drained."""

    def __init__(
        self,
        settings: ProxySettings,
        *,
        control: ControlClient,
        server_tls: ServerTLS | None,
    ):
        self.settings = settings
        self.control = control
        self.state = ProxyState(
            settings=settings,
            server_tls=server_tls,
            wake=WakeClient(control, AddressCache(settings.address_cache_ttl)),
            roles=RoleCache(control, settings.role_cache_ttl),
            cancels=CancelMap(),
            mock_key=mock_key_from(os.urandom(32)),
        )
        self._listener: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self.listening = asyncio.Event()

    @property
    def port(self) -> int:
        assert self._listener is not None
        port: int = self._listener.getsockname()[1]
        return port

    async def start(self, sock: socket.socket | None = None) -> None:
        """Listen on `sock` (already bound) or bind the configured address."""
        s = self.settings
        if sock is None:
            family = socket.AF_INET6 if ":" in s.listen_host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((s.listen_host, s.listen_port))
            sock.listen(s.backlog)
        sock.setblocking(False)
        self._listener = sock
        self._accept_task = asyncio.create_task(self._accept_loop(sock), name="proxy-accept")
        self.listening.set()
        log.info("proxy listening on %s:%d", s.listen_host, self.port)

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, addr = await loop.sock_accept(listener)
            except OSError as exc:
                # EMFILE and friends: keep serving the connections we have.
                log.warning("accept failed: %s", exc)
                await asyncio.sleep(0.05)
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer = f"{addr[0]}:{addr[1]}"
            task = asyncio.create_task(Session(self.state, sock, peer).run())
            self.state.sessions.add(task)
            task.add_done_callback(self.state.sessions.discard)

    async def stop_accepting(self) -> None:
        self.listening.clear()
        if self._accept_task is not None:
            self._accept_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accept_task
            self._accept_task = None
        if self._listener is not None:
            self._listener.close()

    async def drain(self, timeout: float | None = None) -> None:
        """Stop accepting; give live sessions `timeout` to end, then cut them."""
        await self.stop_accepting()
        timeout = self.settings.drain_timeout if timeout is None else timeout
        sessions = set(self.state.sessions)
        if sessions:
            log.info("draining %d sessions (up to %.0f s)", len(sessions), timeout)
            _, pending = await asyncio.wait(sessions, timeout=timeout)
            for splice in list(self.state.splices):
                splice.abort()
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self.state.wake.close()
