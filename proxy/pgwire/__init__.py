"""Sans-IO PostgreSQL v3 wire protocol: message builders, framing and the startup phase."""

from proxy.pgwire.errors import ProtocolViolation

__all__ = ["ProtocolViolation"]
