"""The mitmproxy addons: thin glue from flows to the pure modules.

request headers -> classify (reference) -> rule (rules) -> plan (router) -> attempts (attempt, upstream) -> answer,
or the flow re-pointed at the chosen host and streamed by mitmproxy.
"""

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from urllib.parse import urlsplit

from mitmproxy import ctx, http, tls

from .attempts import (
    HOP_BY_HOP,
    READ_WHOLE_KINDS,
    Outcome,
    choose_streamed_host,
    encode_error,
    error_body,
    failure,
    first_good,
    refusal,
    refusal_code,
)
from .auth import Access, Authorization
from .captures import Redaction
from .configuration import Configuration, Shared
from .dialing import Dialing
from .hostclient import HostResponse
from .hoststoml import Host, Rule
from .httponly import HttpOnly
from .plan import PUSH, Attempt, Plan, location_for_client, make_plan
from .redaction import MaskingStream, echo_forms, hides_echoes, mask, mask_headers, may_echo
from .routes import Route, RouteError, RouteKind, normalize_repository, parse_route
from .verify import BlobAnswer, StreamVerifier, judge_blob_answer

log = logging.getLogger("ocigate")

METADATA_KEY = "ocigate"
# How often a blob's watchdog looks whether the flow's connection to its host is open yet.
_CONNECTION_POLL = 0.25
_STREAM_KEY = "ocigate_stream"


class Gateway:
    """Routes the distribution requests of every upstream that has a rule, as containerd's hosts.toml says."""

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        # What ocigate must still do for each streamed flow, until its response: kept here and not in the flow's
        # metadata, which captures and other addons see (it holds the Authorization).
        self._streamed: dict[str, _StreamedFlow] = {}

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        if ctx.options.ocigate_intercept_unruled or self.shared.rules is None:
            return
        address = data.context.server.address
        if address and self.shared.upstream_rule(address[0], address[1], "https") is None:
            data.ignore_connection = True

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not self.shared.rules:
            return
        found = self.shared.upstream_rule(flow.request.host, flow.request.port, flow.request.scheme)
        if found is None:
            return
        upstream, rule = found
        try:
            await self._route(flow, upstream, rule)
        except Exception:
            # Fail closed: a flow of a ruled upstream that was not routed must not leave for the upstream as sent.
            log.exception("ocigate: internal error routing %s %s", flow.request.method, flow.request.pretty_url)
            self._answer(flow, 500, error_body("UNKNOWN", "ocigate failed on this request: see the gateway log"))

    async def _route(self, flow: http.HTTPFlow, upstream: str, rule: Rule) -> None:
        request = flow.request
        source = str(rule.source)
        path, _, query = request.path.partition("?")
        if not request.path.isascii():
            # Anything else is not a valid request target (RFC 9112 3.2): it has no one spelling to forward.
            message = "request target has bytes that are not percent-encoded ASCII"
            self._answer(flow, 400, error_body("UNSUPPORTED", message))
            self._record(flow, upstream, source, None, [], "gateway")
            return
        try:
            route = parse_route(path)
        except RouteError as e:
            self._answer(flow, 400, error_body(e.code, str(e)))
            self._record(flow, upstream, source, None, [], "gateway")
            return
        if route is None:
            if rule.offline:
                # Anything but the distribution API would go to the registry itself, which an offline rule never
                # contacts (a token endpoint under /v2/, a Location outside a mirror's API).
                message = f"{request.path} is not a distribution request; {upstream} is offline ({source})"
                self._answer(flow, 404, error_body("UNSUPPORTED", message))
                self._record(flow, upstream, source, None, [], "gateway")
            return
        if route.repository:
            route = _with_repository(route, normalize_repository(upstream, route.repository))
        client = _client_key(flow)
        origin = None
        if route.digest and route.repository and request.method in ("GET", "HEAD"):
            fetch = route.kind is RouteKind.MANIFEST and request.method == "GET"
            origin = self.shared.contexts.origin(client, upstream, route.repository, route.digest, fetch=fetch)
        plan = make_plan(route, request.method, rule, upstream, query, ctx.options.ocigate_named_ref_headers, origin)
        if route.kind is RouteKind.PING:
            # The client needs no credentials for a registry ocigate authenticates to. One that authenticates
            # itself hears the registry's own challenge (and only the registry's own host hears its credentials).
            plan = replace(plan, attempts=tuple(a for a in plan.attempts if a.forward_authorization))
            if not plan.attempts:
                flow.response = http.Response.make(
                    200,
                    b"" if request.method == "HEAD" else b"{}",
                    {"Content-Type": "application/json", "Docker-Distribution-API-Version": "registry/2.0"},
                )
                self._record(flow, upstream, source, route, [], "gateway")
                return
        if not plan.attempts:
            self._fail(flow, plan, [], source)
            return
        client_headers = list(request.headers.fields)
        access = Access(
            upstream,
            route.repository,
            push=plan.capabilities == PUSH,
            catalog=route.kind is RouteKind.CATALOG,
            offline=rule.offline,
        )
        asker = self.shared.asker
        small_answer = route.kind in READ_WHOLE_KINDS and plan.capabilities != PUSH
        if small_answer or route.kind is RouteKind.PING or (route.kind is RouteKind.BLOB and request.method == "HEAD"):
            answer, outcomes = await first_good(plan, request.method, client_headers, asker, access)
            if answer is None:
                self._fail(flow, plan, outcomes, source)
                return
            flow.response = _response(answer, head=request.method == "HEAD")
            served_by = next(a.host for a in plan.attempts if a.host.url == outcomes[-1].host)
            _point_location_at_the_gateway(flow.response, served_by)
            if route.kind is RouteKind.MANIFEST and plan.named_reference and 200 <= answer.status < 300:
                self._remember(flow, client, plan, served_by, answer)
            self._record(flow, upstream, source, route, outcomes, served_by.url, plan)
            return
        probe = route.kind is RouteKind.BLOB and plan.capabilities != PUSH
        chosen, outcomes = await choose_streamed_host(plan, client_headers, asker, access, probe=probe)
        if chosen is None:
            self._fail(flow, plan, outcomes, source)
            return
        host = chosen.attempt.host
        verified = route.digest if route.kind is RouteKind.BLOB and request.method == "GET" else None
        asked_as = request.path
        _repoint(flow, chosen.attempt, chosen.authorization, as_digest_names_it=verified is not None)
        self.shared.repointed.setdefault(flow.client_conn.id, {})[(host.host, host.port)] = host
        streamed = _StreamedFlow(
            host, chosen.authorization, verified, plan, tuple(outcomes), source, asked_as, chosen.fallback
        )
        self._streamed[flow.id] = streamed
        if verified:
            streamed.watchdog = asyncio.create_task(self._watch(flow, streamed, ctx.options.ocigate_read_timeout))
        flow.metadata[_STREAM_KEY] = True
        request.stream = True
        self._record(flow, upstream, source, route, outcomes, host.url, plan)

    def _remember(self, flow: http.HTTPFlow, client: str, plan: Plan, host: Host, answer: HostResponse) -> None:
        """What the manifest just served references belongs to its pull; a tag resolved by HEAD lends its reference
        to the GET of its digest that follows."""
        route, contexts = plan.route, self.shared.contexts
        if flow.request.method == "GET":
            content_type = flow.response.headers.get("Content-Type")
            contexts.remember(
                client, plan.upstream, route.repository, plan.named_reference, host.url, answer.body, content_type
            )
        elif route.tag and (digest := flow.response.headers.get("Docker-Content-Digest")):
            contexts.resolved(client, plan.upstream, route.repository, digest, plan.named_reference, host.url)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if not (flow.metadata.get(_STREAM_KEY) and flow.response):
            return
        streamed = self._streamed.get(flow.id)
        if streamed is None:
            flow.response.stream = True
            return
        streamed.answered = time.monotonic()
        status = flow.response.status_code
        if streamed.authorization is not None and status in (401, 403):
            self._refused(flow, streamed)
        elif streamed.digest and streamed.authorization is None and status in (401, 403):
            # The client authenticates itself to this host: its challenge is for the client to answer.
            flow.response.stream = True
        elif streamed.digest:
            self._blob_answer(flow, streamed)
        else:
            flow.response.stream = True
        if streamed.replacement is None:
            _point_location_at_the_gateway(flow.response, streamed.host)
            _mask_echoes(flow, streamed)

    async def _watch(self, flow: http.HTTPFlow, streamed: "_StreamedFlow", timeout: float) -> None:
        """A blob's host that sends nothing for `timeout` seconds, before its answer or between two pieces of it, is
        cut off: the client sees the transfer fail, and its retry goes to another host."""
        host = streamed.host
        # Dialling, and mitmproxy's wait for a free connection to the host, are not the host's silence: the clock
        # starts on the connection the flow is sent on.
        while not (flow.server_conn.connected and flow.server_conn.address == (host.host, host.port)):
            await asyncio.sleep(_CONNECTION_POLL)
            streamed.answered = time.monotonic()
        while (wait := streamed.last_heard() + timeout - time.monotonic()) > 0:
            await asyncio.sleep(wait)
        streamed.cut_off = f"{host.url} sent nothing for {timeout} s: transfer aborted"
        if not _cut_server_connection(flow):
            log.warning("ocigate: cannot cut off %s, which sent nothing for %s s", host.url, timeout)

    def _blob_answer(self, flow: http.HTTPFlow, streamed: "_StreamedFlow") -> None:
        """A blob GET's answer reaches the client as the blob, checked while it passes; as what the client asked for
        (a range, a redirect) marked unchecked; or, when it is no blob, not at all."""
        response = flow.response
        judged = judge_blob_answer(
            response.status_code,
            response.headers.fields,
            flow.request.headers.fields,
            streamed.digest,
            client=flow.request.http_version,
        )
        if judged.failed:
            self._blob_not_sent(flow, streamed, judged)
            return
        streamed.unchecked = judged.unchecked
        if response.http_version == "HTTP/1.0" and flow.request.http_version == "HTTP/1.1":
            # The client hears ocigate, which speaks HTTP/1.1, frames and all: a chunked body (whether a host that
            # said HTTP/1.0 sent it so, or ocigate frames it) under an HTTP/1.0 status line is read as raw bytes.
            response.http_version = "HTTP/1.1"
        if not judged.verify:
            streamed.passed_on = _PassedOn()
            response.stream = streamed.passed_on
            return
        streamed.verifier = StreamVerifier(streamed.digest)
        response.stream = streamed.verifier
        if judged.drop_encoding:
            response.headers.pop("Content-Encoding", None)
        if judged.chunked:
            # mitmproxy frames what it sends the client by these headers; it reads the host by its own.
            response.headers["Transfer-Encoding"] = "chunked"

    def _blob_not_sent(self, flow: http.HTTPFlow, streamed: "_StreamedFlow", judged: BlobAnswer) -> None:
        """The host's answer to a blob GET is not the blob: none of it reaches the client, and the host is not asked
        for that blob during a cool-down. With hosts left to ask, the client is sent back to the same URL (307) and
        ocigate asks the next; otherwise it gets an OCI error naming every host. A 404 of the last host, which was
        not asked whether it had the blob, is its honest answer: it is not held against it."""
        url, status = streamed.host.url, flow.response.status_code
        outcome = Outcome(url, f"answered {judged.failed}", True, status)
        held_against = judged.hosts_fault and (streamed.fallback or status != 404)
        marked = held_against and self.shared.health.failed(url, streamed.digest, outcome.result)
        _replace(flow, streamed, self._ask_again_or_fail(flow, streamed, outcome, marked))

    def _ask_again_or_fail(
        self, flow: http.HTTPFlow, streamed: "_StreamedFlow", outcome: Outcome, marked: bool
    ) -> http.Response:
        """What the client gets for a host that did not send it what it asked for, none of whose bytes reached it:
        with hosts left (and this one `marked`, so that the next request passes it over), a 307 back to the same URL;
        otherwise an OCI error naming every host. Recorded in the flow's record."""
        outcomes = [*streamed.outcomes, outcome]
        if marked and streamed.fallback:
            replacement = streamed.ask_again()
            error = f"{outcome.host} {outcome.result}: the client was sent to ask again (307)"
        else:
            status, body = failure(streamed.plan, outcomes, streamed.source)
            replacement = _error_response(flow.request.method, status, body)
            error = body["errors"][0]["message"]
        record = flow.metadata.get(METADATA_KEY)
        if record is not None:
            record["attempts"] = [o.as_dict() for o in outcomes]
            record["served_by"] = "gateway"
            record["error"] = error
        return replacement

    def instead(self, flow: http.HTTPFlow, why: str) -> http.Response | None:
        """What the client gets instead of mitmproxy's own page when the host of a flow ocigate streams failed before
        answering (refused, hung up, cut off when silent): for a blob with hosts left, a 307 back to the same URL,
        whose next request goes to the next host; otherwise an OCI error naming every host. None for a flow that is
        not ocigate's, or whose client is gone."""
        streamed = self._streamed.get(flow.id)
        if streamed is None or not flow.client_conn.connected:
            return None
        opened = flow.server_conn.timestamp_start
        if streamed.digest and not streamed.cut_off and opened is not None and opened < flow.request.timestamp_start:
            # A kept-alive connection the host had closed meanwhile: nothing against the host, and its next request
            # (sent again, as Go clients send a request again on a stale connection) gets a new connection to it.
            return streamed.ask_again()
        url, why = streamed.host.url, _shown(streamed.cut_off or why, streamed)
        outcome = Outcome(url, why, True, unreachable=True)
        marked = bool(streamed.digest) and self.shared.health.failed(url, streamed.digest, why)
        replacement = self._ask_again_or_fail(flow, streamed, outcome, marked)
        streamed.replacement = replacement.content or b""
        return replacement

    def _refused(self, flow: http.HTTPFlow, streamed: "_StreamedFlow") -> None:
        """A refusal of ocigate's own credentials is replaced by an error naming them: the host's challenge would only
        send the client after a token for credentials it has not got."""
        status, authorization = flow.response.status_code, streamed.authorization
        assert authorization is not None
        if status == 401:
            # A host thought open asks for credentials after all (a protected repository): the next request answers
            # its challenge up front, and the refused token is not handed out again.
            self.shared.broker.learn(streamed.host, HostResponse(401, b"", tuple(flow.response.headers.fields), b""))
            self.shared.broker.refused(authorization)
        host = f"{flow.request.scheme}://{flow.request.host_header or flow.request.host}"
        result = refusal(status, authorization)
        record = flow.metadata.get(METADATA_KEY)
        if record is not None:
            record["attempts"].append({"host": host, "result": result, "fell_through": False})
        body = error_body(refusal_code(status), f"{host} answered {result}")
        _replace(flow, streamed, _error_response(flow.request.method, status, body))

    def response(self, flow: http.HTTPFlow) -> None:
        streamed = self._streamed.pop(flow.id, None)
        if streamed and streamed.watchdog:
            streamed.watchdog.cancel()
        record = flow.metadata.get(METADATA_KEY)
        if streamed and streamed.replacement is not None:
            # A host answer that ended with its headers was read whole into the replacement: it keeps its own body.
            flow.response.content = streamed.replacement
        elif streamed and streamed.verifier and not streamed.verifier.finished:
            self._check_whole(flow, streamed)
        if streamed and streamed.verifier and streamed.verifier.mismatch:
            self._sent_wrong_blob(flow, streamed, record)
            return
        if record and flow.response:
            record["status"] = flow.response.status_code
            if streamed and streamed.verifier:
                record["verified"] = streamed.digest
            elif streamed and streamed.unchecked:
                record["unchecked"] = streamed.unchecked
            log.info("ocigate: %s", describe(flow.request.method, record))

    def _check_whole(self, flow: http.HTTPFlow, streamed: "_StreamedFlow") -> None:
        """An answer that ended with its headers (a Content-Length of 0, an HTTP/2 end of stream) never passed the
        stream hook: mitmproxy read it whole, and sends it after this hook. Not the blob, it is not sent at all."""
        verifier = streamed.verifier
        assert verifier is not None
        verifier(flow.response.raw_content or b"")
        verifier(b"")
        if verifier.mismatch:
            self.shared.health.bad_content(streamed.host.url, streamed.digest, verifier.mismatch)
            outcome = Outcome(streamed.host.url, f"sent {verifier.mismatch}", True, flow.response.status_code)
            flow.response = self._ask_again_or_fail(flow, streamed, outcome, marked=True)
            streamed.verifier = None

    def _sent_wrong_blob(self, flow: http.HTTPFlow, streamed: "_StreamedFlow", record: dict | None) -> None:
        """The host streamed something else than the blob: the client's transfer is cut short before its last piece,
        so it never holds a complete wrong blob, and the host is not asked for that blob again."""
        why = streamed.verifier.mismatch
        self.shared.health.bad_content(streamed.host.url, streamed.digest, why)
        flow.kill()
        if record is not None:
            record["error"] = f"{streamed.host.url} sent {why} for {streamed.digest}: transfer aborted"
            log.warning("ocigate: %s", describe(flow.request.method, record))

    def error(self, flow: http.HTTPFlow) -> None:
        streamed = self._streamed.pop(flow.id, None)
        if streamed and streamed.watchdog:
            streamed.watchdog.cancel()
        record = flow.metadata.get(METADATA_KEY)
        why = streamed.cut_off if streamed and streamed.cut_off else flow.error.msg if flow.error else None
        why = _shown(why, streamed) if why and streamed else why
        killed = flow.error is not None and flow.error.msg == flow.error.KILLED_MESSAGE
        host_failed = streamed and streamed.digest and flow.error and (streamed.cut_off or not killed)
        if host_failed and flow.client_conn.connected:
            # The host broke off or stopped talking (the client is still there to hear of it): the client's retry goes
            # elsewhere.
            self.shared.health.failed(streamed.host.url, streamed.digest, why)
            if flow.response is None and flow.killable:
                # Before any answer, mitmproxy would send its own HTML page: the client's connection is closed
                # instead, a failure no client takes for an answer (and one Go clients retry on a reused connection).
                flow.kill()
        if record and why and "error" not in record:
            record["error"] = why
            log.warning("ocigate: %s", describe(flow.request.method, record))

    async def done(self) -> None:
        for streamed in self._streamed.values():
            if streamed.watchdog:
                streamed.watchdog.cancel()
        await self.shared.hostclient.aclose()

    def _fail(self, flow: http.HTTPFlow, plan: Plan, outcomes: list[Outcome], source: str) -> None:
        status, body = failure(plan, outcomes, source)
        self._answer(flow, status, body)
        self._record(flow, plan.upstream, source, plan.route, outcomes, "gateway", plan)

    @staticmethod
    def _answer(flow: http.HTTPFlow, status: int, body: dict) -> None:
        flow.response = _error_response(flow.request.method, status, body)

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
            "capabilities": sorted(plan.capabilities) if plan else None,
            "named_reference": plan.named_reference if plan else None,
            "attempts": [o.as_dict() for o in outcomes],
            "served_by": served_by,
        }


def _mask_echoes(flow: http.HTTPFlow, streamed: "_StreamedFlow") -> None:
    """ocigate's own credential, echoed by the host in its answer's headers, reason or (in what is no content, not a
    2xx) body, reaches nobody; such a body in a content coding, which could hide it, is not passed on at all."""
    secrets = streamed.echo_forms()
    if not secrets:
        return
    response = flow.response
    response.headers = http.Headers(mask_headers(response.headers.fields, secrets))
    response.reason = mask(response.reason.encode("latin-1", "replace"), secrets).decode("latin-1")
    if not may_echo(response.status_code):
        return
    if hides_echoes(response.headers.get("Content-Encoding")):
        kept = [(k, v) for k, v in response.headers.fields if k.lower() not in _BODY_FRAMING]
        replacement = http.Response.make(response.status_code, b"", kept)
        replacement.reason = response.reason
        _replace(flow, streamed, replacement)
        return
    masking = MaskingStream(secrets)
    if response.stream is True:
        response.stream = masking
    elif isinstance(response.stream, _PassedOn):
        response.stream.masking = masking


# How much of mitmproxy's word on a failed connection is shown: it may quote what the host sent.
_MAX_SHOWN = 200


def _shown(why: str, streamed: "_StreamedFlow") -> str:
    """mitmproxy's description of a host's failure as the client and the log may see it: it may quote the host's own
    bytes (an echo of ocigate's credential among them), so those are masked, and it is cut short."""
    shown = mask(why.encode("utf-8", "replace"), streamed.echo_forms()).decode("utf-8", "replace")
    return shown if len(shown) <= _MAX_SHOWN else shown[:_MAX_SHOWN] + "..."


# What frames or encodes a body, which a replaced body does not keep.
_BODY_FRAMING = frozenset({b"content-encoding", b"content-length", b"transfer-encoding"})


def _replace(flow: http.HTTPFlow, streamed: "_StreamedFlow", replacement: http.Response) -> None:
    """The client gets `replacement` instead of the host's answer, none of whose bytes reach it (they are read and
    dropped, so the connection to the host stays usable)."""
    streamed.replacement = replacement.content or b""
    replacement.stream = _SendOnly(streamed.replacement)
    flow.response = replacement


@dataclass
class _StreamedFlow:
    host: Host  # the host the flow was re-pointed to
    authorization: Authorization | None  # what ocigate added; None: the client's own went, if any
    digest: str | None  # a blob GET: the digest its bytes must hash to
    plan: Plan
    outcomes: tuple[Outcome, ...]  # what the hosts before this one said
    source: str  # the rule's file
    asked_as: str  # the path and query the client asked for, before the flow was re-pointed
    fallback: bool  # hosts after this one could be asked instead
    verifier: StreamVerifier | None = None
    unchecked: str | None = None  # why the answer passed without a check
    replacement: bytes | None = None  # the host's answer was not sent: the body of what the client got instead
    passed_on: "_PassedOn | None" = None  # the stream hook of an answer passed unchecked
    answered: float = field(default_factory=time.monotonic)  # when the flow was sent, then when its answer came
    watchdog: "asyncio.Task[None] | None" = None
    cut_off: str | None = None  # why the host's connection was cut

    def echo_forms(self) -> tuple[bytes, ...]:
        """The forms of ocigate's own Authorization on this flow that the host could echo (none: it sent none)."""
        return echo_forms(self.authorization.header) if self.authorization else ()

    def ask_again(self) -> http.Response:
        """The client is sent back to the URL it asked for: its next request is planned anew."""
        return http.Response.make(307, b"", {"Location": self.asked_as, "Content-Length": "0"})

    def last_heard(self) -> float:
        """When the host last sent something: its answer's headers, or a piece of its body."""
        hook = self.verifier or self.passed_on
        return max(self.answered, hook.last_piece) if hook else self.answered


class _PassedOn:
    """A stream hook that hands every piece on as it came (through `masking`, when set), noting when the last one
    came."""

    def __init__(self) -> None:
        self.last_piece = time.monotonic()
        self.masking: MaskingStream | None = None

    def __call__(self, chunk: bytes) -> list[bytes]:
        self.last_piece = time.monotonic()
        if self.masking:
            return self.masking(chunk)
        return [chunk] if chunk else []


def _cut_server_connection(flow: http.HTTPFlow) -> bool:
    """Closes the flow's connection to its host as if the host had: the flow then fails (an incomplete body, or before
    any answer the gateway's own, see Gateway.instead). False when mitmproxy's proxy server does not have it (not
    running, or changed)."""
    proxyserver = ctx.master.addons.get("proxyserver")
    handler = getattr(proxyserver, "connections", {}).get(flow.client_conn.id)
    transport = getattr(handler, "transports", {}).get(flow.server_conn)
    task = getattr(transport, "handler", None)
    if task is None:
        return False
    task.cancel("ocigate: the host sent nothing in time")
    return True


class _SendOnly:
    """A stream hook that sends the client one body, once, and none of the host's bytes."""

    def __init__(self, body: bytes) -> None:
        self._body: bytes | None = body

    def __call__(self, chunk: bytes) -> list[bytes]:
        body, self._body = self._body, None
        return [body] if body else []


def _error_response(method: str, status: int, body: dict) -> http.Response:
    content = b"" if method == "HEAD" else encode_error(body)
    response = http.Response.make(status, content, {"Content-Type": "application/json"})
    response.reason = reason_phrase(status, body)
    return response


_MAX_REASON = 2000


def reason_phrase(status: int, body: dict) -> str:
    """The status line's reason phrase, with the error's message after the standard one: Go clients built on
    distribution's client code (docker, skopeo, podman) show a 5xx answer's status line and never its body, and a
    HEAD answer has no body at all."""
    standard = http.status_codes.RESPONSES.get(status, "Error")
    message = " ".join(error.get("message", "") for error in body.get("errors", []))
    # A reason phrase is visible ASCII and spaces only (RFC 9112 4): anything else would break the status line.
    shown = "".join(c if " " <= c <= "~" else "?" for c in message)[:_MAX_REASON]
    return f"{standard}: {shown}" if shown else standard


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
    elif "unchecked" in record:
        line += f" unchecked: {record['unchecked']}"
    if skipped:
        # Hosts passed over for one that answered were skipped; when the gateway answered, every one was tried.
        verb = "tried" if record["served_by"] == "gateway" else "skipped"
        line += f" ({verb} {'; '.join(skipped)})"
    return line


def _with_repository(route: Route, repository: str) -> Route:
    if route.repository == repository:
        return route
    return Route(route.kind, repository, route.tag, route.digest, route.upload_id)


def _repoint(
    flow: http.HTTPFlow, attempt: Attempt, authorization: Authorization | None, *, as_digest_names_it: bool
) -> None:
    request = flow.request
    host = attempt.host
    request.scheme = host.scheme
    request.host = host.host
    request.port = host.port
    request.path = attempt.target
    request.host_header = host.netloc
    if not attempt.forward_authorization:
        request.headers.pop("Authorization", None)
    for name in attempt.withheld | {name for name, _ in attempt.headers}:
        request.headers.pop(name, None)
    for name, value in attempt.headers:
        request.headers.add(name, value)
    if authorization is not None and authorization.header:
        request.headers["Authorization"] = authorization.header
    if as_digest_names_it:
        # The bytes are checked against the blob's digest as they pass: they must come as the digest names them.
        request.headers["Accept-Encoding"] = "identity"


def _client_key(flow: http.HTTPFlow) -> str:
    """Who is pulling, for attributing content to pulls: the client's address (one pull spreads over connections)."""
    peer = flow.client_conn.peername
    return str(peer[0]) if peer else flow.client_conn.id


def _point_location_at_the_gateway(response: http.Response, host: Host) -> None:
    location = response.headers.get("Location")
    if location:
        response.headers["Location"] = location_for_client(location, host)


def _response(answer: HostResponse, *, head: bool) -> http.Response:
    headers = http.Headers([(k, v) for k, v in answer.headers if k.lower() not in HOP_BY_HOP])
    # The host sent its body chunked: it goes on with a length. A HEAD answer keeps exactly what the host said,
    # since a client takes its Content-Length as the size of what a GET would bring.
    if not head and b"content-length" not in {k.lower() for k, _ in answer.headers}:
        headers["Content-Length"] = str(len(answer.body))
    now = time.time()
    return http.Response(b"HTTP/1.1", answer.status, answer.reason, headers, answer.body, None, now, now)


def make_addons() -> list:
    shared = Shared()
    gateway = Gateway(shared)
    return [
        Redaction(),
        HttpOnly(shared.upstream_rule, gateway.instead),
        Dialing(shared),
        Configuration(shared),
        gateway,
    ]
