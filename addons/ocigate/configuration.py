"""The gateway's options, and what the addons share: the rules, ocigate's own HTTP client and its authentication."""

import logging
from collections.abc import Sequence
from pathlib import Path

from cachetools import LRUCache
from mitmproxy import ctx, exceptions
from mitmproxy.addonmanager import Loader

from .attempts import Asker
from .auth import Broker
from .context import ContextStore
from .credentials import (
    DEFAULT_HELPER_TIMEOUT,
    DEFAULT_STORE_PATH,
    ContainersAuth,
    CredentialChain,
    CredentialSource,
    DockerConfig,
    KubernetesSecrets,
    OcigateStore,
    default_containers_auth_paths,
)
from .health import DEFAULT_COOLDOWN, HostHealth
from .hostclient import HostClient
from .hoststoml import Host, Rule, RulesError, RuleSet, load_rules
from .hosttls import HostTLSError, forget_contexts, openssl_context, python_context
from .routes import RouteError, default_port, normalize_upstream

log = logging.getLogger("ocigate")

# Connections (client or server) ocigate keeps a note about, the least recently used forgotten first. A note goes
# when its connection ends or is dialled, so only those whose end never came (a client gone while mitmproxy waited to
# dial) pile up; a connection forgotten while alive loses only its host's own TLS settings in hosts.toml.
MAX_CONNECTIONS = 10_000


class Shared:
    """What the addons share: the loaded rules, ocigate's own HTTP client and its authentication, and which host
    each re-pointed client connection talks to."""

    def __init__(self) -> None:
        self.rules: RuleSet | None = None
        self.hostclient = HostClient()
        self.broker = Broker(self.hostclient)
        self.health = HostHealth()
        self.asker = Asker(self.broker, self.health)
        self.contexts = ContextStore()
        # The hosts.toml entry behind each connection a client's flows were re-pointed to, by client and address:
        # one host may stand in several rules with different TLS settings, and a client connection (one CONNECT
        # tunnel) belongs to one upstream.
        self.repointed: LRUCache[str, dict[tuple[str, int], Host]] = LRUCache(MAX_CONNECTIONS)

    def host_for_connection(self, client_id: str, address: tuple[str, int]) -> Host | None:
        return self.repointed.get(client_id, {}).get(address) or self.hostclient.hosts_by_address.get(address)

    def upstream_rule(self, host: str, port: int, scheme: str) -> tuple[str, Rule] | None:
        """The upstream a request to scheme://host:port is for, and its rule; None when no rule names it."""
        try:
            upstream = normalize_upstream(host, None if port == default_port(scheme) else port)
        except RouteError:
            return None
        rule = self.rules.lookup(upstream) if self.rules else None
        return (upstream, rule) if rule else None


CREDENTIAL_SOURCES = ("ocigate", "docker", "containers", "kubernetes")
_CREDENTIAL_OPTIONS = frozenset(
    {
        "ocigate_credential_sources",
        "ocigate_credentials",
        "ocigate_docker_config",
        "ocigate_containers_auth",
        "ocigate_kubernetes_secrets",
        "ocigate_credential_helper_timeout",
    }
)


class Credentials:
    """Where ocigate finds the credentials it authenticates to hosts with."""

    def __init__(self, shared: Shared) -> None:
        self.shared = shared

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "ocigate_credential_sources",
            Sequence[str],
            list(CREDENTIAL_SOURCES),
            "Credential sources in the order they are asked; the first that has a credential for a host, upstream "
            "and repository wins. ocigate: ocigate_credentials (ocigate login); docker: config.json with its "
            "credential helpers; containers: auth.json; kubernetes: ocigate_kubernetes_secrets. Empty: ocigate "
            "authenticates anonymously only.",
        )
        loader.add_option(
            "ocigate_credentials",
            str,
            DEFAULT_STORE_PATH,
            "ocigate's own credentials file, per host, upstream and repository prefix (written by ocigate login).",
        )
        loader.add_option(
            "ocigate_docker_config",
            str,
            "",
            "Directory of docker's config.json. Empty: $DOCKER_CONFIG, else ~/.docker.",
        )
        loader.add_option(
            "ocigate_containers_auth",
            str,
            "",
            "containers' auth.json (podman, skopeo). Empty: $REGISTRY_AUTH_FILE, "
            "$XDG_RUNTIME_DIR/containers/auth.json, then ~/.config/containers/auth.json.",
        )
        loader.add_option(
            "ocigate_kubernetes_secrets",
            str,
            "",
            "Directory of mounted kubernetes.io/dockerconfigjson secrets (DIR/.dockerconfigjson, "
            "DIR/*/.dockerconfigjson). Empty: none.",
        )
        loader.add_option(
            "ocigate_credential_helper_timeout",
            int,
            int(DEFAULT_HELPER_TIMEOUT),
            "Seconds a docker-credential-<name> helper may take before it is killed.",
        )

    def configure(self, updated: set[str]) -> None:
        if not updated & _CREDENTIAL_OPTIONS:
            return
        sources = list(ctx.options.ocigate_credential_sources)
        unknown = [name for name in sources if name not in CREDENTIAL_SOURCES]
        if unknown:
            raise exceptions.OptionsError(
                f"ocigate_credential_sources: unknown source {unknown[0]!r} (expected {', '.join(CREDENTIAL_SOURCES)})"
            )
        timeout = ctx.options.ocigate_credential_helper_timeout
        if timeout <= 0:
            raise exceptions.OptionsError("ocigate_credential_helper_timeout must be a positive number of seconds")
        chain: list[CredentialSource] = []
        for name in dict.fromkeys(sources):
            chain += self._sources(name, timeout)
        self.shared.broker.credentials = CredentialChain(chain)
        self.shared.broker.forget()

    @staticmethod
    def _sources(name: str, timeout: float) -> list[CredentialSource]:
        options = ctx.options
        if name == "ocigate":
            return [OcigateStore(Path(options.ocigate_credentials).expanduser())]
        if name == "docker":
            directory = Path(options.ocigate_docker_config).expanduser() if options.ocigate_docker_config else None
            return [DockerConfig(directory, helper_timeout=timeout)]
        if name == "containers":
            paths = [Path(options.ocigate_containers_auth).expanduser()] if options.ocigate_containers_auth else None
            return [ContainersAuth(path, helper_timeout=timeout) for path in paths or default_containers_auth_paths()]
        if options.ocigate_kubernetes_secrets:
            return [KubernetesSecrets(Path(options.ocigate_kubernetes_secrets).expanduser())]
        return []


class Configuration:
    """The gateway's options: declared, checked, and the rules, host client and health they set."""

    def __init__(self, shared: Shared) -> None:
        self.shared = shared

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "ocigate_rules",
            str,
            "",
            "Directory of containerd hosts.toml rules (the certs.d layout: <registry>/hosts.toml, _default/).",
        )
        loader.add_option(
            "ocigate_named_ref_headers",
            Sequence[str],
            ["OCI-Named-Ref"],
            "Names of the request header carrying <registry>/<repository>:<tag> (or @<digest>) to hosts, e.g. "
            "OCI-Ref. Empty: send none.",
        )
        loader.add_option("ocigate_connect_timeout", int, 30, "Seconds to connect to a host that has no dial_timeout.")
        loader.add_option(
            "ocigate_read_timeout",
            int,
            60,
            "Seconds a host has for its whole answer, headers and body, from the request being sent, to a request "
            "ocigate reads itself (manifests, tags, pings, probes, token requests); for a streamed blob, the longest "
            "silence before its answer or between two pieces.",
        )
        loader.add_option(
            "ocigate_cooldown",
            int,
            int(DEFAULT_COOLDOWN),
            "Seconds a host that could not be reached (refused, timed out) is skipped before it is asked again. "
            "0: ask every time.",
        )
        loader.add_option(
            "ocigate_intercept_unruled",
            bool,
            False,
            "Decrypt connections to hosts no rule names too (for captures); by default they pass through as-is.",
        )
        # httpx logs every request it sends, with the address dialled: ocigate logs one line per request itself.
        logging.getLogger("httpx").setLevel(logging.WARNING)

    def configure(self, updated: set[str]) -> None:
        if "connection_strategy" in updated and ctx.options.connection_strategy != "lazy":
            # An eager proxy dials the CONNECT target before any hook can re-point it, and upstream names may not
            # resolve at all (an air-gap box, a mirror-only registry).
            log.info("ocigate: setting connection_strategy=lazy")
            ctx.options.update(connection_strategy="lazy")
        for name in ("ocigate_connect_timeout", "ocigate_read_timeout"):
            if getattr(ctx.options, name) <= 0:
                raise exceptions.OptionsError(f"{name} must be a positive number of seconds")
        for name in ctx.options.ocigate_named_ref_headers:
            if not name or not all(c.isalnum() or c in "-_" for c in name):
                raise exceptions.OptionsError(f"ocigate_named_ref_headers: {name!r} is not a header name")
        if ctx.options.ocigate_cooldown < 0:
            raise exceptions.OptionsError("ocigate_cooldown must be 0 or a positive number of seconds")
        self.shared.health.cooldown = ctx.options.ocigate_cooldown
        hostclient = self.shared.hostclient
        hostclient.connect_timeout = ctx.options.ocigate_connect_timeout
        hostclient.read_timeout = ctx.options.ocigate_read_timeout
        trust = {"ocigate_rules", "ssl_insecure", "ssl_verify_upstream_trusted_ca"}
        if updated & trust:
            roots = ctx.options.ssl_verify_upstream_trusted_ca
            hostclient.roots = Path(roots).expanduser() if roots else None
            hostclient.insecure = ctx.options.ssl_insecure
            forget_contexts()
            hostclient.forget_clients()
            self.shared.rules = self._load_rules(ctx.options.ocigate_rules)
            hostclient.hosts_by_address = _hosts_by_address(self.shared.rules)
            self.shared.broker.forget()

    def _load_rules(self, directory: str) -> RuleSet | None:
        if not directory:
            return None
        try:
            rules = load_rules(Path(directory).expanduser())
        except RulesError as e:
            raise exceptions.OptionsError(f"ocigate_rules: {e}") from None
        # A `ca` or `client` file that cannot be loaded is a broken rule too: found now, not on the first pull.
        for rule in rules.rules():
            for host in rule.hosts:
                host_tls = self.shared.hostclient.host_tls(host)
                try:
                    python_context(host_tls)
                    openssl_context(host_tls)
                except HostTLSError as e:
                    raise exceptions.OptionsError(f"ocigate_rules: {rule.source}: {host.url}: {e}") from None
        return rules

    def running(self) -> None:
        if self.shared.rules is None:
            log.warning("ocigate: no ocigate_rules directory: every request passes through untouched")
        host = ctx.options.listen_host or "127.0.0.1"
        proxy = f"http://{host}:{ctx.options.listen_port or 8080}"
        ca = Path(ctx.options.confdir).expanduser() / "mitmproxy-ca-cert.pem"
        log.info(
            "ocigate: gateway on %s with rules from %s\n"
            "  point clients at it: export HTTPS_PROXY=%s\n"
            "  and make them trust its CA: %s (README: 'Point your client at ocigate')",
            proxy,
            ctx.options.ocigate_rules or "(none)",
            proxy,
            ca,
        )


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
