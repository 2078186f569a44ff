"""Working through a plan's hosts in order: the first good answer wins, and every host tried is accounted for."""

import json
from collections.abc import Sequence
from dataclasses import dataclass

from .destinations import DestinationError
from .reference import RouteKind
from .router import Attempt, Plan
from .upstream import HostFailed, HostResponse, Upstream

# Hop-by-hop headers belong to one connection, never to the message forwarded on another.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)


@dataclass(frozen=True)
class Outcome:
    host: str  # the host's URL, never with credentials
    result: str  # "200", "404", "connection refused", ...
    fell_through: bool
    status: int | None = None  # the host's HTTP status; None when it could not be asked

    def as_dict(self) -> dict[str, str | bool]:
        return {"host": self.host, "result": self.result, "fell_through": self.fell_through}


def falls_through(status: int, attempt: Attempt) -> bool:
    """Statuses that mean "this host cannot serve it, ask the next": not found, overloaded or broken; and for a
    mirror, refused credentials: the client's own never go to a mirror, so its challenge is of no use to the client."""
    if status in (401, 403) and not attempt.forward_authorization:
        return True
    return status == 404 or status == 429 or status >= 500


def request_headers(client_headers: Sequence[tuple[bytes, bytes]], attempt: Attempt) -> list[tuple[bytes, bytes]]:
    """The client's header lines as they came (several Accept lines stay several), for one attempt."""
    dropped = HOP_BY_HOP | {b"host", b"content-length"}
    if not attempt.forward_authorization:
        dropped |= {b"authorization"}
    added = {name.lower().encode() for name, _ in attempt.headers}
    kept = [(k, v) for k, v in client_headers if k.lower() not in dropped and k.lower() not in added]
    return kept + [(name.encode(), value.encode()) for name, value in attempt.headers]


async def first_good(
    plan: Plan,
    method: str,
    client_headers: Sequence[tuple[bytes, bytes]],
    upstream: Upstream,
) -> tuple[HostResponse | None, list[Outcome]]:
    """Asks each host in turn; returns the first answer that does not fall through, with what every host said."""
    outcomes: list[Outcome] = []
    for attempt in plan.attempts:
        try:
            response = await upstream.send(
                attempt.host, method, attempt.target, request_headers(client_headers, attempt)
            )
        except HostFailed as e:
            outcomes.append(Outcome(attempt.host.url, str(e), True))
            continue
        fell_through = falls_through(response.status, attempt)
        outcomes.append(Outcome(attempt.host.url, str(response.status), fell_through, response.status))
        if not fell_through:
            return response, outcomes
    return None, outcomes


async def choose_streamed_host(
    plan: Plan,
    client_headers: Sequence[tuple[bytes, bytes]],
    upstream: Upstream,
    *,
    probe: bool,
) -> tuple[Attempt | None, list[Outcome]]:
    """The host mitmproxy will stream a request to: the first the dialling policy allows and, with `probe`, that
    answers a HEAD for it (a blob). The last candidate is not probed, since whatever it answers is then the answer.
    None when no host is left: the gateway answers the client itself, as it cannot once mitmproxy has the flow."""
    outcomes: list[Outcome] = []
    for position, attempt in enumerate(plan.attempts, start=1):
        try:
            await upstream.destinations.resolve(attempt.host.host, attempt.host.port)
        except DestinationError as e:
            outcomes.append(Outcome(attempt.host.url, str(e), True))
            continue
        if not probe or position == len(plan.attempts):
            return attempt, outcomes
        try:
            response = await upstream.send(
                attempt.host, "HEAD", attempt.target, request_headers(client_headers, attempt)
            )
        except HostFailed as e:
            outcomes.append(Outcome(attempt.host.url, f"probe: {e}", True))
            continue
        if response.status >= 400:
            outcomes.append(Outcome(attempt.host.url, f"probe: {response.status}", True, response.status))
            continue
        return attempt, outcomes
    return None, outcomes


_NOT_FOUND_CODES = {
    RouteKind.MANIFEST: "MANIFEST_UNKNOWN",
    RouteKind.BLOB: "BLOB_UNKNOWN",
}


def failure(plan: Plan, outcomes: Sequence[Outcome], source: str) -> tuple[int, dict]:
    """The status and OCI error body when no host could serve the request, naming every host and why."""
    if not plan.attempts:
        wanted = " and ".join(repr(c) for c in sorted(plan.capabilities))
        message = f"no host for {plan.upstream} in {source} has the capabilities {wanted}"
        return 405, error_body("UNSUPPORTED", message)
    tried = "; ".join(f"{o.host}: {o.result}" for o in outcomes)
    # "Not found" from every host that could be asked is the answer, though others were down: a client checking
    # whether something exists (a signature tag, say) must not take an outage of one mirror for an error.
    answered = [o.status for o in outcomes if o.status is not None]
    if answered and all(status == 404 for status in answered):
        code = _NOT_FOUND_CODES.get(plan.route.kind, "NAME_UNKNOWN")
        return 404, error_body(code, f"not found on any host for {plan.upstream} ({tried})")
    return 502, error_body("UNAVAILABLE", f"no host for {plan.upstream} could answer ({tried})")


def error_body(code: str, message: str) -> dict:
    return {"errors": [{"code": code, "message": message}]}


def encode_error(body: dict) -> bytes:
    return json.dumps(body).encode()
