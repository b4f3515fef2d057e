"""The one rule for role names and control API path segments (wakeup/api.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wakeup.api import as_postgres_name, path_segment, valid_role_name


@pytest.mark.parametrize("name", ["app", "_x", "A$b-c_9", "a" * 63])
def test_valid_role_names(name: str) -> None:
    assert valid_role_name(name)


@pytest.mark.parametrize(
    "name", ["", "a" * 64, "..", "../x", "a/b", "app\n", "9lives", "-x", "a b", "é", "a%2Fb"]
)
def test_invalid_role_names(name: str) -> None:
    assert not valid_role_name(name)


def test_names_are_cut_like_postgres() -> None:
    assert as_postgres_name("x" * 9000) == "x" * 63
    assert as_postgres_name("app") == "app"
    # 31 two-byte characters are 62 bytes; the 32nd would straddle byte 63: it goes.
    assert as_postgres_name("é" * 40) == "é" * 31


@given(st.text())
def test_a_cut_name_is_at_most_63_bytes(value: str) -> None:
    assert len(as_postgres_name(value).encode("utf-8", "surrogatepass")) <= 63


@given(st.text(min_size=1))
def test_a_segment_stays_one_segment(value: str) -> None:
    try:
        encoded = path_segment(value)
    except ValueError:
        assert value in (".", "..") or "/" in value or "\\" in value
        return
    assert "/" not in encoded and encoded not in (".", "..")
