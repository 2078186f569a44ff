"""The mitmproxy addons: thin glue from flows to the pure modules.

request headers -> classify (reference) -> rule (rules) -> plan (router) -> attempts (attempt, upstream) -> answer,
or the flow re-pointed at the chosen host and streamed by mitmproxy.
"""

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from mitmproxy import connection, ctx, exceptions, http, tls
from mitmproxy.proxy import server_hooks
from OpenSSL import SSL

from .attempt import HOP_BY_HOP, Outcome, choose_blob_host, encode_error, error_body, failure, first_good
from .destinations import DestinationError, Destinations
from .hosttls import HostTLS, HostTLSError, openssl_context, python_context
from .reference import Route, RouteError, RouteKind, normalize_repository, normalize_upstream, parse_route
from .router import Attempt, Plan, make_plan
from .rules import Host, RulesError, RuleSet, load_rules
from .upstream import HostResponse, Upstream

log = logging.getLogger("ocigate")

METADATA_KEY = "ocigate"
_SMALL_ANSWER_KINDS = frozenset({RouteKind.MANIFEST, RouteKind.TAGS, RouteKind.REFERRERS, RouteKind.CATALOG})


class Shared:
    """What the addons share: the dialling policy and the loaded rules (replaced whole on reconfiguration)."""

    def __init__(self) -> None:
        self.destinations = Destinations()
        self.rules: RuleSet | None = None
        # The TLS settings a client connection's flows were re-pointed with, by host and port: the same host may
        # appear in several rules with different settings, and a client connection belongs to one upstream.
        self.host_tls_by_client: dict[str, dict[tuple[str, int], HostTLS]] = {}
        self.upstream = Upstream(self.destinations, connect_timeout=30, read_timeout=60)

    def set_destinations(self, destinations: Destinations) -> None:
        self.destinations = destinations
        self.upstream.destinations = destinations


class Dialing:
    """Every connection mitmproxy opens goes where the host map says and only to allowed addresses."""

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        # The address a server connection was asked for, before the host map re-pointed it: the TLS settings of a
        # host belong to its name and port, not to where it happens to be dialled.
        self.asked_for: dict[str, tuple[str, int]] = {}

    def load(self, loader) -> None:
        loader.add_option(
            "ocigate_map_hosts",
            Sequence[str],
            [],
            "Host map, NAME[:PORT]=ADDRESS[:PORT]: connections to NAME go to ADDRESS instead of resolving it "
            "(an air-gap box without DNS, or test registries under made-up names).",
        )
        loader.add_option(
            "ocigate_allow_destinations",
            Sequence[str],
            [],
            "Networks (CIDR) every connection must go to; anything else is refused. Empty: no limit.",
        )
        loader.add_option(
            "ocigate_dns",
            bool,
            True,
            "Resolve names that ocigate_map_hosts does not map. Off: such names are refused, never resolved.",
        )

    def configure(self, updated: set[str]) -> None:
        if updated & {"ocigate_map_hosts", "ocigate_allow_destinations", "ocigate_dns"}:
            try:
                destinations = Destinations.from_options(
                    ctx.options.ocigate_map_hosts,
                    ctx.options.ocigate_allow_destinations,
                    ctx.options.ocigate_dns,
                )
            except ValueError as e:
                raise exceptions.OptionsError(str(e)) from None
            self.shared.set_destinations(destinations)

    async def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        server = data.server
        if server.address is None or server.via is not None:
            return
        host, port = server.address
        try:
            server.address = await self.shared.destinations.resolve(host, port)
        except DestinationError as e:
            server.error = f"ocigate refused the connection: {e}"
            log.warning("ocigate: refused connection to %s:%s: %s", host, port, e)
            return
        self.asked_for[server.id] = (host, port)

    def server_disconnected(self, data: server_hooks.ServerConnectionHookData) -> None:
        self.asked_for.pop(data.server.id, None)

    def client_disconnected(self, client: connection.Client) -> None:
        self.shared.host_tls_by_client.pop(client.id, None)

    def tls_start_server(self, tls_start: tls.TlsData) -> None:
        # Runs after mitmproxy's own tlsconfig addon built the connection: swapping the context keeps its SNI,
        # hostname check and ALPN, and trusts and presents what the host's hosts.toml entry says instead.
        server = tls_start.conn
        if not isinstance(server, connection.Server) or tls_start.ssl_conn is None:
            return
        asked = self.asked_for.get(server.id)
        if asked is None:
            return
        host_tls = self.shared.host_tls_by_client.get(tls_start.context.client.id, {}).get(asked)
        if host_tls is None:
            return
        tls_start.ssl_conn.set_context(openssl_context(host_tls))
        if host_tls.skip_verify:
            tls_start.ssl_conn.set_verify(SSL.VERIFY_NONE)


class Gateway:
    """Routes the distribution requests of every upstream that has a rule, as containerd's hosts.toml says."""

    def __init__(self, shared: Shared) -> None:
        self.shared = shared

    def load(self, loader) -> None:
        loader.add_option(
            "ocigate_rules",
            str,
            "",
            "Directory of containerd hosts.toml rules (the certs.d layout: <registry>/hosts.toml, _default/).",
        )
        loader.add_option(
            "ocigate_named_ref_headers",
            Sequence[str],
            ["OCI-Named-Ref"],
            "Names of the request header carrying <registry>/<repository>:<tag> (or @<digest>) to hosts, e.g. "
            "OCI-Ref. Empty: send none.",
        )
        loader.add_option("ocigate_connect_timeout", int, 30, "Seconds to connect to a host that has no dial_timeout.")
        loader.add_option("ocigate_read_timeout", int, 60, "Seconds to wait for a host's answer.")
        loader.add_option(
            "ocigate_intercept_unruled",
            bool,
            False,
            "Decrypt connections to hosts no rule names too (for captures); by default they pass through as-is.",
        )

    def configure(self, updated: set[str]) -> None:
        if "connection_strategy" in updated and ctx.options.connection_strategy != "lazy":
            # An eager proxy dials the CONNECT target before any hook can re-point it, and upstream names may not
            # resolve at all (an air-gap box, a mirror-only registry).
            log.info("ocigate: setting connection_strategy=lazy")
            ctx.options.update(connection_strategy="lazy")
        if "ocigate_rules" in updated:
            self.shared.rules = self._load_rules(ctx.options.ocigate_rules)
        for name in ("ocigate_connect_timeout", "ocigate_read_timeout"):
            if getattr(ctx.options, name) <= 0:
                raise exceptions.OptionsError(f"{name} must be a positive number of seconds")
        for name in ctx.options.ocigate_named_ref_headers:
            if not name or not all(c.isalnum() or c in "-_" for c in name):
                raise exceptions.OptionsError(f"ocigate_named_ref_headers: {name!r} is not a header name")
        self.shared.upstream.connect_timeout = ctx.options.ocigate_connect_timeout
        self.shared.upstream.read_timeout = ctx.options.ocigate_read_timeout

    @staticmethod
    def _load_rules(directory: str) -> RuleSet | None:
        if not directory:
            return None
        try:
            rules = load_rules(Path(directory).expanduser())
        except RulesError as e:
            raise exceptions.OptionsError(f"ocigate_rules: {e}") from None
        # A `ca` or `client` file that cannot be loaded is a broken rule too: found now, not on the first pull.
        for rule in rules.rules():
            for host in rule.hosts:
                try:
                    python_context(HostTLS.of(host))
                    openssl_context(HostTLS.of(host))
                except HostTLSError as e:
                    raise exceptions.OptionsError(f"ocigate_rules: {rule.source}: {host.url}: {e}") from None
        return rules

    def running(self) -> None:
        if self.shared.rules is None:
            log.warning("ocigate: no ocigate_rules directory: every request passes through untouched")
        host = ctx.options.listen_host or "127.0.0.1"
        proxy = f"http://{host}:{ctx.options.listen_port or 8080}"
        ca = Path(ctx.options.confdir).expanduser() / "mitmproxy-ca-cert.pem"
        log.info(
            "ocigate: gateway on %s with rules from %s\n"
            "  point clients at it: export HTTPS_PROXY=%s\n"
            "  and make them trust its CA: %s (README: 'Point your client at ocigate')",
            proxy,
            ctx.options.ocigate_rules or "(none)",
            proxy,
            ca,
        )

    async def done(self) -> None:
        await self.shared.upstream.aclose()

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        if ctx.options.ocigate_intercept_unruled or self.shared.rules is None:
            return
        address = data.context.server.address
        if address and self._upstream_rule(address[0], address[1], "https") is None:
            data.ignore_connection = True

    def _upstream_rule(self, host: str, port: int, scheme: str):
        default_port = 443 if scheme == "https" else 80
        try:
            upstream = normalize_upstream(host, None if port == default_port else port)
        except RouteError:
            return None
        rule = self.shared.rules.lookup(upstream) if self.shared.rules else None
        return (upstream, rule) if rule else None

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not self.shared.rules:
            return
        request = flow.request
        found = self._upstream_rule(request.host, request.port, request.scheme)
        if found is None:
            return
        upstream, rule = found
        path, _, query = request.path.partition("?")
        try:
            route = parse_route(path)
        except RouteError as e:
            self._answer(flow, 400, error_body(e.code, str(e)))
            self._record(flow, upstream, str(rule.source), None, [], "gateway")
            return
        if route is None:
            return
        if route.repository:
            route = _with_repository(route, normalize_repository(upstream, route.repository))
        if route.kind is RouteKind.PING:
            flow.response = http.Response.make(
                200,
                b"{}",
                {"Content-Type": "application/json", "Docker-Distribution-API-Version": "registry/2.0"},
            )
            self._record(flow, upstream, str(rule.source), route, [], "gateway")
            return
        plan = make_plan(route, request.method, rule, upstream, query, ctx.options.ocigate_named_ref_headers)
        if not plan.attempts:
            self._fail(flow, plan, [], str(rule.source))
            return
        client_headers = list(request.headers.fields)
        if (route.kind in _SMALL_ANSWER_KINDS and plan.capability != "push") or (
            route.kind is RouteKind.BLOB and request.method == "HEAD"
        ):
            answer, outcomes = await first_good(plan, request.method, client_headers, self.shared.upstream)
            if answer is None:
                self._fail(flow, plan, outcomes, str(rule.source))
                return
            flow.response = _response(answer)
            self._record(flow, upstream, str(rule.source), route, outcomes, outcomes[-1].host, plan)
            return
        if route.kind is RouteKind.BLOB:
            chosen, outcomes = await choose_blob_host(plan, client_headers, self.shared.upstream)
        else:
            chosen, outcomes = plan.attempts[0], []
        assert chosen is not None
        _repoint(flow, chosen)
        host_tls = HostTLS.of(chosen.host)
        if chosen.host.scheme == "https" and not host_tls.is_default:
            self.shared.host_tls_by_client.setdefault(flow.client_conn.id, {})[(chosen.host.host, chosen.host.port)] = (
                host_tls
            )
        flow.metadata[METADATA_KEY + "_stream"] = True
        request.stream = True
        self._record(flow, upstream, str(rule.source), route, outcomes, chosen.host.url, plan)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.metadata.get(METADATA_KEY + "_stream") and flow.response:
            flow.response.stream = True

    def response(self, flow: http.HTTPFlow) -> None:
        record = flow.metadata.get(METADATA_KEY)
        if record and flow.response:
            record["status"] = flow.response.status_code
            log.info("ocigate: %s", describe(flow.request.method, record))

    def error(self, flow: http.HTTPFlow) -> None:
        record = flow.metadata.get(METADATA_KEY)
        if record and flow.error:
            record["error"] = flow.error.msg
            log.warning("ocigate: %s", describe(flow.request.method, record))

    def _fail(self, flow: http.HTTPFlow, plan: Plan, outcomes: list[Outcome], source: str) -> None:
        status, body = failure(plan, outcomes, source)
        self._answer(flow, status, body)
        self._record(flow, plan.upstream, source, plan.route, outcomes, "gateway", plan)

    @staticmethod
    def _answer(flow: http.HTTPFlow, status: int, body: dict) -> None:
        content = b"" if flow.request.method == "HEAD" else encode_error(body)
        flow.response = http.Response.make(status, content, {"Content-Type": "application/json"})

    @staticmethod
    def _record(
        flow: http.HTTPFlow,
        upstream: str,
        source: str,
        route: Route | None,
        outcomes: Sequence[Outcome],
        served_by: str,
        plan: Plan | None = None,
    ) -> None:
        flow.metadata[METADATA_KEY] = {
            "upstream": upstream,
            "rule": source,
            "route": route.kind.value if route else "invalid",
            "repository": route.repository if route else None,
            "reference": route.reference if route else None,
            "capability": plan.capability if plan else None,
            "named_reference": plan.named_reference if plan else None,
            "attempts": [o.as_dict() for o in outcomes],
            "served_by": served_by,
        }


def describe(method: str, record: dict) -> str:
    """One log line a person can read: what was asked, who served it, who was skipped and why."""
    what = f"{method} {record['upstream']}"
    if record.get("repository"):
        what += f"/{record['repository']}"
    if record.get("reference"):
        what += f" {record['route']} {record['reference']}"
    else:
        what += f" {record['route']}"
    skipped = [f"{a['host']}: {a['result']}" for a in record["attempts"] if a["fell_through"]]
    line = f"{what} -> {urlsplit(record['served_by']).netloc or record['served_by']}"
    if "status" in record:
        line += f" {record['status']}"
    if "error" in record:
        line += f" failed: {record['error']}"
    if skipped:
        line += f" (skipped {'; '.join(skipped)})"
    return line


def _with_repository(route: Route, repository: str) -> Route:
    if route.repository == repository:
        return route
    return Route(route.kind, repository, route.tag, route.digest, route.upload_id)


def _repoint(flow: http.HTTPFlow, attempt: Attempt) -> None:
    request = flow.request
    host: Host = attempt.host
    request.scheme = host.scheme
    request.host = host.host
    request.port = host.port
    request.path = attempt.target
    request.host_header = host.netloc
    if not attempt.forward_authorization:
        request.headers.pop("Authorization", None)
    for name in {name for name, _ in attempt.headers}:
        request.headers.pop(name, None)
    for name, value in attempt.headers:
        request.headers.add(name, value)


def _response(answer: HostResponse) -> http.Response:
    headers = http.Headers([(k, v) for k, v in answer.headers if k.lower() not in HOP_BY_HOP])
    if b"content-length" not in {k.lower() for k, _ in answer.headers}:
        headers["Content-Length"] = str(len(answer.body))
    now = time.time()
    return http.Response(b"HTTP/1.1", answer.status, b"", headers, answer.body, None, now, now)


def make_addons() -> list:
    shared = Shared()
    return [Dialing(shared), Gateway(shared)]
