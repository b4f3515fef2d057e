"""Choosing a certificate for the server name a client sent (SNI), without ssl.

The matching rules are the ones libpq and OpenSSL apply when verifying: a
wildcard is only the whole leftmost label and covers exactly one label. The
proxy must not pick a certificate that the client is going to reject.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")


def match_hostname(pattern: str, name: str) -> bool:
    """Whether certificate name ``pattern`` covers host ``name`` (case-insensitive)."""
    pattern = _normalise(pattern)
    name = _normalise(name)
    if not pattern or not name or "*" in name:
        return False
    if pattern.startswith("*."):
        first_label, _, rest = name.partition(".")
        return bool(first_label) and rest == pattern[2:] and "*" not in rest
    return "*" not in pattern and pattern == name


class CertificateSelector(Generic[T]):
    """Maps a server name to one of several certificates: exact, then wildcard, then default.

    Immutable once built; to change certificates, build a new selector and
    swap the reference, so a handshake in progress never sees a half update.
    """

    def __init__(self, candidates: Iterable[tuple[Sequence[str], T]], default: T) -> None:
        self.default = default
        self._exact: dict[str, T] = {}
        self._wildcard: dict[str, T] = {}
        for names, value in candidates:
            for pattern in map(_normalise, names):
                if pattern.startswith("*."):
                    suffix = pattern[2:]
                    if suffix and "*" not in suffix:
                        # First listed wins, so earlier certificates take precedence.
                        self._wildcard.setdefault(suffix, value)
                elif pattern and "*" not in pattern:
                    self._exact.setdefault(pattern, value)

    def tables(self) -> tuple[dict[str, T], dict[str, T]]:
        """The exact names and the wildcard suffixes (after "*."), normalised: for a
        matcher outside Python (the native data plane) that must choose alike."""
        return dict(self._exact), dict(self._wildcard)

    def select(self, server_name: str | None) -> T:
        """The certificate for ``server_name``; the default if none covers it or it is None."""
        if server_name is None:
            return self.default
        name = _normalise(server_name)
        exact = self._exact.get(name)
        if exact is not None:
            return exact
        first_label, _, rest = name.partition(".")
        if first_label and "*" not in name:
            wildcard = self._wildcard.get(rest)
            if wildcard is not None:
                return wildcard
        return self.default


def _normalise(name: str) -> str:
    # A trailing dot names the same absolute host; DNS is case-insensitive.
    return name.rstrip(".").lower()
