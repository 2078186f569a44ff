"""From a classified request and its upstream's rule to the ordered attempts, as containerd would make them."""

from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode

from .reference import Route, RouteKind, format_route, named_reference
from .rules import Host, Rule

DOCKER_HUB = "docker.io"
DOCKER_HUB_SERVER = "registry-1.docker.io"
_WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def required_capability(route: Route, method: str) -> str:
    """The hosts.toml capability a host needs to be asked this request."""
    if route.kind in (RouteKind.BLOB_UPLOAD, RouteKind.UPLOAD_SESSION) or method in _WRITE_METHODS:
        return "push"
    if route.kind is RouteKind.REFERRERS:
        return "referrers"
    if route.kind is RouteKind.BLOB or (route.kind is RouteKind.MANIFEST and route.digest):
        return "pull"
    # Tags are mutable: turning one into a digest, or listing them, is what `resolve` allows.
    return "resolve"


def is_proxy_for(host: Host, upstream: str) -> bool:
    """containerd's rule for sending ns=: every host that is not the upstream registry itself."""
    if host.netloc == upstream:
        return False
    return not (upstream == DOCKER_HUB and host.netloc == DOCKER_HUB_SERVER)


@dataclass(frozen=True)
class Attempt:
    host: Host
    target: str  # path and query as sent to this host
    headers: tuple[tuple[str, str], ...]  # added to the client's: the host's [header] and the named reference
    forward_authorization: bool  # the client's credentials may go only to the upstream's own host


@dataclass(frozen=True)
class Plan:
    upstream: str
    route: Route
    capability: str
    named_reference: str | None
    attempts: tuple[Attempt, ...]


def host_target(host: Host, route: Route, query: Sequence[tuple[str, str]], upstream: str) -> str:
    # format_route gives "/v2/..."; a host's path replaces "/v2" (containerd appends it unless override_path).
    path = host.path.rstrip("/") + format_route(route)[len("/v2") :]
    params = [(k, v) for k, v in query if k != "ns"]
    if is_proxy_for(host, upstream):
        params.append(("ns", upstream))
    return f"{path}?{urlencode(params)}" if params else path


def make_plan(
    route: Route,
    method: str,
    rule: Rule,
    upstream: str,
    query: str,
    named_ref_headers: Sequence[str],
) -> Plan:
    capability = required_capability(route, method)
    named_ref = None
    if route.kind is RouteKind.MANIFEST and route.repository:
        named_ref = named_reference(upstream, route.repository, tag=route.tag, digest=route.digest)
    context = tuple((name, named_ref) for name in named_ref_headers) if named_ref else ()
    params = parse_qsl(query, keep_blank_values=True)
    attempts = tuple(
        Attempt(
            host=host,
            target=host_target(host, route, params, upstream),
            headers=host.headers + context,
            forward_authorization=not is_proxy_for(host, upstream),
        )
        for host in rule.hosts
        if capability in host.capabilities
    )
    return Plan(upstream, route, capability, named_ref, attempts)
