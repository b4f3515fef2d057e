"""Certificate files on disk: parsing, file stamps and the channel-binding hash.

The proxy needs three facts about each certificate it serves: the DNS names it
covers (to choose it for an SNI name), when it expires (to warn), and the
RFC 5929 ``tls-server-end-point`` hash of the leaf, which is the channel
binding data for SCRAM-SHA-256-PLUS.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class CertPair:
    """Paths of a PEM certificate (leaf first, chain may follow) and its key."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class FileStamp:
    """Identity of both files at one moment: (inode, mtime_ns, size) each.

    The inode is included because certificate managers (and Kubernetes secret
    volumes) swap files atomically, which may keep size and even mtime equal.
    """

    cert: tuple[int, int, int]
    key: tuple[int, int, int]

    @classmethod
    def of(cls, pair: CertPair) -> FileStamp:
        return cls(cert=_stat_triple(pair.cert), key=_stat_triple(pair.key))


@dataclass(frozen=True)
class LoadedCert:
    """A parsed certificate pair, with the stamp of the files it came from."""

    pair: CertPair
    dns_names: tuple[str, ...]
    not_after: datetime
    end_point_hash: bytes
    der: bytes
    stamp: FileStamp


def load_certificate(pair: CertPair) -> LoadedCert:
    """Read and parse ``pair.cert``; raise ``OSError`` or ``ValueError`` if unusable.

    The key is not parsed here: building the ``ssl.SSLContext`` checks that it
    matches, and that is the check that matters for serving.
    """
    # Stamp first: if the files change while we read, the next check sees a
    # newer stamp and loads again, instead of missing the change.
    stamp = FileStamp.of(pair)
    chain = x509.load_pem_x509_certificates(pair.cert.read_bytes())
    leaf = chain[0]
    der = leaf.public_bytes(serialization.Encoding.DER)
    return LoadedCert(
        pair=pair,
        dns_names=certificate_dns_names(leaf),
        not_after=leaf.not_valid_after_utc,
        end_point_hash=end_point_hash(leaf),
        der=der,
        stamp=stamp,
    )


def certificate_dns_names(cert: x509.Certificate) -> tuple[str, ...]:
    """DNS names from SubjectAltName, lower-cased; the CN only if there is no SAN.

    This mirrors what libpq and OpenSSL verify against, so the proxy never
    selects a certificate for a name the client would then reject.
    """
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    if san is not None:
        names = san.get_values_for_type(x509.DNSName)
        if names:
            return tuple(name.lower() for name in names)
    common_names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return tuple(str(attribute.value).lower() for attribute in common_names)


def end_point_hash(cert: x509.Certificate) -> bytes:
    """RFC 5929 ``tls-server-end-point``: hash of the DER certificate.

    The hash is the certificate's signature hash, upgraded to SHA-256 when
    that is MD5 or SHA-1. Signatures without a separate hash (Ed25519) are
    undefined by the RFC and libpq refuses channel binding for them; SHA-256
    is used so the value is at least well defined.
    """
    try:
        algorithm = cert.signature_hash_algorithm
    except UnsupportedAlgorithm:
        algorithm = None
    if algorithm is None or isinstance(algorithm, hashes.MD5 | hashes.SHA1):
        algorithm = hashes.SHA256()
    digest = hashes.Hash(algorithm)
    digest.update(cert.public_bytes(serialization.Encoding.DER))
    return digest.finalize()


def _stat_triple(path: Path) -> tuple[int, int, int]:
    # os.stat follows symlinks, so a swapped ..data link shows a new inode.
    status = os.stat(path)
    return (status.st_ino, status.st_mtime_ns, status.st_size)
