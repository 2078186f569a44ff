"""`ocigate login` and `ocigate logout`: writing and removing entries of ocigate's own credentials store.

A login is tried before it is stored: the credential is sent to the host's /v2/ exactly as the gateway would send
it (the same Broker, the same `ns=` rule, the same host key), so a stored credential is one the gateway can use.
The secret comes from stdin or a prompt only: a flag value would end up in shell history and in `ps`.
"""

import argparse
import asyncio
import getpass
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .auth import AuthFailed, Broker
from .credentials import (
    DEFAULT_STORE_PATH,
    Credential,
    CredentialChain,
    CredentialError,
    CredentialSource,
    OcigateStore,
)
from .destinations import Destinations
from .hostclient import HostClient, HostFailed
from .hoststoml import CAPABILITIES, Host, HostURLError, parse_host_url
from .plan import Access, ping_target
from .routes import (
    DEFAULT_PORTS,
    DOCKER_HUB_ALIASES,
    DOCKER_HUB_SERVER,
    RouteError,
    normalize_upstream,
    validate_repository,
)


class LoginFailed(Exception):
    """The host did not accept the login, or could not be asked. The message never carries the secret."""


# --- what the command line names --------------------------------------------------------------------------------


def parse_host(text: str, *, ca_file: Path | None = None, insecure: bool = False) -> Host:
    """The host HOST names, exactly as a [host."HOST"] table of hosts.toml would: `host[:port]` is https, a URL may
    say http; a URL path is where the registry API lives below (/v2 appended as containerd does). Docker Hub's names
    are its registry host, since that is the host the gateway looks Docker Hub's credentials up for. Raises
    ValueError."""
    try:
        url = parse_host_url(text)
    except HostURLError as e:
        raise ValueError(f"HOST {text!r}: {e}") from None
    hostname = url.host
    if url.scheme == "https" and url.port == DEFAULT_PORTS["https"] and hostname in DOCKER_HUB_ALIASES:
        hostname = DOCKER_HUB_SERVER
    return Host(
        scheme=url.scheme,
        host=hostname,
        port=url.port,
        path=url.api_path(),
        capabilities=CAPABILITIES,
        ca=(ca_file,) if ca_file else (),
        skip_verify=insecure,
    )


def parse_namespace(text: str | None) -> str | None:
    """The upstream as the gateway names it (Docker Hub's aliases are docker.io, :443 is dropped)."""
    if text is None:
        return None
    try:
        return normalize_upstream(text.strip())
    except RouteError as e:
        raise ValueError(f"--namespace {text!r}: {e}") from None


def upstream_of(host: Host) -> str:
    """The registry a login without --namespace is for: the host itself, as an image reference names it."""
    try:
        return normalize_upstream(host.netloc)
    except RouteError as e:
        # hosts.toml allows names (with "_", say) that no image reference can carry: such a host is only a mirror.
        raise ValueError(
            f"HOST {host.netloc!r} names no registry an image could come from ({e}); give --namespace"
        ) from None


def parse_prefix(text: str | None) -> str | None:
    if text is None:
        return None
    prefix = text.strip().strip("/")
    try:
        validate_repository(prefix)
    except RouteError as e:
        raise ValueError(f"--repository {text!r}: {e}") from None
    return prefix


def describe(host_key: str, upstream: str | None, prefix: str | None) -> str:
    narrowing = [f"namespace {upstream}"] if upstream else []
    narrowing += [f"repository prefix {prefix}"] if prefix else []
    return f"{host_key} ({', '.join(narrowing)})" if narrowing else host_key


# --- the secret -------------------------------------------------------------------------------------------------


def read_credential(args: argparse.Namespace) -> tuple[Credential, str]:
    """The credential and where it came from (for messages). Raises LoginFailed."""
    username = args.username
    what = "identity token" if args.identity_token else "password"
    if args.password_stdin:
        source = "stdin"
        if username is None and not args.identity_token:
            # stdin is taken by the secret, so there is nothing left to prompt on.
            raise LoginFailed("--password-stdin needs --username (or --identity-token)")
        secret = sys.stdin.read()
        # One trailing newline is how `echo` and here-strings end the secret; anything else is part of it.
        secret = secret.removesuffix("\r\n") if secret.endswith("\r\n") else secret.removesuffix("\n")
    else:
        source = "the prompt"
        try:
            if username is None and not args.identity_token:
                username = input("Username: ").strip()
            secret = getpass.getpass(f"{what.capitalize()}: ")
        except EOFError:
            raise LoginFailed(f"no {what} given (end of input at the prompt)") from None
    if not args.identity_token and not username:
        raise LoginFailed("no username given")
    if username and ":" in username:
        raise LoginFailed("a username cannot contain ':' (HTTP Basic authentication could not carry it)")
    if not secret:
        raise LoginFailed(f"no {what} given ({source} was empty)")
    if args.identity_token:
        return Credential(username=username or None, identity_token=secret), source
    return Credential(username=username, password=secret), source


class _Given(CredentialSource):
    """The credential being logged in with, for every lookup: the broker asks a chain, this is its only link."""

    def __init__(self, credential: Credential, description: str) -> None:
        self.credential = credential
        self.description = description

    async def locate(self, host: str, upstream: str, repository: str) -> tuple[Credential, str] | None:
        return self.credential, self.description


# --- verification -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verified:
    challenged: bool  # False: the host answered without asking for credentials, so they were never tried
    target: str


async def verify(
    host: Host,
    upstream: str,
    prefix: str | None,
    credential: Credential,
    source: str,
    destinations: Destinations,
) -> Verified:
    """GET of the host's /v2/ (with ns= for a mirror) authenticated as the gateway would be. Raises LoginFailed."""
    client = HostClient(destinations)
    broker = Broker(client, CredentialChain([_Given(credential, source)]))
    target = ping_target(host, upstream)
    try:
        response, authorization = await broker.send(host, "GET", target, (), Access(upstream, prefix))
    except (AuthFailed, HostFailed) as e:
        raise LoginFailed(f"{host.netloc}: {e}" if host.netloc not in str(e) else str(e)) from None
    finally:
        await client.aclose()
    if 200 <= response.status < 300:
        return Verified(challenged=authorization.header is not None, target=target)
    if response.status in (401, 403):
        if authorization.header is None:
            raise LoginFailed(
                f"{host.netloc} answered HTTP {response.status} to GET {target} without a challenge ocigate can "
                "answer, so the credential was never sent"
            )
        who = f"the credential of {credential.username!r}" if credential.username else "the identity token"
        raise LoginFailed(f"{host.netloc} refused {who} (HTTP {response.status})")
    raise LoginFailed(f"{host.netloc} answered HTTP {response.status} to GET {target}; is it a registry?")


# --- commands ---------------------------------------------------------------------------------------------------


def _parser(command: str) -> argparse.ArgumentParser:
    if command == "login":
        description = (
            "Check a registry credential against HOST/v2/ and save it in ocigate's credentials file, for the "
            "gateway to authenticate with. The password or token is read from stdin (--password-stdin) or "
            "prompted for; it is never taken from an argument."
        )
    else:
        description = "Remove the entry saved by `ocigate login` with exactly this HOST, --namespace and --repository."
    # No abbreviations: `--password s3cret` must not pass as --password-stdin with the secret read as HOST.
    parser = argparse.ArgumentParser(prog=f"ocigate {command}", description=description, allow_abbrev=False)
    parser.add_argument(
        "host",
        metavar="HOST",
        help="the host ocigate connects to: host[:port] (https), or http://host:port or https://host[:port][/path]",
    )
    parser.add_argument(
        "--namespace",
        metavar="UPSTREAM",
        help="only for images of this upstream registry (the ns= a mirror is asked with, e.g. docker.io)",
    )
    parser.add_argument(
        "--repository",
        metavar="PREFIX",
        help="only for repositories under this prefix (whole path segments, e.g. library or team/app)",
    )
    parser.add_argument(
        "--credentials",
        metavar="FILE",
        type=Path,
        default=Path(DEFAULT_STORE_PATH),
        help=f"ocigate's credentials file (the gateway's ocigate_credentials; default {DEFAULT_STORE_PATH})",
    )
    if command == "logout":
        return parser
    parser.add_argument("-u", "--username", metavar="USER", help="the user name (prompted for when not given)")
    parser.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password (or token) from stdin, all of it, less one trailing newline",
    )
    parser.add_argument(
        "--identity-token",
        action="store_true",
        help="the secret is an OAuth2 identity (refresh) token, as docker's identitytoken; no username needed",
    )
    parser.add_argument(
        "--map-host",
        metavar="NAME[:PORT]=ADDRESS[:PORT]",
        action="append",
        default=[],
        help="dial NAME at ADDRESS instead of resolving it (as the gateway's ocigate_map_hosts); repeatable",
    )
    parser.add_argument("--ca-file", metavar="PEM", type=Path, help="also trust this CA for HOST")
    parser.add_argument("--insecure", action="store_true", help="do not verify HOST's TLS certificate")
    return parser


def _refuse_secret_arguments(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """docker login's -p/--password, refused before argparse sees them: its error would echo the value."""
    for arg in argv:
        if arg == "--":
            return
        if arg.startswith("-p") or (arg.startswith("--password") and arg != "--password-stdin"):
            parser.error(
                "a password is never taken from an argument (it would stay in shell history and ps); "
                "use --password-stdin or the prompt"
            )


def login(argv: Sequence[str]) -> int:
    parser = _parser("login")
    _refuse_secret_arguments(parser, argv)
    args = parser.parse_args(argv)
    try:
        host = parse_host(args.host, ca_file=args.ca_file, insecure=args.insecure)
        namespace = parse_namespace(args.namespace)
        prefix = parse_prefix(args.repository)
        upstream = namespace or upstream_of(host)
        destinations = Destinations.from_options(args.map_host, [], True)
    except ValueError as e:
        parser.error(str(e))
    store = OcigateStore(args.credentials.expanduser())
    what = describe(host.netloc, namespace, prefix)
    try:
        credential, source = read_credential(args)
        verified = asyncio.run(verify(host, upstream, prefix, credential, source, destinations))
        store.save(host.netloc, credential, namespace, prefix)
    except (LoginFailed, CredentialError) as e:
        print(f"ocigate login: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    if not verified.challenged:
        print(
            f"ocigate login: warning: {host.netloc} answered GET {verified.target} without asking for credentials, "
            "so the login could not be verified; saved anyway",
            file=sys.stderr,
        )
    print(f"Login succeeded: {what} saved in {store.path}")
    return 0


def logout(argv: Sequence[str]) -> int:
    parser = _parser("logout")
    args = parser.parse_args(argv)
    try:
        host = parse_host(args.host)
        namespace = parse_namespace(args.namespace)
        prefix = parse_prefix(args.repository)
    except ValueError as e:
        parser.error(str(e))
    store = OcigateStore(args.credentials.expanduser())
    what = describe(host.netloc, namespace, prefix)
    try:
        removed = store.remove(host.netloc, namespace, prefix)
        others = [e for e in store.entries() if e.host == host.netloc]
    except CredentialError as e:
        print(f"ocigate logout: {e}", file=sys.stderr)
        return 1
    if removed:
        print(f"Removed {what} from {store.path}")
        return 0
    message = f"ocigate logout: no credential stored for {what} in {store.path}"
    if others:
        # A near miss (say, saved with --namespace, removed without) is easier fixed when the keys are shown.
        message += "; stored for: " + "; ".join(describe(e.host, e.upstream, e.repository_prefix) for e in others)
    print(message, file=sys.stderr)
    return 1


def main(argv: Sequence[str]) -> int:
    """`argv` starts with the command: ["login", ...] or ["logout", ...]."""
    command, *rest = argv
    return login(rest) if command == "login" else logout(rest)
