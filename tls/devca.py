"""Development CA for ``pgwake up``: a local root and a wildcard server certificate.

Both are created once and reused, so a developer trusts ``ca.crt`` once
(``sslrootcert=ca.crt sslmode=verify-full``) and keeps it across restarts. The
server certificate is re-issued only when the requested names change, when it
is close to expiry, or when it no longer chains to the CA on disk.
"""

from __future__ import annotations

import ipaddress
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tls.certs import CertPair, certificate_dns_names

CA_COMMON_NAME = "pgwake dev CA"
CA_VALIDITY = timedelta(days=3650)
# Browsers and Apple platforms reject leaf certificates valid for > 398 days.
SERVER_VALIDITY = timedelta(days=397)
RENEW_BEFORE = timedelta(days=30)
# Tolerates a client clock slightly behind ours right after issuance.
BACKDATE = timedelta(minutes=5)
LOOPBACK_ADDRESSES = (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))

__all__ = ["CertPair", "ensure_dev_ca", "ensure_server_certificate"]


def ensure_dev_ca(directory: Path) -> CertPair:
    """Return ``directory/ca.crt`` and ``ca.key``, creating them if missing or unusable."""
    pair = CertPair(cert=directory / "ca.crt", key=directory / "ca.key")
    if _usable_ca(pair):
        return pair
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_COMMON_NAME)])
    now = datetime.now(UTC)
    subject_key_id = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(subject_key_id, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(subject_key_id),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    _write_pair(pair, cert, key)
    return pair


def ensure_server_certificate(directory: Path, ca: CertPair, names: list[str]) -> CertPair:
    """Return ``directory/server.crt`` and ``server.key`` covering exactly ``names``.

    ``names`` are DNS names; a wildcard is allowed as the whole leftmost label
    (``*.pgwake.localhost``). 127.0.0.1 and ::1 are always added as IP names.
    """
    if not names:
        raise ValueError("a server certificate needs at least one DNS name")
    pair = CertPair(cert=directory / "server.crt", key=directory / "server.key")
    ca_cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    ca_key = _load_ec_key(ca.key)
    if _usable_server_certificate(pair, ca_cert, names):
        return pair
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    # CN is informational only (clients match SAN when present) but is limited to 64 chars.
    common_name = names[0] if len(names[0]) <= 64 else "pgwake server"
    alt_names: list[x509.GeneralName] = [x509.DNSName(name) for name in names]
    alt_names += [x509.IPAddress(address) for address in LOOPBACK_ADDRESSES]
    ca_key_id = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + SERVER_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_key_id),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_pair(pair, cert, key)
    return pair


def _usable_ca(pair: CertPair) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(pair.cert.read_bytes())
        key = _load_ec_key(pair.key)
    except (OSError, ValueError):
        return False
    return _same_public_key(cert, key) and not _expires_soon(cert)


def _usable_server_certificate(pair: CertPair, ca_cert: x509.Certificate, names: list[str]) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(pair.cert.read_bytes())
        key = _load_ec_key(pair.key)
        # A CA re-created since issuance makes the old certificate untrusted.
        cert.verify_directly_issued_by(ca_cert)
    except (OSError, ValueError, TypeError, InvalidSignature):
        return False
    wanted = {name.lower() for name in names}
    return (
        _same_public_key(cert, key)
        and set(certificate_dns_names(cert)) == wanted
        and not _expires_soon(cert)
    )


def _expires_soon(cert: x509.Certificate) -> bool:
    return cert.not_valid_after_utc - datetime.now(UTC) < RENEW_BEFORE


def _same_public_key(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return cert.public_key().public_bytes(der, spki) == key.public_key().public_bytes(der, spki)


def _load_ec_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path}: expected an EC private key")
    return key


def _write_pair(pair: CertPair, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    # Key first: a reloader that sees the new key with the old certificate
    # fails the key check and retries, rather than serving a mismatched pair.
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_atomically(pair.key, key_pem, mode=0o600)
    _write_atomically(pair.cert, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        # os.open's mode is filtered by the umask; the key must be 0600 regardless.
        os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
