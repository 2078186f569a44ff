"""ocigate authenticating to hosts itself: the credential for each host, upstream and repository, and the token
broker that turns a host's challenge into one token fetch per scope and identity for the token's lifetime.

Per host (its hosts.toml URL) the broker remembers the challenge it last answered with a 401, without the
challenge's scope, so that later requests carry their Authorization up front; a host that once answered without a
challenge is remembered as open. A 401 to a request sent with a cached token drops that token and the request is
tried once more with a fresh one.

Which credential goes where: a host's own credential (looked up for that host, the upstream and the repository)
goes to that host and its token realm only. A redirect ocigate follows itself (of a manifest, say) keeps the
Authorization on the same host and drops it for any other, so no Authorization it adds ever reaches another host.
"""

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from cachetools import LRUCache

from .credentials import Credential, CredentialChain, CredentialError
from .headers import Lines
from .hostclient import HostClient, HostFailed, HostResponse
from .hoststoml import Host
from .plan import Access, is_proxy_for
from .redaction import echo_forms
from .tokens import (
    MAX_TOKEN_RESPONSE,
    Challenge,
    RealmURL,
    Token,
    TokenCache,
    TokenError,
    TokenRequest,
    basic_authorization,
    fetch_token,
    header_safe,
    parse_challenges,
    preferred_challenge,
)

# Hosts whose challenge (or openness) is remembered, the least recently asked forgotten first: far more than rules
# name, and a forgotten host costs one 401 more.
MAX_KNOWN_HOSTS = 1024


class AuthFailed(Exception):
    """No Authorization could be made for a host: no usable token, or a credential that cannot be used. The message
    names the host and where the credential came from, never a secret."""


@dataclass(frozen=True)
class Authorization:
    """The Authorization one request carries, and what it was made from (for dropping a refused token and for
    naming the credential when a host refuses it)."""

    header: str | None = field(default=None, repr=False)  # the secret: never logged, never kept in flow metadata
    credential_source: str | None = None  # where the credential came from; None for an anonymous request
    username: str | None = None
    token_request: TokenRequest | None = None
    token: Token | None = None
    # Where the token came from: "cached" (the token cache had it) or "fetched" (from the token endpoint, by this
    # request or one it waited for); None without a token.
    token_source: str | None = None

    def describe(self) -> str:
        """What was presented, in words fit for a log line or the client's error."""
        if self.credential_source is None:
            return "anonymously" if self.header else "without credentials"
        who = f" of {self.username!r}" if self.username else ""
        return f"with the credential{who} from {self.credential_source}"

    def credential(self) -> str | None:
        """Which credential was used, by its source and user, never its value; None when none was."""
        if self.credential_source is None:
            return None
        return f"{self.username!r} from {self.credential_source}" if self.username else self.credential_source

    def lines(self) -> Lines:
        return ((b"Authorization", self.header.encode()),) if self.header else ()

    def echo_forms(self) -> tuple[bytes, ...]:
        """The forms in which a host could echo `header` (redaction.echo_forms); a token's are the token's own, when
        `header` is the token's."""
        if self.token is not None and self.header == self.token.authorization:
            return self.token.echo_forms
        return echo_forms(self.header)


_ANONYMOUS = Authorization()
# The challenge of a host known to answer without one.
_OPEN = Challenge("none")


def _host_key(host: Host) -> str:
    return host.url


def _without_scope(challenge: Challenge) -> Challenge:
    return replace(challenge, params={k: v for k, v in challenge.params.items() if k != "scope"})


def challenge_of(response: HostResponse) -> Challenge | None:
    """The challenge of a 401 that ocigate can answer (Bearer before Basic), or None."""
    values = [v.decode("latin-1") for k, v in response.headers if k.lower() == b"www-authenticate"]
    return preferred_challenge(parse_challenges(values))


class Broker:
    """Authenticates ocigate's requests to hosts, sent through `hostclient`. `credentials` is the chain to look
    credentials up in (None: every request is anonymous)."""

    def __init__(
        self,
        hostclient: HostClient,
        credentials: CredentialChain | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.hostclient = hostclient
        self.credentials = credentials
        self.tokens = TokenCache(clock=clock)
        self._clock = clock
        self._challenges: LRUCache[str, Challenge] = LRUCache(MAX_KNOWN_HOSTS)

    def with_client(self, hostclient: HostClient) -> "Broker":
        """This broker's credentials, tokens and what hosts asked for, sending through another host client (its
        dialling or timeouts changed, not the rules, the trust or the credentials)."""
        broker = Broker(hostclient, self.credentials, clock=self._clock)
        broker.tokens, broker._challenges = self.tokens, self._challenges
        return broker

    def knows(self, host: Host) -> bool:
        return _host_key(host) in self._challenges

    def learn(self, host: Host, response: HostResponse) -> Challenge | None:
        """Remembers what a host's answer says about its authentication; returns the challenge of a 401."""
        if response.status == 401:
            challenge = challenge_of(response)
            if challenge is not None:
                self._challenges[_host_key(host)] = _without_scope(challenge)
            return challenge
        if 200 <= response.status < 300:
            self._challenges.setdefault(_host_key(host), _OPEN)
        return None

    async def _credential(self, host: Host, access: Access) -> tuple[Credential, str] | None:
        if self.credentials is None:
            return None
        try:
            return await self.credentials.lookup(host.netloc, access.upstream, access.repository or "")
        except CredentialError as e:
            raise AuthFailed(f"credentials for {host.netloc}: {e}") from None

    async def authorize(self, host: Host, access: Access, challenge: Challenge | None = None) -> Authorization:
        """The Authorization for a request to `host` answering `challenge` (by default the one the host is known to
        ask). Nothing when the host asks for nothing that ocigate knows of."""
        challenge = challenge or self._challenges.get(_host_key(host))
        if challenge is None or challenge is _OPEN:
            return _ANONYMOUS
        found = await self._credential(host, access)
        credential, source = found if found else (None, None)
        if credential is not None and credential.registry_token:
            # docker's `registrytoken`: a bearer token issued out of band, sent as it is.
            if not header_safe(credential.registry_token):
                raise AuthFailed(f"the registry token from {source} has characters an HTTP header cannot carry")
            return Authorization(f"Bearer {credential.registry_token}", source, credential.username)
        if challenge.scheme == "basic":
            if credential is None:
                return _ANONYMOUS
            secret = credential.password or credential.identity_token or ""
            return Authorization(basic_authorization(credential.username or "", secret), source, credential.username)
        try:
            request = TokenRequest.for_challenge(challenge, access.scopes, credential)
            realm = request.realm
            if access.offline and not is_proxy_for(
                self.hostclient.realm_host(realm.scheme, realm.host, realm.port), access.upstream
            ):
                raise TokenError(
                    f"its realm {realm.netloc} is {access.upstream} itself, which its offline rule never contacts"
                )

            async def fetch() -> Token:
                return await fetch_token(request, credential, self._send_token_request, clock=self._clock)

            # Asked before the fetch, with nothing awaited in between: what the cache held is what was used.
            cached = self.tokens.get(request) is not None
            token = await self.tokens.get_or_fetch(request, fetch)
        except TokenError as e:
            with_what = Authorization("", source, credential.username if credential else None).describe()
            raise AuthFailed(f"no token for {host.netloc} {with_what}: {e}") from None
        username = credential.username if credential else None
        return Authorization(token.authorization, source, username, request, token, "cached" if cached else "fetched")

    async def prepare(self, host: Host, ping_target: str) -> None:
        """Learns what `host` asks for before a request ocigate cannot retry (a streamed one): a GET of its /v2/."""
        if self.knows(host):
            return
        try:
            response = await self.hostclient.send(host, "GET", ping_target, ())
        except HostFailed:
            return  # the request itself will find out and say so
        self.learn(host, response)

    def refused(self, authorization: Authorization) -> None:
        """The host answered 401 to this Authorization: its token is not handed out again."""
        if authorization.token_request is not None:
            self.tokens.drop(authorization.token_request, authorization.token)

    async def send(
        self, host: Host, method: str, target: str, headers: Lines, access: Access
    ) -> tuple[HostResponse, Authorization]:
        """Sends a request authenticated as ocigate: with the Authorization the host is known to want, and on a 401
        once more with one answering its challenge (a fresh token when the refused one was cached)."""
        authorization = await self.authorize(host, access)
        response = await self.hostclient.send(host, method, target, headers + authorization.lines())
        challenge = self.learn(host, response)
        if response.status != 401 or challenge is None:
            return response, authorization
        self.refused(authorization)
        retry = await self.authorize(host, access, challenge)
        if retry.header is None or retry.header == authorization.header:
            return response, authorization
        response = await self.hostclient.send(host, method, target, headers + retry.lines())
        if response.status == 401:
            self.refused(retry)
        return response, retry

    async def _send_token_request(
        self, method: str, url: RealmURL, headers: dict[str, str], body: bytes | None
    ) -> tuple[int, Mapping[str, str], bytes]:
        host = self.hostclient.realm_host(url.scheme, url.host, url.port)
        lines = tuple((k.encode(), v.encode()) for k, v in headers.items())
        try:
            response = await self.hostclient.send(host, method, url.target, lines, MAX_TOKEN_RESPONSE, body)
        except HostFailed as e:
            raise TokenError(f"token request to {host.url} failed: {e}") from None
        answer = {k.decode("latin-1"): v.decode("latin-1") for k, v in response.headers}
        return response.status, answer, response.body
