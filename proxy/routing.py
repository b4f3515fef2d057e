"""Which endpoint a connection means: SNI, then `options=endpoint=`; disagreement is an error."""

from __future__ import annotations

from dataclasses import dataclass

from proxy.errors import ClientError, Kind
from wakeup.api import valid_endpoint_id

ROUTING_HINT = (
    "Connect with the host name <endpoint>.{domain} (TLS SNI), or add "
    "options=endpoint%3D<endpoint> to the connection URL."
)


@dataclass(frozen=True)
class Route:
    endpoint_id: str
    source: str  # "sni" | "options"


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
    raise ClientError(
        Kind.ROUTING,
        "no endpoint given: the connection names no database endpoint",
        hint=ROUTING_HINT.format(domain=domain),
    )
