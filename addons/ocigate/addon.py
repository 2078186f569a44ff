"""The mitmproxy addons: thin glue from flows to the pure modules.

A request to a ruled upstream: routes (what it asks for) -> policy (whether this proxy user may) -> plan (every
decision: hosts in order, what each is sent, who answers) -> attempts (ocigate asks hosts itself, through hostclient
and auth) -> answers (what the client gets), or streaming (the flow re-pointed at the chosen host and streamed by
mitmproxy, its answer judged by verify). The record of each flow says what was decided and what each host answered.
"""

import logging
import weakref
from dataclasses import dataclass

from mitmproxy import http, tls

from .addlog import AddLogWhenHeard
from .answers import (
    error_response,
    failed_plan,
    from_host,
    internal_error,
    ping_answer,
    point_location_at_the_gateway,
)
from .attempts import Streamed, choose_streamed_host, first_good
from .captures import Redaction, Replayed
from .configuration import Configuration, Shared
from .dialing import Dialing
from .draining import Draining
from .hoststoml import Rule
from .httponly import HttpOnly
from .logscrub import ScrubbedLogs
from .ocierror import OciError
from .operating import Operating
from .plan import Handling, Plan, classify, make_plan, origin_query
from .policy import Decision, around_the_rules, audit_line, check
from .record import METADATA_KEY, FlowRecord, proxy_user_of
from .routes import Route
from .streaming import Streams
from .worker import SharedListen
from .workeridentity import Identity

log = logging.getLogger("ocigate")
# The audit events (policy.py): every refusal and every push, one line each.
audit = logging.getLogger("ocigate.audit")

__all__ = ["METADATA_KEY", "Gateway", "make_addons"]


@dataclass(frozen=True)
class Answer:
    """The gateway answers the client itself."""

    response: http.Response
    record: FlowRecord


@dataclass(frozen=True)
class Forward:
    """mitmproxy streams the request to the chosen host."""

    chosen: Streamed
    plan: Plan
    record: FlowRecord


class Gateway:
    """Routes the distribution requests of every upstream that has a rule, as containerd's hosts.toml says."""

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self.records: weakref.WeakKeyDictionary[http.HTTPFlow, FlowRecord] = weakref.WeakKeyDictionary()
        self.streams = Streams(shared)

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        if self.shared.rules is None or self.shared.settings.intercept_unruled:
            return
        address = data.context.server.address
        if address and self.shared.upstream_rule(address[0], address[1], "https") is None:
            data.ignore_connection = True

    def http_connect(self, flow: http.HTTPFlow) -> None:
        flow.response = self._around_the_rules(flow)

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not self.shared.rules:
            return
        found = self.shared.upstream_rule(flow.request.host, flow.request.port, flow.request.scheme)
        if found is None:
            flow.response = self._around_the_rules(flow)
            return
        upstream, rule = found
        try:
            decision = await self._decide(flow, upstream, rule)
            if isinstance(decision, Forward):
                self.streams.start(flow, decision.chosen, decision.plan, decision.record)
        except Exception:
            # Fail closed: a flow of a ruled upstream that was not routed (or only half re-pointed) must not leave for
            # any host: the gateway answers it.
            log.exception("ocigate: internal error routing %s %s", flow.request.method, flow.request.pretty_url)
            self.streams.forget(flow)
            error = internal_error()
            record = FlowRecord.ocigate_failed(upstream, rule, flow.request.method, error.message)
            decision = Answer(error_response(flow.request.method, error), record)
        if isinstance(decision, Answer):
            flow.response = decision.response
        if decision is not None:
            decision.record.client_of(flow)
            self.records[flow] = decision.record
            decision.record.publish(flow)

    def _around_the_rules(self, flow: http.HTTPFlow) -> http.Response | None:
        """A client asking a mirror directly, which a policy refuses (policy.around_the_rules); audited."""
        rules, request = self.shared.rules, flow.request
        if rules is None or flow.response is not None:
            return flow.response
        if self.shared.upstream_rule(request.host, request.port, request.scheme or "https") is not None:
            return None  # a ruled upstream: its requests are decided one by one
        mirrors = ((host.host, host.port) for rule in rules.rules() for host in rule.hosts if not host.is_server)
        decision = around_the_rules(self.shared.services.policy, mirrors, request.host, request.port)
        if decision is None:
            return None
        _audit(flow, decision, f"{request.host}:{request.port}")
        return error_response(request.method, decision.error())

    async def _decide(self, flow: http.HTTPFlow, upstream: str, rule: Rule) -> Answer | Forward | None:
        """What becomes of a request to a ruled upstream: refused when the policy (policy.py) says so, else planned
        (plan.py), then answered from what the hosts said or forwarded to the host chosen. None: it is none of the
        distribution API, and passes untouched."""
        request = flow.request
        route = classify(request.path, rule, upstream)
        policy = self.shared.services.policy
        user = proxy_user_of(flow)
        if route is None:
            reach = policy.may_reach(user, upstream)
            if reach.allowed:
                return None
            # The client's path as it sent it, quoted: it is no name the gateway checked.
            _audit(flow, reach, f"{upstream} {request.path.partition('?')[0]!r}")
            return Answer(
                error_response(request.method, reach.error()),
                FlowRecord.denied(upstream, rule, request.method, None, reach),
            )
        if isinstance(route, OciError):
            return Answer(error_response(request.method, route), FlowRecord.refused(upstream, rule, request.method))
        # Decided before anything is planned: no host is asked and no credential looked up for a request refused.
        query, content_type = request.path.partition("?")[2], request.headers.get("Content-Type")
        decision = check(policy, user, upstream, route, request.method, query, content_type)
        if decision is not None and not decision.allowed:
            _audit(flow, decision, _named(upstream, route))
            record = FlowRecord.denied(upstream, rule, request.method, route, decision)
            return Answer(error_response(request.method, decision.error()), record)
        planned = await self._planned(flow, upstream, rule, route)
        if decision is not None and decision.push:
            _audit(flow, decision, _named(upstream, route))
            planned.record.policy = decision.describe()
        return planned

    async def _planned(self, flow: http.HTTPFlow, upstream: str, rule: Rule, route: Route) -> Answer | Forward:
        request = flow.request
        client = _client_key(flow)
        wanted = origin_query(route, request.method)
        origin = None
        if wanted is not None:
            origin = self.shared.contexts.origin(client, upstream, wanted.repository, wanted.digest, fetch=wanted.fetch)
        query = request.path.partition("?")[2]
        plan = make_plan(route, request.method, rule, upstream, query, self.shared.settings.named_ref_headers, origin)
        if plan.handling is Handling.PING:
            return Answer(ping_answer(request.method), FlowRecord.of(plan))
        if plan.handling is Handling.NO_HOST:
            return Answer(*failed_plan(request.method, plan, []))
        if plan.handling is Handling.READ_WHOLE:
            answer, outcomes = await first_good(plan, request.headers.fields, self.shared.asker)
            if answer is None:
                return Answer(*failed_plan(request.method, plan, outcomes))
            served_by = next(a.host for a in plan.attempts if a.host.url == outcomes[-1].host)
            response = from_host(answer, head=request.method == "HEAD", client_headers=request.headers.fields)
            point_location_at_the_gateway(response, served_by)
            self.shared.contexts.served(client, plan, served_by.url, answer)
            served = outcomes[-1]
            record = FlowRecord.of(plan, outcomes, served_by.url, credential=served.credential, token=served.token)
            return Answer(response, record)
        chosen, outcomes = await choose_streamed_host(plan, request.headers.fields, self.shared.asker)
        if chosen is None:
            return Answer(*failed_plan(request.method, plan, outcomes))
        authorization = chosen.authorization
        record = FlowRecord.of(
            plan,
            outcomes,
            chosen.attempt.host.url,
            credential=authorization.credential() if authorization else None,
            token=authorization.token_source if authorization else None,
        )
        return Forward(chosen, plan, record)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self.streams.responseheaders(flow)
        self._publish(flow)

    def instead(self, flow: http.HTTPFlow, why: str) -> http.Response | None:
        """See streaming.Streams.instead: called by askagain for a streamed flow whose host failed before answering."""
        return self.streams.instead(flow, why)

    def response(self, flow: http.HTTPFlow) -> None:
        cut_short = self.streams.response(flow)
        record = self.records.get(flow)
        if record is None or flow.response is None:
            return
        if not cut_short:
            # A client that authenticates itself sent its own Authorization (held redacted in the flow), or none yet.
            sent_credentials = "Authorization" in flow.request.headers
            challenged = "WWW-Authenticate" in flow.response.headers
            record.answered(flow.response.status_code, client_sent_credentials=sent_credentials, challenged=challenged)
        record.publish(flow)
        if cut_short:
            log.warning("ocigate: %s", record.describe())
        else:
            log.info("ocigate: %s", record.describe())

    def error(self, flow: http.HTTPFlow) -> None:
        why = self.streams.error(flow)
        record = self.records.get(flow)
        if record is not None and why and record.error is None:
            record.error = why
            record.publish(flow)
            log.warning("ocigate: %s", record.describe())

    async def done(self) -> None:
        self.streams.stop()
        await self.shared.aclose()

    def _publish(self, flow: http.HTTPFlow) -> None:
        record = self.records.get(flow)
        if record is not None:
            record.publish(flow)


def _client_key(flow: http.HTTPFlow) -> str:
    """Who is pulling, for attributing content to pulls: the client's address (one pull spreads over connections)."""
    peer = flow.client_conn.peername
    return str(peer[0]) if peer else flow.client_conn.id


def _named(upstream: str, route: Route) -> str:
    """What a request names, for its audit line: `upstream/repository:tag` or `@digest`, and its kind."""
    what = f"{upstream}/{route.repository}" if route.repository else upstream
    if route.tag is not None:
        what += f":{route.tag}"
    elif route.digest is not None:
        what += f"@{route.digest}"
    return f"{what} {route.kind}"


def _audit(flow: http.HTTPFlow, decision: Decision, what: str) -> None:
    """One audit line: who (the proxy user, else the client's address), what, and the policy's decision."""
    user = proxy_user_of(flow)
    peer = flow.client_conn.peername
    who = f"proxy user {user!r}" if user is not None else f"client {peer[0]}:{peer[1]}" if peer else "client"
    level = logging.INFO if decision.allowed else logging.WARNING
    audit.log(level, "ocigate audit: %s", audit_line(who, flow.request.method, what, decision))


def make_addons(worker: Identity | None = None) -> list:
    """The gateway's addons; `worker`: which of `ocigate --workers N`'s processes this is, None for a gateway alone."""
    shared = Shared()
    gateway = Gateway(shared)
    redaction = Redaction()
    return [
        HttpOnly(
            shared.upstream_rule,
            gateway.instead,
            redaction.answer_as_sent,
            lambda flow, request: gateway.streams.as_sent(flow, redaction.as_sent(flow, request)),
        ),
        Dialing(shared),
        Configuration(shared),
        # Before the gateway: a replayed flow's placeholders never reach a decision or a host.
        Replayed(),
        gateway,
        # After the gateway: each flow's record is complete when it ends.
        Operating(shared, gateway.records, worker),
        # SIGTERM: /readyz says 503 for ocigate_drain seconds before the gateway stops.
        Draining(shared, worker),
        # After the gateway, whose decisions need the request as the client sent it (see captures.py), and last
        # before mitmproxy's own recorders.
        redaction,
        ScrubbedLogs(),
        # mitmproxy's deprecated add_log event only while an addon listens: else every log line walks the chain.
        AddLogWhenHeard(),
        # A worker of `ocigate --workers N`: the proxy's address shared with the other workers.
        *([SharedListen(worker, shared)] if worker is not None else []),
    ]
