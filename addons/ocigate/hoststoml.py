"""Routing rules read from containerd's hosts.toml files (the certs.d layout).

A rules root holds one directory per registry (``docker.io``, ``registry.example_5000_``, ``_default``),
each with a ``hosts.toml`` naming the hosts to try for that registry, in order. ocigate gives every file the
meaning containerd gives it. References such as "hosts.go:101" point into containerd's
core/remotes/docker/config/hosts.go (containerd commit 301026e), whose behaviour this module follows.

Where containerd silently ignores or misreads part of a file (unknown keys, a host it never lists, top-level
settings it overwrites), ocigate refuses the file instead, so a rule never routes other than as it reads.
"""

import json
import os
import posixpath
import re
import stat
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import SplitResult, urlsplit

from .files import NotRegularFileError, read_regular_file
from .routes import DEFAULT_PORTS, DOCKER_HUB, DOCKER_HUB_SERVER, RouteError, ip_address, validate_repository

CAPABILITIES = frozenset({"pull", "resolve", "push", "referrers"})

HOSTS_FILE = "hosts.toml"
DEFAULT_DIRECTORY = "_default"

_CAPABILITY_ORDER = ("pull", "resolve", "push", "referrers")
_HOST_KEYS = frozenset({"capabilities", "ca", "client", "skip_verify", "header", "override_path", "dial_timeout"})
_ROOT_KEYS = _HOST_KEYS | {"server", "host", "authentication", "offline"}
# Keys of a [host."..."] table only: containers-registries.conf's pull-from-mirror, which concerns mirrors.
_MIRROR_KEYS = _HOST_KEYS | {"pull_from_mirror", "repository_prefix"}
PULL_FROM_MIRROR = ("all", "digest-only", "tag-only")
# ocigate's own top-level key: who authenticates to the registry's own host. containerd ignores it.
AUTHENTICATION_MODES = ("gateway", "client")
# containerd overwrites these for the upstream's own entry when `server` is absent (hosts.go:134-135).
_KEYS_NEEDING_SERVER = ("capabilities", "override_path")


def netloc(scheme: str, host: str, port: int) -> str:
    """host[:port] as a URL writes it: an IPv6 address in brackets, the scheme's default port left out."""
    shown = f"[{host}]" if ":" in host else host
    return shown if port == DEFAULT_PORTS[scheme] else f"{shown}:{port}"


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_URL_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_HOST_NAME = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*\.?")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# RFC 9110 5.5 field-value: visible characters (and obs-text), with spaces or tabs between them only.
_FIELD_VALUE = re.compile(r"(?:[\x21-\x7e\x80-\xff](?:[ \t\x21-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?")
_UPSTREAM = re.compile(r"(?:\[(?P<bracketed>[^\]]+)\]|(?P<plain>[^:\[\]/\s]+))(?::(?P<port>[0-9]{1,5}))?")
_PORT_DIRECTORY = re.compile(r"(.+)_([0-9]{1,5})_")
_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_DURATION_PART = re.compile(r"([0-9]+\.?[0-9]*|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h)")
_DURATION = re.compile(r"\+?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:ns|us|µs|μs|ms|s|m|h))+")
# Go's time.Duration is an int64 of nanoseconds; time.ParseDuration rejects anything longer.
_LONGEST_DURATION_SECONDS = (2**63 - 1) / 1e9


class RulesError(Exception):
    """A hosts.toml that cannot be used. str() names the file, the key and what was expected, e.g.
    "rules/docker.io/hosts.toml: host.\"https://m.example\".capabilities: unknown capability 'pul'
    (expected pull, resolve, push, referrers)"."""

    def __init__(self, path: Path, key: str | None, problem: str) -> None:
        self.path = path
        self.key = key
        self.problem = problem
        super().__init__(f"{path}: {key}: {problem}" if key else f"{path}: {problem}")


@dataclass(frozen=True)
class TLSSettings:
    """What hosts.toml says about TLS to one host: the CAs it adds to the trusted roots (`ca`), the certificates it
    presents with their keys (`client`, a key of None: in the certificate's file), and whether it is not verified."""

    ca: tuple[Path, ...] = ()
    client: tuple[tuple[Path, Path | None], ...] = ()
    skip_verify: bool = False


@dataclass(frozen=True)
class Host:
    scheme: str
    host: str
    port: int
    path: str
    capabilities: frozenset[str]
    ca: tuple[Path, ...] = ()
    client: tuple[tuple[Path, Path | None], ...] = ()
    skip_verify: bool = False
    headers: tuple[tuple[str, str], ...] = ()
    override_path: bool = False
    dial_timeout: float | None = None
    is_server: bool = False
    # containers-registries.conf's pull-from-mirror: which pulls this mirror serves, those of an image by tag, by
    # digest, or both.
    pull_from_mirror: str = "all"
    # ocigate's own: the mirror serves the upstream's repositories under this path (a Harbor proxy-cache project):
    # `library/alpine` is `<prefix>/library/alpine` there.
    repository_prefix: str | None = None

    @property
    def netloc(self) -> str:
        return netloc(self.scheme, self.host, self.port)

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.netloc}{self.path}"

    @property
    def tls(self) -> TLSSettings:
        return TLSSettings(self.ca, self.client, self.skip_verify)


@dataclass(frozen=True)
class Rule:
    upstream: str
    source: Path | None
    hosts: tuple[Host, ...]
    # `authentication = "client"`: the client's own ping, challenge and credentials for the registry's own host;
    # by default ("gateway") ocigate authenticates to every host, the registry's own included.
    client_authenticates: bool = False
    # `offline = true`: nothing of this registry's goes anywhere but to its mirrors.
    offline: bool = False


@dataclass(frozen=True)
class _Settings:
    """What one TOML table (the top level or a [host."..."] table) says about the host it describes."""

    capabilities: frozenset[str] = CAPABILITIES
    ca: tuple[Path, ...] = ()
    client: tuple[tuple[Path, Path | None], ...] = ()
    skip_verify: bool = False
    headers: tuple[tuple[str, str], ...] = ()
    override_path: bool = False
    dial_timeout: float | None = None

    def host(self, scheme: str, host: str, port: int, path: str, *, is_server: bool) -> Host:
        return Host(
            scheme=scheme,
            host=host,
            port=port,
            path=path,
            capabilities=self.capabilities,
            ca=self.ca,
            client=self.client,
            skip_verify=self.skip_verify,
            headers=self.headers,
            override_path=self.override_path,
            dial_timeout=self.dial_timeout,
            is_server=is_server,
        )


@dataclass(frozen=True)
class _RegistryDirectory:
    """One parsed registry directory. The upstream's own entry is only known per lookup, because `_default`
    and a port-less directory serve many upstreams."""

    source: Path | None
    mirrors: tuple[Host, ...]
    server: Host | None
    top_level: _Settings
    authentication: str | None = None  # as written; None when absent
    # ocigate's `offline = true`: only the mirrors are ever contacted, never the server or the registry itself.
    offline: bool = False

    def rule(self, upstream: str) -> Rule:
        return Rule(upstream, self.source, self.hosts_for(upstream), self.authentication == "client", self.offline)

    def hosts_for(self, upstream: str) -> tuple[Host, ...]:
        if self.offline:
            return self.mirrors
        return (*self.mirrors, self.server or _upstream_host(upstream, self.top_level))

    @property
    def changes_nothing(self) -> bool:
        """No mirror, no server, no TLS files or headers, nothing said about authentication: containerd would go to
        the registry itself, just as a registry without a directory does, so for ocigate it is no rule (and its
        traffic passes through). This is how a directory holding only an example file (hosts.toml.example) stays
        inactive."""
        nothing_routed = not self.mirrors and self.server is None and self.top_level == _Settings()
        return nothing_routed and self.authentication is None and not self.offline


class RuleSet:
    def __init__(self, root: Path, directories: Mapping[str, _RegistryDirectory]) -> None:
        self.root = root
        self._directories = dict(directories)

    def __repr__(self) -> str:
        return f"RuleSet(root={self.root!r}, directories={sorted(self._directories)!r})"

    def rules(self) -> Iterator[Rule]:
        """One rule per registry directory, for the registry its name gives ("host_port_" is "host:port").
        `_default` serves every registry; its rule is given for the placeholder upstream "_default"."""
        for name, directory in self._directories.items():
            if directory.changes_nothing:
                continue
            yield directory.rule(_directory_upstream(name))

    def lookup(self, upstream: str) -> Rule | None:
        """The rule for a normalized upstream ("docker.io", "host", "host:port"), or None when no directory
        matches or the first that matches changes nothing. Raises ValueError for a string that is not a registry
        host[:port]."""
        for name in _directory_candidates(upstream):
            directory = self._directories.get(name)
            if directory is not None:
                if directory.changes_nothing:
                    return None
                return directory.rule(upstream)
        return None

    def directories(self) -> Mapping[str, "RegistryDirectory"]:
        """Every registry directory read, by its name in the tree (those that change nothing included): what a tree
        read again one directory at a time (rulewatch.py) starts from."""
        return MappingProxyType(self._directories)


# One registry directory as read, for code that reads a tree again one directory at a time (rulewatch.py).
RegistryDirectory = _RegistryDirectory


def load_registry_directory(entry: Path) -> RegistryDirectory | None:
    """One entry of a rules root read as load_rules reads it: a registry directory, or None for a file beside the
    registries (README.md), which nothing reads. RulesError for whatever load_rules would refuse in it."""
    if entry.name == HOSTS_FILE:
        raise RulesError(
            entry, None, f"never read here: a hosts.toml belongs in a registry directory, not in {entry.parent}"
        )
    if not _is_directory(entry):
        return None
    try:
        _directory_upstream(entry.name)
    except ValueError:
        raise RulesError(
            entry, None, "directory name is not a registry (host, host:port, host_port_ or _default)"
        ) from None
    return _load_directory(entry)


def load_rules(root: Path) -> RuleSet:
    """Read and validate every <root>/<registry>/hosts.toml, so that one broken file refuses start-up."""
    root = Path(root).absolute()
    if not _is_directory(root):
        problem = "is not a directory" if root.exists() else "does not exist"
        raise RulesError(root, None, f"rules directory {problem}")
    try:
        entries = sorted(root.iterdir())
    except OSError as error:
        raise RulesError(root, None, f"cannot list the rules directory: {error.strerror or error}") from None
    directories: dict[str, _RegistryDirectory] = {}
    for entry in entries:
        if is_hidden(entry.name):
            continue
        if entry.name == HOSTS_FILE:
            raise RulesError(
                entry,
                None,
                f"never read here: a hosts.toml belongs in a registry directory, "
                f"{root}/<registry>/{HOSTS_FILE} or {root}/{DEFAULT_DIRECTORY}/{HOSTS_FILE}",
            )
        if _is_directory(entry):
            try:
                _directory_upstream(entry.name)
            except ValueError:
                raise RulesError(
                    entry, None, "directory name is not a registry (host, host:port, host_port_ or _default)"
                ) from None
            directories[entry.name] = _load_directory(entry)
    return RuleSet(root, directories)


def is_hidden(name: str) -> bool:
    """A rules-tree entry that is no registry's and is passed over: no registry name starts with a dot, and such
    entries are an editor's or a mounter's (a Kubernetes ConfigMap volume's `..data` and `..<timestamp>`)."""
    return name.startswith(".")


def _is_directory(entry: Path) -> bool:
    """Whether the rules directory or an entry of it is a directory, symbolic links followed. One that cannot be
    resolved (a link loop, a denied search) is an error: containerd fails the pull for a host directory it cannot
    stat (HostDirFromRoot, hosts.go) instead of going to the registry as if it had no rule. A dangling link is
    absent for both."""
    try:
        return stat.S_ISDIR(os.stat(entry).st_mode)
    except FileNotFoundError:
        return False
    except OSError as error:
        raise RulesError(entry, None, f"cannot be resolved: {error.strerror or error}") from None


def _directory_candidates(upstream: str) -> list[str]:
    _, port = _split_upstream(upstream)
    # containerd's hostPaths (config_unix.go) and hostDirectory (hosts.go:307-313): "host:port" is first
    # looked up as "host_port_" (the last colon replaced), then as written, then _default.
    candidates: list[str] = []
    colon = upstream.rfind(":")
    if colon > 0:
        candidates.append(f"{upstream[:colon]}_{upstream[colon + 1 :]}_")
    candidates.append(upstream)
    if port is not None:
        # ocigate's addition: a port-less directory also serves that host on any port.
        candidates.append(upstream[:colon])
    candidates.append(DEFAULT_DIRECTORY)
    return candidates


def _directory_upstream(name: str) -> str:
    port_form = _PORT_DIRECTORY.fullmatch(name)
    upstream = f"{port_form[1]}:{port_form[2]}" if port_form else name
    _split_upstream(upstream)
    return upstream


def _split_upstream(upstream: str) -> tuple[str, int | None]:
    match = _UPSTREAM.fullmatch(upstream)
    if match is not None:
        port = int(match["port"]) if match["port"] else None
        if port is None or 0 < port < 65536:
            return match["bracketed"] or match["plain"], port
    if ":" in upstream and ip_address(upstream) is not None:
        return upstream, None
    raise ValueError(f"not a registry host[:port]: {upstream!r}")


def split_url(url: str) -> tuple[SplitResult, str, int | None]:
    """`url` split as urlsplit does, with the host it names (lowercased, without brackets) and the port it writes
    (None: none): ValueError saying what keeps ocigate from dialling it (not a URL, no host name, a host name or
    IPv6 address that cannot be, port 0). Its scheme, and what else it may hold (userinfo, a query), are the
    caller's to judge: a hosts.toml URL and a token realm differ there."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise ValueError(f"not a valid URL: {error}") from None
    host = parts.hostname or ""
    if not host:
        raise ValueError("no host name")
    problem = host_problem(host, bracketed=parts.netloc.rpartition("@")[2].startswith("["))
    if problem:
        raise ValueError(problem)
    if port == 0:
        raise ValueError("invalid port 0 (expected 1-65535)")
    return parts, host, port


def host_problem(host: str, *, bracketed: bool) -> str | None:
    """What is wrong with a URL's host name (urlsplit's hostname: lowercased, without brackets) for dialling it, or
    None: in brackets an IPv6 address, else a DNS name or an IPv4 address."""
    if bracketed:
        return None if ":" in host and ip_address(host) is not None else f"invalid IPv6 address {host!r}"
    return None if _HOST_NAME.fullmatch(host) else f"invalid host name {host!r}"


def _is_localhost(host: str) -> bool:
    # docker.IsLocalhost (core/remotes/docker/resolver.go): "localhost" or a loopback IP.
    if host == "localhost":
        return True
    address = ip_address(host)
    return address is not None and address.is_loopback


def _upstream_host(upstream: str, top_level: _Settings) -> Host:
    """The entry containerd adds for the upstream registry itself when `server` is absent (hosts.go:101-136):
    the top-level TLS, header and timeout settings apply to it, but the path is /v2 and every capability is
    granted whatever the file says."""
    settings = replace(top_level, capabilities=CAPABILITIES, override_path=False)
    if upstream == DOCKER_HUB:
        return settings.host("https", DOCKER_HUB_SERVER, DEFAULT_PORTS["https"], "/v2", is_server=True)
    host, port = _split_upstream(upstream)
    scheme = "https"
    if _is_localhost(host):
        # containerd talks plain HTTP to a local registry on a port other than https's and skips TLS verification
        # unless the port is http's (hosts.go:105-122).
        if port not in (None, DEFAULT_PORTS["https"]):
            scheme = "http"
        if port != DEFAULT_PORTS["http"]:
            settings = replace(settings, skip_verify=True)
    return settings.host(scheme, host.lower(), port or DEFAULT_PORTS[scheme], "/v2", is_server=True)


def _load_directory(directory: Path) -> _RegistryDirectory:
    hosts_file = directory / HOSTS_FILE
    try:
        content = read_regular_file(hosts_file)
    except FileNotFoundError:
        content = b""
    except NotRegularFileError as error:
        # Read as it is, a FIFO would stop the gateway until someone writes to it.
        raise RulesError(hosts_file, None, str(error)) from None
    except OSError as error:
        # containerd too fails on a hosts.toml it cannot read (loadHostDir, hosts.go), other than a missing one.
        raise RulesError(hosts_file, None, f"cannot read: {error.strerror or error}") from None
    if not content:
        # containerd reads an empty hosts.toml like a missing one (hosts.go:321-326).
        return _RegistryDirectory(None, (), None, _docker_certificate_files(directory))
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RulesError(hosts_file, None, f"not UTF-8 text (bad byte at offset {error.start})") from None
    return _parse_hosts_file(text, hosts_file)


def _docker_certificate_files(directory: Path) -> _Settings:
    """containerd's loadCertFiles (hosts.go:622-650), Docker's certs.d layout: *.crt files are CAs, each
    *.cert a client certificate whose key is in the matching *.key, or else in the .cert itself."""
    try:
        files = sorted(entry for entry in directory.iterdir() if not entry.is_dir())
    except OSError as error:
        raise RulesError(directory, None, f"cannot list: {error.strerror or error}") from None
    ca = tuple(file for file in files if file.name.endswith(".crt"))
    client: list[tuple[Path, Path | None]] = []
    for file in files:
        if file.name.endswith(".cert"):
            key = file.with_name(file.name.removesuffix(".cert") + ".key")
            client.append((file, key if key.exists() else None))
    return _Settings(ca=ca, client=tuple(client))


def _parse_hosts_file(text: str, path: Path) -> _RegistryDirectory:
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise RulesError(path, None, f"invalid TOML: {error}") from None
    except RecursionError:
        raise RulesError(path, None, "invalid TOML: arrays or tables nested too deeply") from None
    return _HostsFileParser(path).parse(text, document)


class _HostsFileParser:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.directory = path.parent.absolute()

    def error(self, key: tuple[str, ...], problem: str) -> RulesError:
        return RulesError(self.path, _format_key(key), problem)

    def parse(self, text: str, document: dict[str, Any]) -> _RegistryDirectory:
        self.check_keys(document, _ROOT_KEYS, ())
        mirrors = self.mirrors(text, document.get("host", {}))
        top_level = self.settings(document, ())
        authentication = self.authentication(document.get("authentication"))
        offline = self.boolean(document.get("offline", False), ("offline",))
        if offline and not mirrors:
            raise self.error(("offline",), 'true without any [host."..."] mirror: no host could ever be contacted')
        server = document.get("server")
        if server is None:
            for key in _KEYS_NEEDING_SERVER:
                if key in document:
                    raise self.error(
                        (key,),
                        "has no effect without `server`: containerd then uses the upstream registry itself "
                        "with path /v2 and every capability; set `server` or move it into a host table",
                    )
            return _RegistryDirectory(self.path, mirrors, None, top_level, authentication, offline)
        if server == "":
            raise self.error(
                ("server",),
                "empty: containerd then uses the upstream registry itself, as if `server` were absent; "
                "remove the key or name a URL",
            )
        server_host = self.host(server, ("server",), top_level, True)
        return _RegistryDirectory(self.path, mirrors, server_host, top_level, authentication, offline)

    def repository_prefix(self, value: Any, key: tuple[str, ...]) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.error(key, f"expected a string, got {_kind(value)}")
        prefix = value.strip("/")
        try:
            validate_repository(prefix)
        except RouteError as e:
            raise self.error(key, f"not a repository path: {e}") from None
        return prefix

    def authentication(self, value: Any) -> str | None:
        if value is not None and value not in AUTHENTICATION_MODES:
            expected = " or ".join(f'"{mode}"' for mode in AUTHENTICATION_MODES)
            raise self.error(("authentication",), f"expected {expected}, got {value!r}")
        return value

    def mirrors(self, text: str, tables: Any) -> tuple[Host, ...]:
        if not isinstance(tables, dict):
            raise self.error(("host",), f'expected tables like [host."https://mirror.example"], got {_kind(tables)}')
        order = _host_table_order(text)
        hosts: dict[str, Host] = {}
        for name, table in tables.items():
            key = ("host", name)
            if not isinstance(table, dict):
                raise self.error(key, f'expected a [host."{name}"] table, got {_kind(table)}')
            if name not in order:
                # getSortedHosts (hosts.go:551-585) lists hosts by their table headers only.
                raise self.error(
                    key,
                    f'defined without a [host."{name}"] table header; containerd never uses such a host, '
                    f'write it as a [host."{name}"] table',
                )
            self.check_keys(table, _MIRROR_KEYS, key)
            host = self.host(name, key, self.settings(table, key), False)
            pull_from_mirror = table.get("pull_from_mirror", "all")
            if pull_from_mirror not in PULL_FROM_MIRROR:
                expected = ", ".join(f'"{value}"' for value in PULL_FROM_MIRROR)
                raise self.error((*key, "pull_from_mirror"), f"expected one of {expected}, got {pull_from_mirror!r}")
            hosts[name] = replace(
                host,
                pull_from_mirror=pull_from_mirror,
                repository_prefix=self.repository_prefix(table.get("repository_prefix"), (*key, "repository_prefix")),
            )
        # A name of `order` without its table is one check_rules set aside as broken (when read as written, every
        # table header makes its table).
        return tuple(hosts[name] for name in order if name in hosts)

    def host(self, url: Any, key: tuple[str, ...], settings: _Settings, is_server: bool) -> Host:
        try:
            parsed = parse_host_url(url)
        except HostURLError as error:
            raise self.error(key, str(error)) from None
        path = parsed.api_path(override_path=settings.override_path)
        return settings.host(parsed.scheme, parsed.host, parsed.port, path, is_server=is_server)

    def check_keys(self, table: dict[str, Any], allowed: frozenset[str], prefix: tuple[str, ...]) -> None:
        for key in table:
            if key in allowed:
                continue
            expected = ", ".join(sorted(allowed))
            hint = ""
            if key.lower() in allowed:
                # go-toml matches struct keys case-insensitively, so containerd would accept it.
                hint = f"; keys are lower case here: write {key.lower()!r}"
            raise self.error((*prefix, key), f"unknown key (expected one of {expected}){hint}")

    def settings(self, table: dict[str, Any], prefix: tuple[str, ...]) -> _Settings:
        return _Settings(
            capabilities=self.capabilities(table.get("capabilities"), (*prefix, "capabilities")),
            ca=self.ca(table.get("ca"), (*prefix, "ca")),
            client=self.client(table.get("client"), (*prefix, "client")),
            skip_verify=self.boolean(table.get("skip_verify", False), (*prefix, "skip_verify")),
            headers=self.headers(table.get("header", {}), (*prefix, "header")),
            override_path=self.boolean(table.get("override_path", False), (*prefix, "override_path")),
            dial_timeout=self.duration(table.get("dial_timeout"), (*prefix, "dial_timeout")),
        )

    def capabilities(self, value: Any, key: tuple[str, ...]) -> frozenset[str]:
        if value is None:
            return CAPABILITIES
        names = self.strings(value, key, "an array of capability names")
        # containerd reads an empty list like an absent one: every capability (hosts.go:453, 468-470).
        if not names:
            return CAPABILITIES
        for name in names:
            if name.lower() not in CAPABILITIES:
                raise self.error(key, f"unknown capability {name!r} (expected {', '.join(_CAPABILITY_ORDER)})")
        return frozenset(name.lower() for name in names)

    def ca(self, value: Any, key: tuple[str, ...]) -> tuple[Path, ...]:
        if value is None:
            return ()
        if isinstance(value, str):
            return (self.file(value, key),)
        return tuple(self.file(path, key) for path in self.strings(value, key, "a path or an array of paths"))

    def client(self, value: Any, key: tuple[str, ...]) -> tuple[tuple[Path, Path | None], ...]:
        expected = 'a path, an array of paths, or an array of ["cert", "key"] pairs'
        if value is None:
            return ()
        if isinstance(value, str):
            return ((self.file(value, key), None),)
        if not isinstance(value, list):
            raise self.error(key, f"expected {expected}, got {_kind(value)}")
        pairs: list[tuple[Path, Path | None]] = []
        for item in value:
            if isinstance(item, str):
                pairs.append((self.file(item, key), None))
            elif isinstance(item, list) and len(item) == 2 and all(isinstance(part, str) for part in item):
                cert, private_key = item
                # An empty key means the certificate file holds the key too (hosts.go:272-280).
                pairs.append((self.file(cert, key), self.file(private_key, key) if private_key else None))
            else:
                raise self.error(key, f"expected {expected}, found an item that is {_kind(item)}")
        return tuple(pairs)

    def file(self, value: str, key: tuple[str, ...]) -> Path:
        if not value:
            raise self.error(key, "expected a file path, got an empty string")
        # Relative paths are relative to the hosts.toml's directory (hosts.go:606-611).
        return Path(os.path.normpath(self.directory / value))

    def boolean(self, value: Any, key: tuple[str, ...]) -> bool:
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {_kind(value)}")
        return value

    def headers(self, value: Any, key: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
        if not isinstance(value, dict):
            raise self.error(key, f"expected a table of header names, got {_kind(value)}")
        headers: list[tuple[str, str]] = []
        for name, values in value.items():
            header_key = (*key, name)
            if not _HEADER_NAME.fullmatch(name):
                raise self.error(header_key, "expected an HTTP header name (letters, digits, and !#$%&'*+-.^_`|~)")
            if isinstance(values, str):
                values = [values]
            for header_value in self.strings(values, header_key, "a string or an array of strings"):
                if any(char in header_value for char in "\r\n\0"):
                    raise self.error(header_key, "header value contains a line break or NUL")
                if not _FIELD_VALUE.fullmatch(header_value):
                    # Shown by position, not quoted: the value may be a secret (an Authorization header).
                    raise self.error(
                        header_key,
                        "header value has characters HTTP does not allow (control characters, or leading or "
                        "trailing whitespace)",
                    )
                headers.append((name, header_value))
        return tuple(headers)

    def duration(self, value: Any, key: tuple[str, ...]) -> float | None:
        if value is None:
            return None
        expected = 'expected a positive duration like "500ms", "3s" or "1m30s"'
        if not isinstance(value, str):
            raise self.error(key, f"{expected}, got {_kind(value)}")
        if not _DURATION.fullmatch(value):
            raise self.error(key, f"{expected}, got {value!r}")
        seconds = sum(float(amount) * _DURATION_UNITS[unit] for amount, unit in _DURATION_PART.findall(value))
        if seconds <= 0:
            # Go's net.Dialer reads 0 as "no limit"; a rule that wants the default should omit the key.
            raise self.error(key, f"{expected}, got {value!r}")
        if seconds > _LONGEST_DURATION_SECONDS:
            raise self.error(key, f"{expected}, got {value!r}, which is longer than Go's limit of about 292 years")
        return seconds

    def strings(self, value: Any, key: tuple[str, ...], expected: str) -> list[str]:
        if not isinstance(value, list):
            raise self.error(key, f"expected {expected}, got {_kind(value)}")
        for item in value:
            if not isinstance(item, str):
                raise self.error(key, f"expected {expected}, found an item that is {_kind(item)}")
        return value


# --- every problem of a tree at once, for `ocigate check` -----------------------------------------------------------


def check_rules(root: Path) -> tuple[RuleSet | None, list[RulesError]]:
    """What load_rules reads, without stopping at the first problem: every problem of the tree, each entry's and
    each hosts.toml's, in file order (a file that is no TOML at all, or cannot be read, is one problem), and the rule
    set of the registry directories that read without one (None when the tree itself cannot be read)."""
    root = Path(root).absolute()
    try:
        if not _is_directory(root):
            problem = "is not a directory" if root.exists() else "does not exist"
            return None, [RulesError(root, None, f"rules directory {problem}")]
        entries = sorted(root.iterdir())
    except RulesError as error:
        return None, [error]
    except OSError as error:
        return None, [RulesError(root, None, f"cannot list the rules directory: {error.strerror or error}")]
    problems: list[RulesError] = []
    directories: dict[str, _RegistryDirectory] = {}
    for entry in entries:
        if is_hidden(entry.name):
            continue
        if entry.name == HOSTS_FILE:
            problems.append(RulesError(entry, None, "never read here: a hosts.toml belongs in a registry directory"))
            continue
        try:
            if not _is_directory(entry):
                continue
            _directory_upstream(entry.name)
            directories[entry.name] = _load_directory(entry)
        except ValueError:
            problems.append(
                RulesError(entry, None, "directory name is not a registry (host, host:port, host_port_ or _default)")
            )
        except RulesError as error:
            problems += _every_problem(entry / HOSTS_FILE, error)
    return RuleSet(root, directories), problems


def _every_problem(hosts_file: Path, first: RulesError) -> list[RulesError]:
    """`first`, the problem reading hosts_file stopped at, and those after it: the key of each is set aside (as if
    it were not written) and the file parsed again, until it parses. A problem of the file as a whole ends it."""
    if first.key is None or first.path != hosts_file:
        return [first]
    try:
        text = read_regular_file(hosts_file).decode("utf-8")
        document = tomllib.loads(text)
    except (OSError, ValueError, NotRegularFileError):
        return [first]  # changed since it was read: what it first said stands
    problems, problem = [first], first
    mirror_set_aside = False
    while problem.key is not None:
        parts = _header_key(f"[{problem.key}]")
        if not _set_aside(document, parts):
            break
        mirror_set_aside |= parts[0] == "host" and len(parts) <= 2
        try:
            _HostsFileParser(hosts_file).parse(text, document)
            break
        except RulesError as error:
            problem = error
        if problem.key == "offline" and mirror_set_aside and document.get("offline") is True:
            # "offline without any mirror" only because a broken mirror was set aside: no problem of its own.
            continue
        problems.append(problem)
    return problems


def _set_aside(document: dict[str, Any], parts: list[str]) -> bool:
    """Removes the key `parts` names from the document; False when it is not there. A broken `server` is replaced
    by a stand-in rather than removed: without it, keys that need a server would be reported too."""
    table: Any = document
    for part in parts[:-1]:
        table = table.get(part) if isinstance(table, dict) else None
    if not isinstance(table, dict) or parts[-1] not in table:
        return False
    if parts == ["server"] and document["server"] != _STAND_IN_SERVER:
        document["server"] = _STAND_IN_SERVER
    else:
        del table[parts[-1]]
    return True


_STAND_IN_SERVER = "https://server.invalid"


class HostURLError(ValueError):
    """A host URL that hosts.toml cannot use; str() says what is wrong with it."""


@dataclass(frozen=True)
class HostURL:
    """A host as a [host."..."] key or `server` names it."""

    scheme: str  # "http" or "https"
    host: str  # lowercased; an IPv6 address without its brackets
    port: int
    path: str  # cleaned, "" for the root, without the /v2 containerd may add

    def api_path(self, *, override_path: bool = False) -> str:
        """Where the registry API lives: containerd appends /v2 unless override_path, and keeps a path that already
        ends in /v2 (hosts.go:440-447)."""
        if override_path or self.path.endswith("/v2"):
            return self.path
        return f"{self.path}/v2"


def parse_host_url(url: object) -> HostURL:
    """The host a hosts.toml URL names, as containerd reads it: http or https (https when the URL has no scheme), a
    host name or IP address, and a port. Whatever containerd would drop (a query, a fragment, credentials) is
    refused rather than dropped. Raises HostURLError."""
    if not isinstance(url, str):
        raise HostURLError(f"expected a URL string like https://mirror.example, got {_kind(url)}")
    if not url:
        raise HostURLError("expected a URL like https://mirror.example, got an empty string")
    if any(char.isspace() or not char.isprintable() for char in url):
        raise HostURLError("URL contains whitespace or control characters")
    scheme_match = _URL_SCHEME.match(url)
    if scheme_match is None:
        # containerd reads a URL without a scheme as https (hosts.go:431-433).
        url = f"https://{url}"
    elif scheme_match[1].lower() not in DEFAULT_PORTS:
        raise HostURLError(f"unsupported URL scheme {scheme_match[1]!r} (expected http or https)")
    try:
        parts, host, port = split_url(url)
    except ValueError as error:
        raise HostURLError(str(error)) from None
    if "?" in url or "#" in url:
        raise HostURLError("URL has a query or fragment, which containerd drops; remove it")
    if "@" in parts.netloc:
        raise HostURLError("URL has credentials, which containerd drops; remove them")
    if parts.netloc.endswith(":"):
        raise HostURLError("URL has an empty port")
    scheme = parts.scheme.lower()
    return HostURL(scheme, host, port or DEFAULT_PORTS[scheme], _clean_path(parts.path))


def _clean_path(path: str) -> str:
    """Go's path.Clean, as containerd applies it (hosts.go:441), except that the root path becomes "" rather
    than "/", so no URL ends up with "//v2"."""
    if not path:
        return ""
    cleaned = "/" + posixpath.normpath(path).lstrip("/")
    return "" if cleaned == "/" else cleaned


def _host_table_order(text: str) -> list[str]:
    """The hosts in containerd's order (getSortedHosts, hosts.go:551-585): one per [host."..."] table header,
    sub-tables such as [host."...".header] included, unless it names the same host as the host header right
    before it. A host whose tables another host's split apart is thus listed, and tried, twice, as in
    containerd."""
    order: list[str] = []
    for header in _table_headers(text):
        parts = _header_key(header)
        if len(parts) >= 2 and parts[0] == "host" and (not order or order[-1] != parts[1]):
            order.append(parts[1])
    return order


def _header_key(header: str) -> list[str]:
    # A lone table header is a document of its own: a chain of single-key tables, one per dotted part.
    table = tomllib.loads(header)
    parts: list[str] = []
    while len(table) == 1:
        part, table = next(iter(table.items()))
        parts.append(part)
    return parts


def _table_headers(text: str) -> Iterator[str]:
    """The standard table headers ([a.b], not [[a.b]], which containerd skips) of a valid TOML document."""
    position, depth, line_start = 0, 0, True
    while position < len(text):
        char = text[position]
        if char == "#":
            position = text.find("\n", position)
            if position == -1:
                return
            continue
        if char == "\n":
            line_start = True
        elif char in "\"'":
            position = _string_end(text, position)
            line_start = False
            continue
        elif char == "[" and line_start and depth == 0:
            end = _header_end(text, position)
            if not text.startswith("[[", position):
                yield text[position:end]
            position, line_start = end, False
            continue
        elif char not in " \t\r":
            line_start = False
            if char in "[{":
                depth += 1
            elif char in "]}":
                depth -= 1
        position += 1


def _header_end(text: str, start: int) -> int:
    closing = "]]" if text.startswith("[[", start) else "]"
    position = start + len(closing)
    while not text.startswith(closing, position):
        position = _string_end(text, position) if text[position] in "\"'" else position + 1
    return position + len(closing)


def _string_end(text: str, start: int) -> int:
    quote = text[start]
    escapes = quote == '"'
    if text.startswith(quote * 3, start):
        position = start + 3
        while not text.startswith(quote * 3, position):
            position += 2 if escapes and text[position] == "\\" else 1
        # Up to two quotes right before the closing three belong to the string.
        while position < len(text) and text[position] == quote:
            position += 1
        return position
    position = start + 1
    while text[position] != quote:
        position += 2 if escapes and text[position] == "\\" else 1
    return position + 1


def _format_key(parts: tuple[str, ...]) -> str:
    return ".".join(part if _BARE_KEY.fullmatch(part) else json.dumps(part, ensure_ascii=False) for part in parts)


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return "a date or time"
