"""Which endpoint a connection means: SNI, `options=endpoint=`, or the password form.

The password form `endpoint=<id>;<password>` is for clients that can send
neither SNI nor options; any two sources that disagree are an error.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.errors import ClientError, Kind
from wakeup.api import ENDPOINT_ID_RE

ROUTING_HINT = (
    "Connect with the host name <endpoint>.{domain} (TLS SNI), or add "
    "options=endpoint%3D<endpoint> to the connection URL, or use the password "
    "endpoint=<endpoint>;<password>."
)
PASSWORD_FORM_PREFIX = b"endpoint="
PASSWORD_FORM_SEPARATOR = b";"
_SOURCE_NAMES = {"sni": "host name", "options": "options"}


@dataclass(frozen=True)
class Route:
    endpoint_id: str
    source: str  # "sni" | "options" | "password"


@dataclass(frozen=True)
class PasswordForm:
    endpoint_id: str
    password: bytes  # the role's real password, as sent (PostgreSQL does not require UTF-8)


def valid_endpoint_id(value: str) -> bool:
    # fullmatch: the pattern's `$` would also accept a trailing newline.
    return ENDPOINT_ID_RE.fullmatch(value) is not None


def endpoint_from_sni(server_name: str | None, domain: str) -> str | None:
    """`<endpoint>.<domain>` → endpoint; any other name (an IP, another domain) → None."""
    if not server_name:
        return None
    name = server_name.rstrip(".").lower()
    suffix = "." + domain.lower()
    if not name.endswith(suffix):
        return None
    label = name[: -len(suffix)]
    if "." in label or not valid_endpoint_id(label):
        raise ClientError(
            Kind.ROUTING,
            f'"{server_name}" does not name an endpoint under {domain}',
            hint=ROUTING_HINT.format(domain=domain),
        )
    return label


def resolve(server_name: str | None, options_endpoint: str | None, domain: str) -> Route:
    route = resolve_optional(server_name, options_endpoint, domain)
    if route is None:
        raise no_endpoint_error(domain)
    return route


def no_endpoint_error(domain: str) -> ClientError:
    return ClientError(
        Kind.ROUTING,
        "no endpoint given: the connection names no database endpoint",
        hint=ROUTING_HINT.format(domain=domain),
    )


def resolve_optional(
    server_name: str | None, options_endpoint: str | None, domain: str
) -> Route | None:
    """The endpoint from SNI or options; None when neither names one (ask for the password)."""
    from_sni = endpoint_from_sni(server_name, domain)
    if options_endpoint is not None and not valid_endpoint_id(options_endpoint):
        raise ClientError(
            Kind.ROUTING,
            f'invalid endpoint id "{options_endpoint[:64]}" in options',
            hint="Endpoint ids are lowercase letters, digits and hyphens.",
        )
    if from_sni and options_endpoint and from_sni != options_endpoint:
        raise ClientError(
            Kind.ROUTING,
            f'the host name names endpoint "{from_sni}" but options name "{options_endpoint}"',
            hint="Use one of them, or make them agree.",
        )
    if from_sni:
        return Route(from_sni, "sni")
    if options_endpoint:
        return Route(options_endpoint, "options")
    return None


def parse_password_form(password: bytes) -> PasswordForm | None:
    """`endpoint=<id>;<password>` → id and password; None if the password is not that form."""
    if not password.startswith(PASSWORD_FORM_PREFIX):
        return None
    raw_id, sep, rest = password[len(PASSWORD_FORM_PREFIX) :].partition(PASSWORD_FORM_SEPARATOR)
    if not sep:
        return None
    endpoint_id = raw_id.decode("ascii", "replace")
    if not valid_endpoint_id(endpoint_id):
        raise ClientError(
            Kind.ROUTING,
            f'invalid endpoint id "{endpoint_id[:64]}" in the password',
            hint="Endpoint ids are lowercase letters, digits and hyphens.",
        )
    return PasswordForm(endpoint_id, rest)


def resolve_with_password(route: Route | None, form: PasswordForm | None, domain: str) -> Route:
    """Combine SNI/options with the password form; they must agree when both are given."""
    if form is None:
        if route is None:
            raise no_endpoint_error(domain)
        return route
    if route is not None and route.endpoint_id != form.endpoint_id:
        raise ClientError(
            Kind.ROUTING,
            f'the {_SOURCE_NAMES[route.source]} name endpoint "{route.endpoint_id}" but the '
            f'password names "{form.endpoint_id}"',
            hint="Use one of them, or make them agree.",
        )
    return route or Route(form.endpoint_id, "password")
