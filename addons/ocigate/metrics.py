"""Prometheus metrics of the requests the gateway handled: what a flow record says, turned into observations with
bounded labels (a label value is a name the rules give, a kind, a status or one of a fixed set of reasons: never
free text or anything a client chooses), counted in a registry of ocigate's own and served over HTTP by a thread.
"""

import enum
import re
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from .attempts import Outcome
from .hoststoml import RuleSet
from .probes import Check, with_probes
from .record import GATEWAY, FlowRecord
from .settings import MetricsAddress

# The label value of an upstream or host the rules do not name (an upstream only `_default` routes, and the
# registry's own host then): clients choose those names, and each would be a time series of its own.
OTHER = "other"
# Request durations: from a ping's milliseconds to a large layer's minutes.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Reason(enum.StrEnum):
    """Why a host was passed over, as a metric's label says it."""

    UNREACHABLE = "unreachable"  # refused, timed out, hung up
    COOLDOWN = "cooldown"  # not asked: it failed lately (down, failed to send this content, or sent it wrong)
    NOT_FOUND = "not_found"  # it answered 404
    STATUS = "status"  # it answered another status that falls through (429, 5xx, ...)
    AUTH = "auth"  # it refused ocigate's credentials, or none could be made for it
    VERIFICATION = "verification"  # what it sent was not what was asked for (a digest's bytes, a manifest)
    OTHER = "other"  # e.g. a destination ocigate may not dial


# How health.HostHealth and attempts.Asker word a host passed over for what it did before.
_COOLING_DOWN = re.compile(r"\(skipped for \d+ s\)$|^sent something else for \S+ before ")


def reason(outcome: Outcome) -> Reason:
    """The class of why a host was passed over."""
    if _COOLING_DOWN.search(outcome.result):
        return Reason.COOLDOWN
    if outcome.auth_failure or outcome.status in (401, 403):
        return Reason.AUTH
    if outcome.unreachable:
        return Reason.UNREACHABLE
    if outcome.status == 404:
        return Reason.NOT_FOUND
    if outcome.status is not None and 200 <= outcome.status < 300:
        # A success that fell through: its manifest or blob failed the check.
        return Reason.VERIFICATION
    if outcome.status is not None:
        return Reason.STATUS
    return Reason.OTHER


@dataclass(frozen=True)
class Names:
    """The upstreams and host URLs the rules name: the only ones that are label values."""

    upstreams: frozenset[str] = frozenset()
    hosts: frozenset[str] = frozenset()

    @classmethod
    def of(cls, rules: RuleSet | None) -> "Names":
        if rules is None:
            return cls()
        found = list(rules.rules())
        return cls(frozenset(rule.upstream for rule in found), frozenset(h.url for rule in found for h in rule.hosts))

    def upstream(self, name: str) -> str:
        return name if name in self.upstreams else OTHER

    def host(self, url: str) -> str:
        return url if url in self.hosts or url == GATEWAY else OTHER


@dataclass(frozen=True)
class Observations:
    """What one request that ended adds to the metrics."""

    upstream: str
    host: str  # the host that served, or GATEWAY
    kind: str
    status: str  # the client's answer's, "none" when it got none
    bytes_sent: int
    seconds: float
    fallbacks: tuple[tuple[str, Reason], ...]  # each host passed over, and why
    verification_failures: tuple[str, ...]  # each host whose bytes failed their check
    tokens: tuple[tuple[str, str], ...]  # each host ocigate presented a token to, and whether it was cached or fetched


def observations(record: FlowRecord, names: Names) -> Observations:
    """What `record`, of a request that ended, adds to the metrics, its labels bounded by `names`."""
    passed_over = [(names.host(o.host), reason(o)) for o in record.attempts if o.fell_through]
    failed_checks = [host for host, why in passed_over if why is Reason.VERIFICATION]
    if record.mismatch is not None:
        failed_checks.append(names.host(record.served_by))
    tokens = [(names.host(o.host), o.token) for o in record.attempts if o.token]
    # A streamed request's host has no outcome of its own: its token is the record's.
    if record.token and not any(o.host == record.served_by and not o.fell_through for o in record.attempts):
        tokens.append((names.host(record.served_by), record.token))
    return Observations(
        upstream=names.upstream(record.upstream),
        host=names.host(record.served_by),
        kind=record.route,
        status=str(record.status) if record.status is not None else "none",
        bytes_sent=record.bytes_sent or 0,
        seconds=record.duration or 0.0,
        fallbacks=tuple(passed_over),
        verification_failures=tuple(failed_checks),
        tokens=tuple(tokens),
    )


class _CoolDowns(Collector):
    """The hosts cooling down, read when scraped."""

    def __init__(self, read: Callable[[], Mapping[str, bool]]) -> None:
        self._read = read

    def collect(self) -> Iterable[Metric]:
        gauge = GaugeMetricFamily(
            "ocigate_host_cooling_down",
            "1 while a host the rules name is skipped after it could not be reached, else 0.",
            labels=["host"],
        )
        for host, cooling in sorted(self._read().items()):
            gauge.add_metric([host], 1 if cooling else 0)
        yield gauge

    def describe(self) -> Iterator[Metric]:
        # Describing would read the hosts at registration, where there are none yet.
        return iter(())


class _CacheEntries(Collector):
    """How full each bounded cache is, read when scraped: a cache at its cap forgets its oldest entries."""

    def __init__(self, read: Callable[[], Mapping[str, int]]) -> None:
        self._read = read

    def collect(self) -> Iterable[Metric]:
        gauge = GaugeMetricFamily(
            "ocigate_cache_entries",
            "Entries in ocigate's bounded caches: tokens, pull contexts, host clients.",
            labels=["cache"],
        )
        for cache, entries in sorted(self._read().items()):
            gauge.add_metric([cache], entries)
        yield gauge

    def describe(self) -> Iterator[Metric]:
        return iter(())


class Metrics:
    """ocigate's metrics in a registry of their own (never prometheus_client's global one, which another addon in
    the same process may fill). `cooling_down` gives, when scraped, every host the rules name and whether it is
    cooling down; `cache_entries` how full each bounded cache is."""

    def __init__(
        self, cooling_down: Callable[[], Mapping[str, bool]], cache_entries: Callable[[], Mapping[str, int]]
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.requests = Counter(
            "ocigate_requests",
            "Requests the gateway handled, by upstream, the host that served (or gateway), kind and status.",
            ["upstream", "host", "kind", "status"],
            registry=r,
        )
        self.bytes = Counter(
            "ocigate_response_bytes",
            "Bytes of answers' bodies sent to clients, by upstream and the host that served them.",
            ["upstream", "host"],
            registry=r,
        )
        self.fallbacks = Counter(
            "ocigate_fallbacks",
            "Hosts passed over for the next (or for the gateway's error), by upstream, host and reason.",
            ["upstream", "host", "reason"],
            registry=r,
        )
        self.verification_failures = Counter(
            "ocigate_verification_failures",
            "Manifests and blobs whose bytes failed their check, by upstream and host.",
            ["upstream", "host"],
            registry=r,
        )
        self.tokens = Counter(
            "ocigate_tokens",
            "Tokens ocigate presented to hosts, by host and source (cached, or fetched from the token endpoint).",
            ["host", "source"],
            registry=r,
        )
        self.access_log_dropped = Counter(
            "ocigate_access_log_dropped_lines",
            "Access log lines dropped because the log was written more slowly than requests ended.",
            registry=r,
        )
        self.duration = Histogram(
            "ocigate_request_duration_seconds",
            "Seconds from a request to the end of its answer, by upstream and kind.",
            ["upstream", "kind"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        r.register(_CoolDowns(cooling_down))
        r.register(_CacheEntries(cache_entries))

    def observe(self, seen: Observations) -> None:
        self.requests.labels(seen.upstream, seen.host, seen.kind, seen.status).inc()
        self.bytes.labels(seen.upstream, seen.host).inc(seen.bytes_sent)
        for host, why in seen.fallbacks:
            self.fallbacks.labels(seen.upstream, host, why.value).inc()
        for host in seen.verification_failures:
            self.verification_failures.labels(seen.upstream, host).inc()
        for host, source in seen.tokens:
            self.tokens.labels(host, source).inc()
        self.duration.labels(seen.upstream, seen.kind).observe(seen.seconds)


class MetricsServer:
    """The registry served over HTTP (GET /metrics, or any path) by a thread of its own, with the health probes
    (see probes)."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread

    @classmethod
    def start(cls, address: MetricsAddress, registry: CollectorRegistry, alive: Check, ready: Check) -> "MetricsServer":
        """Listening on `address`; OSError when it cannot (in use, not this machine's)."""
        # As prometheus_client's start_http_server, with the probes in its app before the first request comes.
        family, host = _best_family(address)

        class Server(ThreadingWSGIServer):
            address_family = family

        app = with_probes(make_wsgi_app(registry), alive, ready)
        server = make_server(host, address.port, app, Server, handler_class=_Quiet)
        thread = threading.Thread(target=server.serve_forever, name="ocigate-metrics", daemon=True)
        thread.start()
        return cls(server, thread)

    @property
    def address(self) -> MetricsAddress:
        host, port = self._server.server_address[:2]
        return MetricsAddress(str(host), int(port))

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def _best_family(address: MetricsAddress) -> tuple[socket.AddressFamily, str]:
    """The address family `address` listens in (an IPv6 address needs AF_INET6), and its host as an address."""
    family, _, _, _, sockaddr = socket.getaddrinfo(
        address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    return family, str(sockaddr[0])


class _Quiet(WSGIRequestHandler):
    """Logs nothing: a probe every few seconds would fill the log."""

    def log_message(self, format: str, *args: object) -> None:
        pass
