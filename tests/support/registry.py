"""Run a real registry (Debian's docker-registry, distribution 2.8) on loopback for end-to-end tests.

Facts about distribution 2.8.2 this module relies on (checked against the Debian binary):

- Any REGISTRY_* environment variable overrides the config file, so the process gets an environment
  without them.
- It writes two kinds of lines: logrus text lines on stderr (`time=... level=... msg=...` with
  `http.request.uri=` fields) and, unless `log.accesslog.disabled`, one Apache combined-format access
  line per request on stdout (`127.0.0.1 - - [ts] "GET /v2/?q HTTP/1.1" 200 2 "" "ua"`). Only the access
  line exists for every request: a request refused by htpasswd auth (401) gets a "error authorizing
  context" logrus line but no "response completed" line. So request URIs are parsed from access lines.
- The access line is written after the response has been sent, so a client may see the response before
  the line is in the log: use `Registry.wait_for_uri` when a test must not race.
- The config file may be JSON (YAML is a superset of JSON).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from .processes import NotReady, stop, wait_until
from .tls import ServerTLS, client_ssl_context

REGISTRY_BINARY = "docker-registry"
_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 5.0
_START_ATTEMPTS = 3
_LOG_TAIL_LINES = 40

# 127.0.0.1 - - [24/Nov/2026:12:31:00 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "curl/7.88.1"
# gorilla/handlers escapes `"` and `\` (and non-printables) inside the quoted request line.
_ACCESS_LINE = re.compile(
    r"^(?P<remote>\S+) - (?P<user>\S+) \[(?P<time>[^\]]*)\] "
    r'"(?P<method>\S+) (?P<uri>(?:[^"\\ ]|\\.)*) (?P<proto>[^"\s]+)" '
    r"(?P<status>\d{3}) (?P<size>\d+)"
)
_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|.)")
_SIMPLE_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", '"': '"', "\\": "\\"}


def _unescape(text: str) -> str:
    def replace(match: re.Match[str]) -> str:
        escape = match.group(1)
        if escape[0] in "xuU" and len(escape) > 1:
            return chr(int(escape[1:], 16))
        return _SIMPLE_ESCAPES.get(escape, escape)

    return _ESCAPE.sub(replace, text)


@dataclass(frozen=True)
class AccessLogEntry:
    method: str
    uri: str  # path + query exactly as the client sent it
    status: int
    size: int


@dataclass
class Registry:
    host: str
    port: int
    scheme: str
    root: Path
    log_path: Path
    config_path: Path
    tls: ServerTLS | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    @property
    def storage_path(self) -> Path:
        return self.root / "storage"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def access_log(self) -> list[AccessLogEntry]:
        """Every request the registry served, in order, from its access log lines."""
        entries = []
        for line in self.log_text().splitlines():
            match = _ACCESS_LINE.match(line)
            if match:
                entries.append(
                    AccessLogEntry(
                        method=match["method"],
                        uri=_unescape(match["uri"]),
                        status=int(match["status"]),
                        size=int(match["size"]),
                    )
                )
        return entries

    def request_uris(self) -> list[str]:
        """The URIs (path + query) of the requests it served, in order."""
        return [entry.uri for entry in self.access_log()]

    def wait_for_uri(self, fragment: str, timeout: float = 5.0) -> str:
        """Wait until a served URI contains `fragment` (the access line trails the response); return it."""
        deadline = time.monotonic() + timeout
        while True:
            for uri in self.request_uris():
                if fragment in uri:
                    return uri
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"registry at {self.url} served no URI containing {fragment!r} within {timeout}s; "
                    f"served: {self.request_uris()}"
                )
            time.sleep(0.02)

    def stop(self) -> None:
        """Terminate the process, kill it if it does not exit in time. Safe to call twice."""
        process, self.process = self.process, None
        if process is None:
            return
        stop(process, _STOP_TIMEOUT)


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago (another process may still take it: callers retry)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_htpasswd(path: Path, users: dict[str, str]) -> Path:
    """Write an htpasswd file for distribution's htpasswd auth, which only accepts bcrypt entries.

    bcrypt comes with mitmproxy. Cost 4 (the minimum) keeps each authenticated request fast.
    """
    import bcrypt

    lines = [
        f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()}\n"
        for user, password in users.items()
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines), encoding="utf-8")
    return path


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Merge `extra` into `base`; a None value removes the key (e.g. to swap the storage driver)."""
    merged = dict(base)
    for key, value in extra.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _build_config(
    root: Path,
    port: int,
    tls: ServerTLS | None,
    htpasswd: Path | None,
    extra_config: dict[str, Any] | None,
    listen_host: str = "127.0.0.1",
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "version": "0.1",
        "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
        "storage": {
            "filesystem": {"rootdirectory": str(root / "storage")},
            "delete": {"enabled": True},
            # The background purge of stale uploads only adds noise to a short-lived registry.
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": {
            "addr": f"{listen_host}:{port}",
            "secret": secrets.token_hex(16),
            "headers": {"X-Content-Type-Options": ["nosniff"]},
        },
        "health": {"storagedriver": {"enabled": False}},
    }
    if tls is not None:
        config["http"]["tls"] = {"certificate": str(tls.cert_path), "key": str(tls.key_path)}
    if htpasswd is not None:
        config["auth"] = {"htpasswd": {"realm": "ocigate-test", "path": str(htpasswd)}}
    if extra_config:
        config = _deep_merge(config, extra_config)
    return config


def _registry_environment() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if not key.startswith("REGISTRY_")}


def _probe(registry: Registry, config: dict[str, Any]) -> bool:
    """True once the registry answers; what "answers" means depends on whether it demands client certs."""
    requires_client_cert = bool(config.get("http", {}).get("tls", {}).get("clientcas"))
    if requires_client_cert:
        # Without a client certificate the handshake fails, so a GET cannot succeed: accept the log
        # line that says it listens plus a TCP connection instead.
        if f"listening on 127.0.0.1:{registry.port}" not in registry.log_text():
            return False
        try:
            with socket.create_connection((registry.host, registry.port), timeout=1.0):
                return True
        except OSError:
            return False
    verify: ssl.SSLContext | bool = False
    if registry.tls is not None:
        # Verify the chain but not the name: a certificate made for names other than 127.0.0.1 is
        # legitimate here, and the probe only asks whether the server is up.
        verify = client_ssl_context(registry.tls.ca_path)
        verify.check_hostname = False
    try:
        response = httpx.get(f"{registry.url}/v2/", verify=verify, timeout=1.0)
    except httpx.TransportError:
        return False
    return response.status_code in (200, 401)


def _start(
    root: Path,
    tls: ServerTLS | None,
    htpasswd: Path | None,
    extra_config: dict[str, Any] | None,
    listen_host: str = "127.0.0.1",
) -> Registry:
    """Start one registry, retrying with a new port when the old one was taken meanwhile."""
    binary = shutil.which(REGISTRY_BINARY)
    if binary is None:
        raise RuntimeError(f"{REGISTRY_BINARY} not found on PATH (Debian package docker-registry)")
    last_error = ""
    for _attempt in range(_START_ATTEMPTS):
        port = free_port()
        config = _build_config(root, port, tls, htpasswd, extra_config, listen_host)
        config_path = root / "config.yml"
        # JSON is valid YAML, and distribution's YAML parser reads it.
        config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
        log_path = root / "registry.log"
        registry = Registry(
            host="127.0.0.1",
            port=port,
            scheme="https" if tls is not None else "http",
            root=root,
            log_path=log_path,
            config_path=config_path,
            tls=tls,
        )
        with log_path.open("wb") as log_file:
            registry.process = subprocess.Popen(
                [binary, "serve", str(config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=root,
                env=_registry_environment(),
            )
        try:
            wait_until(
                functools.partial(_probe, registry, config),
                _START_TIMEOUT,
                lambda why: f"docker-registry did not answer GET /v2/: {why}",
                process=registry.process,
            )
            return registry
        except NotReady as not_ready:
            registry.stop()
            last_error = f"{not_ready}; log tail:\n{registry.log_tail()}"
        except BaseException:
            registry.stop()
            raise
        if "address already in use" not in last_error:
            break
    raise RuntimeError(last_error)


@contextlib.contextmanager
def running_registry(
    workdir: Path,
    *,
    tls: ServerTLS | None = None,
    htpasswd: Path | None = None,
    extra_config: dict[str, Any] | None = None,
    listen_host: str = "127.0.0.1",
) -> Iterator[Registry]:
    """Run docker-registry with its storage, config.yml and registry.log in `workdir`.

    `extra_config` is deep-merged into the generated config (e.g. {"http": {"tls": {"clientcas": [...]}}},
    {"http": {"relativeurls": True}}); a None value deletes a key ({"storage": {"filesystem": None,
    "inmemory": {}}}). `listen_host` is where it listens (0.0.0.0: every address of the host); it is asked at
    127.0.0.1 all the same.
    When it demands client certificates, readiness is "listening" in the log plus a TCP connection.
    The process is stopped on exit, whatever happened inside the block.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    registry = _start(workdir, tls, htpasswd, extra_config, listen_host)
    try:
        yield registry
    finally:
        registry.stop()
