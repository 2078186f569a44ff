"""Every routing decision, made without asking anyone: from a request and its upstream's rule to the hosts to ask in
order (as containerd would make them), what each is sent and the token scope it needs, and how the gateway handles
the request: reads the answer whole itself, lets mitmproxy stream it (probing hosts first, verifying a blob's
digest), answers it itself, or refuses it."""

import enum
from collections.abc import Sequence
from dataclasses import dataclass, replace
from urllib.parse import quote, unquote_plus, unquote_to_bytes, urlsplit

from .hoststoml import Host, Rule
from .ocierror import OciError
from .routes import (
    DOCKER_HUB,
    DOCKER_HUB_SERVER,
    Route,
    RouteError,
    RouteKind,
    default_port,
    format_route,
    named_reference,
    normalize_repository,
    parse_route,
)

_WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


PUSH = frozenset({"push"})
REFERRERS = frozenset({"referrers"})
PULL = frozenset({"pull"})
PULL_AND_RESOLVE = frozenset({"pull", "resolve"})

# What ocigate reads whole (it is small) and passes on as the host's answer: it follows their redirects itself.
READ_WHOLE_KINDS = frozenset({RouteKind.MANIFEST, RouteKind.TAGS, RouteKind.REFERRERS, RouteKind.CATALOG})

# The headers hosts read a named reference from, whichever ocigate_named_ref_headers names: only the gateway says it.
NAMED_REFERENCE_HEADERS = ("OCI-Named-Ref", "OCI-Ref")


def required_capabilities(route: Route, method: str) -> frozenset[str]:
    """The hosts.toml capabilities a host needs, all of them, to be asked this request (containerd's filterHosts)."""
    if route.kind in (RouteKind.BLOB_UPLOAD, RouteKind.UPLOAD_SESSION) or method in _WRITE_METHODS:
        return PUSH
    if route.kind is RouteKind.REFERRERS:
        return REFERRERS
    if route.kind is RouteKind.BLOB or (route.kind is RouteKind.MANIFEST and route.digest):
        return PULL
    # Tags are mutable: turning one into a digest, or listing them, is what `resolve` adds to `pull`.
    return PULL_AND_RESOLVE


def is_proxy_for(host: Host, upstream: str) -> bool:
    """containerd's rule for sending ns=: every host that is not the upstream registry itself."""
    if host.netloc == upstream:
        return False
    return not (upstream == DOCKER_HUB and host.netloc == DOCKER_HUB_SERVER)


@dataclass(frozen=True)
class Access:
    """What a request does to which repository of which upstream: the token scope it needs."""

    upstream: str
    repository: str | None  # None: the registry's catalog, or its /v2/ ping
    push: bool = False
    catalog: bool = False
    # The repository as the host asked names it (a mirror's repository_prefix applied), for its token scope;
    # credentials are looked up for the upstream's own name.
    host_repository: str | None = None
    # A cross-repository mount's source, as the host names it: the token must allow pulling from it too.
    mounted_from: str | None = None
    # The upstream's rule is offline: no token realm on the registry itself may be asked either.
    offline: bool = False

    @property
    def scopes(self) -> tuple[str, ...]:
        if self.catalog:
            return ("registry:catalog:*",)
        repository = self.host_repository or self.repository
        if repository is None:
            return ()
        actions = "pull,push" if self.push else "pull"
        scope = f"repository:{repository}:{actions}"
        if self.mounted_from and self.mounted_from != repository:
            return (scope, f"repository:{self.mounted_from}:pull")
        return (scope,)


@dataclass(frozen=True)
class Attempt:
    host: Host
    target: str  # path and query as sent to this host
    headers: tuple[tuple[str, str], ...]  # added to the client's: the host's [header] and the named reference
    # Client headers (lowercase names) that never reach this host: the named reference's, which the gateway alone
    # says (under `headers`, or not at all).
    withheld: frozenset[str]
    repository: str | None  # the repository as this host names it (its repository_prefix applied)
    mounted_from: str | None  # a cross-repository mount's source repository, as this host names it
    # The client's credentials go along, to the upstream's own host only and only when its rule says the client
    # authenticates; otherwise ocigate authenticates with its own.
    forward_authorization: bool
    access: Access  # the token scope ocigate's own Authorization for this host must carry


class Handling(enum.Enum):
    """Who answers the client."""

    READ_WHOLE = "read whole"  # ocigate asks the hosts in turn, reads the first good answer whole and passes it on
    STREAM = "stream"  # mitmproxy streams the request to the first host that may be asked, and its answer back
    PING = "ping"  # the gateway answers the /v2/ ping itself: ocigate authenticates for the client
    NO_HOST = "no host"  # no host of the rule has the capabilities: the gateway answers with an error


@dataclass(frozen=True)
class Plan:
    upstream: str
    route: Route
    method: str
    capabilities: frozenset[str]
    named_reference: str | None
    attempts: tuple[Attempt, ...]
    handling: Handling
    source: str  # the rule's file, for messages
    # The rule is offline: nothing may go to the registry itself, not even where a host's answer points.
    offline: bool = False
    # A streamed blob: each host but the last that may be asked is asked first (HEAD) whether it has it.
    probe: bool = False
    # A blob GET: the digest its bytes must hash to as they pass.
    verify: str | None = None
    # A manifest a pull names: what it references belongs to that pull (see context.ContextStore).
    remembers: bool = False

    @property
    def push(self) -> bool:
        return self.capabilities == PUSH


def host_target(host: Host, route: Route, query: str, upstream: str) -> str:
    """Path and query for one host. The client's query is kept as it was sent (byte for byte, whatever its
    encoding), but for an `ns` of its own, however spelled: the gateway knows the upstream, and says it once."""
    if route.repository:
        route = replace(route, repository=host_repository(host, route.repository))
    # format_route gives "/v2/..."; a host's path replaces "/v2" (containerd appends it unless override_path).
    path = host.path.rstrip("/") + format_route(route)[len("/v2") :]
    params = [_host_param(p, host) for p in query.split("&") if p and not _names_ns(p)]
    if is_proxy_for(host, upstream):
        params.append("ns=" + quote(upstream, safe=""))
    return f"{path}?{'&'.join(params)}" if params else path


def _names_ns(param: str) -> bool:
    """Whether a query parameter is an `ns` as a host reads it (Go's url.ParseQuery, which a mirror's first `ns`
    comes from)."""
    return _query_key(param) == b"ns"


def _query_key(param: str) -> bytes:
    """A query parameter's key as a host reads it (Go's url.ParseQuery): "+" and percent escapes decoded, case kept."""
    return unquote_to_bytes(param.partition("=")[0].replace("+", " "))


def _host_param(param: str, host: Host) -> str:
    """A query parameter as the host is to see it: a cross-repository mount's `from` names a repository, which a
    host with a repository_prefix knows under that prefix."""
    _, equals, value = param.partition("=")
    if _query_key(param) != b"from" or not equals or not host.repository_prefix:
        return param
    return f"from={quote(host_repository(host, unquote_plus(value)), safe='')}"


def mount_sources(query: str) -> tuple[str, ...]:
    """Every repository a cross-repository mount (`POST .../blobs/uploads/?mount=<digest>&from=<repository>`) names
    as its source, however its key is spelled (`%66rom`, as a host's Go reads it too), in order."""
    return tuple(unquote_plus(p.partition("=")[2]) for p in query.split("&") if _query_key(p) == b"from")


def mounted_from(query: str) -> str | None:
    """The repository a mount takes the blob from, as a host reads it (the first `from`), or None."""
    sources = mount_sources(query)
    return sources[0] if sources and sources[0] else None


def host_repository(host: Host, repository: str) -> str:
    return f"{host.repository_prefix}/{repository}" if host.repository_prefix else repository


def ping_target(host: Host, upstream: str) -> str:
    """The host's /v2/ (with ns= for a mirror): where it says how it wants to be authenticated."""
    return host_target(host, Route(RouteKind.PING), "", upstream)


def location_for_client(location: str, host: Host) -> str:
    """A Location a host answered with, as the client is to follow it: one on the host itself becomes a path on the
    upstream (`/v2/...`, its query kept), so that an upload session goes on through the gateway under the upstream's
    name; one anywhere else (object storage) is left as it is."""
    try:
        parts = urlsplit(location)
        port = parts.port or default_port(parts.scheme)
    except ValueError:
        return location  # not a URL ocigate can read: the client makes of it what it can
    elsewhere = (parts.scheme, (parts.hostname or "").lower(), port) != (host.scheme, host.host, host.port)
    if (parts.scheme or parts.netloc) and elsewhere:
        return location
    prefix = host.path.rstrip("/")
    if host.repository_prefix:
        prefix += "/" + host.repository_prefix
    if not (parts.path == prefix or parts.path.startswith(prefix + "/")):
        return location
    path = "/v2" + parts.path[len(prefix) :]
    return f"{path}?{parts.query}" if parts.query else path


@dataclass(frozen=True)
class Origin:
    """The pull a request for content belongs to: the manifest it was referenced by, as the client asked for it."""

    named_reference: str  # "<upstream>/<repository>:<tag>", or "@<digest>" for a pull by digest
    host: str  # the URL of the host that served that manifest


def _named_reference(route: Route, upstream: str, origin: Origin | None) -> str | None:
    """What the OCI-Named-Ref header says: the manifest's own reference; for content by digest, the reference of
    the pull it belongs to, and its own `@<digest>` when that is not known."""
    if not route.repository or route.kind not in _NAMED_KINDS:
        return None
    if route.tag is None and origin is not None:
        return origin.named_reference
    return named_reference(upstream, route.repository, tag=route.tag, digest=route.digest)


_NAMED_KINDS = frozenset({RouteKind.MANIFEST, RouteKind.BLOB, RouteKind.REFERRERS})


def _serves_this_pull(host: Host, by_tag: bool) -> bool:
    """containers-registries.conf's pull-from-mirror: a mirror may serve only the pulls of images by digest, or only
    those by tag (and everything they reference). The registry's own host serves every pull."""
    if host.is_server or host.pull_from_mirror == "all":
        return True
    return (host.pull_from_mirror == "tag-only") == by_tag


def classify(target: str, rule: Rule, upstream: str) -> Route | OciError | None:
    """What a request (its path and query) to a ruled upstream asks for, its repository as the upstream names it; an
    error when it is no request the gateway can forward; None when it is none of the distribution API and passes
    untouched."""
    if not target.isascii():
        # Anything else is not a valid request target (RFC 9112 3.2): it has no one spelling to forward.
        return OciError(400, "UNSUPPORTED", "request target has bytes that are not percent-encoded ASCII")
    try:
        route = parse_route(target.partition("?")[0])
    except RouteError as e:
        return OciError(400, e.code, str(e))
    if route is None:
        if rule.offline:
            # Anything but the distribution API would go to the registry itself, which an offline rule never
            # contacts (a token endpoint under /v2/, a Location outside a mirror's API).
            message = f"{target} is not a distribution request; {upstream} is offline ({rule.source})"
            return OciError(404, "UNSUPPORTED", message)
        return None
    if route.repository:
        route = replace(route, repository=normalize_repository(upstream, route.repository))
    return route


@dataclass(frozen=True)
class OriginQuery:
    """The request is for content by digest: the pull it belongs to is looked up (see context.ContextStore.origin)."""

    repository: str
    digest: str
    fetch: bool  # a manifest GET: its bytes are about to be read, so what they reference need not be fetched


def origin_query(route: Route, method: str) -> OriginQuery | None:
    if not (route.digest and route.repository and method in ("GET", "HEAD")):
        return None
    return OriginQuery(route.repository, route.digest, fetch=route.kind is RouteKind.MANIFEST and method == "GET")


def make_plan(
    route: Route,
    method: str,
    rule: Rule,
    upstream: str,
    query: str,
    named_ref_headers: Sequence[str],
    origin: Origin | None = None,
) -> Plan:
    """The hosts to ask, in order, and how the request is handled. `origin`: the pull this request belongs to, when
    a manifest the client fetched referenced what it asks for; its host is asked first (the sticky host), and its
    reference is named."""
    capabilities = required_capabilities(route, method)
    pushing = origin is None and any("push" in host.capabilities for host in rule.hosts)
    if route.kind is RouteKind.BLOB and method == "HEAD" and pushing:
        # A HEAD of a blob is how a client pushing asks whether it must upload it: the host the push goes to must
        # answer, not a mirror that has it (as containerd's pusher asks its push host). A blob of a pull the gateway
        # served a manifest for is being pulled: its pull hosts answer.
        capabilities = PUSH
    push = capabilities == PUSH
    named_ref = _named_reference(route, upstream, origin if not push else None)
    context = tuple((name, named_ref) for name in named_ref_headers) if named_ref else ()
    withheld = frozenset(name.lower() for name in (*NAMED_REFERENCE_HEADERS, *named_ref_headers))
    hosts = [host for host in rule.hosts if capabilities <= host.capabilities]
    if not push and named_ref:
        by_tag = "@" not in named_ref
        hosts = [host for host in hosts if _serves_this_pull(host, by_tag)]
    if origin is not None and route.tag is None and not push:
        hosts.sort(key=lambda host: host.url != origin.host)  # stable: the others keep their order
    if push:
        # A push goes to one host, the first that may take it, as containerd pushes: an upload session started on
        # one host cannot go on on another, and content pushed must land where it is meant to.
        hosts = hosts[:1]
    if route.kind is RouteKind.PING:
        # The client needs no credentials for a registry ocigate authenticates to. One that authenticates itself
        # hears the registry's own challenge (and only the registry's own host hears its credentials).
        hosts = [host for host in hosts if rule.client_authenticates and not is_proxy_for(host, upstream)]
    source = mounted_from(query)
    access = Access(
        upstream, route.repository, push=push, catalog=route.kind is RouteKind.CATALOG, offline=rule.offline
    )
    attempts = []
    for host in hosts:
        repository = host_repository(host, route.repository) if route.repository else None
        mounted = host_repository(host, source) if source else None
        attempts.append(
            Attempt(
                host=host,
                target=host_target(host, route, query, upstream),
                headers=host.headers + context,
                withheld=withheld,
                repository=repository,
                mounted_from=mounted,
                forward_authorization=rule.client_authenticates and not is_proxy_for(host, upstream),
                access=replace(access, host_repository=repository, mounted_from=mounted),
            )
        )
    blob = route.kind is RouteKind.BLOB
    return Plan(
        upstream,
        route,
        method,
        capabilities,
        named_ref,
        tuple(attempts),
        _handling(route, method, push, bool(attempts)),
        str(rule.source),
        offline=rule.offline,
        probe=blob and not push,
        verify=route.digest if blob and method == "GET" else None,
        remembers=route.kind is RouteKind.MANIFEST and named_ref is not None,
    )


def _handling(route: Route, method: str, push: bool, any_host: bool) -> Handling:
    if not any_host:
        return Handling.PING if route.kind is RouteKind.PING else Handling.NO_HOST
    small_answer = route.kind in READ_WHOLE_KINDS and not push
    if small_answer or route.kind is RouteKind.PING or (route.kind is RouteKind.BLOB and method == "HEAD"):
        return Handling.READ_WHOLE
    return Handling.STREAM
