"""Server-side TLS for the proxy: one SSLContext per certificate, chosen by SNI.

Clients connect to the front ``ServerTLS.context``; its SNI callback switches
the connection to the per-certificate context the selector picks and records
the choice on the connection's SSL object, so the SCRAM layer can later ask
which certificate the client saw (channel binding) and what name it asked for
(endpoint routing).
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tls.certs import CertPair, LoadedCert, load_certificate
from tls.sni import CertificateSelector

ALPN_PROTOCOL = "postgresql"
# Attribute stashed on the SSLObject/SSLSocket by the SNI callback. Both are
# ordinary Python objects, and the record dies with the connection.
_CHOICE_ATTRIBUTE = "_pgwake_tls_choice"


@dataclass(frozen=True)
class TLSInfo:
    """What a finished handshake tells the proxy about its client."""

    server_name: str | None
    end_point_hash: bytes
    alpn: str | None


@dataclass(frozen=True)
class CertificateContext:
    """A loaded certificate and the server SSLContext that serves it."""

    cert: LoadedCert
    context: ssl.SSLContext


@dataclass(frozen=True)
class _Choice:
    server_name: str | None
    cert: LoadedCert


def certificate_context(cert: LoadedCert) -> CertificateContext:
    """Build the SSLContext serving ``cert``; raises ``ssl.SSLError`` or ``OSError``.

    Reads the certificate and key files again: ``ssl`` only loads from paths.
    """
    context = _server_context()
    context.load_cert_chain(certfile=cert.pair.cert, keyfile=cert.pair.key)
    return CertificateContext(cert=cert, context=context)


class ServerTLS:
    """Front SSLContext plus the swappable set of per-certificate contexts.

    The first certificate is the default, used when the client sends no SNI
    or a name no certificate covers (the client then decides whether to
    accept it, e.g. libpq with ``sslmode=require``).
    """

    def __init__(self, certificates: Sequence[CertificateContext]) -> None:
        if not certificates:
            raise ValueError("ServerTLS needs at least one certificate")
        self._certificates: tuple[CertificateContext, ...] = tuple(certificates)
        # Called after each `replace` (a native data plane reloads its own contexts).
        self.on_replace: list[Callable[[], None]] = []
        self._selector = self._build_selector(self._certificates)
        # The front context holds no certificate: the SNI callback always
        # runs (with None when there is no SNI) and always switches context.
        self.context = _server_context()
        self.context.sni_callback = self._on_server_name

    @classmethod
    def from_certificates(cls, certificates: Sequence[LoadedCert]) -> ServerTLS:
        """Build contexts for already loaded certificates (reads their files)."""
        return cls([certificate_context(cert) for cert in certificates])

    @classmethod
    def load(cls, pairs: Sequence[CertPair]) -> ServerTLS:
        """Load certificate pairs from disk; the first is the default."""
        return cls.from_certificates([load_certificate(pair) for pair in pairs])

    @property
    def certificates(self) -> tuple[CertificateContext, ...]:
        return self._certificates

    def replace(self, index: int, certificate: CertificateContext) -> None:
        """Serve ``certificate`` instead of the one at ``index``, for new handshakes only.

        The old SSLContext is left untouched, so connections that already
        use it carry on; only the selector reference is swapped.
        """
        updated = list(self._certificates)
        updated[index] = certificate
        certificates = tuple(updated)
        selector = self._build_selector(certificates)
        self._certificates = certificates
        self._selector = selector
        for listener in self.on_replace:
            listener()

    @staticmethod
    def _build_selector(
        certificates: tuple[CertificateContext, ...],
    ) -> CertificateSelector[CertificateContext]:
        return CertificateSelector(
            ((entry.cert.dns_names, entry) for entry in certificates),
            default=certificates[0],
        )

    def _on_server_name(
        self,
        connection: ssl.SSLObject | ssl.SSLSocket,
        server_name: str | None,
        _context: ssl.SSLContext,
    ) -> int | None:
        chosen = self._selector.select(server_name)
        connection.context = chosen.context
        setattr(connection, _CHOICE_ATTRIBUTE, _Choice(server_name=server_name, cert=chosen.cert))
        return None


def tls_info(connection: ssl.SSLObject | ssl.SSLSocket) -> TLSInfo:
    """The server name, channel-binding hash and ALPN of a handshaken connection.

    Raises ``LookupError`` if the connection was not accepted through a
    ``ServerTLS`` context.
    """
    choice = getattr(connection, _CHOICE_ATTRIBUTE, None)
    if not isinstance(choice, _Choice):
        raise LookupError("connection did not go through a ServerTLS handshake")
    return TLSInfo(
        server_name=choice.server_name,
        end_point_hash=choice.cert.end_point_hash,
        alpn=connection.selected_alpn_protocol(),
    )


def _server_context() -> ssl.SSLContext:
    # Every context gets the same settings: after the SNI switch OpenSSL takes
    # the ALPN callback from the new context, not from the front one.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_NONE
    # PostgreSQL disables renegotiation too; it is a DoS vector for servers.
    context.options |= ssl.OP_NO_RENEGOTIATION
    context.set_alpn_protocols([ALPN_PROTOCOL])
    return context
