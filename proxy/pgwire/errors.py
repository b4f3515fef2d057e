"""The one error the wire codecs raise: the remote peer broke the protocol."""

from __future__ import annotations


class ProtocolViolation(Exception):
    """The peer sent bytes that are not valid PostgreSQL protocol.

    The fault is always the remote peer's, so ``message`` is safe to send back
    in an ErrorResponse: it describes the peer's own input and no internals.
    """

    def __init__(self, message: str, *, sqlstate: str = "08P01") -> None:
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate
