"""Endpoint resolution: SNI, options, the password form, and their disagreements."""

from __future__ import annotations

import pytest

from proxy.errors import ClientError
from proxy.routing import (
    PasswordForm,
    Route,
    endpoint_from_sni,
    parse_password_form,
    resolve,
    resolve_optional,
    resolve_with_password,
)

DOMAIN = "pgwake.localhost"


def test_password_form_parses_id_and_keeps_the_rest_verbatim() -> None:
    assert parse_password_form(b"endpoint=ep-a1;s3cr;et") == PasswordForm("ep-a1", b"s3cr;et")
    assert parse_password_form(b"endpoint=ep-a1;") == PasswordForm("ep-a1", b"")
    assert parse_password_form(b"endpoint=ep-a1;\xff\xfe") == PasswordForm("ep-a1", b"\xff\xfe")


@pytest.mark.parametrize("password", [b"hunter2", b"endpoint=ep-a1", b"", b"Endpoint=ep;x"])
def test_other_passwords_are_not_the_form(password: bytes) -> None:
    assert parse_password_form(password) is None


@pytest.mark.parametrize(
    "password",
    [b"endpoint=;pw", b"endpoint=EP;pw", b"endpoint=ep-a\n;pw", b"endpoint=../x;pw",
     b"endpoint=" + b"a" * 64 + b";pw", b"endpoint=\xff;pw", b"endpoint=-ep;pw"],
)
def test_password_form_ids_are_validated_strictly(password: bytes) -> None:
    with pytest.raises(ClientError) as info:
        parse_password_form(password)
    assert info.value.sqlstate == "08P01"
    assert "invalid endpoint id" in info.value.message


def test_resolution_order_and_disagreements() -> None:
    assert resolve(f"ep-a.{DOMAIN}", None, DOMAIN) == Route("ep-a", "sni")
    assert resolve("127.0.0.1", "ep-b", DOMAIN) == Route("ep-b", "options")
    assert resolve_optional("localhost", None, DOMAIN) is None
    assert resolve_optional(None, None, DOMAIN) is None
    with pytest.raises(ClientError, match="the host name names endpoint"):
        resolve(f"ep-a.{DOMAIN}", "ep-b", DOMAIN)
    form = PasswordForm("ep-c", b"pw")
    assert resolve_with_password(None, form, DOMAIN) == Route("ep-c", "password")
    assert resolve_with_password(Route("ep-c", "sni"), form, DOMAIN) == Route("ep-c", "sni")
    with pytest.raises(ClientError, match='the host name name endpoint "ep-a" but the password'):
        resolve_with_password(Route("ep-a", "sni"), form, DOMAIN)
    with pytest.raises(ClientError, match='the options name endpoint "ep-b" but the password'):
        resolve_with_password(Route("ep-b", "options"), form, DOMAIN)
    with pytest.raises(ClientError) as info:
        resolve_with_password(None, None, DOMAIN)
    assert "no endpoint given" in info.value.message
    assert info.value.hint is not None and "endpoint=<endpoint>;<password>" in info.value.hint


@pytest.mark.parametrize(
    "name", [f"a.b.{DOMAIN}", f"EP_X.{DOMAIN}", f"-x.{DOMAIN}", f"{'a' * 64}.{DOMAIN}"]
)
def test_sni_names_under_the_domain_must_be_endpoint_ids(name: str) -> None:
    with pytest.raises(ClientError):
        endpoint_from_sni(name, DOMAIN)


def test_sni_outside_the_domain_names_nothing() -> None:
    assert endpoint_from_sni("db.example.com", DOMAIN) is None
    assert endpoint_from_sni(f"EP-A.{DOMAIN.upper()}.", DOMAIN) == "ep-a"
