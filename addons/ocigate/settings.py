"""Every option ocigate reads: declared in one place, and parsed once into one frozen, typed value.

A value that cannot be used is refused when it is set (an OptionsError whose message starts with the option's
name), never found out on the first request. Parsing reads no file: what the files say is found out when the
services are built from the settings (see services).
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mitmproxy import exceptions
from mitmproxy.addonmanager import Loader
from mitmproxy.optmanager import OptManager

from .credentials import DEFAULT_HELPER_TIMEOUT, DEFAULT_STORE_PATH
from .destinations import Destinations
from .health import DEFAULT_COOLDOWN
from .reuseport import AFFINITIES, Affinity

CREDENTIAL_SOURCES = ("ocigate", "docker", "containers", "kubernetes")

# ocigate_access_log's value for standard error.
STDERR: Literal["-"] = "-"
# Where a metrics address given as a bare port listens: only what is written out may listen beyond this machine.
METRICS_DEFAULT_HOST = "127.0.0.1"

# mitmproxy's own options that ocigate honours too: the roots upstream certificates are checked against, and
# whether they are checked at all.
MITMPROXY_OPTIONS = frozenset({"ssl_insecure", "ssl_verify_upstream_trusted_ca"})


def declare(loader: Loader) -> None:
    """Declares every ocigate_* option (the README's table documents them as they are here)."""
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
    loader.add_option(
        "ocigate_map_hosts",
        Sequence[str],
        [],
        "Host map, NAME[:PORT]=ADDRESS[:PORT]: connections to NAME go to ADDRESS instead of resolving it "
        "(an air-gap box without DNS, or test registries under made-up names).",
    )
    loader.add_option(
        "ocigate_allow_destinations",
        Sequence[str],
        [],
        "Networks (CIDR) every connection must go to; anything else is refused. Empty: no limit.",
    )
    loader.add_option(
        "ocigate_dns",
        bool,
        True,
        "Resolve names that ocigate_map_hosts does not map. Off: such names are refused, never resolved.",
    )
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
    loader.add_option(
        "ocigate_access_log",
        str,
        "",
        "File the access log is appended to, one JSON object per request the gateway handled; - for standard "
        "error. Empty: no access log.",
    )
    loader.add_option(
        "ocigate_worker_affinity",
        str,
        "connection",
        "With ocigate --workers, how the kernel gives new connections to the workers: connection (each to any worker: "
        "one client uses every core) or client (every connection of one client address to the same worker, where the "
        "pull context of its manifests is). Read when the workers start listening.",
        choices=AFFINITIES,
    )
    loader.add_option(
        "ocigate_metrics",
        str,
        "",
        "Address the Prometheus metrics are served on (/metrics), HOST:PORT, or PORT alone for 127.0.0.1:PORT "
        "(0: any free port). Empty: no metrics.",
    )
    loader.add_option(
        "ocigate_drain",
        int,
        0,
        "Seconds the gateway keeps serving after its first SIGTERM, with /readyz answering 503, so that a load "
        "balancer stops sending it clients before it stops; a second SIGTERM, or SIGINT, stops it at once. "
        "0: stop at once.",
    )


def is_settings_option(name: str) -> bool:
    """Whether the option named goes into Settings."""
    return name.startswith("ocigate_") or name in MITMPROXY_OPTIONS


@dataclass(frozen=True)
class MetricsAddress:
    host: str  # a name or an address as written (an IPv6 address without its brackets)
    port: int  # 0: any free port

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Settings:
    """The options, checked and parsed: paths with `~` expanded, and None where an option is empty."""

    rules: Path | None  # ocigate_rules
    named_ref_headers: tuple[str, ...]
    connect_timeout: int
    read_timeout: int
    cooldown: int
    intercept_unruled: bool
    destinations: Destinations  # ocigate_map_hosts, ocigate_allow_destinations and ocigate_dns
    credential_sources: tuple[str, ...]  # each named once, in the order given
    credentials: Path
    docker_config: Path | None
    containers_auth: Path | None
    kubernetes_secrets: Path | None
    credential_helper_timeout: int
    upstream_trusted_ca: Path | None  # mitmproxy's ssl_verify_upstream_trusted_ca
    ssl_insecure: bool
    access_log: Path | Literal["-"] | None = None  # ocigate_access_log: a file, STDERR, or None for none
    metrics: MetricsAddress | None = None  # ocigate_metrics
    worker_affinity: Affinity = "connection"  # ocigate_worker_affinity
    drain: int = 0  # ocigate_drain: seconds served after the first SIGTERM

    @classmethod
    def parse(cls, options: OptManager) -> "Settings":
        """The settings the options hold (ctx.options, once declare() declared them there); an OptionsError naming
        the first option that cannot be used."""
        try:
            destinations = Destinations.from_options(
                options.ocigate_map_hosts, options.ocigate_allow_destinations, options.ocigate_dns
            )
        except ValueError as e:
            # Its message starts with the option's name.
            raise exceptions.OptionsError(str(e)) from None
        # In the order the options were checked before they were parsed in one place: the first bad one is named.
        credential_sources = _credential_sources(options.ocigate_credential_sources)
        credential_helper_timeout = _seconds(
            "ocigate_credential_helper_timeout", options.ocigate_credential_helper_timeout
        )
        return cls(
            rules=_path_or_none(options.ocigate_rules),
            connect_timeout=_seconds("ocigate_connect_timeout", options.ocigate_connect_timeout),
            read_timeout=_seconds("ocigate_read_timeout", options.ocigate_read_timeout),
            named_ref_headers=_header_names(options.ocigate_named_ref_headers),
            cooldown=_cooldown(options.ocigate_cooldown),
            intercept_unruled=options.ocigate_intercept_unruled,
            destinations=destinations,
            credential_sources=credential_sources,
            credentials=Path(options.ocigate_credentials).expanduser(),
            docker_config=_path_or_none(options.ocigate_docker_config),
            containers_auth=_path_or_none(options.ocigate_containers_auth),
            kubernetes_secrets=_path_or_none(options.ocigate_kubernetes_secrets),
            credential_helper_timeout=credential_helper_timeout,
            upstream_trusted_ca=_path_or_none(options.ssl_verify_upstream_trusted_ca),
            ssl_insecure=options.ssl_insecure,
            access_log=_access_log(options.ocigate_access_log),
            metrics=_metrics_address(options.ocigate_metrics),
            worker_affinity=_affinity(options.ocigate_worker_affinity),
            drain=_drain(options.ocigate_drain),
        )


def _path_or_none(value: str | None) -> Path | None:
    return Path(value).expanduser() if value else None


def _seconds(name: str, value: int) -> int:
    if value <= 0:
        raise exceptions.OptionsError(f"{name} must be a positive number of seconds")
    return value


def _cooldown(value: int) -> int:
    if value < 0:
        raise exceptions.OptionsError("ocigate_cooldown must be 0 or a positive number of seconds")
    return value


def _drain(value: int) -> int:
    if value < 0:
        raise exceptions.OptionsError("ocigate_drain must be 0 or a positive number of seconds")
    return value


def _header_names(names: Sequence[str]) -> tuple[str, ...]:
    for name in names:
        # Sent on every request ocigate routes: a space, a colon or a line break would break its header lines.
        if not name or not all(c.isalnum() or c in "-_" for c in name):
            raise exceptions.OptionsError(f"ocigate_named_ref_headers: {name!r} is not a header name")
    return tuple(names)


def _credential_sources(names: Sequence[str]) -> tuple[str, ...]:
    # `--set ocigate_credential_sources=` (an empty value) names none, as the option's help says empty does.
    names = [name for name in names if name]
    unknown = [name for name in names if name not in CREDENTIAL_SOURCES]
    if unknown:
        raise exceptions.OptionsError(
            f"ocigate_credential_sources: unknown source {unknown[0]!r} (expected {', '.join(CREDENTIAL_SOURCES)})"
        )
    return tuple(dict.fromkeys(names))


def _affinity(value: str) -> Affinity:
    if value == "client":
        return "client"
    if value != "connection":
        raise exceptions.OptionsError(f"ocigate_worker_affinity: {value!r} is not one of {', '.join(AFFINITIES)}")
    return "connection"


def _access_log(value: str) -> Path | Literal["-"] | None:
    if value == STDERR:
        return STDERR
    return _path_or_none(value)


def _metrics_address(value: str) -> MetricsAddress | None:
    """HOST:PORT ([ADDRESS]:PORT for IPv6), or PORT alone on loopback; None when empty."""
    if not value:
        return None
    if value.isdigit():
        host, port = METRICS_DEFAULT_HOST, value
    else:
        host, colon, port = value.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host:
            host = ""  # an IPv6 address without brackets: where it ends and the port starts is a guess
        if not colon or not host or not all(c.isalnum() or c in ".-_:" for c in host):
            raise exceptions.OptionsError(
                f"ocigate_metrics: {value!r} is not HOST:PORT or PORT (a host other than loopback is written out, "
                "e.g. 0.0.0.0:9090)"
            )
    if not port.isdigit() or int(port) > 65535:
        raise exceptions.OptionsError(f"ocigate_metrics: {value!r} has no port number (0-65535)")
    return MetricsAddress(host, int(port))
