"""What every session of one proxy shares, passed in (no module-level singletons)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from proxy.activity import ActivityTracker
from proxy.cancel import CancelMap
from proxy.connlog import ConnectionLog
from proxy.guards import ConnectionGuards
from proxy.metrics import ProxyMetrics
from proxy.ratelimit import FrontDoorLimits
from proxy.rolecache import RoleCache
from proxy.sessionstate import SessionRegistry
from proxy.settings import ProxySettings
from proxy.splice import SessionEnding
from proxy.stream import Stream
from proxy.wake import WakeClient
from tls.context import ServerTLS

if TYPE_CHECKING:
    from proxy.dataplane import NativePlane
    from proxy.nativesplice import AnySplice


@dataclass
class ProxyState:
    """Everything sessions share, passed in (no module-level singletons)."""

    settings: ProxySettings
    server_tls: ServerTLS | None
    wake: WakeClient
    roles: RoleCache
    cancels: CancelMap
    mock_key: bytes
    limits: FrontDoorLimits
    metrics: ProxyMetrics
    connection_log: ConnectionLog
    sessions: set[asyncio.Task[None]] = field(default_factory=set)
    splices: set[AnySplice] = field(default_factory=set)
    ending: SessionEnding | None = None  # set while the proxy drains
    registry: SessionRegistry = field(default_factory=SessionRegistry)
    parked: set[Stream] = field(default_factory=set)  # clients of parked sessions
    handshakes: int = 0
    guards: ConnectionGuards = field(default_factory=ConnectionGuards)
    activity: ActivityTracker = field(default_factory=ActivityTracker)
    plane: NativePlane | None = None  # the native data plane's engine, when it is used
