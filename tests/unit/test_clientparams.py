"""Startup parameters forwarded to the compute: libpq's client-side keywords are dropped."""

from __future__ import annotations

from proxy.clientparams import CLIENT_ONLY_KEYWORDS, forwarded_parameters, is_client_only
from proxy.pgwire.startup import StartupMessage


def _startup(**params: str) -> StartupMessage:
    return StartupMessage(3, 0, params, {})


def test_url_keywords_a_driver_forwards_do_not_reach_the_compute() -> None:
    # What asyncpg sends for the SNI url of `endpoint create --json`.
    startup = _startup(
        user="app", database="main", hostaddr="127.0.0.1", sslrootcert="/x/ca.pem",
        channel_binding="require", target_session_attrs="any", connect_timeout="5",
        application_name="web", client_encoding="UTF8", DateStyle="ISO",
    )
    assert forwarded_parameters(startup, "-c work_mem=8MB") == {
        "user": "app", "database": "main", "application_name": "web",
        "client_encoding": "UTF8", "DateStyle": "ISO", "options": "-c work_mem=8MB",
    }


def test_server_settings_and_protocol_parameters_are_not_on_the_list() -> None:
    for name in ("user", "database", "options", "replication", "application_name",
                 "client_encoding", "search_path", "TimeZone", "work_mem"):
        assert not is_client_only(name), name
    for name in ("hostaddr", "sslmode", "sslrootcert", "channel_binding",
                 "target_session_attrs", "connect_timeout", "sslnegotiation", "passfile"):
        assert is_client_only(name), name
    assert all(name == name.lower() for name in CLIENT_ONLY_KEYWORDS)
