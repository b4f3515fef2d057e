"""Which startup parameters reach the compute: libpq's client-side keywords never do.

libpq reads connection keywords (`hostaddr`, `sslmode`, `sslrootcert`, ...) itself
and never sends them; other drivers (asyncpg, for one) forward every URL parameter
they do not know as a server setting, and PostgreSQL then refuses the whole login
with 42704 `unrecognized configuration parameter "hostaddr"`. The URLs we hand out
carry such keywords, so the proxy drops them instead of passing the refusal on.
"""

from __future__ import annotations

from proxy.pgwire.startup import StartupMessage

# libpq's connection keywords (PostgreSQL 18, `PQconndefaults()`) that are not
# startup parameters of the protocol: the client acts on them, the server has
# no setting of that name. Kept: user, database, options, replication and the
# real server settings among them (application_name, client_encoding).
CLIENT_ONLY_KEYWORDS = frozenset({
    "host", "hostaddr", "port", "dbname", "password", "passfile", "service", "servicefile",
    "require_auth", "channel_binding", "connect_timeout", "fallback_application_name",
    "keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count",
    "tcp_user_timeout", "sslmode", "sslnegotiation", "sslcompression", "sslcert", "sslkey",
    "sslkeylogfile", "sslpassword", "sslcertmode", "sslrootcert", "sslcrl", "sslcrldir",
    "sslsni", "requirepeer", "ssl_min_protocol_version", "ssl_max_protocol_version",
    "min_protocol_version", "max_protocol_version", "gssencmode", "krbsrvname", "gsslib",
    "gssdelegation", "target_session_attrs", "load_balance_hosts", "scram_client_key",
    "scram_server_key", "oauth_issuer", "oauth_client_id", "oauth_client_secret",
    "oauth_scope",
})


def is_client_only(name: str) -> bool:
    """True for a libpq keyword a driver forwarded by mistake (spelled as libpq spells it)."""
    return name in CLIENT_ONLY_KEYWORDS


def forwarded_parameters(startup: StartupMessage, options_rest: str) -> dict[str, str]:
    """The startup parameters the compute sees: ours stripped, protocol options and
    libpq's client-side keywords (which some drivers forward) dropped."""
    params = {
        k: v for k, v in startup.params.items() if k != "options" and not is_client_only(k)
    }
    params.setdefault("database", params["user"])
    if options_rest.strip():
        params["options"] = options_rest
    return params
