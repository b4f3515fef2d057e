"""SCRAM-SHA-256: RFC 7677 vectors, full exchanges both ways, every rejection, fuzzing."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import scram
from proxy.scram import ScramClient, ScramError, ScramSecret, ScramServer

RFC_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC_VERIFIER = (
    "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY="
    ":wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU="
)
RFC_SERVER_FIRST = (
    "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
)
RFC_CLIENT_FINAL = (
    "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    "p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
RFC_SERVER_FINAL = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
SECRET = scram.parse_verifier(RFC_VERIFIER)
CBIND = hashlib.sha256(b"certificate").digest()
MOCK_KEY = b"m" * 32


def nonce(n: int) -> bytes:
    return bytes([n]) * 18


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class PasswordClient:
    """An independent client that knows the password, written from RFC 5802 directly."""

    def __init__(
        self,
        password: str,
        *,
        user: str = "",
        client_nonce: str = "rOprNGfwEbeRWgbNEkqO",
        gs2: str = "n,,",
        cbind: bytes = b"",
    ) -> None:
        self.password = password
        self.gs2 = gs2
        self.cbind = cbind
        self.bare = f"n={user},r={client_nonce}"
        self.server_signature = b""

    def first(self) -> bytes:
        return (self.gs2 + self.bare).encode()

    def final(self, server_first: bytes, *, nonce_override: str | None = None) -> bytes:
        attrs = dict(part.split("=", 1) for part in server_first.decode().split(","))
        salted = hashlib.pbkdf2_hmac(
            "sha256", self.password.encode(), base64.b64decode(attrs["s"]), int(attrs["i"])
        )
        client_key = hmac.digest(salted, b"Client Key", "sha256")
        without_proof = f"c={b64(self.gs2.encode() + self.cbind)},r={nonce_override or attrs['r']}"
        auth = f"{self.bare},{server_first.decode()},{without_proof}".encode()
        signature = hmac.digest(hashlib.sha256(client_key).digest(), auth, "sha256")
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        server_key = hmac.digest(salted, b"Server Key", "sha256")
        self.server_signature = hmac.digest(server_key, auth, "sha256")
        return f"{without_proof},p={b64(proof)}".encode()

    def check(self, server_final: bytes) -> None:
        assert server_final == f"v={b64(self.server_signature)}".encode()


def error(call: object, *args: object) -> ScramError:
    assert callable(call)
    with pytest.raises(ScramError) as info:
        call(*args)
    return info.value


# --- RFC 7677 and verifiers -----------------------------------------------------------


def test_rfc7677_verifier() -> None:
    assert scram.make_verifier("pencil", salt=RFC_SALT, iterations=4096) == RFC_VERIFIER
    assert SECRET == ScramSecret(
        4096,
        RFC_SALT,
        base64.b64decode("WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY="),
        base64.b64decode("wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU="),
    )


def test_rfc7677_exchange_validates_the_test_client() -> None:
    client = PasswordClient("pencil", user="user")
    assert client.first() == b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
    assert client.final(RFC_SERVER_FIRST.encode()) == RFC_CLIENT_FINAL.encode()
    client.check(RFC_SERVER_FINAL.encode())


def test_make_verifier_round_trips() -> None:
    verifier = scram.make_verifier("s3cret", salt=b"0123456789abcdef", iterations=10)
    secret = scram.parse_verifier(verifier)
    assert (secret.iterations, secret.salt) == (10, b"0123456789abcdef")
    assert scram.verify_password(secret, "s3cret") == scram.client_key_from_password(
        "s3cret", b"0123456789abcdef", 10
    )
    assert scram.verify_password(secret, "S3cret") is None


def test_secret_keys_stay_out_of_repr() -> None:
    assert "WG5d" not in repr(SECRET) and "stored_key" not in repr(SECRET)


@pytest.mark.parametrize(
    "verifier",
    [
        "",
        "md5abcdef",
        RFC_VERIFIER.replace("SCRAM-SHA-256", "SCRAM-SHA-1"),
        RFC_VERIFIER.replace("4096", "0"),
        RFC_VERIFIER.replace("4096", "x"),
        RFC_VERIFIER.replace("4096", "99999999999"),
        RFC_VERIFIER.replace("W22ZaJ0SNY7soEsUEjb6gQ==", "W22ZaJ0SNY7soEsUEjb6gQ="),
        RFC_VERIFIER[:-4],
        RFC_VERIFIER + "$",
        RFC_VERIFIER.replace(":wfP", ":wfPAAAA"),
        RFC_VERIFIER.replace("$WG5d", "$W=5d"),
        RFC_VERIFIER + "\n",
    ],
)
def test_parse_verifier_rejects(verifier: str) -> None:
    with pytest.raises(ValueError) as info:
        scram.parse_verifier(verifier)
    assert "wfPL" not in str(info.value)


def test_saslprep_matches_postgres_rules() -> None:
    # Checked against PostgreSQL 15's pg_authid when this was written:
    # non-ASCII space maps to space, soft hyphen maps to nothing, NFKC applies,
    # and prohibited or pure-ASCII input is used exactly as given.
    def key(password: str | bytes) -> bytes:
        return scram.client_key_from_password(password, RFC_SALT, 16)

    assert key("a\u00a0b") == key("a b")
    assert key("I\u00adX") == key("IX") == key("\u2168")
    assert key("a\u200eb") == scram.client_key_from_password(b"a\xe2\x80\x8eb", RFC_SALT, 16)
    assert key("a\u200eb") != key("ab")
    assert key("a\u0007b") != key("ab")
    assert key("pässwörd".encode()) == key("pässwörd")
    assert key(b"\xff\xfe") == hmac.digest(
        hashlib.pbkdf2_hmac("sha256", b"\xff\xfe", RFC_SALT, 16), b"Client Key", "sha256"
    )


# --- full exchanges -------------------------------------------------------------------


def login(server: ScramServer, client: PasswordClient, mechanism: str = "SCRAM-SHA-256") -> None:
    server_first = server.client_first(mechanism, client.first())
    client.check(server.client_final(client.final(server_first)))


def test_password_client_against_server_recovers_client_key() -> None:
    server = ScramServer("alice", SECRET, nonce=nonce(1))
    assert server.mechanisms() == ["SCRAM-SHA-256"]
    login(server, PasswordClient("pencil"))
    assert server.client_key == scram.client_key_from_password("pencil", RFC_SALT, 4096)


def test_client_key_passes_through_to_a_second_server() -> None:
    # Exactly the proxy's path: recover ClientKey from the client, replay it to the compute.
    front = ScramServer("alice", SECRET, nonce=nonce(1))
    login(front, PasswordClient("pencil"))
    compute = ScramServer("alice", SECRET, nonce=nonce(2))
    client = ScramClient("alice", front.client_key, SECRET.server_key, nonce=nonce(3))
    first = client.client_first()
    assert first == f"n,,n=,r={b64(nonce(3))}".encode()
    final = client.server_first(compute.client_first(client.mechanism, first))
    client.server_final(compute.client_final(final))
    assert compute.client_key == front.client_key


@settings(max_examples=25, deadline=None)
@given(st.text(max_size=20), st.binary(min_size=1, max_size=32), st.integers(1, 64))
def test_any_password_round_trips(password: str, salt: bytes, iterations: int) -> None:
    secret = scram.parse_verifier(scram.make_verifier(password, salt=salt, iterations=iterations))
    key = scram.verify_password(secret, password)
    assert key is not None
    compute = ScramServer("u", secret, nonce=nonce(4))
    client = ScramClient("u", key, secret.server_key, nonce=nonce(5))
    client.server_final(
        compute.client_final(
            client.server_first(compute.client_first(client.mechanism, client.client_first()))
        )
    )
    assert compute.client_key == key


def test_wrong_password_fails_like_postgres() -> None:
    server = ScramServer("alice", SECRET, nonce=nonce(1))
    client = PasswordClient("pencils")
    server_first = server.client_first("SCRAM-SHA-256", client.first())
    failure = error(server.client_final, client.final(server_first))
    assert (failure.sqlstate, failure.message) == (
        "28P01",
        'password authentication failed for user "alice"',
    )
    with pytest.raises(RuntimeError):
        _ = server.client_key
    with pytest.raises(RuntimeError):
        server.client_final(b"")


# Client nonce + our 18 random bytes in base64, a 16-byte salt, PostgreSQL's default count.
SERVER_FIRST = re.compile(r"r=rOprNGfwEbeRWgbNEkqO[A-Za-z0-9+/]{24},s=[A-Za-z0-9+/]{22}==,i=4096")


def test_mock_exchange_looks_real_and_always_fails() -> None:
    real = ScramServer("alice", scram.parse_verifier(
        scram.make_verifier("pw", salt=b"s" * 16)), nonce=nonce(1))
    mock = ScramServer("nobody", None, nonce=nonce(1), mock_key=MOCK_KEY)
    assert mock.mechanisms() == real.mechanisms()
    client = PasswordClient("pw")
    real_first = real.client_first("SCRAM-SHA-256", client.first())
    mock_first = mock.client_first("SCRAM-SHA-256", client.first())
    assert SERVER_FIRST.fullmatch(real_first.decode())
    assert SERVER_FIRST.fullmatch(mock_first.decode())
    # Same user and key give the same salt on every attempt, as a stored one would.
    again = ScramServer("nobody", None, nonce=nonce(2), mock_key=MOCK_KEY)
    salt = mock_first.split(b",")[1]
    assert again.client_first("SCRAM-SHA-256", client.first()).split(b",")[1] == salt
    other = ScramServer("somebody", None, nonce=nonce(2), mock_key=MOCK_KEY)
    assert other.client_first("SCRAM-SHA-256", client.first()).split(b",")[1] != salt
    failure = error(mock.client_final, client.final(mock_first))
    assert (failure.sqlstate, failure.message) == (
        "28P01",
        'password authentication failed for user "nobody"',
    )


def test_mock_exchange_needs_a_key() -> None:
    with pytest.raises(ValueError):
        ScramServer("nobody", None, nonce=nonce(1))


def test_short_nonce_is_refused() -> None:
    with pytest.raises(ValueError):
        ScramServer("alice", SECRET, nonce=b"short")
    with pytest.raises(ValueError):
        ScramClient("alice", b"k" * 32, None, nonce=b"short")


# --- channel binding ------------------------------------------------------------------


PLUS_GS2 = "p=tls-server-end-point,,"


def tls_server() -> ScramServer:
    return ScramServer("alice", SECRET, nonce=nonce(1), channel_binding=CBIND)


def test_channel_binding_happy_path() -> None:
    server = tls_server()
    assert server.mechanisms() == ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]
    login(server, PasswordClient("pencil", gs2=PLUS_GS2, cbind=CBIND), "SCRAM-SHA-256-PLUS")
    assert server.client_key == scram.client_key_from_password("pencil", RFC_SALT, 4096)


def test_plain_mechanism_still_allowed_over_tls() -> None:
    login(tls_server(), PasswordClient("pencil"))


def test_y_flag_without_tls_is_fine() -> None:
    login(ScramServer("alice", SECRET, nonce=nonce(1)), PasswordClient("pencil", gs2="y,,"))


def test_channel_binding_data_mismatch() -> None:
    server = tls_server()
    client = PasswordClient("pencil", gs2=PLUS_GS2, cbind=b"another certificate hash")
    server_first = server.client_first("SCRAM-SHA-256-PLUS", client.first())
    failure = error(server.client_final, client.final(server_first))
    assert (failure.sqlstate, failure.message) == ("28000", "SCRAM channel binding check failed")


def test_c_attribute_must_match_gs2_header_without_binding() -> None:
    server = ScramServer("alice", SECRET, nonce=nonce(1))
    client = PasswordClient("pencil")
    server_first = server.client_first("SCRAM-SHA-256", client.first())
    client.gs2 = "y,,"  # c=eSws while the header said n,,
    assert error(server.client_final, client.final(server_first)).sqlstate == "08P01"


@pytest.mark.parametrize(
    ("mechanism", "gs2", "sqlstate", "problem"),
    [
        ("SCRAM-SHA-256", "y,,", "28000", "negotiation error"),  # downgrade attack
        ("SCRAM-SHA-256-PLUS", "n,,", "08P01", "does not include channel binding"),
        ("SCRAM-SHA-256-PLUS", "y,,", "08P01", "does not include channel binding"),
        ("SCRAM-SHA-256", PLUS_GS2, "08P01", "includes channel binding"),
        ("SCRAM-SHA-256-PLUS", "p=tls-unique,,", "08P01", "unsupported SCRAM channel-binding"),
        ("SCRAM-SHA-256", "x,,", "08P01", "unexpected channel-binding flag"),
        ("SCRAM-SHA-256", "n,a=bob,", "0A000", "authorization identity"),
        ("SCRAM-SHA-256", "n,b=bob,", "08P01", "malformed"),
        ("SCRAM-SHA-1", "n,,", "08P01", "invalid SASL authentication mechanism"),
    ],
)
def test_client_first_rejections(mechanism: str, gs2: str, sqlstate: str, problem: str) -> None:
    failure = error(tls_server().client_first, mechanism, PasswordClient("pencil", gs2=gs2).first())
    assert failure.sqlstate == sqlstate
    assert problem in str(failure)


def test_plus_is_not_accepted_without_tls() -> None:
    server = ScramServer("alice", SECRET, nonce=nonce(1))
    client = PasswordClient("pencil", gs2=PLUS_GS2, cbind=CBIND)
    failure = error(server.client_first, "SCRAM-SHA-256-PLUS", client.first())
    assert "invalid SASL" in failure.message


@pytest.mark.parametrize(
    ("data", "sqlstate"),
    [
        (b"", "08P01"),
        (b"n,,", "08P01"),
        (b"n,,m=ext,n=,r=abc", "0A000"),
        (b"n,,n=,r=", "08P01"),
        (b"n,,n=,r=a b", "08P01"),
        (b"n,,n=,r=\xc3\xa9", "08P01"),
        (b"n,,n=,r=\xff", "08P01"),
        (b"n,,r=abc", "08P01"),
        (b"n,,n=", "08P01"),
        (b"n,,n=,r=abc,", "08P01"),
        (b"n,,n=,r=abc,=x", "08P01"),
    ],
)
def test_malformed_client_first(data: bytes, sqlstate: str) -> None:
    server = ScramServer("alice", SECRET, nonce=nonce(1))
    assert error(server.client_first, "SCRAM-SHA-256", data).sqlstate == sqlstate


def test_client_first_extensions_are_ignored() -> None:
    server = ScramServer("alice", SECRET, nonce=nonce(1))
    assert server.client_first("SCRAM-SHA-256", b"n,,n=x,r=abc,x=1").startswith(b"r=abc")


# --- client-final rejections ----------------------------------------------------------


def final_error(mutate: object) -> ScramError:
    assert callable(mutate)
    server = ScramServer("alice", SECRET, nonce=nonce(1))
    client = PasswordClient("pencil")
    server_first = server.client_first("SCRAM-SHA-256", client.first())
    return error(server.client_final, mutate(client.final(server_first), server_first))


@pytest.mark.parametrize(
    ("mutate", "problem"),
    [
        (lambda final, first: final.replace(b"c=biws", b"c=bi!s"), "invalid base64"),
        (lambda final, first: final.replace(b"c=biws", b"c=biw"), "invalid base64"),
        (lambda final, first: final[:-3] + b"!==", "invalid base64"),
        (lambda final, first: final.rsplit(b",p=", 1)[0] + b",p=AAAA", "Malformed proof"),
        (lambda final, first: final.replace(b",r=", b",r=x"), "Nonce does not match"),
        (lambda final, first: final.rsplit(b",p=", 1)[0], 'expected attribute "p"'),
        (lambda final, first: final + b",x=1", 'expected attribute "p"'),
        (lambda final, first: b"r=x," + final, 'expected attribute "c"'),
        (lambda final, first: final.replace(b",r=", b",x="), 'expected attribute "r"'),
        (lambda final, first: b"c=biws", 'expected attribute "r"'),
        (lambda final, first: b"", "expected attribute"),
        (lambda final, first: b"\xff", "UTF-8"),
    ],
)
def test_malformed_client_final(mutate: object, problem: str) -> None:
    failure = final_error(mutate)
    assert failure.sqlstate == "08P01"
    assert problem in str(failure)


def test_nonce_from_another_exchange_is_rejected() -> None:
    server = ScramServer("alice", SECRET, nonce=nonce(1))
    client = PasswordClient("pencil")
    server_first = server.client_first("SCRAM-SHA-256", client.first())
    forged = client.final(server_first, nonce_override=f"rOprNGfwEbeRWgbNEkqO{b64(nonce(9))}")
    assert "Nonce does not match" in str(error(server.client_final, forged))


def test_client_final_extensions_before_proof_are_allowed() -> None:
    server = ScramServer("alice", SECRET, nonce=nonce(1))
    client = PasswordClient("pencil")
    server_first = server.client_first("SCRAM-SHA-256", client.first())
    # The extension is part of the signed AuthMessage, so it only verifies if
    # the client signed it too; here it did not, so the proof must fail.
    final = client.final(server_first).replace(b",p=", b",x=1,p=")
    assert error(server.client_final, final).sqlstate == "28P01"


def test_server_calls_out_of_order() -> None:
    server = ScramServer("alice", SECRET, nonce=nonce(1))
    with pytest.raises(RuntimeError):
        server.client_final(b"c=biws")
    client = PasswordClient("pencil")
    server.client_first("SCRAM-SHA-256", client.first())
    with pytest.raises(RuntimeError):
        server.client_first("SCRAM-SHA-256", client.first())


# --- ScramClient rejections -----------------------------------------------------------


def started_client(server_key: bytes | None = SECRET.server_key) -> ScramClient:
    key = scram.client_key_from_password("pencil", RFC_SALT, 4096)
    client = ScramClient("alice", key, server_key, nonce=nonce(3))
    client.client_first()
    return client


CLIENT_NONCE = b64(nonce(3))


@pytest.mark.parametrize(
    ("server_first", "sqlstate"),
    [
        (f"r={CLIENT_NONCE}", "08P01"),
        (f"r={CLIENT_NONCE}xyz,s=!!!!,i=4096", "08P01"),
        (f"r={CLIENT_NONCE}xyz,s=,i=4096", "08P01"),
        (f"r={CLIENT_NONCE}xyz,s=c2FsdA==,i=0", "08P01"),
        (f"r={CLIENT_NONCE}xyz,s=c2FsdA==,i=-1", "08P01"),
        (f"r={CLIENT_NONCE}xyz,s=c2FsdA==,i=٣", "08P01"),
        (f"r={CLIENT_NONCE},s=c2FsdA==,i=4096", "08P01"),
        ("r=someoneelse,s=c2FsdA==,i=4096", "08P01"),
        (f"m=x,r={CLIENT_NONCE}xyz,s=c2FsdA==,i=4096", "0A000"),
        ("e=other-error", "08P01"),
    ],
)
def test_client_rejects_bad_server_first(server_first: str, sqlstate: str) -> None:
    client = started_client()
    assert error(client.server_first, server_first.encode()).sqlstate == sqlstate
    with pytest.raises(RuntimeError):
        client.server_first(server_first.encode())


@pytest.mark.parametrize(
    ("server_final", "sqlstate"),
    [
        ("e=invalid-proof", "28000"),
        ("v=" + b64(b"x" * 32), "28000"),
        ("v=***", "08P01"),
        ("x=1", "08P01"),
        ("", "08P01"),
    ],
)
def test_client_rejects_bad_server_final(server_final: str, sqlstate: str) -> None:
    client = started_client()
    client.server_first(f"r={CLIENT_NONCE}xyz,s=c2FsdA==,i=4096".encode())
    assert error(client.server_final, server_final.encode()).sqlstate == sqlstate


def test_client_without_server_key_skips_the_signature_check() -> None:
    client = started_client(server_key=None)
    client.server_first(f"r={CLIENT_NONCE}xyz,s=c2FsdA==,i=4096".encode())
    client.server_final(("v=" + b64(b"x" * 32)).encode())


# --- fuzzing --------------------------------------------------------------------------

scram_text = st.text(alphabet="nypacrsvemix=,-_+/biws0129AZ!~ ", max_size=60)
scram_bytes = st.one_of(st.binary(max_size=80), scram_text.map(str.encode))


@given(
    st.sampled_from(["SCRAM-SHA-256", "SCRAM-SHA-256-PLUS", "SCRAM-SHA-1", ""]),
    scram_bytes,
    scram_bytes,
    st.booleans(),
    st.booleans(),
)
def test_fuzz_server(
    mechanism: str, first: bytes, final: bytes, tls: bool, known_role: bool
) -> None:
    server = ScramServer(
        "alice",
        SECRET if known_role else None,
        nonce=nonce(1),
        channel_binding=CBIND if tls else None,
        mock_key=MOCK_KEY,
    )
    try:
        server.client_first(mechanism, first)
        server.client_final(final)
    except ScramError as failure:
        assert failure.sqlstate in {"08P01", "0A000", "28000", "28P01"}


@given(scram_bytes, scram_bytes)
def test_fuzz_server_final_after_valid_first(final_prefix: bytes, final_suffix: bytes) -> None:
    server = ScramServer("alice", SECRET, nonce=nonce(1))
    server_first = server.client_first("SCRAM-SHA-256", b"n,,n=,r=abc")
    nonce_attr = server_first.split(b",")[0]
    try:
        server.client_final(final_prefix + b"c=biws," + nonce_attr + final_suffix)
    except ScramError:
        pass


@given(scram_bytes, scram_bytes)
def test_fuzz_client(server_first: bytes, server_final: bytes) -> None:
    client = started_client()
    try:
        client.server_first(f"r={CLIENT_NONCE}".encode() + server_first)
        client.server_final(server_final)
    except ScramError:
        pass
