"""The gateway's options, owned by one addon, and what the addons share: the settings parsed from the options, the
services built from them, and which host each re-pointed client connection talks to."""

import asyncio
import logging
import weakref
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from cachetools import LRUCache
from mitmproxy import ctx
from mitmproxy.addonmanager import Loader

from .attempts import Asker
from .auth import Broker
from .context import ContextStore
from .health import HostHealth
from .hostclient import HostClient
from .hoststoml import DEFAULT_DIRECTORY, HOSTS_FILE, Host, Rule, RuleSet
from .hosttls import forget_contexts
from .policy import Policy
from .routes import RouteError, default_port, normalize_upstream
from .rulewatch import INTERVAL, PolicyWatched, Reload, Watched, keep_policy_live, keep_rules_live
from .services import Services, build, rebuilt_by, with_rules
from .settings import MITMPROXY_OPTIONS, Settings, declare, is_settings_option

log = logging.getLogger("ocigate")

# Connections (client or server) ocigate keeps a note about, the least recently used forgotten first. A note goes
# when its connection ends or is dialled, so only those whose end never came (a client gone while mitmproxy waited to
# dial) pile up; a connection forgotten while alive loses only its host's own TLS settings in hosts.toml.
MAX_CONNECTIONS = 10_000

# What the shipped rules/ holds instead of rules: containerd (and ocigate) read only files named hosts.toml.
EXAMPLE_FILE = f"{HOSTS_FILE}.example"

# Options whose files are read again whenever they are set, even to the value they had: setting ocigate_rules again
# reloads hosts.toml and the TLS files its hosts name.
_RELOADED_WHEN_SET = frozenset({"ocigate_rules", *MITMPROXY_OPTIONS})


class Shared:
    """What the addons share: the current settings and the services built from them (both replaced only by the
    Configuration addon, and only as a whole), and which host each re-pointed client connection talks to."""

    def __init__(self) -> None:
        self._settings: Settings | None = None
        self._services = Services.unconfigured()
        # Host clients replaced by others: each closes once idle, and is forgotten once nothing holds it.
        self._retired: weakref.WeakSet[HostClient] = weakref.WeakSet()
        # The hosts.toml entry behind each connection a client's flows were re-pointed to, by client and address:
        # one host may stand in several rules with different TLS settings, and a client connection (one CONNECT
        # tunnel) belongs to one upstream.
        self.repointed: LRUCache[str, dict[tuple[str, int], Host]] = LRUCache(MAX_CONNECTIONS)
        # The gateway is shutting down (draining after a SIGTERM, see draining.py, or the first of its addons to hear
        # `done` says so): no longer ready.
        self.stopping = False

    @property
    def configured(self) -> bool:
        return self._settings is not None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            raise RuntimeError("ocigate's options have not been parsed yet")
        return self._settings

    @property
    def services(self) -> Services:
        return self._services

    def use(self, settings: Settings, services: Services) -> None:
        """These settings and services from now on. A host client replaced retires: the requests under way on it
        finish, and its connections close once idle."""
        if services.hostclient is not self._services.hostclient:
            self._services.hostclient.retire()
            self._retired.add(self._services.hostclient)
        self._settings, self._services = settings, services

    async def aclose(self) -> None:
        """The gateway stops: every host client closes, those replaced whose last request is still under way too."""
        clients = [self._services.hostclient, *self._retired]
        await asyncio.gather(*(client.aclose() for client in clients))

    @property
    def rules(self) -> RuleSet | None:
        return self._services.rules

    @property
    def hostclient(self) -> HostClient:
        return self._services.hostclient

    @property
    def broker(self) -> Broker:
        return self._services.broker

    @property
    def health(self) -> HostHealth:
        return self._services.health

    @property
    def asker(self) -> Asker:
        return self._services.asker

    @property
    def contexts(self) -> ContextStore:
        return self._services.contexts

    def host_for_connection(self, client_id: str, address: tuple[str, int]) -> Host | None:
        return self.repointed.get(client_id, {}).get(address) or self.hostclient.hosts_by_address.get(address)

    def upstream_rule(self, host: str, port: int, scheme: str) -> tuple[str, Rule] | None:
        """The upstream a request to scheme://host:port is for, and its rule; None when no rule names it."""
        try:
            upstream = normalize_upstream(host, None if port == default_port(scheme) else port)
        except RouteError:
            return None
        rules = self.rules
        rule = rules.lookup(upstream) if rules else None
        return (upstream, rule) if rule else None


class Configuration:
    """Owns the gateway's options: declares them, parses them into the shared Settings whenever one changes, and
    builds the services from those when they make other services, swapped in whole."""

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self._watching: asyncio.Task[None] | None = None  # keeps the rules in step with their tree
        self._watching_policy: asyncio.Task[None] | None = None  # and the policy with its file
        self.rules_interval = INTERVAL  # how often the rules tree is looked at (tests look more often)

    def load(self, loader: Loader) -> None:
        declare(loader)

    def configure(self, updated: set[str]) -> None:
        if any(is_settings_option(name) for name in updated):
            self._settings_changed(updated)
        if "connection_strategy" in updated and ctx.options.connection_strategy != "lazy":
            # An eager proxy dials the CONNECT target before any hook can re-point it, and upstream names may not
            # resolve at all (an air-gap box, a mirror-only registry). Set once the settings are in force: a value
            # refused meanwhile is put back before this runs.
            log.info("ocigate: setting connection_strategy=lazy")
            ctx.options.update(connection_strategy="lazy")

    def _settings_changed(self, updated: set[str]) -> None:
        # Nothing is replaced before everything is parsed and built. On an OptionsError mitmproxy puts the options
        # back and configures again: settings equal to those in force replace nothing.
        settings = Settings.parse(ctx.options)
        shared = self.shared
        reread = bool(updated & _RELOADED_WHEN_SET)
        if not shared.configured:
            shared.use(settings, build(settings))
        elif reread or rebuilt_by(shared.settings, settings):
            shared.use(settings, build(settings, (shared.settings, shared.services), reread=reread))
        else:
            shared.use(settings, shared.services)

    def running(self) -> None:
        if self._watching is None:
            self._watching = asyncio.get_running_loop().create_task(
                keep_rules_live(self._watched, self._rules_changed, self.rules_interval)
            )
        if self._watching_policy is None:
            self._watching_policy = asyncio.get_running_loop().create_task(
                keep_policy_live(self._watched_policy, self._policy_changed, self.rules_interval)
            )
        policy = self.shared.services.policy
        # Declared by mitmproxy's proxyauth addon, which a plain script's chain may lack.
        if getattr(ctx.options, "proxyauth", None) == "any" and policy.users is not None:
            log.warning(
                "ocigate: proxyauth=any accepts any user name with any password, so a client may name itself any user "
                "of the per-user rules in %s: set proxyauth to @HTPASSWD-FILE or ldap for them to mean anything",
                policy.source,
            )
        rules = self.shared.rules
        if rules is None:
            log.warning("ocigate: no ocigate_rules directory: every request passes through untouched")
        else:
            # Read once at start-up, before any flow, so the listing blocks nothing.
            hint = unrouted_hint(rules, sorted(rules.root.glob(f"*/{EXAMPLE_FILE}")))
            if hint is not None:
                log.warning("ocigate: %s", hint)
        host = ctx.options.listen_host or "127.0.0.1"
        proxy = f"http://{host}:{ctx.options.listen_port or 8080}"
        ca = Path(ctx.options.confdir).expanduser() / "mitmproxy-ca-cert.pem"
        log.info(
            "ocigate: gateway on %s with rules from %s\n"
            "  point clients at it: export HTTPS_PROXY=%s\n"
            "  and make them trust its CA: %s (README: 'Point your client at ocigate')",
            proxy,
            rules.root if rules else "(none)",
            proxy,
            ca,
        )

    async def done(self) -> None:
        # First of the gateway's addons to be done: a readiness probe hears of it before host clients close.
        self.shared.stopping = True
        for task in (self._watching, self._watching_policy):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._watching = self._watching_policy = None

    def _watched(self) -> Watched | None:
        rules = self.shared.rules
        if rules is None:
            return None
        settings, first = self.shared.settings, self.shared.services.snapshot
        return Watched(rules, settings.upstream_trusted_ca, settings.ssl_insecure, first)

    def _watched_policy(self) -> PolicyWatched | None:
        services = self.shared.services
        if services.rules is None:
            return None
        first = services.snapshot.policy if services.snapshot is not None else None
        return PolicyWatched(services.rules.root, services.policy, first)

    def _policy_changed(self, looked_at: Policy, policy: Policy) -> None:
        """policy.toml changed on disk: the new policy decides the next request. Not when another was put in force
        meanwhile."""
        shared = self.shared
        if shared.services.policy is looked_at:
            # The snapshot's word on the policy file was for the policy it replaces.
            snapshot = shared.services.snapshot
            taken = replace(snapshot, policy=None) if snapshot is not None else None
            shared.use(shared.settings, replace(shared.services, policy=policy, snapshot=taken))

    def _rules_changed(self, looked_at: RuleSet, reload: Reload) -> None:
        """The rules tree changed on disk: its new rules in force for the next request, in services of their own (a
        request under way keeps the rule it was planned with). Not when other rules were put in force meanwhile."""
        shared = self.shared
        if reload.rules is None or shared.rules is not looked_at:
            return
        if reload.tls_changed:
            forget_contexts()
        shared.use(shared.settings, with_rules(shared.settings, shared.services, reload.rules))


def unrouted_hint(rules: RuleSet, examples: Sequence[Path]) -> str | None:
    """What the start-up lines say when `rules` route no registry (the shipped rules/ holds examples only, which
    nothing reads): that everything passes through, and which of `examples` (its `*/hosts.toml.example` files) to copy
    where. None when some registry is routed. A registry's own example is named before `_default`'s, which would route
    every registry through the gateway."""
    if next(rules.rules(), None) is not None:
        return None
    root = rules.root
    unrouted = f"{root} routes no registry: every registry passes through untouched"
    if not examples:
        return f"{unrouted}\n  write {root}/<registry>/{HOSTS_FILE} to route one (README: 'A worked example')"
    own = [example for example in examples if example.parent.name != DEFAULT_DIRECTORY]
    chosen = (own or list(examples))[0]
    return (
        f"{unrouted}\n"
        f"  its examples: {', '.join(str(example) for example in examples)}\n"
        f"  copy one to {HOSTS_FILE} beside it with your mirrors, e.g. "
        f"cp {chosen} {chosen.with_name(HOSTS_FILE)} (README: 'A worked example')"
    )
