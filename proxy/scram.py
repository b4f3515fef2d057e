"""SCRAM-SHA-256 (RFC 5802/7677) as pure state machines for both sides of the proxy.

The proxy never learns a password in the SCRAM path: ScramServer recovers the
client's ClientKey from its proof, and ScramClient logs in to the compute with
that ClientKey. No randomness or I/O happens here; callers supply nonces.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import stringprep
import unicodedata
from dataclasses import dataclass, field

SCRAM_SHA_256 = "SCRAM-SHA-256"
SCRAM_SHA_256_PLUS = "SCRAM-SHA-256-PLUS"
CHANNEL_BINDING_TYPE = "tls-server-end-point"
DEFAULT_ITERATIONS = 4096
MIN_NONCE_BYTES = 12  # libpq and PostgreSQL use 18; RFC 7677's example nonce is 15
KEY_LENGTH = hashlib.sha256().digest_size
_MOCK_SALT_LENGTH = 16

_VERIFIER = re.compile(
    r"SCRAM-SHA-256\$([0-9]{1,10}):([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+):([A-Za-z0-9+/=]+)"
)


class ScramError(Exception):
    """A SCRAM exchange failed; ``message``/``detail`` are safe to show the peer."""

    def __init__(self, message: str, *, sqlstate: str = "08P01", detail: str | None = None) -> None:
        super().__init__(message if detail is None else f"{message}: {detail}")
        self.message = message
        self.sqlstate = sqlstate
        self.detail = detail


def _malformed(detail: str) -> ScramError:
    return ScramError("malformed SCRAM message", detail=detail)


@dataclass(frozen=True)
class ScramSecret:
    """A parsed pg_authid SCRAM verifier."""

    iterations: int
    salt: bytes
    stored_key: bytes = field(repr=False)
    server_key: bytes = field(repr=False)


# --- key derivation -----------------------------------------------------------------


def _hmac(key: bytes, message: bytes) -> bytes:
    return hmac.digest(key, message, "sha256")


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _xor(left: bytes, right: bytes) -> bytes:
    return bytes(a ^ b for a, b in zip(left, right, strict=True))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _saslprep(password: str) -> str:
    """RFC 4013 SASLprep as PostgreSQL's pg_saslprep applies it.

    Like PostgreSQL, any password SASLprep would reject (prohibited or
    unassigned code points, bad bidi) is used unchanged rather than refused,
    and pure ASCII is never touched — so verifiers made by PostgreSQL match.
    """
    if password.isascii():
        return password
    mapped = "".join(
        " " if stringprep.in_table_c12(char) else char
        for char in password
        if not stringprep.in_table_b1(char)
    )
    prepared = unicodedata.normalize("NFKC", mapped)
    if not prepared:
        return password
    for char in prepared:
        if (
            stringprep.in_table_a1(char)
            or stringprep.in_table_c12(char)
            or stringprep.in_table_c21_c22(char)
            or stringprep.in_table_c3(char)
            or stringprep.in_table_c4(char)
            or stringprep.in_table_c5(char)
            or stringprep.in_table_c6(char)
            or stringprep.in_table_c7(char)
            or stringprep.in_table_c8(char)
            or stringprep.in_table_c9(char)
        ):
            return password
    if any(stringprep.in_table_d1(char) for char in prepared) and (
        any(stringprep.in_table_d2(char) for char in prepared)
        or not stringprep.in_table_d1(prepared[0])
        or not stringprep.in_table_d1(prepared[-1])
    ):
        return password
    return prepared


def _password_bytes(password: str | bytes) -> bytes:
    # A cleartext PasswordMessage need not be UTF-8; PostgreSQL then hashes the
    # raw bytes, and so do we.
    if isinstance(password, bytes):
        try:
            text = password.decode("utf-8")
        except UnicodeDecodeError:
            return password
    else:
        text = password
    return _saslprep(text).encode("utf-8", "surrogatepass")


def salted_password(password: str | bytes, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", _password_bytes(password), salt, iterations)


def client_key_from_password(password: str | bytes, salt: bytes, iterations: int) -> bytes:
    return _hmac(salted_password(password, salt, iterations), b"Client Key")


def make_verifier(password: str, *, salt: bytes, iterations: int = DEFAULT_ITERATIONS) -> str:
    salted = salted_password(password, salt, iterations)
    stored_key = _sha256(_hmac(salted, b"Client Key"))
    server_key = _hmac(salted, b"Server Key")
    return f"SCRAM-SHA-256${iterations}:{_b64(salt)}${_b64(stored_key)}:{_b64(server_key)}"


def parse_verifier(verifier: str) -> ScramSecret:
    """Parse ``SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>``; ValueError if malformed.

    Error messages never echo the verifier: it is a credential.
    """
    match = _VERIFIER.fullmatch(verifier)
    if match is None:
        raise ValueError("malformed SCRAM verifier")
    try:
        salt, stored_key, server_key = (
            base64.b64decode(part, validate=True) for part in match.group(2, 3, 4)
        )
    except binascii.Error:
        raise ValueError("malformed SCRAM verifier: invalid base64") from None
    iterations = int(match.group(1))
    if iterations < 1 or not salt or len(stored_key) != KEY_LENGTH or len(server_key) != KEY_LENGTH:
        raise ValueError("malformed SCRAM verifier")
    return ScramSecret(iterations, salt, stored_key, server_key)


def verify_password(secret: ScramSecret, password: str | bytes) -> bytes | None:
    """The ClientKey if ``password`` matches ``secret`` (cleartext auth path), else None."""
    client_key = client_key_from_password(password, secret.salt, secret.iterations)
    if hmac.compare_digest(_sha256(client_key), secret.stored_key):
        return client_key
    return None


# --- message parsing ----------------------------------------------------------------


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise _malformed("not valid UTF-8") from None


def _attributes(text: str, where: str) -> list[tuple[str, str]]:
    """Split ``a=value,b=value`` into pairs; attribute names are single ASCII letters."""
    pairs = []
    for part in text.split(","):
        if len(part) < 2 or part[1] != "=" or not (part[0].isascii() and part[0].isalpha()):
            raise _malformed(f"expected attribute in {where}")
        pairs.append((part[0], part[2:]))
    return pairs


def _expect(pairs: list[tuple[str, str]], index: int, name: str, where: str) -> str:
    if index >= len(pairs) or pairs[index][0] != name:
        raise _malformed(f'expected attribute "{name}" in {where}')
    return pairs[index][1]


def _b64decode(value: str, what: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise _malformed(f"invalid base64 in {what}") from None


def _check_nonce_text(nonce: str, where: str) -> None:
    # RFC 5802 "printable": %x21-7E except ",", which splitting already excluded.
    if not nonce or not all("\x21" <= char <= "\x7e" for char in nonce):
        raise _malformed(f"invalid nonce in {where}")


def _check_nonce_bytes(nonce: bytes) -> None:
    if len(nonce) < MIN_NONCE_BYTES:
        raise ValueError(f"nonce must be at least {MIN_NONCE_BYTES} random bytes")


# --- proxy <-> client ---------------------------------------------------------------


class ScramServer:
    """Server side of one SCRAM exchange with a client: client_first, then client_final.

    With ``secret=None`` (unknown role) it runs a mock exchange that looks like
    a real one and fails only at the end, so clients cannot probe for roles.
    """

    def __init__(
        self,
        user: str,
        secret: ScramSecret | None,
        *,
        nonce: bytes,
        channel_binding: bytes | None = None,
        mock_key: bytes = b"",
    ) -> None:
        _check_nonce_bytes(nonce)
        self._user = user
        self._doomed = secret is None
        if secret is None:
            # A salt anyone could recompute would reveal the mock, hence a key.
            if not mock_key:
                raise ValueError("mock_key is required when the role has no secret")
            salt = _hmac(mock_key, user.encode("utf-8", "surrogatepass"))[:_MOCK_SALT_LENGTH]
            secret = ScramSecret(DEFAULT_ITERATIONS, salt, b"\0" * KEY_LENGTH, b"\0" * KEY_LENGTH)
        self._secret = secret
        self._server_nonce = _b64(nonce)
        self._channel_binding = channel_binding
        self._state = "client-first"
        self._gs2_header = ""
        self._uses_channel_binding = False
        self._nonce = ""
        self._client_first_bare = ""
        self._server_first = ""
        self._client_key: bytes | None = None

    def mechanisms(self) -> list[str]:
        if self._channel_binding is not None:
            return [SCRAM_SHA_256_PLUS, SCRAM_SHA_256]
        return [SCRAM_SHA_256]

    @property
    def client_key(self) -> bytes:
        """The verified ClientKey; only available after a successful client_final."""
        if self._client_key is None:
            raise RuntimeError("SCRAM exchange has not succeeded")
        return self._client_key

    def _advance(self, expected: str) -> None:
        if self._state != expected:
            raise RuntimeError(f"SCRAM server expected {expected}, state is {self._state}")
        # Any exception before the step completes leaves the exchange failed.
        self._state = "failed"

    def client_first(self, mechanism: str, data: bytes) -> bytes:
        """Take the SASLInitialResponse; return the server-first-message."""
        self._advance("client-first")
        if mechanism not in self.mechanisms():
            raise ScramError("client selected an invalid SASL authentication mechanism")
        parts = _decode(data).split(",", 2)
        if len(parts) != 3:
            raise _malformed("missing GS2 header in client-first-message")
        flag, authzid, bare = parts
        self._check_gs2_flag(mechanism, flag)
        if authzid.startswith("a="):
            raise ScramError(
                "client uses authorization identity, but it is not supported", sqlstate="0A000"
            )
        if authzid:
            raise _malformed("unexpected attribute in GS2 header")
        if bare.startswith("m="):
            raise ScramError("client requires an unsupported SCRAM extension", sqlstate="0A000")
        pairs = _attributes(bare, "client-first-message")
        # The user name is ignored, as PostgreSQL does: the startup packet's counts.
        _expect(pairs, 0, "n", "client-first-message")
        client_nonce = _expect(pairs, 1, "r", "client-first-message")
        _check_nonce_text(client_nonce, "client-first-message")
        self._gs2_header = f"{flag},{authzid},"
        self._uses_channel_binding = flag.startswith("p=")
        self._client_first_bare = bare
        self._nonce = client_nonce + self._server_nonce
        self._server_first = (
            f"r={self._nonce},s={_b64(self._secret.salt)},i={self._secret.iterations}"
        )
        self._state = "client-final"
        return self._server_first.encode("ascii")

    def _check_gs2_flag(self, mechanism: str, flag: str) -> None:
        plus = mechanism == SCRAM_SHA_256_PLUS
        if flag in ("n", "y"):
            if plus:
                raise _malformed(
                    "The client selected SCRAM-SHA-256-PLUS, but the SCRAM message does not"
                    " include channel binding data."
                )
            if flag == "y" and self._channel_binding is not None:
                # We offered PLUS; a client that believes we did not was downgraded.
                raise ScramError(
                    "SCRAM channel binding negotiation error",
                    sqlstate="28000",
                    detail="The client supports SCRAM channel binding but thinks the server"
                    " does not.  However, this server does support channel binding.",
                )
        elif flag.startswith("p="):
            if not plus:
                raise _malformed(
                    "The client selected SCRAM-SHA-256 without channel binding, but the SCRAM"
                    " message includes channel binding data."
                )
            if flag[2:] != CHANNEL_BINDING_TYPE:
                raise ScramError("unsupported SCRAM channel-binding type")
        else:
            raise _malformed("unexpected channel-binding flag")

    def client_final(self, data: bytes) -> bytes:
        """Take the client-final-message; return the server-final-message or raise 28P01."""
        self._advance("client-final")
        text = _decode(data)
        pairs = _attributes(text, "client-final-message")
        binding = _expect(pairs, 0, "c", "client-final-message")
        nonce = _expect(pairs, 1, "r", "client-final-message")
        # Extensions may sit between r= and p=; the proof is always last.
        proof_b64 = _expect(pairs, max(len(pairs) - 1, 2), "p", "client-final-message")
        _b64decode(binding, "channel binding")
        expected_binding = self._gs2_header.encode("utf-8")
        if self._uses_channel_binding:
            assert self._channel_binding is not None  # PLUS is offered only with it
            expected_binding += self._channel_binding
        if binding != _b64(expected_binding):
            if self._uses_channel_binding:
                raise ScramError("SCRAM channel binding check failed", sqlstate="28000")
            raise ScramError("unexpected SCRAM channel-binding attribute in client-final-message")
        if nonce != self._nonce:
            raise ScramError("invalid SCRAM response", detail="Nonce does not match.")
        proof = _b64decode(proof_b64, "client proof")
        if len(proof) != KEY_LENGTH:
            raise _malformed("Malformed proof in client-final-message.")
        without_proof = text[: text.rindex(",p=")]
        auth_message = ",".join((self._client_first_bare, self._server_first, without_proof))
        auth_bytes = auth_message.encode("utf-8")
        client_key = _xor(proof, _hmac(self._secret.stored_key, auth_bytes))
        # The check runs for a mock too, so that both fail after the same work.
        matches = hmac.compare_digest(_sha256(client_key), self._secret.stored_key)
        if self._doomed or not matches:
            raise ScramError(
                f'password authentication failed for user "{self._user}"', sqlstate="28P01"
            )
        self._client_key = client_key
        self._state = "done"
        return f"v={_b64(_hmac(self._secret.server_key, auth_bytes))}".encode("ascii")


# --- proxy -> compute ---------------------------------------------------------------


class ScramClient:
    """Client side of SCRAM-SHA-256 that proves a ClientKey instead of a password.

    The compute's salt and iteration count play no part in the proof: they only
    derive ClientKey from a password, and we already hold ClientKey.
    """

    mechanism = SCRAM_SHA_256

    def __init__(
        self, user: str, client_key: bytes, server_key: bytes | None, *, nonce: bytes
    ) -> None:
        _check_nonce_bytes(nonce)
        if len(client_key) != KEY_LENGTH:
            raise ValueError(f"client_key must be {KEY_LENGTH} bytes")
        self.user = user  # for the caller's logs only: the compute takes it from the startup packet
        self._client_key = client_key
        self._server_key = server_key
        self._client_nonce = _b64(nonce)
        # An empty n= like libpq's: PostgreSQL ignores the SCRAM user name.
        self._client_first_bare = f"n=,r={self._client_nonce}"
        self._auth_message = b""
        self._state = "client-first"

    def _advance(self, expected: str) -> None:
        if self._state != expected:
            raise RuntimeError(f"SCRAM client expected {expected}, state is {self._state}")
        self._state = "failed"

    def client_first(self) -> bytes:
        """The client-first-message, to send in a SASLInitialResponse."""
        self._advance("client-first")
        self._state = "server-first"
        return f"n,,{self._client_first_bare}".encode("ascii")

    def server_first(self, data: bytes) -> bytes:
        """Take the server-first-message; return the client-final-message."""
        self._advance("server-first")
        text = _decode(data)
        if text.startswith("m="):
            raise ScramError("server requires an unsupported SCRAM extension", sqlstate="0A000")
        pairs = _attributes(text, "server-first-message")
        nonce = _expect(pairs, 0, "r", "server-first-message")
        salt = _b64decode(_expect(pairs, 1, "s", "server-first-message"), "salt")
        iterations = _expect(pairs, 2, "i", "server-first-message")
        _check_nonce_text(nonce, "server-first-message")
        if not nonce.startswith(self._client_nonce) or len(nonce) == len(self._client_nonce):
            raise ScramError("invalid SCRAM response", detail="Nonce does not match.")
        if not salt or not (iterations.isascii() and iterations.isdigit()) or int(iterations) < 1:
            raise _malformed("invalid salt or iteration count in server-first-message")
        without_proof = f"c=biws,r={nonce}"  # biws = base64("n,,")
        self._auth_message = ",".join((self._client_first_bare, text, without_proof)).encode(
            "utf-8"
        )
        signature = _hmac(_sha256(self._client_key), self._auth_message)
        self._state = "server-final"
        return f"{without_proof},p={_b64(_xor(self._client_key, signature))}".encode("ascii")

    def server_final(self, data: bytes) -> None:
        """Check the server-final-message; the server proves it knows ServerKey, if we do."""
        self._advance("server-final")
        text = _decode(data)
        pairs = _attributes(text, "server-final-message")
        if pairs[0][0] == "e":
            raise ScramError(
                "SCRAM authentication rejected by server", sqlstate="28000", detail=pairs[0][1]
            )
        signature = _b64decode(_expect(pairs, 0, "v", "server-final-message"), "server signature")
        if self._server_key is not None and not hmac.compare_digest(
            signature, _hmac(self._server_key, self._auth_message)
        ):
            raise ScramError("incorrect server signature", sqlstate="28000")
        self._state = "done"
