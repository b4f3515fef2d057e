"""Generated passwords, ids and SCRAM verifiers: no plaintext password is ever stored."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets

SCRAM_ITERATIONS = 4096
_ID_ALPHABET = "abcdefghijkmnpqrstuvwxyz23456789"  # no 0/o/1/l: ids get read aloud


def generate_password() -> str:
    return secrets.token_urlsafe(24)


def generate_id(prefix: str, length: int = 10) -> str:
    return prefix + "".join(secrets.choice(_ID_ALPHABET) for _ in range(length))


def scram_verifier(password: str, *, iterations: int = SCRAM_ITERATIONS) -> str:
    """The verifier string PostgreSQL stores in pg_authid (and accepts in ALTER ROLE)."""
    salt = os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.digest(salted, b"Server Key", "sha256")

    def b64(b: bytes) -> str:
        return base64.b64encode(b).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"
