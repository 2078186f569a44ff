"""`ocigate explain IMAGE`: what the gateway would do for an image's manifest, said without contacting any host or
running any credential helper. The decisions are the planner's own (plan.make_plan): this module only says why each
host is or is not asked, and where each one's credential would come from (by source and key, never its value)."""

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .credentials import CredentialError, Finding
from .hoststoml import Host, Rule, RulesError, load_rules
from .plan import PULL_AND_RESOLVE, Attempt, Plan, make_plan
from .policy import Policy, PolicyError, load_policy
from .routes import (
    DOCKER_HUB,
    Route,
    RouteError,
    RouteKind,
    named_reference,
    normalize_repository,
    normalize_upstream,
    validate_digest,
    validate_repository,
    validate_tag,
)

DEFAULT_TAG = "latest"


@dataclass(frozen=True)
class Image:
    """An image reference as docker reads it: `alpine` is docker.io/library/alpine:latest."""

    upstream: str
    repository: str
    tag: str | None
    digest: str | None

    def __str__(self) -> str:
        return named_reference(self.upstream, self.repository, tag=self.tag, digest=self.digest)

    @property
    def route(self) -> Route:
        # A reference with both asks for the digest, as docker and containerd do.
        tag = None if self.digest else self.tag
        return Route(RouteKind.MANIFEST, self.repository, tag=tag, digest=self.digest)


def parse_image(text: str) -> Image:
    """[registry/]repository[:tag][@digest], docker's way: the first component is a registry when it has a dot or a
    port or is `localhost`, else the image is Docker Hub's (`library/` before a single name); no tag and no digest
    mean `:latest`. Raises RouteError naming what is wrong."""
    name, at, digest = text.partition("@")
    if at:
        validate_digest(digest)
    slash = name.rfind("/")
    colon = name.rfind(":")
    tag = None
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
        validate_tag(tag)
    first, _, rest = name.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        upstream = normalize_upstream(first)
    else:
        upstream, rest = DOCKER_HUB, name
    validate_repository(rest)
    if tag is None and not at:
        tag = DEFAULT_TAG
    return Image(upstream, normalize_repository(upstream, rest), tag, digest or None)


@dataclass(frozen=True)
class HostDecision:
    """One host of the rule, and what the gateway would do with it for this reference."""

    host: Host
    asked: bool
    why: str
    request: str | None = None  # method and URL of the manifest request it would be sent
    # Headers added: hosts.toml's by name only (a value there may be a secret), the named reference with its value.
    headers: tuple[str, ...] = ()
    credential: tuple[Finding, ...] = ()  # where it would come from, in the order asked; empty: anonymous
    credential_problem: str | None = None  # a credential that is there but unusable
    client_authenticates: bool = False  # the client's own Authorization goes to this host instead


@dataclass(frozen=True)
class Explanation:
    image: Image
    push: bool
    user: str | None
    rules: Path | None
    rule: Rule | None  # None: no rule, the registry's traffic passes through untouched
    hosts: tuple[HostDecision, ...] = ()
    # The per-user policy's word, when it would refuse the request (before any host or credential is asked).
    refusal: str | None = None
    # A policy restricts anything: a client asking the mirrors themselves, by any name or address, is refused.
    guarded: bool = False


# Where a host's credential would come from: (host[:port], upstream, repository) -> findings; raises CredentialError.
CredentialFinder = Callable[[str, str, str], list[Finding]]


def explain(
    image: Image,
    rule: Rule | None,
    *,
    push: bool,
    user: str | None,
    rules: Path | None,
    named_ref_headers: Sequence[str],
    find_credential: CredentialFinder,
    refusal: str | None = None,
    guarded: bool = False,
) -> Explanation:
    if rule is None or refusal is not None:
        return Explanation(image, push, user, rules, rule, refusal=refusal)
    plan = make_plan(image.route, "PUT" if push else "GET", rule, image.upstream, "", named_ref_headers)
    attempts = {attempt.host: attempt for attempt in plan.attempts}
    decisions = []
    for host in rule.hosts:
        attempt = attempts.get(host)
        if attempt is None:
            decisions.append(HostDecision(host, False, _why_not(host, plan)))
        else:
            decisions.append(_asked(host, attempt, plan, image, find_credential))
    return Explanation(image, push, user, rules, rule, tuple(decisions), guarded=guarded)


def _asked(host: Host, attempt: Attempt, plan: Plan, image: Image, find: CredentialFinder) -> HostDecision:
    position = plan.attempts.index(attempt)
    if plan.push:
        why = "the host the push goes to: the first with push"
    else:
        needs = " and ".join(sorted(plan.capabilities))
        before = "the host" if position == 1 else f"the {position} hosts"
        order = "asked first" if position == 0 else f"asked if {before} before it cannot answer"
        what = "resolve a tag" if plan.capabilities == PULL_AND_RESOLVE else "fetch content by digest"
        why = f"{order}: it may {what} (has {needs})"
    named = {name for name, _ in host.headers}
    headers = tuple(
        f"{name}: (from hosts.toml, value not shown)" if name in named else f"{name}: {value}"
        for name, value in attempt.headers
    )
    request = f"{plan.method} {host.scheme}://{host.netloc}{attempt.target}"
    if attempt.forward_authorization:
        return HostDecision(host, True, why, request, headers, client_authenticates=True)
    try:
        found = tuple(find(host.netloc, image.upstream, image.repository))
    except CredentialError as e:
        return HostDecision(host, True, why, request, headers, credential_problem=str(e))
    return HostDecision(host, True, why, request, headers, found)


def _why_not(host: Host, plan: Plan) -> str:
    missing = plan.capabilities - host.capabilities
    if missing:
        needs = " and ".join(sorted(plan.capabilities))
        what = "a push" if plan.push else "resolving a tag" if plan.capabilities == PULL_AND_RESOLVE else "a pull"
        return f"not asked: lacks {', '.join(sorted(missing))} ({what} needs {needs})"
    if plan.push:
        return "not asked: a push goes to one host only, the first with push"
    if host.pull_from_mirror != "all":
        return f'not asked: pull_from_mirror = "{host.pull_from_mirror}" and this is a pull by ' + (
            "digest" if plan.route.digest else "tag"
        )
    return "not asked"


def _capabilities(host: Host) -> str:
    order = ("pull", "resolve", "push", "referrers")
    return ", ".join(name for name in order if name in host.capabilities)


def _host_name(host: Host, rule: Rule) -> str:
    if host.is_server and rule.upstream == "_default":
        return "the registry itself"
    return host.url + (" (the registry itself)" if host.is_server else "")


def render(explanation: Explanation) -> str:
    """The explanation as the command prints it."""
    e = explanation
    lines = [f"{e.image} ({'push' if e.push else 'pull'}{f' by proxy user {e.user!r}' if e.user else ''})"]
    if e.refusal is not None:
        lines.append(f"policy: refused: {e.refusal}")
        lines.append("no host is asked and no credential looked up")
        return "\n".join(lines) + "\n"
    if e.rule is None:
        lines.append(f"rule: none in {e.rules}: the traffic of {e.image.upstream} passes through untouched")
        return "\n".join(lines) + "\n"
    rule = e.rule
    lines.append(f"rule: {rule.source or 'certificate files only'}")
    if rule.offline:
        lines.append("offline = true: only the mirrors are contacted, never the registry itself")
    if rule.client_authenticates:
        lines.append('authentication = "client": the registry itself gets the client\'s own credentials')
    lines.append("hosts, in order:")
    for number, decision in enumerate(e.hosts, 1):
        lines.append(f"  {number}. {_host_name(decision.host, rule)} [{_capabilities(decision.host)}]")
        lines.append(f"     {decision.why}")
        if not decision.asked:
            continue
        lines.append(f"     {decision.request}")
        lines += [f"       {header}" for header in decision.headers]
        lines.append(f"     credential: {_credential(decision)}")
    if not any(decision.asked for decision in e.hosts):
        lines.append("no host may be asked: the client gets an error naming the rule")
    mirrors = [decision.host for decision in e.hosts if not decision.host.is_server]
    if e.guarded and mirrors:
        lines.append(
            "policy: a client asking these mirrors directly (by name, address or another name of theirs) is refused: "
            "they are reached through the rules only; a mirror at loopback or at an address of the gateway's own host "
            "is refused at every such address, loopback included, at its port"
        )
    return "\n".join(lines) + "\n"


def _credential(decision: HostDecision) -> str:
    if decision.client_authenticates:
        return 'the client\'s own (authentication = "client")'
    if decision.credential_problem is not None:
        return f"unusable: {decision.credential_problem}"
    if not decision.credential:
        return "none: anonymous"
    return ", if it has none: ".join(finding.where for finding in decision.credential)


# --- the command ---------------------------------------------------------------------------------------------------


def policy_refusal(policy: Policy, user: str | None, image: Image, push: bool) -> str | None:
    """What the rules tree's policy (policy.py) says of this request, when it refuses it."""
    decision = policy.decide(user, image.upstream, image.repository, push=push)
    return None if decision.allowed else decision.describe()


def _parser() -> argparse.ArgumentParser:
    from .check import add_settings_arguments

    parser = argparse.ArgumentParser(
        prog="ocigate explain",
        description="Say what the gateway would do for IMAGE's manifest, without contacting any host.",
    )
    parser.add_argument(
        "image", metavar="IMAGE", help="an image reference: alpine, ghcr.io/team/app:v1, ...@sha256:..."
    )
    parser.add_argument("--push", action="store_true", help="a push of IMAGE instead of a pull")
    parser.add_argument("--user", metavar="NAME", help="the proxy user (proxyauth) asking")
    add_settings_arguments(parser)
    return parser


def main(argv: Sequence[str]) -> int:
    """`argv` starts with the command: ["explain", IMAGE, ...]. Exit status: 0 explained, 1 the rules or the image
    cannot be read, 2 usage error."""
    from .check import settings_of
    from .services import credential_chain

    args = _parser().parse_args(argv[1:])
    settings = settings_of(args)
    if settings is None:
        return 2
    try:
        image = parse_image(args.image)
    except RouteError as e:
        print(f"ocigate explain: {args.image!r} is not an image reference: {e}", file=sys.stderr)
        return 1
    rule, policy = None, Policy()
    if settings.rules is not None:
        try:
            rule = load_rules(settings.rules).lookup(image.upstream)
            policy = load_policy(settings.rules)
        except (RulesError, PolicyError) as e:
            print(f"ocigate explain: {e} (ocigate check lists every problem)", file=sys.stderr)
            return 1
    chain = credential_chain(settings)
    explanation = explain(
        image,
        rule,
        push=args.push,
        user=args.user,
        rules=settings.rules,
        named_ref_headers=settings.named_ref_headers,
        find_credential=chain.find,
        # An upstream without a rule passes through untouched: the policy decides only what goes through the rules.
        refusal=policy_refusal(policy, args.user, image, args.push) if rule is not None else None,
        guarded=policy.restricts,
    )
    sys.stdout.write(render(explanation))
    return 0
