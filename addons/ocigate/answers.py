"""What the client gets: when ocigate answers itself, OCI errors with the status that names what went wrong; a
host's answer read whole, passed on as the client's; and any host's Location, pointed back at the gateway where it
names the host itself."""

import time
from collections.abc import Sequence
from dataclasses import dataclass

from mitmproxy import http

from .attempts import Outcome, refusal
from .auth import Authorization
from .headers import HOP_BY_HOP, Lines, accepts_coding, header_value
from .hostclient import HostResponse
from .hoststoml import Host
from .ocierror import OciError
from .plan import Plan, location_for_client
from .record import FlowRecord
from .routes import RouteKind
from .verify import decodable, decoded_body


def error_response(method: str, error: OciError) -> http.Response:
    """The client's answer carrying `error` (a HEAD answer has no body)."""
    response = http.Response.make(
        error.status, b"" if method == "HEAD" else error.body(), {"Content-Type": "application/json"}
    )
    response.reason = error.reason()
    return response


def internal_error() -> OciError:
    """A request ocigate failed on itself: the details are in the gateway's log, never in the answer."""
    return OciError(500, "UNKNOWN", "ocigate failed on this request: see the gateway log")


def refused(status: int, host: str, authorization: Authorization) -> OciError:
    """A host refused ocigate's own credential: the client hears which, with the host's status."""
    return OciError(status, _refusal_code(status), f"{host} answered {refusal(status, authorization)}")


def _refusal_code(status: int) -> str:
    return "UNAUTHORIZED" if status == 401 else "DENIED"


_NOT_FOUND_CODES = {
    RouteKind.MANIFEST: "MANIFEST_UNKNOWN",
    RouteKind.BLOB: "BLOB_UNKNOWN",
}


def failure(plan: Plan, outcomes: Sequence[Outcome]) -> OciError:
    """The OCI error when no host could serve the request, naming every host and why."""
    if not plan.attempts:
        wanted = " and ".join(repr(c) for c in sorted(plan.capabilities))
        message = f"no host for {plan.upstream} in {plan.source} has the capabilities {wanted}"
        return OciError(405, "UNSUPPORTED", message)
    tried = "; ".join(f"{o.host}: {o.result}" for o in outcomes)
    # "Not found" from every host that could be asked is the answer, though others were down: a client checking
    # whether something exists (a signature tag, say) must not take an outage of one mirror for an error.
    answered = [o.status for o in outcomes if o.status is not None]
    if answered and all(status == 404 for status in answered) and not any(o.auth_failure for o in outcomes):
        code = _NOT_FOUND_CODES.get(plan.route.kind, "NAME_UNKNOWN")
        return OciError(404, code, f"not found on any host for {plan.upstream} ({tried})")
    # Like containerd's resolver, the first refusal is what the client hears: credentials to fix, not an outage.
    first_refusal = next((o for o in outcomes if o.auth_failure), None)
    if first_refusal is not None:
        status = 403 if first_refusal.status == 403 else 401
        message = f"no host for {plan.upstream} accepted ocigate's credentials ({tried})"
        return OciError(status, _refusal_code(status), message)
    if all(o.unreachable for o in outcomes):
        # Nobody could be reached, now or lately: a 503 tells the client to come back later.
        return OciError(503, "UNAVAILABLE", f"no host for {plan.upstream} could be reached ({tried})")
    return OciError(502, "UNAVAILABLE", f"no host for {plan.upstream} could answer ({tried})")


@dataclass(frozen=True)
class AskAgain:
    """The client is sent back to the URL it asked for (a 307): its next request is planned anew, and passes over
    the host that just failed."""

    location: str  # the path and query the client asked for

    def response(self) -> http.Response:
        return http.Response.make(307, b"", {"Location": self.location, "Content-Length": "0"})


def after_failed_host(
    plan: Plan, outcomes: Sequence[Outcome], *, asked_as: str, marked: bool, fallback: bool
) -> AskAgain | OciError:
    """What the client gets for a streamed request whose host failed before the client saw a byte of its answer:
    with hosts left (and the failed one `marked`, so that the next request passes it over) a 307 back to the same
    URL; otherwise an OCI error naming every host."""
    if marked and fallback:
        return AskAgain(asked_as)
    return failure(plan, outcomes)


def from_host(answer: HostResponse, *, head: bool, client_headers: Lines) -> http.Response:
    """A host's answer that ocigate read whole, as the client gets it. A body in a content coding the client's
    Accept-Encoding does not accept (ocigate asked the host for identity; a host may compress anyway) is decoded:
    the client gets the bytes it can read, which are the ones ocigate checked."""
    headers = http.Headers([(k, v) for k, v in answer.headers if k.lower() not in HOP_BY_HOP])
    body = answer.body
    coding = header_value(answer.headers, b"content-encoding")
    if coding and coding.lower() != "identity" and not accepts_coding(client_headers, coding):
        if head:
            if decodable(coding):
                # A GET would be decoded, to a length the HEAD cannot know: it says none, rather than the length of
                # bytes the client would never get (containerd then asks with a GET for the size).
                del headers["Content-Encoding"]
                headers.pop("Content-Length", None)
        else:
            try:
                body = decoded_body(body, coding)
            except ValueError:
                pass  # not one ocigate decodes (a manifest in it was not served): passed on as it came
            else:
                del headers["Content-Encoding"]
                headers["Content-Length"] = str(len(body))
    # The host sent its body chunked: it goes on with a length. A HEAD answer keeps exactly what the host said,
    # since a client takes its Content-Length as the size of what a GET would bring.
    if not head and header_value(answer.headers, b"content-length") is None:
        headers["Content-Length"] = str(len(body))
    now = time.time()
    return http.Response(b"HTTP/1.1", answer.status, answer.reason, headers, body, None, now, now)


def ping_answer(method: str) -> http.Response:
    """The gateway's own /v2/ for a client that needs no credentials of its own: ocigate authenticates for it."""
    return http.Response.make(
        200,
        b"" if method == "HEAD" else b"{}",
        {"Content-Type": "application/json", "Docker-Distribution-API-Version": "registry/2.0"},
    )


def failed_plan(method: str, plan: Plan, outcomes: list[Outcome]) -> tuple[http.Response, FlowRecord]:
    """No host could serve the request: the client's OCI error naming every host, and the record."""
    return error_response(method, failure(plan, outcomes)), FlowRecord.of(plan, outcomes)


def point_location_at_the_gateway(response: http.Response, host: Host) -> None:
    location = response.headers.get("Location")
    if location:
        response.headers["Location"] = location_for_client(location, host)
