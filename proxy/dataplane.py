"""The data plane: what moves a client's bytes, and the native engine's event pump.

Two data paths carry a session. The Python path is uvloop transports and
proxy/splice.py. The native path is the C engine in proxy/_native/ (the
extension `proxy._dataplane`): it owns the client's socket and its TLS from the
handshake on, gives Python a plaintext stream for the startup and auth phase
(proxy/nativetransport.py), and after login moves bytes between client and
compute on its own threads (proxy/nativesplice.py). Python hears of session
events only (handshake done, bytes for the auth phase, yielded, closed), read
here from one eventfd and handed to the connection they concern.

`--data-plane auto` takes the native path when the extension was built and the
Python path otherwise (with one log line saying why); `native` insists.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol

from tls.context import ServerTLS
from tls.sni import CertificateSelector

log = logging.getLogger(__name__)

DATA_PLANES = ("auto", "native", "python")


class DataPlaneUnavailable(RuntimeError):
    """`--data-plane native` was asked for and the extension cannot be loaded."""


class ConnHandler(Protocol):
    """Whoever owns a native connection's events (its NativeTransport)."""

    def on_event(self, kind: int, payload: Any) -> None: ...


def load_extension() -> tuple[ModuleType | None, str]:
    """The native extension, or None and why not."""
    try:
        return importlib.import_module("proxy._dataplane"), "native"
    except ImportError as exc:
        return None, f"the native extension is not built ({exc})"


@dataclass(frozen=True)
class Choice:
    """Which data path a proxy uses, and the words for the banner and logs."""

    name: str  # "native" | "python"
    detail: str


def choose(requested: str, threads: int) -> tuple[Choice, ModuleType | None]:
    if requested not in DATA_PLANES:
        raise ValueError(f"--data-plane must be one of {', '.join(DATA_PLANES)}")
    if requested == "python":
        return Choice("python", "Python (uvloop) splice, as asked"), None
    module, why = load_extension()
    if module is None:
        if requested == "native":
            raise DataPlaneUnavailable(
                f"--data-plane native: {why}; install libssl-dev and a C compiler, "
                "then reinstall pgwake (./dev does both)"
            )
        log.warning("data plane: Python (uvloop) splice: %s", why)
        return Choice("python", f"Python (uvloop) splice: {why}"), None
    return Choice("native", f"native (C, OpenSSL, {threads} thread(s))"), module


class NativePlane:
    """One engine per proxy: its event pump, its connections' handlers, its
    certificates (kept in step with the ServerTLS the Python path would use)."""

    def __init__(self, module: ModuleType, threads: int, server_tls: ServerTLS | None):
        self.module = module
        self.engine = module.Engine(threads)
        self.server_tls = server_tls
        self._handlers: dict[int, ConnHandler] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        # The certificates of the table the engine has now: a handshake's cert index
        # is read against the table it was made with (a reload swaps both at once).
        self.certificates: tuple[Any, ...] = ()
        if server_tls is not None:
            self.load_certificates()
            server_tls.on_replace.append(self.load_certificates)

    # constants of the extension, by name, so that Python code reads like the spec
    def __getattr__(self, name: str) -> Any:
        if name.isupper():
            return getattr(self.module, name)
        raise AttributeError(name)

    def load_certificates(self) -> None:
        """Give the engine the certificate files and the SNI tables, built by the same
        rules as the Python path's selector (tls/sni.py)."""
        assert self.server_tls is not None
        certificates = self.server_tls.certificates
        selector = CertificateSelector(
            ((entry.cert.dns_names, index) for index, entry in enumerate(certificates)),
            default=0,
        )
        exact, wildcard = selector.tables()
        self.engine.set_certificates(
            [(entry.cert.pair.cert, entry.cert.pair.key) for entry in certificates],
            exact, wildcard,
        )
        self.certificates = certificates

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.engine.fileno(), self.pump)

    def register(self, conn_id: int, handler: ConnHandler) -> None:
        self._handlers[conn_id] = handler

    def unregister(self, conn_id: int) -> None:
        self._handlers.pop(conn_id, None)

    def pump(self) -> None:
        """Hand every queued event to its connection (called when the eventfd is
        readable; a handler's exception is logged, never lost in the loop)."""
        for conn_id, kind, payload in self.engine.events():
            handler = self._handlers.get(conn_id)
            if handler is None:
                continue  # a connection Python already let go of
            try:
                handler.on_event(kind, payload)
            except Exception:
                log.exception("native connection %d: event %d failed", conn_id, kind)

    def close(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.engine.fileno())
            self._loop = None
        if self.server_tls is not None and self.load_certificates in self.server_tls.on_replace:
            self.server_tls.on_replace.remove(self.load_certificates)
        self.engine.shutdown()


def open_plane(
    requested: str, threads: int, server_tls: ServerTLS | None
) -> tuple[Choice, NativePlane | None]:
    """The data path a proxy will use, with its engine when it is the native one."""
    if threads < 1:
        raise ValueError("--data-plane-threads must be at least 1")
    choice, module = choose(requested, threads)
    plane = NativePlane(module, threads, server_tls) if module is not None else None
    return choice, plane
