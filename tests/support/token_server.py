"""A token server (Docker/distribution token auth) for tests: it runs in the test process on 127.0.0.1.

Facts about distribution 2.8.2's token auth (`auth: token:` in its config) this module relies on, read in
registry/auth/token of v2.8.2 and checked against Debian's docker-registry binary:

- Its config needs realm, service, issuer and rootcertbundle; it refuses to start unless the bundle holds
  at least one PEM certificate. The challenge is `Bearer realm="<realm>",service="<service>"`, followed by
  `,scope="repository:<name>:<actions>"` when the request needs access to a resource and by
  `,error="invalid_token"` (bad token) or `,error="insufficient_scope"` (valid token, too little access).
- A token is checked in this order: `iss` equals the configured issuer, `aud` equals the service (`aud`
  must be a JSON string: 2.8 unmarshals it into a string, so a list makes the token malformed), the time,
  then the signing key. The key comes from the header's `x5c` (base64 DER, leaf first, verified against
  the bundle's certificates with any key usage; a self-signed leaf that is itself in the bundle passes),
  else `jwk`, else `kid` (a libtrust key id of a bundle certificate's key). The signature is libtrust's
  JWS check, so ES256 means the raw 64-byte r||s.
- `exp` and `nbf` are whole Unix seconds and get 60 s of leeway each way (token.Leeway): a token is
  refused only when now > exp + 60. A short-lived token would therefore outlive its `expires_in` by a
  minute. So the server writes `exp` = issued + lifetime - `registry_leeway` (60 by default), rounded
  up to a whole second: the registry accepts the token for at least `expires_in` from `issued_at` and
  refuses it less than 1 s later. A JWT whose `exp` precedes its `iat` does not trouble distribution,
  which does not look at `iat`.
- A request is allowed when every access it needs, (type, name, action), is in the token's `access`
  claim; `sub` is only the user name the registry logs.

The token endpoint side follows https://distribution.github.io/distribution/spec/auth/token/ (GET with
Basic or no credentials; repeated `scope` parameters; `offline_token=true` asks for a refresh token) and
https://distribution.github.io/distribution/spec/auth/oauth/ (POST form with grant_type password or
refresh_token, space-separated `scope`, `access_type=offline` asks for a refresh token). Go clients
(docker, containerd) read `expires_in` into an int, so it is sent as one whenever the lifetime is whole.
Each request is recorded before its response is written, so a test holding the response finds the record.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime
import fnmatch
import hmac
import json
import math
import secrets
import threading
import time
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from .tls import make_ca

# An account's allowed access: resource pattern -> actions ("*" allows any action). A pattern without ":" is
# an fnmatch glob over repository names; "<type>:<glob>" (e.g. "registry:catalog") covers other types.
AccessPolicy = Mapping[str, Iterable[str]]
# account name (None: anonymous) -> its policy
Access = Mapping[str | None, AccessPolicy]

DEFAULT_SERVICE = "ocigate-test-registry"
DEFAULT_ISSUER = "ocigate-test-token-server"
DISTRIBUTION_LEEWAY = 60.0  # token.Leeway in distribution 2.8
_REALM_PATH = "/token"
_MAX_FORM_BYTES = 64 * 1024
# A client that opens a connection and sends nothing must not hold a handler thread for ever.
_CLIENT_TIMEOUT = 10.0
_SHUTDOWN_TIMEOUT = 5.0
# Every named account may do anything unless the test says otherwise; anonymous gets nothing.
_EVERYTHING: AccessPolicy = {"*:*": ["*"]}


@dataclass(frozen=True)
class TokenRequest:
    """One request the token server received, whatever its outcome."""

    method: str  # GET or POST (anything else is recorded too, and answered 405)
    path: str
    account: str | None  # who it authenticated as, or claimed to be when refused; None: anonymous
    service: str | None
    scopes: tuple[str, ...]  # as requested, in order
    grant_type: str | None  # POST only
    client_id: str | None
    status: int
    granted: tuple[str, ...] = ()  # the token's access as scope strings, e.g. "repository:team/app:pull"


@dataclass
class TokenServer:
    host: str
    port: int
    service: str
    issuer: str
    rootcertbundle: Path
    accounts: dict[str, str]
    # None: every named account may do anything, anonymous nothing.
    access: Access | None
    identity_tokens: dict[str, str]  # refresh token -> account; refresh tokens the server issues are added
    lifetime: float  # seconds; read per request, so a test may change it while the server runs
    oauth_post: bool  # False: POST answers 404 (like GCR), so clients fall back to GET
    registry_leeway: float  # subtracted from `exp`: see the module docstring
    _key: ec.EllipticCurvePrivateKey = field(repr=False)
    _x5c: list[str] = field(repr=False)  # the signing certificate, base64 DER, for the JWT header
    _requests: list[TokenRequest] = field(default_factory=list, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def realm(self) -> str:
        return f"{self.url}{_REALM_PATH}"

    @property
    def requests(self) -> list[TokenRequest]:
        """A snapshot: later requests do not change a list already returned."""
        with self._lock:
            return list(self._requests)

    def clear(self) -> None:
        with self._lock:
            self._requests.clear()

    def registry_auth_config(self) -> dict[str, Any]:
        """The `extra_config` for running_registry that makes the registry trust this server's tokens."""
        return {
            "auth": {
                "token": {
                    "realm": self.realm,
                    "service": self.service,
                    "issuer": self.issuer,
                    "rootcertbundle": str(self.rootcertbundle),
                }
            }
        }

    def grant(self, account: str | None, scopes: Iterable[str]) -> list[dict[str, Any]]:
        """The `access` claim for `account` asking for `scopes`: requested actions that its policy allows."""
        policy = self._policy(account)
        granted: list[dict[str, Any]] = []
        for scope in scopes:
            parsed = _parse_scope(scope)
            if parsed is None:
                continue
            resource_type, name, actions = parsed
            allowed = _allowed_actions(policy, resource_type, name)
            given = [action for action in actions if "*" in allowed or action in allowed]
            if given:
                granted.append({"type": resource_type, "name": name, "actions": given})
        return granted

    def mint(
        self,
        subject: str | None,
        access: list[dict[str, Any]],
        *,
        lifetime: float | None = None,
        issued_at: float | None = None,
        audience: str | None = None,
        issuer: str | None = None,
    ) -> str:
        """A signed JWT, as the endpoint issues them; the keywords let a test make expired or foreign tokens."""
        issued = time.time() if issued_at is None else issued_at
        lifetime = self.lifetime if lifetime is None else lifetime
        claims = {
            "iss": self.issuer if issuer is None else issuer,
            "sub": subject or "",
            "aud": self.service if audience is None else audience,
            # Rounded up, so the token never dies before the expires_in the client was told.
            "exp": math.ceil(issued + lifetime - self.registry_leeway),
            "nbf": math.floor(issued),
            "iat": math.floor(issued),
            "jti": secrets.token_hex(16),
            "access": access,
        }
        header = {"typ": "JWT", "alg": "ES256", "x5c": self._x5c}
        signing_input = f"{_b64url(_compact_json(header))}.{_b64url(_compact_json(claims))}"
        r, s = decode_dss_signature(self._key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        return f"{signing_input}.{_b64url(signature)}"

    def _policy(self, account: str | None) -> AccessPolicy:
        if self.access is None:
            return _EVERYTHING if account is not None else {}
        return self.access.get(account, {})

    def _record(self, request: TokenRequest) -> None:
        with self._lock:
            self._requests.append(request)

    def _check_password(self, username: str, password: str) -> bool:
        expected = self.accounts.get(username)
        return expected is not None and hmac.compare_digest(expected.encode(), password.encode())

    def _issue_refresh_token(self, account: str) -> str:
        token = secrets.token_urlsafe(24)
        with self._lock:
            self.identity_tokens[token] = account
        return token

    def _refresh_account(self, token: str) -> str | None:
        with self._lock:
            return self.identity_tokens.get(token)


def _compact_json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _parse_scope(scope: str) -> tuple[str, str, list[str]] | None:
    """(type, name, actions) of `type:name:actions`; a name may hold colons (e.g. a host:port prefix)."""
    parts = scope.split(":")
    if len(parts) < 3:
        return None
    resource_type, name = parts[0], ":".join(parts[1:-1])
    actions = [action for action in parts[-1].split(",") if action]
    if not resource_type or not name:
        return None
    return resource_type, name, actions


def _allowed_actions(policy: AccessPolicy, resource_type: str, name: str) -> set[str]:
    # A resource class ("repository(plugin)") does not change what the policy allows.
    base_type = resource_type.split("(", 1)[0]
    allowed: set[str] = set()
    for pattern, actions in policy.items():
        pattern_type, _, glob = pattern.partition(":") if ":" in pattern else ("repository", "", pattern)
        if fnmatch.fnmatchcase(base_type, pattern_type) and fnmatch.fnmatchcase(name, glob):
            allowed.update(actions)
    return allowed


def _expires_in(lifetime: float) -> float | int:
    return int(lifetime) if float(lifetime).is_integer() else lifetime


def _rfc3339(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class _Refused(Exception):
    def __init__(self, status: int, body: dict[str, Any], account: str | None) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.account = account


def _registry_error(message: str) -> dict[str, Any]:
    return {"errors": [{"code": "UNAUTHORIZED", "message": message, "detail": None}]}


def _oauth_error(error: str, description: str) -> dict[str, Any]:
    return {"error": error, "error_description": description}


class _TokenHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    token_server: TokenServer


class _TokenHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = _CLIENT_TIMEOUT
    server: _TokenHTTPServer

    def log_message(self, format: str, *args: object) -> None:
        pass  # the record is the log; stderr noise would only clutter pytest's output

    def do_GET(self) -> None:
        target = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(target.query, keep_blank_values=True)
        service = _first(query, "service")
        scopes = tuple(query.get("scope", []))
        client_id = _first(query, "client_id")
        account: str | None = None
        if target.path != _REALM_PATH:
            self._finish(404, _registry_error("not found"), account, service, scopes, None, client_id)
            return
        try:
            account = self._basic_account()
        except _Refused as refused:
            self._finish(refused.status, refused.body, refused.account, service, scopes, None, client_id)
            return
        refresh_token = None
        if account is not None and _first(query, "offline_token") == "true":
            refresh_token = self.server.token_server._issue_refresh_token(account)
        self._answer_token(account, service, scopes, None, client_id, refresh_token, oauth=False)

    def do_POST(self) -> None:
        server = self.server.token_server
        target = urllib.parse.urlsplit(self.path)
        try:
            form = self._read_form()
        except _Refused as refused:
            self._finish(refused.status, refused.body, None, None, (), None, None)
            return
        service = _first(form, "service")
        scopes = tuple(" ".join(form.get("scope", [])).split())
        grant_type = _first(form, "grant_type")
        client_id = _first(form, "client_id")
        if target.path != _REALM_PATH or not server.oauth_post:
            self._finish(404, _registry_error("not found"), None, service, scopes, grant_type, client_id)
            return
        offline = _first(form, "access_type") == "offline"
        refresh_token: str | None = None
        if grant_type == "password":
            username = _first(form, "username") or ""
            if not server._check_password(username, _first(form, "password") or ""):
                body = _oauth_error("invalid_grant", "incorrect username or password")
                self._finish(401, body, username, service, scopes, grant_type, client_id)
                return
            account = username
            refresh_token = server._issue_refresh_token(account) if offline else None
        elif grant_type == "refresh_token":
            presented = _first(form, "refresh_token") or ""
            found = server._refresh_account(presented)
            if found is None:
                body = _oauth_error("invalid_grant", "unknown refresh token")
                self._finish(401, body, None, service, scopes, grant_type, client_id)
                return
            account = found
            refresh_token = presented if offline else None
        else:
            body = _oauth_error("unsupported_grant_type", f"grant_type {grant_type!r} is not supported")
            self._finish(400, body, None, service, scopes, grant_type, client_id)
            return
        self._answer_token(account, service, scopes, grant_type, client_id, refresh_token, oauth=True)

    def _other_method(self) -> None:
        self._finish(405, _registry_error("method not allowed"), None, None, (), None, None)

    do_PUT = do_DELETE = do_PATCH = do_HEAD = _other_method

    def _basic_account(self) -> str | None:
        """The account the Authorization header proves, None without one; raises _Refused when it proves none."""
        header = self.headers.get("Authorization")
        if header is None:
            return None
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() != "basic":
            raise _Refused(401, _registry_error(f"unsupported authorization scheme {scheme!r}"), None)
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise _Refused(401, _registry_error("malformed basic credentials"), None) from None
        username, _, password = decoded.partition(":")
        if not self.server.token_server._check_password(username, password):
            raise _Refused(401, _registry_error("incorrect username or password"), username)
        return username

    def _read_form(self) -> dict[str, list[str]]:
        try:
            length = int(self.headers.get("Content-Length") or "0")
        except ValueError:
            length = -1
        if not 0 <= length <= _MAX_FORM_BYTES:
            self.close_connection = True
            raise _Refused(400, _oauth_error("invalid_request", "bad Content-Length"), None)
        body = self.rfile.read(length).decode("utf-8", errors="replace")
        return urllib.parse.parse_qs(body, keep_blank_values=True)

    def _answer_token(
        self,
        account: str | None,
        service: str | None,
        scopes: tuple[str, ...],
        grant_type: str | None,
        client_id: str | None,
        refresh_token: str | None,
        *,
        oauth: bool,
    ) -> None:
        server = self.server.token_server
        lifetime = server.lifetime
        issued = time.time()
        access = server.grant(account, scopes)
        token = server.mint(account, access, lifetime=lifetime, issued_at=issued)
        body: dict[str, Any] = {
            "token": token,
            "access_token": token,
            "expires_in": _expires_in(lifetime),
            "issued_at": _rfc3339(issued),
        }
        if oauth:
            body["scope"] = " ".join(scopes)
        if refresh_token is not None:
            body["refresh_token"] = refresh_token
        granted = tuple(f"{item['type']}:{item['name']}:{','.join(item['actions'])}" for item in access)
        self._finish(200, body, account, service, scopes, grant_type, client_id, granted)

    def _finish(
        self,
        status: int,
        body: dict[str, Any],
        account: str | None,
        service: str | None,
        scopes: tuple[str, ...],
        grant_type: str | None,
        client_id: str | None,
        granted: tuple[str, ...] = (),
    ) -> None:
        self.server.token_server._record(
            TokenRequest(
                method=self.command,
                path=urllib.parse.urlsplit(self.path).path,
                account=account,
                service=service,
                scopes=scopes,
                grant_type=grant_type,
                client_id=client_id,
                status=status,
                granted=granted,
            )
        )
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        # One request per connection: no idle keep-alive connection outlives the server.
        self.send_header("Connection", "close")
        self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)


def _first(values: Mapping[str, list[str]], name: str) -> str | None:
    found = values.get(name)
    return found[0] if found else None


def _signing_identity(workdir: Path) -> tuple[ec.EllipticCurvePrivateKey, Path, list[str]]:
    """A throwaway P-256 key and its self-signed certificate: the bundle file, and the header's x5c."""
    signer = make_ca(workdir / "token-signer", common_name="ocigate test token signer")
    der = signer.certificate.public_bytes(serialization.Encoding.DER)
    return signer.private_key, signer.cert_path, [base64.b64encode(der).decode()]


@contextlib.contextmanager
def running_token_server(
    workdir: Path,
    accounts: Mapping[str, str],
    *,
    access: Access | None = None,
    lifetime: float = 300,
    identity_tokens: Mapping[str, str] | None = None,
    oauth_post: bool = True,
    service: str = DEFAULT_SERVICE,
    issuer: str = DEFAULT_ISSUER,
    registry_leeway: float = DISTRIBUTION_LEEWAY,
) -> Iterator[TokenServer]:
    """Serve a token endpoint at `<url>/token` on 127.0.0.1 (free port) until the block ends.

    `accounts` maps user names to passwords. `access` maps an account (None: anonymous) to its policy,
    e.g. {"alice": {"team/*": ["pull"]}, None: {"public/*": ["pull"]}}; a token grants the requested
    actions the policy allows, and an account without a policy gets a token with an empty access list.
    Without `access`, named accounts may do anything and anonymous nothing. `identity_tokens` maps
    refresh tokens to accounts. The signing certificate goes to `workdir`/token-signer/ca.pem
    (`rootcertbundle`). `registry_leeway`: see the module docstring; 0 writes the true expiry into `exp`.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    key, bundle, x5c = _signing_identity(workdir)
    http_server = _TokenHTTPServer(("127.0.0.1", 0), _TokenHandler)
    host, port = http_server.server_address[:2]
    server = TokenServer(
        host=str(host),
        port=int(port),
        service=service,
        issuer=issuer,
        rootcertbundle=bundle,
        accounts=dict(accounts),
        access=access,
        identity_tokens=dict(identity_tokens or {}),
        lifetime=lifetime,
        oauth_post=oauth_post,
        registry_leeway=registry_leeway,
        _key=key,
        _x5c=x5c,
    )
    http_server.token_server = server
    serving = threading.Thread(target=http_server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    serving.start()
    try:
        yield server
    finally:
        http_server.shutdown()
        http_server.server_close()
        serving.join(timeout=_SHUTDOWN_TIMEOUT)
