"""The connection budget proxies share: a compute's max_connections minus reserved slots."""

from __future__ import annotations

from wakeup.provisioners.base import connection_budget


def test_postgresql_defaults_leave_97() -> None:
    assert connection_budget({}) == 97


def test_settings_override_defaults_and_reserved_slots_count() -> None:
    assert connection_budget({"max_connections": "20"}) == 17
    assert connection_budget({"max_connections": "50", "superuser_reserved_connections": "5",
                              "reserved_connections": "2"}) == 43


def test_never_below_one() -> None:
    assert connection_budget({"max_connections": "3"}) == 1
