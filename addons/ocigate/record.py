"""What ocigate decided for a flow and what each host answered: one typed record per flow, its log line, and the
plain form kept in the flow's metadata (which captures save and mitmweb shows, so it holds no secret)."""

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from mitmproxy import http

from .attempts import Outcome
from .hoststoml import Rule
from .plan import Plan, is_proxy_for
from .policy import Decision
from .routes import Route, RouteKind

# The flow metadata key of the record.
METADATA_KEY = "ocigate"
# served_by of a flow the gateway answered itself.
GATEWAY = "gateway"
# flow.marked of a failed flow: mitmweb and the console show it as ❌ beside the flow.
FAILED_MARK = ":x:"


@dataclass
class FlowRecord:
    upstream: str
    rule: str  # the rule's file
    route: str  # the request's kind (routes.RouteKind), "invalid" for one the gateway refused
    method: str
    repository: str | None = None
    reference: str | None = None
    capabilities: tuple[str, ...] | None = None  # those a host needed to be asked
    named_reference: str | None = None
    attempts: list[Outcome] = field(default_factory=list)  # every host asked or passed over, in order
    served_by: str = GATEWAY  # the URL of the host that answered, or GATEWAY
    status: int | None = None  # the client's answer's, once sent
    error: str | None = None  # why the client did not get what it asked for
    verified: str | None = None  # the digest the answer's bytes were checked against as they passed
    unchecked: str | None = None  # why the answer passed without a check
    ns: str | None = None  # the ns= the host that served was asked with (a mirror's: the upstream)
    credential: str | None = None  # the credential ocigate presented to it, by source and user (never its value)
    token: str | None = None  # its token: "cached" or "fetched"
    client: str | None = None  # the client's address
    proxy_user: str | None = None  # the user the client authenticated to the proxy as (mitmproxy's proxyauth)
    mismatch: str | None = None  # what the serving host streamed instead of the digest's bytes (the client's cut short)
    bytes_sent: int | None = None  # of the answer's body, sent to the client, once the flow ended
    duration: float | None = None  # seconds from the request to the end of the flow, once it ended
    policy: str | None = None  # the policy's decision on a refused request or a push, naming its rule (policy.py)
    # A status of 400 or more the client was to expect, no failure (see answered): "challenge" (a host's challenge to
    # a client that authenticates itself and sent no credential yet) or "probe" (the registry's "not found" to a
    # blob HEAD: a push asks before uploading, containerd before pulling by digest).
    expected: str | None = None

    @classmethod
    def refused(cls, upstream: str, rule: Rule, method: str) -> "FlowRecord":
        """A request the gateway refused before planning it."""
        return cls(upstream, str(rule.source), "invalid", method)

    @classmethod
    def ocigate_failed(cls, upstream: str, rule: Rule, method: str, error: str) -> "FlowRecord":
        """A request ocigate failed on itself (see the gateway's log), whatever it asked for."""
        return cls(upstream, str(rule.source), "unknown", method, error=error)

    @classmethod
    def of(
        cls,
        plan: Plan,
        outcomes: Sequence[Outcome] = (),
        served_by: str = GATEWAY,
        *,
        credential: str | None = None,
        token: str | None = None,
    ) -> "FlowRecord":
        """The record of a planned request; `served_by` the URL of the host that answered, with the `credential` and
        `token` ocigate presented to it."""
        route = plan.route
        served = next((a.host for a in plan.attempts if a.host.url == served_by), None)
        return cls(
            upstream=plan.upstream,
            rule=plan.source,
            route=route.kind.value,
            method=plan.method,
            repository=route.repository,
            reference=route.reference,
            capabilities=tuple(sorted(plan.capabilities)),
            named_reference=plan.named_reference,
            attempts=list(outcomes),
            served_by=served_by,
            ns=plan.upstream if served is not None and is_proxy_for(served, plan.upstream) else None,
            credential=credential,
            token=token,
        )

    @classmethod
    def denied(cls, upstream: str, rule: Rule, method: str, route: Route | None, policy: Decision) -> "FlowRecord":
        """A request the policy refused (`route` None: one that is none of the distribution API): what it asked for,
        and the rule that refused it. No host was asked."""
        return cls(
            upstream,
            str(rule.source),
            route.kind.value if route else "invalid",
            method,
            repository=route.repository if route else None,
            reference=route.reference if route else None,
            error=policy.error().message,
            policy=policy.describe(),
        )

    def client_of(self, flow: http.HTTPFlow) -> None:
        """Who asked: the client's address and, when the proxy asked it to authenticate, its user (never the
        password that mitmproxy's proxyauth keeps beside it)."""
        peer = flow.client_conn.peername
        self.client = f"{peer[0]}:{peer[1]}" if peer else None
        self.proxy_user = proxy_user_of(flow)

    def as_metadata(self) -> dict[str, Any]:
        """The record as flow metadata holds it: plain values (mitmproxy saves metadata in captures), and the end
        of the flow (status, error, verified, unchecked, mismatch, bytes_sent, duration) only once known."""
        shown: dict[str, Any] = {
            "upstream": self.upstream,
            "rule": self.rule,
            "route": self.route,
            "method": self.method,
            "repository": self.repository,
            "reference": self.reference,
            "capabilities": list(self.capabilities) if self.capabilities is not None else None,
            "named_reference": self.named_reference,
            "attempts": [o.as_dict() for o in self.attempts],
            "served_by": self.served_by,
        }
        optional = (
            "status",
            "error",
            "verified",
            "unchecked",
            "ns",
            "credential",
            "token",
            "client",
            "proxy_user",
            "policy",
            "expected",
        )
        for name in (*optional, "mismatch", "bytes_sent", "duration"):
            if getattr(self, name) is not None:
                shown[name] = getattr(self, name)
        return shown

    def publish(self, flow: http.HTTPFlow) -> None:
        """The record on the flow, refreshed each time it says more: in metadata, as the flow's comment, and a
        failure as its mark. A mark is only ever set, so that one a person put on the flow in mitmweb stays."""
        flow.metadata[METADATA_KEY] = self.as_metadata()
        flow.comment = self.comment()
        if self.failed():
            flow.marked = FAILED_MARK

    def answered(self, status: int, *, client_sent_credentials: bool, challenged: bool) -> None:
        """The status the client got (`challenged`: with a WWW-Authenticate challenge), and whether it was one to
        expect on the way (`expected`). Never one the gateway answered with for a failure of its own or of a host
        (an `error`: a policy's refusal, a host that failed mid-answer, an internal error):
        - "challenge": a host's own 401 with its challenge, passed on to a client that sent no credential yet, and to
          which ocigate presented none of its own (neither a credential nor a token: had it, the 401 is ocigate's
          credential failing). That is the first step of the client's own authentication.
        - "probe": a 404 to a blob HEAD that is the registry's own "not found": every host asked said 404 (the
          gateway passes their verdict on, naming them). Not when a host was passed over or failed (cooling down,
          refused, timed out, 5xx, refused ocigate's credentials): that host may have the blob."""
        self.status = status
        if self.error is not None:
            return
        if status == 401 and self._clients_own_challenge(challenged, client_sent_credentials):
            self.expected = "challenge"
        elif status == 404 and self.method == "HEAD" and self.route == RouteKind.BLOB and self._not_found_anywhere():
            self.expected = "probe"

    def _clients_own_challenge(self, challenged: bool, client_sent_credentials: bool) -> bool:
        presented = self.credential is not None or self.token is not None
        return self.served_by != GATEWAY and challenged and not client_sent_credentials and not presented

    def _not_found_anywhere(self) -> bool:
        return bool(self.attempts) and all(attempt.status == 404 for attempt in self.attempts)

    def failed(self) -> bool:
        """The client did not get what it asked for: an error (a blob that was not what its digest says among
        them), or an answer of 400 or more, whoever gave it, but one it was to expect (`expected`)."""
        return self.error is not None or (self.status is not None and self.status >= 400 and self.expected is None)

    def comment(self) -> str:
        """The log line with what ocigate added and presented: the context the serving host was asked with, the
        credential by source and user (never its value), the token's origin, and the digest the answer was checked
        against. One line, as mitmweb shows a flow's comment."""
        details = []
        if self.ns is not None:
            details.append(f"ns={self.ns}")
        if self.named_reference is not None:
            details.append(f"OCI-Named-Ref {self.named_reference}")
        if self.credential is not None:
            details.append(f"credential {self.credential}")
        if self.token is not None:
            details.append(f"token {self.token}")
        if self.verified is not None:
            details.append(f"verified {self.verified}")
        if self.policy is not None:
            details.append(f"policy {self.policy}")
        # A host's words in an error may span lines; the comment is one.
        return " ".join("; ".join([self.describe(), *details]).split())

    def describe(self) -> str:
        """One log line a person can read: what was asked, who served it, who was skipped and why."""
        what = f"{self.method} {self.upstream}"
        if self.repository:
            what += f"/{self.repository}"
        what += f" {self.route} {self.reference}" if self.reference else f" {self.route}"
        line = f"{what} -> {urlsplit(self.served_by).netloc or self.served_by}"
        if self.status is not None:
            line += f" {self.status}"
        if self.error is not None:
            line += f" failed: {self.error}"
        elif self.unchecked is not None:
            line += f" unchecked: {self.unchecked}"
        skipped = [f"{a.host}: {a.result}" for a in self.attempts if a.fell_through]
        if skipped:
            # Hosts passed over for one that answered were skipped; when the gateway answered, every one was tried.
            verb = "tried" if self.served_by == GATEWAY else "skipped"
            line += f" ({verb} {'; '.join(skipped)})"
        return line


def proxy_user_of(flow: http.HTTPFlow) -> str | None:
    """The user the client authenticated to the proxy as (mitmproxy's proxyauth keeps (user, password) in the flow's
    metadata; only the user is taken), or None."""
    proxy_user = flow.metadata.get("proxyauth")
    if isinstance(proxy_user, tuple | list) and proxy_user and isinstance(proxy_user[0], str):
        return proxy_user[0]
    return None
