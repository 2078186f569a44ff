"""Working through a plan's hosts in order: the first good answer wins, and every host tried is accounted for."""

from dataclasses import dataclass, replace
from urllib.parse import urljoin

from .auth import AuthFailed, Authorization, Broker
from .destinations import DestinationError
from .headers import HOP_BY_HOP, Lines, header_value, without
from .health import HostHealth
from .hostclient import HostFailed, HostResponse
from .plan import READ_WHOLE_KINDS, Attempt, Plan, is_proxy_for, ping_target
from .redaction import Body, mask, masked_answer
from .routes import RouteKind
from .tokens import RealmURL, TokenError
from .verify import REDIRECTS, Problem, manifest_problem


@dataclass(frozen=True)
class Outcome:
    host: str  # the host's URL, never with credentials
    result: str  # "200", "404", "connection refused", ...
    fell_through: bool
    status: int | None = None  # the host's HTTP status; None when it could not be asked
    # The host refused ocigate's credentials (401/403), or none could be made for it.
    auth_failure: bool = False
    # The host could not be connected to or did not answer in time, now or in its cool-down.
    unreachable: bool = False
    credential: str | None = None  # the credential ocigate presented, by source and user (Authorization.credential)
    token: str | None = None  # its token: "cached" or "fetched" (Authorization.token_source)

    def as_dict(self) -> dict[str, str | bool]:
        shown: dict[str, str | bool] = {"host": self.host, "result": self.result, "fell_through": self.fell_through}
        if self.credential is not None:
            shown["credential"] = self.credential
        if self.token is not None:
            shown["token"] = self.token
        return shown


def falls_through(status: int, attempt: Attempt) -> bool:
    """Statuses that mean "this host cannot serve it, ask the next": not found, overloaded or broken; and for a
    mirror, refused credentials: the client's own never go to a mirror, so its challenge is of no use to the client."""
    if status in (401, 403) and not attempt.forward_authorization:
        return True
    return status == 404 or status == 429 or status >= 500


# A part or a "not modified" of what ocigate reads and checks itself would be neither whole nor checkable: it asks
# for the whole answer, whatever the client asked.
_PARTIAL_OR_CONDITIONAL = frozenset(
    {b"range", b"if-range", b"if-none-match", b"if-modified-since", b"if-match", b"if-unmodified-since"}
)
# Redirects ocigate follows for what it reads itself, so that what it checks is what the client gets.
MAX_REDIRECTS = 5


def request_headers(client_headers: Lines, attempt: Attempt) -> Lines:
    """The client's header lines as they came (several Accept lines stay several), for one request ocigate sends and
    reads whole itself. Content codings, ranges and conditions are not asked for: ocigate reads what it asks for
    whole and as it is (and checks it against its digest)."""
    dropped = HOP_BY_HOP | _PARTIAL_OR_CONDITIONAL | {b"host", b"content-length", b"accept-encoding"}
    dropped |= {name.encode() for name in attempt.withheld}
    if not attempt.forward_authorization:
        # The client's credentials and cookies are for the upstream it named, never for a mirror.
        dropped |= {b"authorization", b"cookie"}
    added = {name.lower().encode() for name, _ in attempt.headers}
    kept = without(client_headers, dropped | added)
    return kept + tuple((name.encode(), value.encode()) for name, value in attempt.headers)


class Asker:
    """Asks hosts: with the client's credentials where they may go, else with ocigate's; not a host that is cooling
    down after it could not be reached, nor one for content it sent wrong before."""

    def __init__(self, broker: Broker, health: HostHealth) -> None:
        self.broker = broker
        self.health = health

    def not_now(self, attempt: Attempt, digest: str | None) -> Outcome | None:
        """Why the attempt's host is not to be asked now, or None."""
        url = attempt.host.url
        skipped = self.health.skipped(url)
        if skipped:
            return Outcome(url, skipped, True, unreachable=True)
        if not digest:
            return None
        bad = self.health.sent_bad(url, digest)
        if bad:
            return Outcome(url, f"sent something else for {digest} before ({bad})", True)
        failed = self.health.failed_lately(url, digest)
        return Outcome(url, failed, True) if failed else None

    async def ask(self, attempt: Attempt, method: str, headers: Lines) -> tuple[HostResponse, Authorization | None]:
        url = attempt.host.url
        authorization: Authorization | None = None
        try:
            if attempt.forward_authorization:
                response = await self.broker.hostclient.send(attempt.host, method, attempt.target, headers)
            else:
                response, authorization = await self.broker.send(
                    attempt.host, method, attempt.target, headers, attempt.access
                )
        except HostFailed as e:
            if e.unreachable:
                self.health.unreachable(url, str(e))
            raise
        self.health.answered(url)
        return without_echoes(response, authorization), authorization

    async def follow(
        self,
        plan: Plan,
        attempt: Attempt,
        method: str,
        headers: Lines,
        answer: HostResponse,
        authorization: Authorization | None,
    ) -> tuple[HostResponse, str | None]:
        """The answer at the end of the host's redirects (at most MAX_REDIRECTS), and where it came from (None: from
        the host itself). The host itself is asked with ocigate's Authorization and its hosts.toml headers; another
        host with neither, as Go clients do; an offline rule's registry itself not at all."""
        host, where = attempt.host, None
        url = f"{host.scheme}://{host.netloc}{attempt.target}"
        own = {name.lower().encode() for name, _ in host.headers}
        for _ in range(MAX_REDIRECTS):
            location = header_value(answer.headers, b"location")
            if answer.status not in REDIRECTS or location is None:
                return answer, where
            try:
                next_url = RealmURL.parse(urljoin(url, location), what="the Location of a redirect")
            except TokenError:
                raise HostFailed(f"a redirect ({answer.status}) to a Location ocigate cannot use") from None
            url = next_url.url
            target = self.broker.hostclient.realm_host(next_url.scheme, next_url.host, next_url.port)
            if plan.offline and not is_proxy_for(target, plan.upstream):
                raise HostFailed(f"a redirect to {plan.upstream} itself, which its offline rule never contacts")
            same_host = (target.scheme, target.host, target.port) == (host.scheme, host.host, host.port)
            lines = headers + authorization.lines() if same_host and authorization else headers
            if not same_host:
                # Nothing that was for the host: its hosts.toml headers, and whatever Authorization went with the
                # request (ocigate's, or the client's own where its rule says the client authenticates), and the
                # client's cookies.
                dropped = own | {b"authorization", b"proxy-authorization", b"cookie"}
                lines = without(lines, dropped)
            answer = await self.broker.hostclient.send(target, method, next_url.target, lines)
            answer = without_echoes(answer, authorization if same_host else None)
            where = target.netloc
        raise HostFailed(f"more than {MAX_REDIRECTS} redirects")


def refusal(status: int, authorization: Authorization) -> str:
    """A host's 401 or 403 to what ocigate presented, in words: "401 unauthorized with the credential of ..."."""
    return f"{status} {'unauthorized' if status == 401 else 'denied'} {authorization.describe()}"


def without_echoes(response: HostResponse, authorization: Authorization | None) -> HostResponse:
    """`response` with every form of what ocigate sent as `authorization` masked where a host may echo it (see
    redaction.masked_answer)."""
    secrets = authorization.echo_forms() if authorization else ()
    if not secrets:
        return response
    masked = masked_answer(response.status, response.reason, response.headers, secrets)
    body = {Body.PASS: response.body, Body.MASK: mask(response.body, secrets), Body.DROP: b""}[masked.body]
    return replace(response, headers=masked.headers, reason=masked.reason, body=body)


def _answered(
    attempt: Attempt, response: HostResponse, authorization: Authorization | None, *, probe: bool = False
) -> Outcome:
    status = response.status
    refused = authorization is not None and status in (401, 403)
    result = refusal(status, authorization) if authorization is not None and refused else str(status)
    if probe:
        result = f"probe: {result}"
    fell_through = status >= 400 if probe else falls_through(status, attempt)
    credential = authorization.credential() if authorization else None
    token = authorization.token_source if authorization else None
    return Outcome(attempt.host.url, result, fell_through, status, refused, credential=credential, token=token)


async def first_good(plan: Plan, client_headers: Lines, asker: Asker) -> tuple[HostResponse | None, list[Outcome]]:
    """Asks each host in turn; returns the first answer that does not fall through, with what every host said. A
    manifest whose bytes or Docker-Content-Digest are not what was asked for falls through like a host that failed."""
    outcomes: list[Outcome] = []
    route, method = plan.route, plan.method
    for attempt in plan.attempts:
        url = attempt.host.url
        not_now = asker.not_now(attempt, route.digest)
        if not_now:
            outcomes.append(not_now)
            continue
        headers = request_headers(client_headers, attempt)
        try:
            response, authorization = await asker.ask(attempt, method, headers)
            redirected = None
            if route.kind in READ_WHOLE_KINDS:
                response, redirected = await asker.follow(plan, attempt, method, headers, response, authorization)
        except HostFailed as e:
            outcomes.append(Outcome(url, str(e), True, unreachable=e.unreachable))
            continue
        except AuthFailed as e:
            outcomes.append(Outcome(url, str(e), True, auth_failure=True))
            continue
        via = f" (redirected to {redirected})" if redirected else ""
        outcome = _answered(attempt, response, authorization)
        outcome = replace(outcome, result=outcome.result + via)
        if route.kind is RouteKind.MANIFEST and 200 <= response.status < 300:
            problem = manifest_problem(route.digest, response.headers, response.body, head=method == "HEAD")
            if response.status != 200:
                # ocigate asked for the whole manifest, unconditionally: anything but a 200 is not it.
                problem = Problem(f"no manifest in a {response.status} answer to a whole request", wrong=False)
            if problem:
                if route.digest and problem.wrong:
                    asker.health.bad_content(url, route.digest, problem.text)
                outcome = replace(outcome, result=f"{response.status}{via} but {problem.text}", fell_through=True)
        outcomes.append(outcome)
        if not outcome.fell_through:
            return response, outcomes
    return None, outcomes


async def _may_stream_to(asker: Asker, attempt: Attempt, digest: str | None) -> Outcome | None:
    """Why a request may not be streamed to the attempt's host (cooling down, wrong content before, or a destination
    the dialling policy refuses), or None."""
    not_now = asker.not_now(attempt, digest)
    if not_now:
        return not_now
    try:
        await asker.broker.hostclient.destinations.resolve(attempt.host.host, attempt.host.port)
    except DestinationError as e:
        return Outcome(attempt.host.url, str(e), True)
    return None


@dataclass(frozen=True)
class Streamed:
    """The host mitmproxy streams a request to, and the Authorization ocigate adds to it (None: the client's own
    goes, if any)."""

    attempt: Attempt
    authorization: Authorization | None
    # Hosts after this one could be asked instead, should this one fail before the client sees a byte.
    fallback: bool = False


async def choose_streamed_host(
    plan: Plan, client_headers: Lines, asker: Asker
) -> tuple[Streamed | None, list[Outcome]]:
    """The host mitmproxy will stream a request to: the first the dialling policy allows and that is not cooling
    down, that ocigate can make an Authorization for and, when the plan probes, that answers a HEAD for it (a blob). The
    last candidate is not probed, since whatever it answers is then the answer. None when no host is left: the
    gateway answers the client itself, as it cannot once mitmproxy has the flow."""
    # Whether each host may be asked at all is known up front: the last that may is not probed.
    checks = [await _may_stream_to(asker, attempt, plan.route.digest) for attempt in plan.attempts]
    candidates = [attempt for attempt, check in zip(plan.attempts, checks, strict=True) if check is None]
    outcomes: list[Outcome] = []
    for attempt, check in zip(plan.attempts, checks, strict=True):
        host = attempt.host
        if check is not None:
            outcomes.append(check)
            continue
        if plan.probe and attempt is not candidates[-1]:
            try:
                headers = request_headers(client_headers, attempt)
                response, probed_with = await asker.ask(attempt, "HEAD", headers)
            except HostFailed as e:
                outcomes.append(Outcome(host.url, f"probe: {e}", True, unreachable=e.unreachable))
                continue
            except AuthFailed as e:
                outcomes.append(Outcome(host.url, f"probe: {e}", True, auth_failure=True))
                continue
            if response.status >= 400:
                outcomes.append(_answered(attempt, response, probed_with, probe=True))
                continue
        fallback = attempt is not candidates[-1]
        if attempt.forward_authorization:
            return Streamed(attempt, None, fallback), outcomes
        try:
            # A streamed request cannot be sent again after a 401: its Authorization has to be right the first time.
            await asker.broker.prepare(host, ping_target(host, plan.upstream))
            authorization = await asker.broker.authorize(host, attempt.access)
        except AuthFailed as e:
            outcomes.append(Outcome(host.url, str(e), True, auth_failure=True))
            continue
        return Streamed(attempt, authorization, fallback), outcomes
    return None, outcomes
