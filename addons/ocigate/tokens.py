"""Authenticating to registries: WWW-Authenticate challenges, token requests and responses, and a token cache.

The parsing is pure; fetching a token goes through an injected `send`, so everything here is testable without a
server. The order of token requests follows containerd (core/remotes/docker/authorizer.go, doBearerAuth): with a
secret, an OAuth2 POST first and a GET with Basic credentials when the server does not do POST; without one, an
anonymous GET.

Secrets (passwords, identity tokens, bearer tokens) never appear in reprs, error messages or cache keys: a cache key
carries an HMAC of the credential under a key that lives only in this process.
"""

import asyncio
import base64
import json
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import cached_property
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from cachetools import TLRUCache

from .credentials import Credential
from .hoststoml import netloc, split_url
from .redaction import echo_forms
from .routes import DEFAULT_PORTS

# When a token response says nothing about its lifetime, the distribution token spec says 60 seconds.
DEFAULT_EXPIRES_IN = 60.0
# A cached token is dropped a little before it expires, so a request never sets out with a token that dies on the
# way: 10% of the lifetime it had left when it was cached, at most 30 s (a 60 s token is used for 54 s, a 1 h token
# for 59.5 min).
SAFETY_MARGIN_FRACTION = 0.1
SAFETY_MARGIN_CAP = 30.0
# Tokens cached (by realm, service, scopes and credential), the least recently used dropped first; each at most
# MAX_TOKEN_LENGTH characters, four times the longest header line nginx and Apache take by default, from a token
# response of at most MAX_TOKEN_RESPONSE bytes: the cache holds about 128 MiB at most, however big a realm's tokens are.
MAX_TOKENS = 4096
MAX_TOKEN_LENGTH = 32 * 1024
MAX_TOKEN_RESPONSE = 256 * 1024
# containerd sends "containerd-client"; servers use client_id only to tell clients apart.
DEFAULT_CLIENT_ID = "ocigate"
# Statuses of the OAuth2 POST after which the token endpoint is asked again with GET, as containerd does
# (authorizer.go): GCR answers 404, Artifactory 401, ACR 400; 405 only for the password grant.
_GET_FALLBACK_STATUSES = frozenset({400, 401, 404})
_GET_FALLBACK_STATUSES_FOR_PASSWORD = _GET_FALLBACK_STATUSES | {405}

# RFC 9110 tchar: what a scheme, a parameter name or an unquoted value may be made of.
_TCHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_WHITESPACE = " \t\r\n"
# RFC 9110 token68 (Basic's credentials form, Negotiate's blob), only when a comma or the end follows it.
_TOKEN68_PATTERN = re.compile(r"[A-Za-z0-9\-._~+/]+=*(?=[ \t\r\n]*(?:,|$))")
# A bearer token goes into an Authorization header: anything that could break the header line is refused.
_HEADER_SAFE_TOKEN_PATTERN = re.compile(r"[\x21-\x7e]+")
_MARKUP_START_PATTERN = re.compile(rb"<[!?/]?[A-Za-z][A-Za-z0-9-]{0,15}")
_RFC3339_PATTERN = re.compile(
    r"(?P<date>\d{4}-\d{2}-\d{2})[Tt ](?P<time>\d{2}:\d{2}:\d{2})(?:\.(?P<fraction>\d+))?(?P<zone>[Zz]|[+-]\d{2}:\d{2})"
)

# Cache keys carry the credential's keyed hash (Credential.identity), never the credential itself.
ANONYMOUS = "anonymous"


class TokenError(Exception):
    """A token could not be had. The message names the realm and what went wrong, and never carries a secret."""


# -- challenges --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lowercased: "basic", "bearer", or any other scheme a server offers
    params: dict[str, str] = field(default_factory=dict)  # names lowercased, values unquoted
    token68: str | None = None  # "Negotiate abc==" style; tolerated, not used


def _skip_whitespace(text: str, at: int) -> int:
    while at < len(text) and text[at] in _WHITESPACE:
        at += 1
    return at


def _read_token(text: str, at: int) -> tuple[str, int]:
    end = at
    while end < len(text) and text[end] in _TCHARS:
        end += 1
    return text[at:end], end


def _read_quoted(text: str, at: int) -> tuple[str, int]:
    """A quoted-string starting at text[at] == '"'. Unterminated, it runs to the end rather than being dropped."""
    value: list[str] = []
    at += 1
    while at < len(text):
        char = text[at]
        if char == '"':
            return "".join(value), at + 1
        if char == "\\" and at + 1 < len(text):
            at += 1
            char = text[at]
        value.append(char)
        at += 1
    return "".join(value), at


def _read_value(text: str, at: int) -> tuple[str, int]:
    if at < len(text) and text[at] == '"':
        return _read_quoted(text, at)
    # Unquoted values should be tokens, but realms like https://auth/token arrive unquoted from some servers.
    end = at
    while end < len(text) and text[end] != "," and text[end] not in _WHITESPACE:
        end += 1
    return text[at:end], end


def _parse_one_header(text: str) -> list[Challenge]:
    """RFC 9110 section 11.6.1: a comma-separated list of challenges, each a scheme followed by a token68 or by
    comma-separated name=value parameters. A token followed by "=" is a parameter of the current challenge, any
    other token starts a new challenge; characters that fit neither are skipped, so this never fails."""
    challenges: list[Challenge] = []
    current: Challenge | None = None
    at = 0
    while at < len(text):
        at = _skip_whitespace(text, at)
        if at < len(text) and text[at] == ",":
            at += 1
            continue
        if at >= len(text):
            break
        name, after_name = _read_token(text, at)
        if not name:
            # Not a token: skip a stray quoted-string whole (its commas are not separators), else one character.
            at = _read_quoted(text, at)[1] if text[at] == '"' else at + 1
            continue
        after_space = _skip_whitespace(text, after_name)
        if after_space < len(text) and text[after_space] == "=":
            value, at = _read_value(text, _skip_whitespace(text, after_space + 1))
            if current is not None and current.token68 is None:
                # Repeated names are invalid; the first one is kept so a later one cannot override the realm.
                current.params.setdefault(name.lower(), value)
            continue
        current = Challenge(name.lower(), {})
        challenges.append(current)
        at = after_space
        if after_space > after_name:  # a token68 only ever follows the scheme after a space
            token68 = _TOKEN68_PATTERN.match(text, after_space)
            if token68:
                current = Challenge(current.scheme, {}, token68.group())
                challenges[-1] = current
                at = token68.end()
    return challenges


def parse_challenges(values: Iterable[str]) -> list[Challenge]:
    """Every challenge in the WWW-Authenticate header values, in order. Never raises, whatever the input."""
    challenges: list[Challenge] = []
    for value in values:
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        challenges.extend(_parse_one_header(str(value)))
    return challenges


def preferred_challenge(challenges: Sequence[Challenge]) -> Challenge | None:
    """Bearer before Basic, as containerd ranks them (parse.go, byScheme); other schemes are not answered."""
    for scheme in ("bearer", "basic"):
        for challenge in challenges:
            if challenge.scheme == scheme:
                return challenge
    return None


# -- credentials and token requests ------------------------------------------------------------------------------


def credential_identity(credential: Credential | None) -> str:
    """An opaque name for a credential, to key cached tokens by: equal credentials give equal names, and every
    credential without a secret is the anonymous one."""
    if credential is None or not (credential.password or credential.identity_token):
        return ANONYMOUS
    return credential.identity()


def _without_userinfo(url: str) -> str:
    """A realm as it may be shown: a user:password@ in it would be a secret."""
    try:
        parts = urlsplit(url)
        if "@" in parts.netloc:
            return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
    except ValueError:
        return "<unparsable realm>"
    return url


@dataclass(frozen=True)
class RealmURL:
    """A token realm, or a token request's URL, that ocigate can dial: http or https, a host name or IP address, a
    port in 1-65535, and a path and query of visible ASCII. A realm's userinfo is not kept: ocigate never sends it,
    and it would be a secret in every message that shows the realm."""

    scheme: str  # "http" or "https"
    host: str  # lowercased; an IPv6 address without its brackets
    port: int
    path: str  # at least "/"
    query: str = ""

    @classmethod
    def parse(cls, text: str, what: str = "the bearer challenge's realm") -> "RealmURL":
        """The realm a challenge names (or the URL `what` says it is); TokenError naming what is wrong with it,
        whatever `text` is."""
        shown = _without_userinfo(text)

        def unusable(why: str) -> TokenError:
            return TokenError(f"{what} is not an http(s) URL ocigate can use ({why}): {shown!r}")

        # Nothing else belongs in a URL; anything else would also be dropped, or refused, on the way to the wire.
        if not all("!" <= char <= "~" for char in text):
            raise unusable("it has spaces, control characters or non-ASCII characters")
        try:
            parts, host, port = split_url(text)
        except ValueError as e:
            raise unusable(str(e)) from None
        scheme = parts.scheme.lower()
        if scheme not in DEFAULT_PORTS:
            raise unusable("not http or https")
        return cls(scheme, host, port or DEFAULT_PORTS[scheme], parts.path or "/", parts.query)

    @property
    def netloc(self) -> str:
        return netloc(self.scheme, self.host, self.port)

    @property
    def target(self) -> str:
        """The path and query, as the request line carries them."""
        return f"{self.path}?{self.query}" if self.query else self.path

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.netloc}{self.target}"


@dataclass(frozen=True)
class TokenRequest:
    realm: RealmURL
    service: str
    scopes: tuple[str, ...]  # sorted, no duplicates: equal needs give equal cache keys
    identity: str  # credential_identity() of the credential the token is fetched with

    @classmethod
    def for_challenge(
        cls, challenge: Challenge, required_scopes: Iterable[str], credential: Credential | None
    ) -> "TokenRequest":
        """The token a Bearer challenge asks for, covering the challenge's own scope and the ones the request
        needs (repository:<name>:pull, ...)."""
        if challenge.scheme != "bearer":
            raise TokenError(f"a {challenge.scheme!r} challenge is not answered with a token")
        text = challenge.params.get("realm", "")
        if not text:
            raise TokenError("the bearer challenge names no realm")
        realm = RealmURL.parse(text)
        # containerd splits the challenge's scope on spaces (fetch.go, GenerateTokenOptions).
        scopes = {scope for scope in challenge.params.get("scope", "").split(" ") if scope}
        scopes.update(scope for scope in required_scopes if scope)
        return cls(realm, challenge.params.get("service", ""), tuple(sorted(scopes)), credential_identity(credential))


# -- token responses ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Token:
    value: str = field(repr=False)
    expires_at: float  # seconds since the epoch, on the clock `now` came from

    @property
    def authorization(self) -> str:
        return f"Bearer {self.value}"

    @cached_property
    def echo_forms(self) -> tuple[bytes, ...]:
        """The forms in which a host could echo `authorization` (redaction.echo_forms), worked out once: a cached
        token goes with every request for its lifetime, and the forms live as long as the token does."""
        return echo_forms(self.authorization)


def _header(headers: Mapping[str, str], name: str) -> str:
    for key, value in headers.items():
        if key.lower() == name:
            return value
    return ""


def _describe_non_json(body: bytes) -> str:
    """What the body looks like, without quoting it: a server that is not a token endpoint may echo anything.
    Markup is named by its first tag, which is what tells a login page or a proxy's error page apart."""
    stripped = body.lstrip()
    markup = _MARKUP_START_PATTERN.match(stripped)
    if markup:
        return f"not JSON (starts with {markup.group().decode('ascii')!r})"
    return f"not JSON ({len(body)} bytes)"


def _parse_rfc3339(text: str) -> float | None:
    match = _RFC3339_PATTERN.fullmatch(text.strip())
    if not match:
        return None
    # Go writes nanoseconds; datetime takes at most microseconds.
    fraction = (match["fraction"] or "0")[:6]
    zone = "+00:00" if match["zone"] in ("Z", "z") else match["zone"]
    try:
        return datetime.fromisoformat(f"{match['date']}T{match['time']}.{fraction:0<6}{zone}").timestamp()
    except ValueError:
        return None


def _expires_in(document: dict[str, object]) -> float:
    value = document.get("expires_in")
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0 or value != value:
        return DEFAULT_EXPIRES_IN
    return min(float(value), 366 * 24 * 3600.0)  # an absurd lifetime must not overflow time arithmetic


def parse_token_response(status: int, headers: Mapping[str, str], body: bytes, realm: str, now: float) -> Token:
    """The token in a token endpoint's answer (GET: "token" or "access_token"; OAuth2 POST: "access_token").

    The token lives expires_in seconds (60 when absent) from issued_at. An issued_at that would make the token
    expire before now or live longer than expires_in from now means the two clocks disagree; then the response's
    arrival is the better start, since the server checks the token against its own clock."""
    shown = _without_userinfo(realm)
    # Only the media type, and not much of it: parameters and overlong values are the server's free text.
    content_type = _header(headers, "content-type").split(";")[0].strip()[:60] or "no content type"
    if not 200 <= status < 300:
        raise TokenError(f"token request to {shown} failed: HTTP {status} ({content_type})")
    if not body.strip():
        raise TokenError(f"token response from {shown} is empty (HTTP {status}, {content_type})")
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise TokenError(f"token response from {shown} is {_describe_non_json(body)}, {content_type}") from None
    if not isinstance(document, dict):
        raise TokenError(f"token response from {shown} is JSON but not an object ({content_type})")
    # access_token wins when both are there, as in containerd (fetch.go, FetchToken).
    value = document.get("access_token") or document.get("token")
    if not isinstance(value, str) or not value:
        raise TokenError(f"token response from {shown} has no token in the JSON")
    if not header_safe(value):
        raise TokenError(f"token response from {shown} has a token with characters an HTTP header cannot carry")
    if len(value) > MAX_TOKEN_LENGTH:
        raise TokenError(f"token response from {shown} has a token longer than {MAX_TOKEN_LENGTH} characters")
    expires_in = _expires_in(document)
    issued_at = document.get("issued_at")
    issued = _parse_rfc3339(issued_at) if isinstance(issued_at, str) else None
    expires_at = now + expires_in
    if issued is not None and now < issued + expires_in <= now + expires_in:
        expires_at = issued + expires_in
    return Token(value, expires_at)


def header_safe(value: str) -> bool:
    """Whether a token can go into an Authorization header as it is."""
    return bool(_HEADER_SAFE_TOKEN_PATTERN.fullmatch(value))


# -- cache -------------------------------------------------------------------------------------------------------


def usable_until(token: Token, now: float) -> float:
    """When a token cached at `now` stops being handed out: SAFETY_MARGIN before it expires."""
    remaining = token.expires_at - now
    return token.expires_at - min(max(remaining, 0.0) * SAFETY_MARGIN_FRACTION, SAFETY_MARGIN_CAP)


class TokenCache:
    """Tokens by TokenRequest, each until usable_until(). Concurrent callers needing the same token share one fetch;
    a failed fetch fails every caller waiting for it and leaves nothing cached, so the next caller fetches again."""

    def __init__(self, maxsize: int = MAX_TOKENS, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._tokens: TLRUCache[TokenRequest, Token] = TLRUCache(
            maxsize, ttu=lambda _request, token, now: usable_until(token, now), timer=clock
        )
        self._fetches: dict[TokenRequest, asyncio.Task[Token]] = {}

    def get(self, request: TokenRequest) -> Token | None:
        return self._tokens.get(request)

    def put(self, request: TokenRequest, token: Token) -> None:
        if usable_until(token, self._clock()) > self._clock():
            self._tokens[request] = token
        else:
            self._tokens.pop(request, None)

    def drop(self, request: TokenRequest, token: Token | None = None) -> None:
        """Forget a token the registry refused (a 401 with it). Given the refused token, a newer one that another
        request has fetched meanwhile is kept."""
        if token is None or self._tokens.get(request) is token:
            self._tokens.pop(request, None)

    def __len__(self) -> int:
        return len(self._tokens)

    async def get_or_fetch(self, request: TokenRequest, fetch: Callable[[], Awaitable[Token]]) -> Token:
        token = self._tokens.get(request)
        if token is not None:
            return token
        task = self._fetches.get(request)
        if task is None:
            # The fetch runs as its own task: a caller that is cancelled does not cancel it for the others.
            task = asyncio.ensure_future(self._fetch_and_keep(request, fetch))
            task.add_done_callback(_consume_exception)
            self._fetches[request] = task
        return await asyncio.shield(task)

    async def _fetch_and_keep(self, request: TokenRequest, fetch: Callable[[], Awaitable[Token]]) -> Token:
        try:
            token = await fetch()
            self.put(request, token)
            return token
        finally:
            self._fetches.pop(request, None)


def _consume_exception(task: "asyncio.Task[Token]") -> None:
    # Every waiter sees the exception; this keeps asyncio from reporting it as never retrieved when all left.
    if not task.cancelled():
        task.exception()


# -- fetching ----------------------------------------------------------------------------------------------------

Send = Callable[[str, RealmURL, dict[str, str], bytes | None], Awaitable[tuple[int, Mapping[str, str], bytes]]]


def basic_authorization(username: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{secret}".encode()).decode("ascii")


def token_get_url(request: TokenRequest) -> RealmURL:
    """realm?service=...&scope=...&scope=..., keeping any query the realm already has (fetch.go, FetchToken)."""
    query = parse_qsl(request.realm.query, keep_blank_values=True)
    if request.service:
        query.append(("service", request.service))
    query.extend(("scope", scope) for scope in request.scopes)
    return replace(request.realm, query=urlencode(query))


def oauth_form(request: TokenRequest, credential: Credential, client_id: str) -> bytes:
    """The OAuth2 POST body (fetch.go, FetchTokenWithOAuth): an identity token is a refresh_token grant,
    a password a password grant."""
    form = []
    if request.scopes:
        form.append(("scope", " ".join(request.scopes)))
    form += [("service", request.service), ("client_id", client_id)]
    if credential.identity_token:
        form += [("grant_type", "refresh_token"), ("refresh_token", credential.identity_token)]
    else:
        form += [
            ("grant_type", "password"),
            ("username", credential.username or ""),
            ("password", credential.password or ""),
        ]
    return urlencode(form).encode("ascii")


async def fetch_token(
    request: TokenRequest,
    credential: Credential | None,
    send: Send,
    *,
    client_id: str = DEFAULT_CLIENT_ID,
    clock: Callable[[], float] = time.time,
) -> Token:
    """One token from the realm, in containerd's order (authorizer.go, doBearerAuth):

    - with a secret (an identity token, else a password): OAuth2 POST; when the server answers 400, 401 or 404
      (or 405 to a password grant), GET with Basic credentials, the identity token as the password with an empty
      username, as containerd does;
    - without: an anonymous GET, with no Authorization header at all.
    """
    if request.identity != credential_identity(credential):
        # A token fetched with one credential and cached under another's key would be handed to the wrong client.
        raise ValueError("the credential is not the one the token request was made for")
    secret = ""
    username = ""
    if credential is not None:
        secret = credential.identity_token or credential.password or ""
        username = "" if credential.identity_token else credential.username or ""
    accept = {"Accept": "application/json"}
    if credential is not None and secret:
        status, headers, body = await send(
            "POST",
            request.realm,
            {**accept, "Content-Type": "application/x-www-form-urlencoded; charset=utf-8"},
            oauth_form(request, credential, client_id),
        )
        fallback = _GET_FALLBACK_STATUSES if credential.identity_token else _GET_FALLBACK_STATUSES_FOR_PASSWORD
        if status not in fallback:
            return parse_token_response(status, headers, body, request.realm.url, clock())
        get_headers = {**accept, "Authorization": basic_authorization(username, secret)}
    else:
        get_headers = accept
    status, headers, body = await send("GET", token_get_url(request), get_headers, None)
    return parse_token_response(status, headers, body, request.realm.url, clock())
