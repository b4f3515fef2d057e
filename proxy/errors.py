"""Error kinds: each maps to a SQLSTATE, a client-safe message, and a metric label.

Nothing internal (addresses, tracebacks, control-plane replies) reaches the
client: the message is written here or by the code that raises, for humans.
"""

from __future__ import annotations

import enum


class Kind(enum.StrEnum):
    PROTOCOL = "protocol"  # the client broke the protocol
    TLS_REQUIRED = "tls_required"
    UNSUPPORTED = "unsupported"
    ROUTING = "routing"  # no endpoint, or ambiguous
    UNKNOWN_ENDPOINT = "unknown_endpoint"
    AUTH = "auth"
    WAKE = "wake"  # the compute did not come up in time (retryable)
    COMPUTE = "compute"  # the compute refused or broke
    CONTROL_PLANE = "control_plane"
    TOO_MANY = "too_many"
    SHUTDOWN = "shutdown"
    INTERNAL = "internal"


DEFAULT_SQLSTATE: dict[Kind, str] = {
    Kind.PROTOCOL: "08P01",
    Kind.TLS_REQUIRED: "08P01",
    Kind.UNSUPPORTED: "0A000",
    Kind.ROUTING: "08P01",
    Kind.UNKNOWN_ENDPOINT: "3D000",
    Kind.AUTH: "28P01",
    Kind.WAKE: "57P03",
    Kind.COMPUTE: "08006",
    Kind.CONTROL_PLANE: "57P03",
    Kind.TOO_MANY: "53300",
    Kind.SHUTDOWN: "57P01",
    Kind.INTERNAL: "XX000",
}


class ClientError(Exception):
    """Ends the handshake with an ErrorResponse the client can act on."""

    def __init__(
        self,
        kind: Kind,
        message: str,
        *,
        sqlstate: str | None = None,
        hint: str | None = None,
        detail: str | None = None,
    ):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.sqlstate = sqlstate or DEFAULT_SQLSTATE[kind]
        self.hint = hint
        self.detail = detail

    @property
    def retryable(self) -> bool:
        return self.kind in (Kind.WAKE, Kind.CONTROL_PLANE)


CONTROL_PLANE_UNAVAILABLE = "control plane unavailable"


def control_plane_unavailable(endpoint_id: str) -> ClientError:
    """The one wording for "the control plane did not answer", whatever we asked it
    (an address, a verifier): only for that reason, never for a slow compute."""
    return ClientError(
        Kind.CONTROL_PLANE,
        f'{CONTROL_PLANE_UNAVAILABLE}: cannot connect to endpoint "{endpoint_id}" now',
        hint="This is temporary; retry the connection.",
    )
