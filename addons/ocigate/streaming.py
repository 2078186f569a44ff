"""Requests mitmproxy streams to the host ocigate chose: re-pointed there, their answers judged as their headers
come (a blob checked as it passes, a refusal of ocigate's credential or an answer that is no blob replaced), watched
for a host that falls silent, and accounted for when they end.

State for each flow is kept by flow (as mitmproxy's proxyauth keeps its own), never in the flow's metadata, which
captures and other addons see: it holds the Authorization.
"""

import asyncio
import logging
import time
import weakref
from dataclasses import dataclass, field

from mitmproxy import http
from mitmproxy.flow import Error

from . import scrub
from .answers import AskAgain, after_failed_host, error_response, point_location_at_the_gateway, refused
from .attempts import Outcome, Streamed, refusal
from .configuration import Shared
from .hostclient import HostResponse
from .hoststoml import Host
from .plan import Attempt, Plan
from .reads import read_larger, server_transport
from .record import GATEWAY, FlowRecord
from .redaction import Body, MaskingStream, mask, masked_answer
from .verify import BlobAnswer, StreamVerifier, judge_blob_answer

log = logging.getLogger("ocigate")

# How often a blob's watchdog looks whether the flow's connection to its host is open yet.
_CONNECTION_POLL = 0.25
# How much of mitmproxy's word on a failed connection is shown: it may quote what the host sent.
_MAX_SHOWN = 200


@dataclass
class StreamedFlow:
    """What ocigate must still do for one streamed flow, until its end."""

    chosen: Streamed  # the host's attempt, and the Authorization ocigate added (None: the client's own went, if any)
    plan: Plan
    record: FlowRecord
    asked_as: str  # the path and query the client asked for, before the flow was re-pointed
    verifier: StreamVerifier | None = None
    unchecked: str | None = None  # why the answer passed without a check
    replacement: bytes | None = None  # the host's answer was not sent: the body of what the client got instead
    passed_on: "_PassedOn | None" = None  # the stream hook of an answer passed unchecked
    answered: float = field(default_factory=time.monotonic)  # when the flow was sent, then when its answer came
    watchdog: "asyncio.Task[None] | None" = None
    cut_off: str | None = None  # why the host's connection was cut

    @property
    def host(self) -> Host:
        return self.chosen.attempt.host

    def echo_forms(self) -> tuple[bytes, ...]:
        """The forms of ocigate's own Authorization on this flow that the host could echo (none: it sent none)."""
        authorization = self.chosen.authorization
        return authorization.echo_forms() if authorization else ()

    def last_heard(self) -> float:
        """When the host last sent something: its answer's headers, or a piece of its body."""
        hook = self.verifier or self.passed_on
        return max(self.answered, hook.last_piece) if hook else self.answered

    def shown(self, why: str) -> str:
        """mitmproxy's description of a host's failure as the client and the log may see it: it may quote the host's
        own bytes (an echo of ocigate's credential among them), so those are masked, and it is cut short."""
        shown = mask(why.encode("utf-8", "replace"), self.echo_forms()).decode("utf-8", "replace")
        return shown if len(shown) <= _MAX_SHOWN else shown[:_MAX_SHOWN] + "..."


class Streams:
    """The streamed flows under way, and what the gateway's hooks do with them."""

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self.flows: weakref.WeakKeyDictionary[http.HTTPFlow, StreamedFlow] = weakref.WeakKeyDictionary()

    def start(self, flow: http.HTTPFlow, chosen: Streamed, plan: Plan, record: FlowRecord) -> None:
        """The flow goes to the chosen host as mitmproxy streams it, with what that host is to be sent."""
        streamed = StreamedFlow(chosen, plan, record, asked_as=flow.request.path)
        _repoint(flow.request, chosen, as_digest_names_it=plan.verify is not None)
        host = streamed.host
        self.shared.repointed.setdefault(flow.client_conn.id, {})[(host.host, host.port)] = host
        self.flows[flow] = streamed
        if plan.verify:
            streamed.watchdog = asyncio.create_task(self._watch(flow, streamed, self.shared.settings.read_timeout))
        flow.request.stream = True

    def as_sent(self, flow: http.HTTPFlow, request: http.Request) -> http.Request:
        """The request as it goes to the host: for a flow ocigate streams, a copy with what it keeps out of the flow
        added, its host's hosts.toml headers and ocigate's own Authorization (askagain sends it)."""
        streamed = self.flows.get(flow)
        if streamed is None:
            return request
        authorization = streamed.chosen.authorization
        header = authorization.header if authorization is not None else None
        if not (streamed.host.headers or header):
            return request
        sent = request.copy()
        for name in dict.fromkeys(name for name, _ in streamed.host.headers):
            sent.headers.set_all(name, [value for key, value in streamed.host.headers if key == name])
        if header:
            sent.headers["Authorization"] = header
        return sent

    def forget(self, flow: http.HTTPFlow) -> None:
        """The flow is not streamed after all (ocigate failed on it): nothing more is done for it."""
        streamed = self.flows.pop(flow, None)
        if streamed is not None:
            _stop(streamed)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        streamed = self.flows.get(flow)
        if streamed is None or flow.response is None:
            return
        streamed.answered = time.monotonic()
        status = flow.response.status_code
        authorization = streamed.chosen.authorization
        if authorization is not None and status in (401, 403):
            self._refused(flow, streamed)
        elif streamed.plan.verify and authorization is None and status in (401, 403):
            # The client authenticates itself to this host: its challenge is for the client to answer.
            flow.response.stream = True
        elif streamed.plan.verify:
            self._blob_answer(flow, streamed)
        else:
            flow.response.stream = True
        if streamed.replacement is None:
            point_location_at_the_gateway(flow.response, streamed.host)
            _mask_echoes(flow, streamed)

    def response(self, flow: http.HTTPFlow) -> bool:
        """Accounts for a streamed flow's answer in its record. True when the client's transfer was cut short: the
        host sent something else than the blob."""
        streamed = self.flows.pop(flow, None)
        if streamed is None:
            return False
        try:
            return self._account(flow, streamed)
        finally:
            _stop(streamed)

    def _account(self, flow: http.HTTPFlow, streamed: StreamedFlow) -> bool:
        if flow.response is None:
            return False
        if streamed.replacement is not None:
            # A host answer that ended with its headers was read whole into the replacement: it keeps its own body.
            flow.response.content = streamed.replacement
        elif streamed.verifier and not streamed.verifier.finished:
            self._check_whole(flow, streamed)
        if streamed.verifier and streamed.verifier.mismatch:
            self._sent_wrong_blob(flow, streamed)
            return True
        record = streamed.record
        record.status = flow.response.status_code
        if streamed.verifier:
            record.verified = streamed.plan.verify
        elif streamed.unchecked:
            record.unchecked = streamed.unchecked
        return False

    def error(self, flow: http.HTTPFlow) -> str | None:
        """Why a flow failed, as the log and record may say it; a blob's host that broke off or fell silent is not
        asked for that blob during a cool-down."""
        streamed = self.flows.pop(flow, None)
        said = flow.error.msg if flow.error else None
        if streamed is None:
            return said
        _stop(streamed)
        why = streamed.cut_off or said
        if why is None:
            return None
        why = streamed.shown(why)
        killed = said == Error.KILLED_MESSAGE
        digest = streamed.plan.verify
        if digest and said and (streamed.cut_off or not killed) and flow.client_conn.connected:
            # The host broke off or stopped talking (the client is still there to hear of it): the client's retry goes
            # elsewhere.
            self.shared.health.failed(streamed.host.url, digest, why)
            if flow.response is None and flow.killable:
                # Before any answer, mitmproxy would send its own HTML page: the client's connection is closed
                # instead, a failure no client takes for an answer (and one Go clients retry on a reused connection).
                flow.kill()
        return why

    def instead(self, flow: http.HTTPFlow, why: str) -> http.Response | None:
        """What the client gets instead of mitmproxy's own page when the host of a flow ocigate streams failed before
        answering (refused, hung up, cut off when silent): for a blob with hosts left, a 307 back to the same URL,
        whose next request goes to the next host; otherwise an OCI error naming every host. None for a flow that is
        not ocigate's, or whose client is gone."""
        streamed = self.flows.get(flow)
        if streamed is None or not flow.client_conn.connected:
            return None
        digest = streamed.plan.verify
        opened = flow.server_conn.timestamp_start
        if digest and not streamed.cut_off and opened is not None and opened < flow.request.timestamp_start:
            # A kept-alive connection the host had closed meanwhile: nothing against the host, and its next request
            # (sent again, as Go clients send a request again on a stale connection) gets a new connection to it.
            return AskAgain(streamed.asked_as).response()
        url, why = streamed.host.url, streamed.shown(streamed.cut_off or why)
        outcome = Outcome(url, why, True, unreachable=True)
        marked = digest is not None and self.shared.health.failed(url, digest, why)
        replacement = self._ask_again_or_fail(flow, streamed, outcome, marked)
        streamed.replacement = replacement.content or b""
        return replacement

    def stop(self) -> None:
        # The gateway is stopping: its watchdogs go, while mitmproxy may still stream blobs, whose hashes go on.
        for streamed in list(self.flows.values()):
            if streamed.watchdog:
                streamed.watchdog.cancel()

    async def _watch(self, flow: http.HTTPFlow, streamed: StreamedFlow, timeout: float) -> None:
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

    def _blob_answer(self, flow: http.HTTPFlow, streamed: StreamedFlow) -> None:
        """A blob GET's answer reaches the client as the blob, checked while it passes; as what the client asked for
        (a range, a redirect) marked unchecked; or, when it is no blob, not at all."""
        response, digest = flow.response, streamed.plan.verify
        assert response is not None and digest is not None
        judged = judge_blob_answer(
            response.status_code,
            response.headers.fields,
            flow.request.headers.fields,
            digest,
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
        streamed.verifier = StreamVerifier(digest)
        response.stream = streamed.verifier
        read_larger(flow)
        if judged.drop_encoding:
            response.headers.pop("Content-Encoding", None)
        if judged.chunked:
            # mitmproxy frames what it sends the client by these headers; it reads the host by its own.
            response.headers["Transfer-Encoding"] = "chunked"

    def _blob_not_sent(self, flow: http.HTTPFlow, streamed: StreamedFlow, judged: BlobAnswer) -> None:
        """The host's answer to a blob GET is not the blob: none of it reaches the client, and the host is not asked
        for that blob during a cool-down. With hosts left to ask, the client is sent back to the same URL (307) and
        ocigate asks the next; otherwise it gets an OCI error naming every host. A 404 of the last host, which was
        not asked whether it had the blob, is its honest answer: it is not held against it."""
        assert flow.response is not None and streamed.plan.verify is not None
        url, status = streamed.host.url, flow.response.status_code
        outcome = Outcome(url, f"answered {judged.failed}", True, status)
        held_against = judged.hosts_fault and (streamed.chosen.fallback or status != 404)
        marked = held_against and self.shared.health.failed(url, streamed.plan.verify, outcome.result)
        _replace(flow, streamed, self._ask_again_or_fail(flow, streamed, outcome, marked))

    def _ask_again_or_fail(
        self, flow: http.HTTPFlow, streamed: StreamedFlow, outcome: Outcome, marked: bool
    ) -> http.Response:
        """What the client gets for a host that did not send it what it asked for, none of whose bytes reached it (see
        answers.after_failed_host), noted in the flow's record."""
        record = streamed.record
        record.attempts.append(outcome)
        record.served_by = GATEWAY
        answer = after_failed_host(
            streamed.plan, record.attempts, asked_as=streamed.asked_as, marked=marked, fallback=streamed.chosen.fallback
        )
        if isinstance(answer, AskAgain):
            record.error = f"{outcome.host} {outcome.result}: the client was sent to ask again (307)"
            return answer.response()
        record.error = answer.message
        return error_response(flow.request.method, answer)

    def _refused(self, flow: http.HTTPFlow, streamed: StreamedFlow) -> None:
        """A refusal of ocigate's own credentials is replaced by an error naming them: the host's challenge would only
        send the client after a token for credentials it has not got."""
        response, authorization = flow.response, streamed.chosen.authorization
        assert response is not None and authorization is not None
        status = response.status_code
        if status == 401:
            # A host thought open asks for credentials after all (a protected repository): the next request answers
            # its challenge up front, and the refused token is not handed out again.
            self.shared.broker.learn(streamed.host, HostResponse(401, b"", tuple(response.headers.fields), b""))
            self.shared.broker.refused(authorization)
        host = f"{flow.request.scheme}://{flow.request.host_header or flow.request.host}"
        streamed.record.attempts.append(Outcome(host, refusal(status, authorization), False))
        _replace(flow, streamed, error_response(flow.request.method, refused(status, host, authorization)))

    def _check_whole(self, flow: http.HTTPFlow, streamed: StreamedFlow) -> None:
        """An answer that ended with its headers (a Content-Length of 0, an HTTP/2 end of stream) never passed the
        stream hook: mitmproxy read it whole, and sends it after this hook. Not the blob, it is not sent at all."""
        verifier, response = streamed.verifier, flow.response
        assert verifier is not None and response is not None and streamed.plan.verify is not None
        verifier(response.raw_content or b"")
        verifier(b"")
        if verifier.mismatch:
            self.shared.health.bad_content(streamed.host.url, streamed.plan.verify, verifier.mismatch)
            outcome = Outcome(streamed.host.url, f"sent {verifier.mismatch}", True, response.status_code)
            flow.response = self._ask_again_or_fail(flow, streamed, outcome, marked=True)
            streamed.verifier = None

    def _sent_wrong_blob(self, flow: http.HTTPFlow, streamed: StreamedFlow) -> None:
        """The host streamed something else than the blob: the client's transfer is cut short before its last piece,
        so it never holds a complete wrong blob, and the host is not asked for that blob again."""
        assert streamed.verifier is not None and streamed.plan.verify is not None
        why = streamed.verifier.mismatch or "something else"
        self.shared.health.bad_content(streamed.host.url, streamed.plan.verify, why)
        flow.kill()
        streamed.record.mismatch = why
        streamed.record.error = f"{streamed.host.url} sent {why} for {streamed.plan.verify}: transfer aborted"


def _stop(streamed: StreamedFlow) -> None:
    if streamed.watchdog:
        streamed.watchdog.cancel()
    if streamed.verifier:
        streamed.verifier.close()


def _repoint(request: http.Request, chosen: Streamed, *, as_digest_names_it: bool) -> None:
    attempt: Attempt = chosen.attempt
    host = attempt.host
    request.scheme = host.scheme
    request.host = host.host
    request.port = host.port
    request.path = attempt.target
    request.host_header = host.netloc
    if not attempt.forward_authorization:
        # The client's credentials and cookies are for the upstream it named, never for a mirror.
        request.headers.pop("Authorization", None)
        request.headers.pop("Cookie", None)
    for name in attempt.withheld | {name for name, _ in attempt.headers}:
        request.headers.pop(name, None)
    # What may be a secret (ocigate's Authorization, the host's hosts.toml headers) is kept in the flow, where
    # captures, mitmweb and other addons see it, only redacted (the exchange still shows what was sent): the request
    # gets the values themselves as it is sent (Streams.as_sent).
    for name, value in attempt.headers:
        request.headers.add(name, scrub.REDACTED if (name, value) in host.headers else value)
    if chosen.authorization is not None and chosen.authorization.header:
        request.headers["Authorization"] = scrub.credential(chosen.authorization.header)
    if as_digest_names_it:
        # The bytes are checked against the blob's digest as they pass: they must come as the digest names them.
        request.headers["Accept-Encoding"] = "identity"


def _mask_echoes(flow: http.HTTPFlow, streamed: StreamedFlow) -> None:
    """ocigate's own credential, echoed by the host in its answer, reaches nobody (see redaction.masked_answer)."""
    secrets, response = streamed.echo_forms(), flow.response
    if not secrets or response is None:
        return
    reason = response.reason.encode("latin-1", "replace")
    masked = masked_answer(response.status_code, reason, response.headers.fields, secrets)
    response.headers = http.Headers(masked.headers)
    response.reason = masked.reason.decode("latin-1")
    if masked.body is Body.DROP:
        replacement = http.Response.make(response.status_code, b"", masked.headers)
        replacement.reason = response.reason
        _replace(flow, streamed, replacement)
    elif masked.body is Body.MASK:
        masking = MaskingStream(secrets)
        if response.stream is True:
            response.stream = masking
        elif isinstance(response.stream, _PassedOn):
            response.stream.masking = masking


def _replace(flow: http.HTTPFlow, streamed: StreamedFlow, replacement: http.Response) -> None:
    """The client gets `replacement` instead of the host's answer, none of whose bytes reach it (they are read and
    dropped, so the connection to the host stays usable)."""
    streamed.replacement = replacement.content or b""
    replacement.stream = _SendOnly(streamed.replacement)
    flow.response = replacement


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


class _SendOnly:
    """A stream hook that sends the client one body, once, and none of the host's bytes."""

    def __init__(self, body: bytes) -> None:
        self._body: bytes | None = body

    def __call__(self, chunk: bytes) -> list[bytes]:
        body, self._body = self._body, None
        return [body] if body else []


def _cut_server_connection(flow: http.HTTPFlow) -> bool:
    """Closes the flow's connection to its host as if the host had: the flow then fails (an incomplete body, or before
    any answer the gateway's own, see Streams.instead). False when mitmproxy's proxy server does not have it (not
    running, or changed)."""
    task = getattr(server_transport(flow), "handler", None)
    if task is None:
        return False
    task.cancel("ocigate: the host sent nothing in time")
    return True
