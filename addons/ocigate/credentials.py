"""Registry credentials: where they come from and which one applies to a host, upstream and repository.

Sources, in the order a `CredentialChain` asks them (the first that has a credential wins; a credential that is
there but invalid is an error, never silently replaced by the next source's):

1. ocigate's own store (`OcigateStore`): a JSON list of entries keyed by host, optionally narrowed by the upstream
   registry and a repository prefix — the one thing docker's config cannot say (nerdctl#3265: a mirror serving
   several upstreams through `?ns=` may need a different credential for each);
2. docker's `config.json` (`DockerConfig`): `auths`, `credHelpers`, `credsStore`;
3. containers' `auth.json` (`ContainersAuth`), whose keys may name a namespace or repository;
4. mounted `kubernetes.io/dockerconfigjson` secrets (`KubernetesSecrets`).

Every file is re-read when it changes on disk, so rotated credentials apply without a restart; a file that turns
unreadable or malformed keeps its last good contents. Secrets never appear in logs, reprs or error messages.
"""

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from cachetools import TTLCache

from .files import NotRegularFileError, read_regular_file
from .routes import DEFAULT_PORTS, DOCKER_HUB_ALIASES, DOCKER_HUB_INDEX

log = logging.getLogger("ocigate")

# The key `docker login` writes Docker Hub's credentials under, and the server URL its helpers are asked for.
DOCKER_HUB_LEGACY_KEY = f"https://{DOCKER_HUB_INDEX}/v1/"
# A credential key's host written with the port a host without one is on.
_DEFAULT_PORT_SUFFIX = f":{DEFAULT_PORTS['https']}"
_HELPER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_HELPER_NOT_FOUND = "credentials not found in native keychain"
_IDENTITY_TOKEN_USERNAME = "<token>"
DEFAULT_HELPER_TIMEOUT = 10.0
# A credential helper's answer is used this long before the helper is asked again: a pull asks for a credential per
# request, and docker itself runs a helper once per pull. Failures are not kept.
HELPER_ANSWER_TTL = 30.0
# What a helper may write to stdout, and to stderr: an answer is a username and a secret, a token at most some KiB.
HELPER_OUTPUT_LIMIT = 1024 * 1024
# How long a killed helper is waited for.
_KILL_GRACE = 2.0
# Where `ocigate login` writes and the gateway reads ocigate's own credentials unless told otherwise.
DEFAULT_STORE_PATH = "~/.ocigate/credentials.json"

# Keyed per process so that an identity() that ends up in a log or a capture cannot be used to guess a password.
_IDENTITY_KEY = secrets.token_bytes(32)


class CredentialError(Exception):
    """A credential that exists but cannot be used; the message names its file or helper and never the secret."""


@dataclass(frozen=True, repr=False)
class Credential:
    """What a registry's token endpoint (or basic auth) needs. `identity_token` is an OAuth2 refresh token (docker's
    `identitytoken`); `registry_token` is a bearer token sent as is (docker's `registrytoken`)."""

    username: str | None = None
    password: str | None = None
    identity_token: str | None = None
    registry_token: str | None = None

    def __repr__(self) -> str:
        def shown(value: str | None) -> str:
            return "None" if value is None else "'<redacted>'"

        return (
            f"Credential(username={self.username!r}, password={shown(self.password)}, "
            f"identity_token={shown(self.identity_token)}, registry_token={shown(self.registry_token)})"
        )

    __str__ = __repr__

    def identity(self) -> str:
        """A stable (within this process) opaque key for caches: equal credentials, equal identities."""
        fields = (self.username, self.password, self.identity_token, self.registry_token)
        encoded = json.dumps(fields).encode()
        return hashlib.blake2b(encoded, key=_IDENTITY_KEY, digest_size=16).hexdigest()


def default_docker_config_dir() -> Path:
    return Path(os.environ.get("DOCKER_CONFIG") or Path.home() / ".docker")


def default_containers_auth_paths() -> list[Path]:
    """Where podman, skopeo and buildah look for auth.json, in their order (containers-auth.json(5))."""
    paths = []
    if os.environ.get("REGISTRY_AUTH_FILE"):
        paths.append(Path(os.environ["REGISTRY_AUTH_FILE"]))
    if os.environ.get("XDG_RUNTIME_DIR"):
        paths.append(Path(os.environ["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
    config_home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    paths.append(Path(config_home) / "containers" / "auth.json")
    return paths


# --- files that are re-read when they change ---------------------------------------------------------------------

T = TypeVar("T")


class _Malformed(Exception):
    """A file's contents do not parse; the message says where, never what the value was."""


class _WatchedFile(Generic[T]):
    """A file's parsed contents, re-read whenever it changes on disk. A file that cannot be read or parsed, or that is
    not a regular file (a FIFO would block every flow), keeps the last good contents and logs one warning; it logs
    again only after it has recovered and broken again. A missing file is empty (it was never written, or its
    credentials were deliberately removed)."""

    def __init__(self, path: Path, parse: Callable[[bytes], T], empty: T) -> None:
        self.path = path
        self._parse = parse
        self._empty = empty
        self._contents = empty
        self._signature: tuple[int, ...] | None = None
        self._broken = False

    def contents(self) -> T:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._signature, self._contents, self._broken = None, self._empty, False
            return self._contents
        except OSError as e:
            self._fail(f"cannot be read ({e.strerror})")
            return self._contents
        # ctime and inode too: a chmod or an atomic replace with the same size and mtime still counts as a change.
        signature = (st.st_mtime_ns, st.st_size, st.st_ctime_ns, st.st_ino)
        if signature == self._signature:
            return self._contents
        # The signature is kept only once the file was read: until then, every lookup tries again.
        try:
            data = read_regular_file(self.path)
        except NotRegularFileError as e:
            self._fail(f"is {e}")
            return self._contents
        except OSError as e:
            self._fail(f"cannot be read ({e.strerror})")
            return self._contents
        self._signature = signature
        try:
            contents = self._parse(data)
        except _Malformed as e:
            self._fail(f"is malformed ({e})")
            return self._contents
        self._contents, self._broken = contents, False
        return contents

    def _fail(self, reason: str) -> None:
        if not self._broken:
            log.warning(f"ocigate: credentials file {self.path} {reason}; keeping its last good contents")
            self._broken = True


def _load_json(data: bytes) -> Any:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _Malformed(f"not UTF-8 at byte {e.start}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        # e.msg and the position only: str(e) is safe today, but the document itself must never reach a message.
        raise _Malformed(f"not JSON: {e.msg} at line {e.lineno} column {e.colno}") from None


# --- key matching -------------------------------------------------------------------------------------------------


def _host_variants(host: str) -> set[str]:
    """The spellings of one registry host in credential keys: Docker Hub's three names are one registry, and 443 is
    the port of a host written without one."""
    bare = _without_default_port(host)
    names = DOCKER_HUB_ALIASES if bare in DOCKER_HUB_ALIASES else {bare}
    return {spelling for name in names for spelling in (name, name + _DEFAULT_PORT_SUFFIX)}


def _without_default_port(host: str) -> str:
    return host.lower().removesuffix(_DEFAULT_PORT_SUFFIX)


def _split_key(key: str) -> tuple[str, str]:
    """(host, path) of an auths key: `host`, `host:port`, `https://host/`, `http://host:port/v1/`, `host/ns/repo`.
    The `/v1` and `/v2` API paths docker's legacy keys carry are no repository narrowing."""
    rest = key.strip()
    scheme = re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", rest)
    if scheme:
        rest = rest[scheme.end() :]
    host, _, path = rest.partition("/")
    path = path.strip("/")
    if path in ("v1", "v2"):
        path = ""
    return host.lower(), path


def _matching_keys(keys: Iterable[str], host: str, repository: str, narrow_by_path: bool) -> list[str]:
    """The keys that apply to host and repository, most specific first.

    Docker compares only the host (with port) of a key, whatever scheme and path it carries; containers' auth.json
    and kubelet-style secrets also let `host/ns` and `host/ns/repo` narrow a key to a repository prefix, the longest
    winning. Among equally specific keys, one spelled with the host exactly as asked wins, then Docker Hub's legacy
    key, then file order."""
    variants = _host_variants(host)
    asked = host.lower()
    ranked = []
    for position, key in enumerate(keys):
        key_host, path = _split_key(key)
        if key_host not in variants:
            continue
        if narrow_by_path and path:
            if repository != path and not repository.startswith(path + "/"):
                continue
            depth = path.count("/") + 1
        else:
            depth = 0
        ranked.append(((-depth, key_host != asked, key != DOCKER_HUB_LEGACY_KEY, position), key))
    return [key for _, key in sorted(ranked)]


def _helper_server_url(host: str) -> str:
    """The server URL docker hands a credential helper: Docker Hub's legacy key, else host[:port]."""
    return DOCKER_HUB_LEGACY_KEY if _without_default_port(host) in DOCKER_HUB_ALIASES else host.lower()


# --- docker's config format (also auth.json's and a dockerconfigjson secret's) ------------------------------------


@dataclass(frozen=True)
class _AuthFile:
    auths: dict[str, dict[str, Any]]
    cred_helpers: dict[str, str]
    creds_store: str | None


_EMPTY_AUTH_FILE = _AuthFile({}, {}, None)
_AUTH_ENTRY_FIELDS = {"auth", "username", "password", "identitytoken", "registrytoken"}


def _parse_auth_file(data: bytes) -> _AuthFile:
    document = _load_json(data)
    if not isinstance(document, dict):
        raise _Malformed("expected a JSON object")
    auths = document.get("auths", {})
    if not isinstance(auths, dict):
        raise _Malformed("'auths' is not an object")
    for key, entry in auths.items():
        if not isinstance(entry, dict):
            raise _Malformed(f"auths[{key!r}] is not an object")
        for field in _AUTH_ENTRY_FIELDS & entry.keys():
            if not isinstance(entry[field], str):
                raise _Malformed(f"auths[{key!r}].{field} is not a string")
    helpers = document.get("credHelpers", {})
    if not isinstance(helpers, dict):
        raise _Malformed("'credHelpers' is not an object")
    for key, name in helpers.items():
        if not isinstance(name, str) or not _HELPER_NAME.match(name):
            raise _Malformed(f"credHelpers[{key!r}] is not a helper name")
    store = document.get("credsStore")
    if store is not None and (not isinstance(store, str) or not _HELPER_NAME.match(store)):
        raise _Malformed("'credsStore' is not a helper name")
    return _AuthFile(auths, helpers, store or None)


def _entry_credential(entry: dict[str, Any], where: str) -> Credential | None:
    """The credential of one auths entry; None for an empty one (`{}`, what docker leaves next to a credsStore)."""
    username = entry.get("username") or None
    password = entry.get("password") or None
    if entry.get("auth"):
        try:
            decoded = base64.b64decode(entry["auth"], validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            raise CredentialError(f"{where}: 'auth' is not base64 of username:password") from None
        username, colon, password = decoded.partition(":")
        if not colon:
            raise CredentialError(f"{where}: 'auth' decodes to no username:password pair")
    identity_token = entry.get("identitytoken") or None
    registry_token = entry.get("registrytoken") or None
    if not (password or identity_token or registry_token):
        return None
    return Credential(username or None, password or None, identity_token, registry_token)


async def run_credential_helper(
    name: str, server_url: str, timeout: float = DEFAULT_HELPER_TIMEOUT
) -> Credential | None:
    """`docker-credential-<name> get` with server_url on stdin (docker's credential-helper protocol), without blocking
    the event loop. None when the helper has no credential for server_url."""
    program = f"docker-credential-{name}"
    try:
        process = await asyncio.create_subprocess_exec(
            program,
            "get",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # its own process group, so a hanging helper is killed with its children
        )
    except FileNotFoundError:
        raise CredentialError(f"credential helper {program} is not on PATH") from None
    except PermissionError:
        raise CredentialError(f"credential helper {program} is not executable") from None
    try:
        stdout, stderr, returncode = await asyncio.wait_for(_exchange(process, server_url.encode()), timeout)
    except TimeoutError:
        await _kill(process)
        raise CredentialError(f"credential helper {program} did not answer within {timeout:g} s; killed") from None
    except _TooMuchOutput as e:
        await _kill(process)
        raise CredentialError(f"credential helper {program} wrote more than {e}; killed") from None
    if returncode != 0:
        if _HELPER_NOT_FOUND in stdout.decode(errors="replace") + stderr.decode(errors="replace"):
            return None
        # Neither of its outputs: stdout may hold half a secret, and a helper may well print one on stderr.
        status = f"signal {-returncode}" if returncode < 0 else f"exit {returncode}"
        raise CredentialError(f"credential helper {program} failed ({status})")
    try:
        answer = json.loads(stdout)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CredentialError(f"credential helper {program} answered with something that is not JSON") from None
    if not isinstance(answer, dict) or not all(isinstance(answer.get(k, ""), str) for k in ("Username", "Secret")):
        raise CredentialError(f"credential helper {program} answered without string Username and Secret")
    username, secret = answer.get("Username", ""), answer.get("Secret", "")
    if not secret:
        return None
    if username == _IDENTITY_TOKEN_USERNAME:
        return Credential(identity_token=secret)
    return Credential(username=username or None, password=secret)


class _TooMuchOutput(Exception):
    """A helper wrote more than an answer can be; str() says how much and where."""


async def _exchange(process: asyncio.subprocess.Process, request: bytes) -> tuple[bytes, bytes, int]:
    """communicate(), with each output read up to HELPER_OUTPUT_LIMIT only: a helper that prints without end must
    not grow the gateway. Both are read at once, so that a helper blocked writing one cannot stall the other.
    Returns stdout, stderr and the exit status."""
    stdin, stdout_pipe, stderr_pipe = process.stdin, process.stdout, process.stderr
    # run_credential_helper starts every helper with all three as pipes.
    assert stdin is not None and stdout_pipe is not None and stderr_pipe is not None
    reads = [
        asyncio.ensure_future(_read_at_most(stdout_pipe, "stdout")),
        asyncio.ensure_future(_read_at_most(stderr_pipe, "stderr")),
    ]
    try:
        stdin.write(request)
        # A helper may exit without reading its stdin; what it answers says what went wrong.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            await stdin.drain()
        stdin.close()
        stdout, stderr = await asyncio.gather(*reads)
    finally:
        # Ended before a read is left waiting on a stream that _kill goes on to read.
        for read in reads:
            read.cancel()
        await asyncio.gather(*reads, return_exceptions=True)
    return stdout, stderr, await process.wait()


async def _read_at_most(stream: asyncio.StreamReader, name: str) -> bytes:
    data = bytearray()
    while chunk := await stream.read(HELPER_OUTPUT_LIMIT + 1 - len(data)):
        data += chunk
        if len(data) > HELPER_OUTPUT_LIMIT:
            raise _TooMuchOutput(f"{HELPER_OUTPUT_LIMIT // 1024} KiB to {name}")
    return bytes(data)


async def _kill(process: asyncio.subprocess.Process) -> None:
    """Kills the helper with its children and waits for it. What is left of its outputs is read and dropped: asyncio's
    wait() returns only once they are closed, and an output whose buffer is full is no longer read to its end. A
    child that left the process group can hold them open for ever: the helper is waited for _KILL_GRACE at most."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            process.kill()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(
            asyncio.gather(process.wait(), _drop(process.stdout), _drop(process.stderr)), _KILL_GRACE
        )


async def _drop(stream: asyncio.StreamReader | None) -> None:
    while stream is not None and await stream.read(64 * 1024):
        pass


# --- what `ocigate check` and `ocigate explain` ask of a source: no helper run, no secret read out --------------------


@dataclass(frozen=True)
class Finding:
    """Where a source would take a credential from: a file's entry, or a credential helper (which may have none, so
    that what comes after it is asked too). Never the credential itself."""

    where: str
    helper: bool = False


@dataclass(frozen=True)
class FileProblem:
    """Something wrong with a configuration file (credentials, rules, policy), by file and key; the message never
    holds a value of it."""

    path: Path
    key: str | None
    problem: str

    def __str__(self) -> str:
        return f"{self.path}: {self.key}: {self.problem}" if self.key else f"{self.path}: {self.problem}"


def _checked(path: Path, parse: Callable[[bytes], T]) -> tuple[T | None, list[FileProblem]]:
    """A credentials file read now, strictly: its contents, or the problem that keeps them from being used (where the
    gateway would keep its last good contents). A missing file is no problem: it has no credentials."""
    try:
        data = read_regular_file(path)
    except FileNotFoundError:
        return None, []
    except NotRegularFileError as e:
        return None, [FileProblem(path, None, f"is {e}")]
    except OSError as e:
        return None, [FileProblem(path, None, f"cannot be read ({e.strerror})")]
    try:
        return parse(data), []
    except _Malformed as e:
        return None, [FileProblem(path, None, f"is malformed ({e})")]


def helper_on_path(helper: str) -> bool:
    """Whether docker-credential-<helper> is a program on PATH (it is looked for, never run)."""
    return shutil.which(f"docker-credential-{helper}") is not None


# --- sources --------------------------------------------------------------------------------------------------------


class CredentialSource:
    """A place credentials come from: `locate` finds the credential for a host, upstream and repository, and says
    where exactly (for error messages)."""

    description: str = "credentials"

    async def locate(self, host: str, upstream: str, repository: str) -> tuple[Credential, str] | None:
        raise NotImplementedError

    def find(self, host: str, upstream: str, repository: str) -> list[Finding]:
        """Where `locate` would look, in its order, up to the entry it would take: said without running a helper.
        Raises CredentialError where locate would (an entry that is there but unusable)."""
        raise NotImplementedError

    def problems(self) -> list[FileProblem]:
        """Everything wrong with the source's files now, each by file and key."""
        raise NotImplementedError


class _AuthFileSource(CredentialSource):
    """What docker's config.json, containers' auth.json and a dockerconfigjson secret share: helpers by host, then
    auths entries by key."""

    def __init__(self, path: Path, kind: str, narrow_by_path: bool, helpers: bool, helper_timeout: float) -> None:
        self._file = _WatchedFile(Path(path), _parse_auth_file, _EMPTY_AUTH_FILE)
        self._narrow_by_path = narrow_by_path
        self._helpers = helpers
        self.helper_timeout = helper_timeout
        self.description = f"{kind} {self._file.path}"
        self._helper_answers: TTLCache[tuple[str, str], Credential | None] = TTLCache(1024, HELPER_ANSWER_TTL)
        self._helper_runs: dict[tuple[str, str], asyncio.Future[Credential | None]] = {}

    @property
    def path(self) -> Path:
        return self._file.path

    async def locate(self, host: str, upstream: str, repository: str) -> tuple[Credential, str] | None:
        config = self._file.contents()
        if self._helpers:
            # docker: credHelpers[host] first, else credsStore for every host. Unlike docker, a helper that has
            # nothing does not hide a real auths entry (a config may mix both after a migration).
            keys = _matching_keys(config.cred_helpers, host, repository, narrow_by_path=False)
            helper = config.cred_helpers[keys[0]] if keys else config.creds_store
            if helper:
                credential = await self._ask_helper(helper, _helper_server_url(host))
                if credential:
                    return credential, f"credential helper docker-credential-{helper} ({self.description})"
        for key in _matching_keys(config.auths, host, repository, self._narrow_by_path):
            where = f"{self.description}: auths[{key!r}]"
            credential = _entry_credential(config.auths[key], where)
            if credential:
                return credential, where
        return None

    async def _ask_helper(self, helper: str, server_url: str) -> Credential | None:
        key = (helper, server_url)
        if key in self._helper_answers:
            return self._helper_answers[key]
        # Requests that need the same answer at once share one run of the helper.
        running = self._helper_runs.get(key)
        if running is None:
            running = asyncio.ensure_future(run_credential_helper(helper, server_url, self.helper_timeout))
            self._helper_runs[key] = running
            running.add_done_callback(lambda done: self._helper_ran(key, done))
        return await asyncio.shield(running)

    def _helper_ran(self, key: tuple[str, str], run: "asyncio.Future[Credential | None]") -> None:
        self._helper_runs.pop(key, None)
        if not run.cancelled() and run.exception() is None:
            self._helper_answers[key] = run.result()

    def find(self, host: str, upstream: str, repository: str) -> list[Finding]:
        config = self._file.contents()
        findings = []
        if self._helpers:
            keys = _matching_keys(config.cred_helpers, host, repository, narrow_by_path=False)
            helper = config.cred_helpers[keys[0]] if keys else config.creds_store
            if helper:
                findings.append(Finding(f"credential helper docker-credential-{helper} ({self.description})", True))
        for key in _matching_keys(config.auths, host, repository, self._narrow_by_path):
            where = f"{self.description}: auths[{key!r}]"
            credential = _entry_credential(config.auths[key], where)
            if credential:
                user = f" (user {credential.username!r})" if credential.username else ""
                return [*findings, Finding(where + user)]
        return findings

    def problems(self) -> list[FileProblem]:
        config, problems = _checked(self.path, _parse_auth_file)
        if config is None:
            return problems
        for key, entry in config.auths.items():
            name = f"auths[{key!r}]"
            try:
                _entry_credential(entry, name)
            except CredentialError as e:
                problems.append(FileProblem(self.path, name, str(e).removeprefix(f"{name}: ")))
        if self._helpers:
            named = [(f"credHelpers[{key!r}]", helper) for key, helper in config.cred_helpers.items()]
            if config.creds_store:
                named.append(("credsStore", config.creds_store))
            for key, helper in named:
                if not helper_on_path(helper):
                    problems.append(FileProblem(self.path, key, f"docker-credential-{helper} is not on PATH"))
        return problems


class DockerConfig(_AuthFileSource):
    """`DIR/config.json` as docker and nerdctl write it (DOCKER_CONFIG, default ~/.docker)."""

    def __init__(self, directory: Path | str | None = None, helper_timeout: float = DEFAULT_HELPER_TIMEOUT) -> None:
        directory = Path(directory) if directory is not None else default_docker_config_dir()
        super().__init__(directory / "config.json", "docker config", False, True, helper_timeout)


class ContainersAuth(_AuthFileSource):
    """containers' auth.json (podman, skopeo, buildah): keys `host`, `host/ns`, `host/ns/repo`, most specific wins."""

    def __init__(self, path: Path | str, helper_timeout: float = DEFAULT_HELPER_TIMEOUT) -> None:
        super().__init__(Path(path), "containers auth", True, True, helper_timeout)


class KubernetesSecrets(CredentialSource):
    """Mounted `kubernetes.io/dockerconfigjson` secrets: DIR/.dockerconfigjson and DIR/*/.dockerconfigjson, in name
    order. Their keys may narrow by repository path as the kubelet allows; they name no helpers (a secret must not
    be able to make ocigate run a program)."""

    FILE_NAME = ".dockerconfigjson"

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        self.description = f"kubernetes secrets {self.directory}"
        self._files: dict[Path, _AuthFileSource] = {}

    def _secret_files(self) -> list[Path]:
        paths = [self.directory / self.FILE_NAME]
        try:
            # Names starting with "." are skipped: the kubelet's atomic writer keeps its ..data and ..timestamp
            # directories there, which hold the same files again.
            names = sorted(e.name for e in os.scandir(self.directory) if not e.name.startswith(".") and e.is_dir())
        except OSError:
            names = []
        paths += [self.directory / name / self.FILE_NAME for name in names]
        # lexists: a secret that is a symbolic link loop is reported by its source, not skipped as if absent.
        return [p for p in paths if os.path.lexists(p)]

    async def locate(self, host: str, upstream: str, repository: str) -> tuple[Credential, str] | None:
        for source in self._current_files():
            found = await source.locate(host, upstream, repository)
            if found:
                return found
        return None

    def _current_files(self) -> list["_AuthFileSource"]:
        paths = self._secret_files()
        self._files = {p: self._files.get(p) or _AuthFileSource(p, "kubernetes secret", True, False, 0) for p in paths}
        return list(self._files.values())

    def find(self, host: str, upstream: str, repository: str) -> list[Finding]:
        for source in self._current_files():
            found = source.find(host, upstream, repository)
            if found:
                return found
        return []

    def problems(self) -> list[FileProblem]:
        if not os.path.isdir(self.directory):
            return [FileProblem(self.directory, None, "is not a directory of mounted secrets")]
        return [problem for source in self._current_files() for problem in source.problems()]


# --- ocigate's own store -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoreEntry:
    host: str
    credential: Credential
    upstream: str | None = None
    repository_prefix: str | None = None

    def applies_to(self, host: str, upstream: str, repository: str) -> bool:
        if self.host != host.lower():
            return False
        if self.upstream is not None and self.upstream != upstream.lower():
            return False
        prefix = self.repository_prefix
        return prefix is None or repository == prefix or repository.startswith(prefix + "/")

    def specificity(self) -> tuple[bool, int]:
        """Host+upstream+longest prefix, then host+upstream, then host with a prefix, then host only."""
        depth = self.repository_prefix.count("/") + 1 if self.repository_prefix else 0
        return self.upstream is not None, depth

    def to_json(self) -> dict[str, str]:
        fields = {
            "host": self.host,
            "upstream": self.upstream,
            "repository_prefix": self.repository_prefix,
            "username": self.credential.username,
            "password": self.credential.password,
            "identity_token": self.credential.identity_token,
            "registry_token": self.credential.registry_token,
        }
        return {name: value for name, value in fields.items() if value is not None}


_STORE_FIELDS = ("host", "upstream", "repository_prefix", "username", "password", "identity_token", "registry_token")


def _parse_store(data: bytes) -> tuple[StoreEntry, ...]:
    document = _load_json(data)
    if not isinstance(document, list):
        raise _Malformed("expected a JSON list of entries")
    entries = []
    for index, item in enumerate(document):
        if not isinstance(item, dict):
            raise _Malformed(f"entry {index} is not an object")
        unknown = sorted(set(item) - set(_STORE_FIELDS))
        if unknown:
            raise _Malformed(f"entry {index} has unknown field {unknown[0]!r}")
        for name, value in item.items():
            if not isinstance(value, str) or not value:
                raise _Malformed(f"entry {index}: {name} is not a non-empty string")
        if "host" not in item:
            raise _Malformed(f"entry {index} has no host")
        credential = Credential(
            item.get("username"), item.get("password"), item.get("identity_token"), item.get("registry_token")
        )
        if not (credential.password or credential.identity_token or credential.registry_token):
            raise _Malformed(f"entry {index} ({item['host']}) has no password, identity_token or registry_token")
        narrowing = _narrowing(item.get("upstream"), item.get("repository_prefix"))
        entries.append(StoreEntry(item["host"].lower(), credential, *narrowing))
    return tuple(entries)


def _narrowing(upstream: str | None, repository_prefix: str | None) -> tuple[str | None, str | None]:
    """An entry's upstream and repository prefix as they are kept: the upstream lowercased, the prefix without the
    slashes around it."""
    return upstream.lower() if upstream else None, repository_prefix.strip("/") if repository_prefix else None


class OcigateStore(CredentialSource):
    """ocigate's own credentials: a JSON list of entries

        [{"host": "mirror.example:5000", "upstream": "docker.io", "repository_prefix": "library",
          "username": "u", "password": "p"}, {"host": "mirror.example:5000", "identity_token": "t"}]

    `host` (the host ocigate connects to, host[:port]) is required; `upstream` (the registry the repository belongs
    to, the `ns=` value) and `repository_prefix` (whole path segments) narrow the entry. The most specific entry that
    applies wins; among equals, the first in the file. Written atomically with mode 0600."""

    def __init__(self, path: Path | str) -> None:
        self._file: _WatchedFile[tuple[StoreEntry, ...]] = _WatchedFile(Path(path), _parse_store, ())
        self.description = f"ocigate credentials {self._file.path}"

    @property
    def path(self) -> Path:
        return self._file.path

    def entries(self) -> tuple[StoreEntry, ...]:
        return self._file.contents()

    async def locate(self, host: str, upstream: str, repository: str) -> tuple[Credential, str] | None:
        applicable = [e for e in self.entries() if e.applies_to(host, upstream, repository)]
        if not applicable:
            return None
        best = max(applicable, key=StoreEntry.specificity)  # max keeps the first of equals
        return best.credential, f"{self.description} (host {best.host})"

    def find(self, host: str, upstream: str, repository: str) -> list[Finding]:
        applicable = [e for e in self.entries() if e.applies_to(host, upstream, repository)]
        if not applicable:
            return []
        best = max(applicable, key=StoreEntry.specificity)
        key = ", ".join(
            f"{name} {value}"
            for name, value in (("host", best.host), ("upstream", best.upstream), ("prefix", best.repository_prefix))
            if value
        )
        user = f", user {best.credential.username!r}" if best.credential.username else ""
        return [Finding(f"{self.description} (entry {key}{user})")]

    def problems(self) -> list[FileProblem]:
        return _checked(self.path, _parse_store)[1]

    def save(
        self, host: str, credential: Credential, upstream: str | None = None, repository_prefix: str | None = None
    ) -> None:
        """Adds the entry, or replaces the one with the same host, upstream and prefix."""
        if not (credential.password or credential.identity_token or credential.registry_token):
            raise CredentialError(f"{self.path}: a credential for {host} needs a password or a token")
        entry = StoreEntry(host.lower(), credential, *_narrowing(upstream, repository_prefix))
        kept = [e for e in self._current_entries() if not self._same_key(e, entry)]
        self._write([*kept, entry])

    def remove(self, host: str, upstream: str | None = None, repository_prefix: str | None = None) -> bool:
        """Removes the entry with exactly this host, upstream and prefix; False if there was none."""
        key = StoreEntry(host.lower(), Credential(), *_narrowing(upstream, repository_prefix))
        entries = self._current_entries()
        kept = [e for e in entries if not self._same_key(e, key)]
        if len(kept) == len(entries):
            return False
        self._write(kept)
        return True

    @staticmethod
    def _same_key(a: StoreEntry, b: StoreEntry) -> bool:
        return (a.host, a.upstream, a.repository_prefix) == (b.host, b.upstream, b.repository_prefix)

    def _current_entries(self) -> list[StoreEntry]:
        """The file as it is now: a malformed file is not overwritten (its other entries would be lost)."""
        try:
            data = read_regular_file(self.path)
        except FileNotFoundError:
            return []
        except NotRegularFileError as e:
            raise CredentialError(f"{self.path} is {e}; not overwriting it") from None
        except OSError as e:
            raise CredentialError(f"{self.path}: cannot be read ({e.strerror})") from None
        try:
            return list(_parse_store(data))
        except _Malformed as e:
            raise CredentialError(f"{self.path} is malformed ({e}); not overwriting it") from None

    def _write(self, entries: Sequence[StoreEntry]) -> None:
        text = json.dumps([e.to_json() for e in entries], indent=2) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # mkstemp creates the file 0600 from the start: the secret is never readable by others, not even briefly.
        fd, temporary = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(temporary, 0o600)
            os.replace(temporary, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise


# --- the chain ----------------------------------------------------------------------------------------------------


class CredentialChain:
    """The sources in order; the first that has a credential wins. A CredentialError (a credential that is there but
    unusable, a helper that fails) stops the lookup: falling through to another source would hide it."""

    def __init__(self, sources: Sequence[CredentialSource]) -> None:
        self.sources = list(sources)

    async def lookup(self, host: str, upstream: str, repository: str) -> tuple[Credential, str] | None:
        for source in self.sources:
            found = await source.locate(host, upstream, repository)
            if found:
                return found
        return None

    def find(self, host: str, upstream: str, repository: str) -> list[Finding]:
        """Where `lookup` would look, in order, up to the first entry it would surely take (a helper may have none:
        what comes after it is listed too). Empty: anonymous. Runs no helper."""
        findings: list[Finding] = []
        for source in self.sources:
            findings += source.find(host, upstream, repository)
            if findings and not findings[-1].helper:
                break
        return findings
