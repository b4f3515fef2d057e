"""TLS termination for the proxy: certificates, SNI selection, hot reload, dev CA.

Imports nothing from ``proxy`` or ``wakeup``; they depend on this package.
"""

from tls.certs import CertPair, FileStamp, LoadedCert, end_point_hash, load_certificate
from tls.context import (
    ALPN_PROTOCOL,
    CertificateContext,
    ServerTLS,
    TLSInfo,
    certificate_context,
    tls_info,
)
from tls.devca import ensure_dev_ca, ensure_server_certificate
from tls.reload import CertificateReloader
from tls.sni import CertificateSelector, match_hostname

__all__ = [
    "ALPN_PROTOCOL",
    "CertPair",
    "CertificateContext",
    "CertificateReloader",
    "CertificateSelector",
    "FileStamp",
    "LoadedCert",
    "ServerTLS",
    "TLSInfo",
    "certificate_context",
    "end_point_hash",
    "ensure_dev_ca",
    "ensure_server_certificate",
    "load_certificate",
    "match_hostname",
    "tls_info",
]
