"""Who may pull and push what through the gateway: the rules tree's `policy.toml`, read once with the rules into a
frozen Policy, and the decision for one request, made from the request alone, before any host is contacted and
before any credential is looked up.

A gateway injects its own credentials; without a policy, whoever reaches it (past mitmproxy's `proxyauth`) borrows
them for every repository its rules route. The file says, per upstream, which repositories anyone may reach (`allow`
and `block` lists of repository prefixes, as containers-registries.conf's `blocked`), and per proxy user which
upstreams and repositories that user may pull and push."""

import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .files import NotRegularFileError, read_regular_file
from .ocierror import OciError
from .plan import PUSH, mount_sources, required_capabilities
from .routes import (
    DOCKER_HUB,
    Route,
    RouteError,
    RouteKind,
    normalize_repository,
    normalize_upstream,
    split_host_port,
    validate_repository,
)

# The policy's file, at the root of the rules tree beside the registry directories (load_rules reads directories
# only, so a file here is no registry's).
POLICY_FILE = "policy.toml"

# An entry of a user's lists that names every upstream.
EVERY_UPSTREAM = "*"

_ROOT_KEYS = frozenset({"upstream", "user"})
_UPSTREAM_KEYS = frozenset({"allow", "block"})
_USER_KEYS = frozenset({"pull", "push"})


class PolicyError(Exception):
    """A policy.toml that cannot be used. str() names the file, the key and what is wrong, e.g.
    "rules/policy.toml: user.bob.pull[0]: 'Team/App' is not a repository prefix (...)"."""

    def __init__(self, path: Path, key: str | None, problem: str) -> None:
        self.path = path
        self.key = key
        self.problem = problem
        super().__init__(f"{path}: {key}: {problem}" if key else f"{path}: {problem}")


def under(prefix: str, repository: str) -> bool:
    """Whether `repository` is `prefix` or lies under it, whole path segments only: `team/app` covers `team/app` and
    `team/app/x`, never `team/apple`. The empty prefix covers every repository."""
    return not prefix or repository == prefix or repository.startswith(prefix + "/")


@dataclass(frozen=True)
class Entry:
    """One entry of a list: where it is written (`key`, for messages) and what it covers."""

    key: str  # e.g. 'user.alice.pull[0]'
    written: str  # the entry as the file has it
    upstream: str | None  # None: every upstream (a user's "*"); an upstream's own lists name none
    prefix: str  # a repository prefix as the upstream names it, "" for all of them

    def covers(self, upstream: str, repository: str | None) -> bool:
        """Whether the entry covers `repository` of `upstream`; a repository of None (the catalog, which lists them
        all) only when it covers the whole upstream."""
        if self.upstream is not None and self.upstream != upstream:
            return False
        return not self.prefix if repository is None else under(self.prefix, repository)

    def named(self) -> str:
        return f"{self.key} {self.written!r}"


@dataclass(frozen=True)
class UpstreamLists:
    """What anyone may reach of one upstream: `allow` (None: every repository) less `block`."""

    key: str  # e.g. 'upstream."docker.io"'
    allow: tuple[Entry, ...] | None
    block: tuple[Entry, ...]


@dataclass(frozen=True)
class Rights:
    """What one proxy user may pull and push (pushing includes pulling: a pushing client reads what it pushes)."""

    key: str  # e.g. 'user.alice'
    pull: tuple[Entry, ...]
    push: tuple[Entry, ...]


@dataclass(frozen=True)
class Decision:
    """Whether a request may go on, and the rule that says so: `rule` names the file and the list or entry."""

    allowed: bool
    rule: str
    why: str  # what was asked and why the rule decides it
    push: bool = False  # what was asked writes (an audit event even when allowed)

    def describe(self) -> str:
        """One line for the log, the flow's record and `ocigate explain`."""
        verdict = "allowed" if self.allowed else "refused"
        return f"{verdict} by {self.rule}: {self.why}"

    def error(self) -> OciError:
        """The client's answer to a refusal: 403 DENIED naming the rule."""
        return OciError(403, "DENIED", f"refused by ocigate's policy ({self.rule}): {self.why}")


@dataclass(frozen=True)
class Policy:
    """Who may pull and push what. An empty Policy (no policy.toml) allows everything; with any `[user]` table, only
    the users named may use the gateway, and a client that did not authenticate to the proxy is refused."""

    source: Path | None = None  # the file; None: there is none
    upstreams: Mapping[str, UpstreamLists] = MappingProxyType({})
    users: Mapping[str, Rights] | None = None  # None: no per-user rules

    @property
    def restricts(self) -> bool:
        """Whether it refuses anything at all (a policy.toml with any rule)."""
        return bool(self.upstreams) or self.users is not None

    def decide(self, user: str | None, upstream: str, repository: str | None, *, push: bool) -> Decision:
        """Whether the proxy user `user` (None: the client did not authenticate) may pull (or `push`) `repository`
        (normalised, as routes.normalize_repository names it; None: the catalog) of `upstream`."""
        return replace(self._judge(user, upstream, repository, push=push), push=push)

    def _judge(self, user: str | None, upstream: str, repository: str | None, *, push: bool) -> Decision:
        action = "push" if push else "pull"
        what = f"{upstream}/{repository}" if repository is not None else f"the catalog of {upstream}"
        asked = f"{action} of {what} by {_who(user)}"
        lists = self.upstreams.get(upstream)
        if lists is not None:
            if repository is None and (lists.block or lists.allow is not None):
                key = f"{lists.key}.{'block' if lists.block else 'allow'}"
                return self._refused(key, f"{asked}: the catalog would list repositories it restricts")
            if repository is not None:
                blocked = next((entry for entry in lists.block if entry.covers(upstream, repository)), None)
                if blocked is not None:
                    return self._refused(blocked.named(), f"{asked}: blocked")
                if lists.allow is not None and not any(e.covers(upstream, repository) for e in lists.allow):
                    return self._refused(f"{lists.key}.allow", f"{asked}: under none of its entries")
        if self.users is None:
            if lists is not None and lists.allow is not None:
                allowed = next(entry for entry in lists.allow if entry.covers(upstream, repository))
                return self._allowed(allowed.named(), asked)
            return self._allowed(None, asked)
        rights = self._rights(user, asked)
        if isinstance(rights, Decision):
            return rights
        entries = rights.push if push else (*rights.pull, *rights.push)
        covering = next((entry for entry in entries if entry.covers(upstream, repository)), None)
        if covering is None:
            return self._refused(f"{rights.key}.{action}", f"{asked}: under none of its entries")
        return self._allowed(covering.named(), asked)

    def may_reach(self, user: str | None, upstream: str) -> Decision:
        """Whether `user` may send `upstream` what is none of the distribution API (a token endpoint under /v2/,
        which passes to the registry as the client sent it): only a user who may pull something of it."""
        asked = f"a request to {upstream} that is not a pull or push, by {_who(user)}"
        if self.users is None:
            return self._allowed(None, asked)
        rights = self._rights(user, asked)
        if isinstance(rights, Decision):
            return rights
        entries = (*rights.pull, *rights.push)
        reaching = next((e for e in entries if e.upstream is None or e.upstream == upstream), None)
        if reaching is None:
            return self._refused(f"{rights.key}.pull", f"{asked}: no entry names {upstream}")
        return self._allowed(reaching.named(), asked)

    def _rights(self, user: str | None, asked: str) -> "Rights | Decision":
        """The rights of `user` under per-user rules, or the refusal of a client without a user or a table."""
        assert self.users is not None
        if user is None:
            return self._refused("user", f"{asked}: the client did not authenticate to the proxy (proxyauth)")
        rights = self.users.get(user)
        if rights is None:
            return self._refused("user", f"{asked}: no [user.{_key_part(user)}] table")
        return rights

    def _allowed(self, key: str | None, why: str) -> Decision:
        return Decision(True, self._rule(key), why)

    def _refused(self, key: str, why: str) -> Decision:
        return Decision(False, self._rule(key), why)

    def _rule(self, key: str | None) -> str:
        """The file and `key`; for a request no entry decided, that nothing in the file refuses it."""
        if self.source is None:
            return f"no {POLICY_FILE}"
        return f"{self.source}: {key}" if key is not None else f"{self.source} (no entry refuses it)"


def check(
    policy: Policy,
    user: str | None,
    upstream: str,
    route: Route,
    method: str,
    query: str,
    content_type: str | None = None,
) -> Decision | None:
    """The decision for one distribution request; None for the /v2/ ping, which names nothing and which every client
    must get through to start (what it goes on to ask is decided). A request that writes, or an upload, needs push
    rights; a blob mount needs the right to pull what it mounts from too, every source it names (a registry reads
    the first `from`, however its key is spelled)."""
    if route.kind is RouteKind.PING:
        return None
    push = required_capabilities(route, method) == PUSH
    decision = policy.decide(user, upstream, route.repository, push=push)
    if not decision.allowed or route.kind is not RouteKind.BLOB_UPLOAD:
        return decision
    kind = (content_type or "").lower()
    if policy.restricts and ("x-www-form-urlencoded" in kind or "multipart/form-data" in kind):
        # distribution reads a mount's `from` from a form body too (Go's FormValue: urlencoded or multipart), which
        # the gateway streams unread.
        return replace(decision, allowed=False, why=f"{decision.why}; but its upload has a form body, unread")
    if policy.restricts and ";" in query:
        # Registries built with Go before 1.17 split a query on `;` as on `&` (`mount=X;from=secret&from=app` mounts
        # from team/secret there), later ones do not. Refused rather than split either way: whichever way the gateway
        # read it, a host built the other way would read another source. No digest, repository or upload state
        # holds a `;`, so no client of the API sends one.
        return replace(
            decision, allowed=False, why=f"{decision.why}; but its query holds a ';', read differently by hosts"
        )
    for source in mount_sources(query):
        if not source:
            continue  # `from=` mounts nothing: a registry starts a plain upload
        try:
            # Judged only as a repository name: `team/app=x` is none, under whatever prefix it starts with.
            validate_repository(source)
        except RouteError:
            return replace(decision, allowed=False, why=f"{decision.why}; but it mounts from {source!r}, no repository")
        repository = normalize_repository(upstream, source)
        mounted = policy.decide(user, upstream, repository, push=False)
        if not mounted.allowed:
            return replace(mounted, push=True)
    return decision


def doubtful_entries(policy: Policy) -> list[str]:
    """What a valid policy may well not mean, for `ocigate check` to warn of: a Docker Hub prefix of one component
    (`nginx`) covers the repositories `nginx/...` only, never the official image `nginx`, which Docker Hub (and so the
    policy) names `library/nginx`. Only a warning, with no advice but how to say a namespace is meant: which names
    are official images is Docker Hub's to say, so an entry written with a trailing slash (`bitnami/`) is trusted to
    mean the namespace and is not warned of."""
    entries = [entry for lists in policy.upstreams.values() for entry in (*(lists.allow or ()), *lists.block)]
    for rights in (policy.users or {}).values():
        entries += [*rights.pull, *rights.push]
    doubtful = []
    for entry in entries:
        prefix = entry.prefix
        if entry.upstream != DOCKER_HUB or not prefix or "/" in prefix or prefix == "library":
            continue
        if entry.written.endswith("/"):
            continue  # `bitnami/`: the namespace, said so
        doubtful.append(
            f"{policy.source}: {entry.key}: {entry.written!r} matches Docker Hub's {prefix}/... repositories, not "
            f"the official image library/{prefix} (write {prefix + '/'!r} if the namespace is meant)"
        )
    return doubtful


def audit_line(who: str, method: str, what: str, decision: Decision) -> str:
    """The audit event of a refusal or a push: who (the proxy user, else the client's address), what (the method
    and what it named) and the rule. No header, no credential: nothing of the request but these. One line whatever
    the client sent: a control character (a newline that would forge a line of its own, a terminal escape) is
    written escaped."""
    return _one_line(f"{who} {method} {what}: {decision.describe()}")


def _one_line(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def load_policy(root: Path) -> Policy:
    """The policy of the rules tree at `root`: its policy.toml, or an empty Policy without one. Raises PolicyError
    naming the file and the key."""
    path = Path(root).absolute() / POLICY_FILE
    try:
        content = read_regular_file(path)
    except FileNotFoundError:
        return Policy()
    except NotRegularFileError as error:
        raise PolicyError(path, None, str(error)) from None
    except OSError as error:
        raise PolicyError(path, None, f"cannot read: {error.strerror or error}") from None
    try:
        document = tomllib.loads(content.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise PolicyError(path, None, f"not UTF-8 text (bad byte at offset {error.start})") from None
    except tomllib.TOMLDecodeError as error:
        raise PolicyError(path, None, f"invalid TOML: {error}") from None
    except RecursionError:
        raise PolicyError(path, None, "invalid TOML: arrays or tables nested too deeply") from None
    return parse_policy(document, path)


def parse_policy(document: Mapping[str, Any], path: Path) -> Policy:
    """The Policy a parsed policy.toml says; PolicyError naming `path` and the key for anything else."""
    _check_keys(document, _ROOT_KEYS, "", path)
    upstreams: dict[str, UpstreamLists] = {}
    for name, table in _table(document.get("upstream", {}), "upstream", path).items():
        key = f"upstream.{_key_part(name)}"
        upstream = _upstream(name, key, path)
        if upstream in upstreams:
            raise PolicyError(path, key, f"names {upstream} again (as {upstreams[upstream].key})")
        table = _table(table, key, path)
        _check_keys(table, _UPSTREAM_KEYS, key, path)
        allow = _prefixes(table["allow"], f"{key}.allow", upstream, path) if "allow" in table else None
        upstreams[upstream] = UpstreamLists(
            key, allow, _prefixes(table.get("block", []), f"{key}.block", upstream, path)
        )
    users: dict[str, Rights] | None = None
    if "user" in document:
        users = {}
        for name, table in _table(document["user"], "user", path).items():
            key = f"user.{_key_part(name)}"
            table = _table(table, key, path)
            _check_keys(table, _USER_KEYS, key, path)
            pull = _user_entries(table.get("pull", []), f"{key}.pull", path)
            users[name] = Rights(key, pull, _user_entries(table.get("push", []), f"{key}.push", path))
    return Policy(path, MappingProxyType(upstreams), MappingProxyType(users) if users is not None else None)


def _who(user: str | None) -> str:
    return f"proxy user {user!r}" if user is not None else "a client that did not authenticate to the proxy"


def _key_part(name: str) -> str:
    """A TOML key as the file would write it: bare when it can be."""
    bare = name and all(c.isascii() and (c.isalnum() or c in "-_") for c in name)
    return name if bare else '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _kind(value: object) -> str:
    return {dict: "a table", list: "an array", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def _table(value: object, key: str, path: Path) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PolicyError(path, key, f"expected a table, got {_kind(value)}")
    return value


def _check_keys(table: Mapping[str, Any], allowed: frozenset[str], prefix: str, path: Path) -> None:
    for name in table:
        if name not in allowed:
            key = f"{prefix}.{_key_part(name)}" if prefix else _key_part(name)
            raise PolicyError(path, key, f"unknown key (expected {', '.join(sorted(allowed))})")


def _strings(value: object, key: str, path: Path) -> list[str]:
    if not isinstance(value, list):
        raise PolicyError(path, key, f"expected an array of strings, got {_kind(value)}")
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise PolicyError(path, f"{key}[{index}]", f"expected a string, got {_kind(item)}")
    return value


def _upstream(name: str, key: str, path: Path) -> str:
    try:
        return normalize_upstream(name)
    except RouteError as error:
        raise PolicyError(path, key, str(error)) from None


def _prefix(text: str, key: str, path: Path) -> str:
    """A repository prefix as written: whole repository name components, no leading slash. One trailing slash
    (`bitnami/`) is allowed and means the same prefix: the author's way of saying a namespace is meant, which
    `doubtful_entries` trusts."""
    name = text.removesuffix("/")
    if not text:
        return ""
    try:
        validate_repository(name)
    except RouteError as error:
        raise PolicyError(path, key, f"{text!r} is not a repository prefix ({error})") from None
    return name


def _prefixes(value: object, key: str, upstream: str, path: Path) -> tuple[Entry, ...]:
    entries = []
    for index, text in enumerate(_strings(value, key, path)):
        entry_key = f"{key}[{index}]"
        if not text:
            raise PolicyError(path, entry_key, "an empty prefix: leave the upstream out of the rules instead")
        entries.append(Entry(entry_key, text, upstream, _prefix(text, entry_key, path)))
    return tuple(entries)


def _user_entries(value: object, key: str, path: Path) -> tuple[Entry, ...]:
    """Entries `upstream[/repository-prefix]`, or "*" for every repository of every upstream."""
    entries = []
    for index, text in enumerate(_strings(value, key, path)):
        entry_key = f"{key}[{index}]"
        if text == EVERY_UPSTREAM:
            entries.append(Entry(entry_key, text, None, ""))
            continue
        name, _, prefix = text.partition("/")
        if not name:
            raise PolicyError(path, entry_key, f"{text!r} names no upstream (expected upstream[/repository-prefix])")
        entries.append(Entry(entry_key, text, _upstream(name, entry_key, path), _prefix(prefix, entry_key, path)))
    return tuple(entries)


def around_the_rules(policy: Policy, mirrors: Iterable[tuple[str, int]], host: str, port: int) -> Decision | None:
    """A client asking a mirror the rules name at its own address (a CONNECT to it, a plain request), no ruled
    upstream: where a policy restricts anything, refused, since the policy decides only what goes through the rules.
    None: not such a request, or no policy that restricts."""
    try:
        # As upstream_rule reads a name: lowercased, without a trailing dot.
        name, _ = split_host_port(host)
    except RouteError:
        name = host.lower()
    if not policy.restricts or (name.strip("[]"), port) not in set(mirrors):
        return None
    return _around(policy, f"{host}:{port} is a mirror of the rules")


def around_the_rules_at(policy: Policy, host: str, port: int, why: str) -> Decision:
    """The refusal of a connection to host:port, which the gateway did not open for a ruled upstream and which may
    reach a mirror of the rules (under a policy that restricts), `why` saying how (it dials a mirror's address, ...):
    asked by its address or by another of its names, a mirror is reached around the rules all the same."""
    return _around(policy, f"{host}:{port} {why}")


def _around(policy: Policy, what: str) -> Decision:
    why = f"{what}, reached through the gateway's rules only"
    return Decision(False, policy._rule(None).replace(" (no entry refuses it)", ""), why)
