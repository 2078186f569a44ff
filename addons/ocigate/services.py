"""What the settings make: the rules, ocigate's own HTTP client and its authentication, what it knows of hosts' health
and of pulls. Built as one frozen bundle from one Settings, and replaced as a whole when the settings change, so
that no request ever sees a host client of one setting and a broker of another."""

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace

from mitmproxy import exceptions

from .attempts import Asker
from .auth import Broker
from .context import ContextStore
from .credentials import (
    ContainersAuth,
    CredentialChain,
    CredentialSource,
    DockerConfig,
    KubernetesSecrets,
    OcigateStore,
    default_containers_auth_paths,
)
from .health import HostHealth
from .hostclient import HostClient
from .hoststoml import Host, Rule, RulesError, RuleSet, load_rules
from .hosttls import HostTLS, HostTLSError, forget_contexts, openssl_context, python_context
from .policy import Policy, PolicyError, load_policy
from .rulewatch import Snapshot, before_reading, snapshot
from .settings import Settings


@dataclass(frozen=True)
class Services:
    rules: RuleSet | None  # None: no ocigate_rules, every request passes through untouched
    hostclient: HostClient
    broker: Broker
    health: HostHealth
    asker: Asker
    contexts: ContextStore
    # Who may pull and push what (the rules tree's policy.toml), read with the rules.
    policy: Policy = field(default_factory=Policy)
    # The rules tree as `rules` and `policy` were read from it, where the watchers start (None: not known, for rules
    # a watcher put in force, which it knows).
    snapshot: Snapshot | None = None

    @classmethod
    def unconfigured(cls) -> "Services":
        """What the addons use before any settings were parsed: no rules, so nothing is routed, and connections
        dialled as asked."""
        return cls.of(None, HostClient(), HostHealth(), credentials=None)

    @classmethod
    def of(
        cls, rules: RuleSet | None, hostclient: HostClient, health: HostHealth, credentials: CredentialChain | None
    ) -> "Services":
        """The services for these rules, host client, health and credentials: with a broker and an asker of their own
        and nothing known of any pull."""
        broker = Broker(hostclient, credentials)
        return cls(rules, hostclient, broker, health, Asker(broker, health), ContextStore())


def build(settings: Settings, before: "tuple[Settings, Services] | None" = None, *, reread: bool = False) -> Services:
    """The services `settings` make. `before`, the settings and services in force, hands on what was learned: what
    is known of hosts' health and of pulls always, the tokens and challenges unless the rules, trust or credentials
    changed, and the rules themselves unless their options changed or `reread` asks to read them again. Rules and
    the TLS files they name are checked as they are read: an OptionsError naming ocigate_rules and the file."""
    same_rules = before is not None and not reread and _rules_inputs(before[0]) == _rules_inputs(settings)
    if before is not None and same_rules:
        rules, policy, taken = before[1].rules, before[1].policy, before[1].snapshot
    else:
        # The files may have changed on disk since their contexts were made.
        forget_contexts()
        rules, policy, taken = _read_tree(settings)
    hostclient = _hostclient(settings, rules)
    if before is None:
        services = Services.of(rules, hostclient, HostHealth(settings.cooldown), credential_chain(settings))
        return replace(services, policy=policy, snapshot=taken)
    old_settings, old = before
    if same_rules and _credential_inputs(old_settings) == _credential_inputs(settings):
        broker = old.broker.with_client(hostclient)
    else:
        broker = Broker(hostclient, credential_chain(settings))
    health = old.health.with_cooldown(settings.cooldown)
    return Services(rules, hostclient, broker, health, Asker(broker, health), old.contexts, policy, taken)


def with_rules(settings: Settings, services: Services, rules: RuleSet) -> Services:
    """`services` (made from `settings`) with other rules: the rules tree changed on disk (rulewatch.py). A host client
    of its own, whose clients load the hosts' TLS files afresh and whose map of hosts by address is the new rules';
    what is known of hosts' health and of pulls, the tokens and the credentials kept: a token is worth what it was
    whatever the rules say."""
    hostclient = _hostclient(settings, rules)
    broker = services.broker.with_client(hostclient)
    health = services.health
    return Services(rules, hostclient, broker, health, Asker(broker, health), services.contexts, services.policy)


def _hostclient(settings: Settings, rules: RuleSet | None) -> HostClient:
    return HostClient(
        settings.destinations,
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        roots=settings.upstream_trusted_ca,
        insecure=settings.ssl_insecure,
        hosts_by_address=_hosts_by_address(rules),
    )


def rebuilt_by(current: Settings, new: Settings) -> bool:
    """Whether `new` makes other services than `current` did: what only the Gateway reads (the named-reference
    headers, whether unruled hosts are intercepted) and what only the access log and metrics read change none."""
    kept = replace(
        current,
        named_ref_headers=new.named_ref_headers,
        intercept_unruled=new.intercept_unruled,
        access_log=new.access_log,
        metrics=new.metrics,
    )
    return kept != new


def _rules_inputs(settings: Settings) -> tuple[object, ...]:
    """What the rules, and the TLS settings of their hosts, are made from."""
    return (settings.rules, settings.upstream_trusted_ca, settings.ssl_insecure)


def _credential_inputs(settings: Settings) -> tuple[object, ...]:
    """What the credential chain is made from."""
    return (
        settings.credential_sources,
        settings.credentials,
        settings.docker_config,
        settings.containers_auth,
        settings.kubernetes_secrets,
        settings.credential_helper_timeout,
    )


def credential_chain(settings: Settings) -> CredentialChain:
    """The credential sources in the order the settings name them (an empty chain: anonymous only)."""
    sources: list[CredentialSource] = []
    for name in settings.credential_sources:
        sources += _sources(name, settings)
    return CredentialChain(sources)


def _sources(name: str, settings: Settings) -> list[CredentialSource]:
    timeout = settings.credential_helper_timeout
    if name == "ocigate":
        return [OcigateStore(settings.credentials)]
    if name == "docker":
        return [DockerConfig(settings.docker_config, helper_timeout=timeout)]
    if name == "containers":
        paths = [settings.containers_auth] if settings.containers_auth else default_containers_auth_paths()
        return [ContainersAuth(path, helper_timeout=timeout) for path in paths]
    return [KubernetesSecrets(settings.kubernetes_secrets)] if settings.kubernetes_secrets else []


def _read_tree(settings: Settings) -> tuple[RuleSet | None, Policy, Snapshot | None]:
    """The rules and the policy of the rules tree, and the tree as they were read from it."""
    if settings.rules is None:
        return None, Policy(), None
    # Looked at before anything is read: an edit from now on differs from the snapshot, and the watchers read it.
    before = before_reading(settings.rules)
    try:
        rules = load_rules(settings.rules)
    except RulesError as e:
        raise exceptions.OptionsError(f"ocigate_rules: {e}") from None
    taken = snapshot(before, rules)  # the TLS files too, before they are loaded
    # A `ca` or `client` file that cannot be loaded is a broken rule too: found now, not on the first pull.
    for rule, host, error in tls_problems(rules.rules(), settings):
        raise exceptions.OptionsError(f"ocigate_rules: {rule.source}: {host.url}: {error}")
    return rules, _load_policy(settings), taken


def tls_problems(rules: Iterable[Rule], settings: Settings) -> Iterator[tuple[Rule, Host, HostTLSError]]:
    """Each host of `rules` whose `ca` or `client` files cannot be loaded (the contexts its connections would get),
    with why; lazily, so that the first stops a start."""
    for rule in rules:
        for host in rule.hosts:
            host_tls = HostTLS.of(host, roots=settings.upstream_trusted_ca, insecure=settings.ssl_insecure)
            try:
                python_context(host_tls)
                openssl_context(host_tls)
            except HostTLSError as error:
                yield rule, host, error


def _load_policy(settings: Settings) -> Policy:
    assert settings.rules is not None
    try:
        return load_policy(settings.rules)
    except PolicyError as e:
        raise exceptions.OptionsError(f"ocigate_rules: {e}") from None


def _hosts_by_address(rules: RuleSet | None) -> dict[tuple[str, int], Host]:
    entries: dict[tuple[str, int], Host] = {}
    conflicting: set[tuple[str, int]] = set()
    for rule in rules.rules() if rules else ():
        for host in rule.hosts:
            address = (host.host, host.port)
            known = entries.setdefault(address, host)
            if known.tls != host.tls:
                conflicting.add(address)
    return {address: host for address, host in entries.items() if address not in conflicting}
