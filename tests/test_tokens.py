import asyncio
import base64
import ipaddress
import json
import re
import string
from urllib.parse import parse_qs, parse_qsl, urlsplit

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ocigate.credentials import Credential
from ocigate.tokens import (
    ANONYMOUS,
    DEFAULT_EXPIRES_IN,
    MAX_TOKEN_LENGTH,
    MAX_TOKENS,
    Challenge,
    RealmURL,
    Token,
    TokenCache,
    TokenError,
    TokenRequest,
    credential_identity,
    fetch_token,
    parse_challenges,
    parse_token_response,
    preferred_challenge,
    usable_until,
)

REALM = "https://auth.example/token"
NOW = 1_700_000_000.0
JSON_HEADERS = {"Content-Type": "application/json"}


# -- challenges --------------------------------------------------------------------------------------------------


def test_docker_hub_challenge():
    [challenge] = parse_challenges(
        [
            'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
            'scope="repository:library/alpine:pull"'
        ]
    )
    assert challenge == Challenge(
        "bearer",
        {
            "realm": "https://auth.docker.io/token",
            "service": "registry.docker.io",
            "scope": "repository:library/alpine:pull",
        },
    )


def test_quoted_values_keep_commas_and_escaped_quotes():
    [challenge] = parse_challenges([r'Bearer realm="https://a/t", scope="repository:x:pull,push", error="say \"no\""'])
    assert challenge.params == {"realm": "https://a/t", "scope": "repository:x:pull,push", "error": 'say "no"'}


def test_several_challenges_in_one_header_and_over_several_headers():
    challenges = parse_challenges(['Basic realm="r1", BEARER Realm="https://a/t", Service=s', 'Digest realm="d"'])
    assert [c.scheme for c in challenges] == ["basic", "bearer", "digest"]
    assert challenges[1].params == {"realm": "https://a/t", "service": "s"}


def test_token68_is_tolerated():
    challenges = parse_challenges(["Negotiate YIIB+w==, Basic realm=x"])
    assert challenges == [Challenge("negotiate", {}, "YIIB+w=="), Challenge("basic", {"realm": "x"})]


def test_unquoted_url_realm_and_a_scheme_without_parameters():
    challenges = parse_challenges(["Bearer realm=https://auth.example/token?x=1,service=reg", "Basic"])
    assert challenges == [
        Challenge("bearer", {"realm": "https://auth.example/token?x=1", "service": "reg"}),
        Challenge("basic", {}),
    ]


def test_the_first_of_repeated_parameters_counts():
    [challenge] = parse_challenges(['Bearer realm="https://good/t", realm="https://evil/t"'])
    assert challenge.params["realm"] == "https://good/t"


@pytest.mark.parametrize("header", ["", " , ,", "=x", '"quoted only"', "realm=x", "\x00\xff", 'Bearer realm="open'])
def test_odd_headers(header):
    challenges = parse_challenges([header])
    assert all(isinstance(c, Challenge) for c in challenges)


def test_an_unterminated_quoted_value_runs_to_the_end():
    assert parse_challenges(['Bearer realm="open, service=s']) == [Challenge("bearer", {"realm": "open, service=s"})]


def test_preferred_challenge_is_bearer_then_basic():
    basic, bearer = Challenge("basic", {}), Challenge("bearer", {"realm": REALM})
    assert preferred_challenge([basic, bearer]) is bearer
    assert preferred_challenge([Challenge("digest", {}), basic]) is basic
    assert preferred_challenge([Challenge("negotiate", {})]) is None


@given(st.lists(st.text()))
def test_parse_challenges_never_raises(values):
    challenges = parse_challenges(values)
    assert isinstance(challenges, list)
    assert all(isinstance(c.scheme, str) and c.scheme == c.scheme.lower() for c in challenges)


TOKEN_CHARS = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
tokens = st.text(TOKEN_CHARS, min_size=1, max_size=12)
param_values = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)


def quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@st.composite
def challenges_strategy(draw):
    scheme = draw(tokens)
    names = draw(st.lists(tokens, unique_by=str.lower, max_size=5))
    params = {name: draw(param_values) for name in names}
    return scheme, params


@given(st.lists(st.lists(challenges_strategy(), min_size=1, max_size=3), max_size=3), st.sampled_from([",", ", "]))
def test_round_trip_of_generated_challenges(headers, separator):
    values = [
        separator.join(
            scheme
            + (" " + separator.join(f"{name}={quoted(value)}" for name, value in params.items()) if params else "")
            for scheme, params in header
        )
        for header in headers
    ]
    expected = [
        Challenge(scheme.lower(), {name.lower(): value for name, value in params.items()})
        for header in headers
        for scheme, params in header
    ]
    assert parse_challenges(values) == expected


# -- token requests ----------------------------------------------------------------------------------------------


def bearer(**params: str) -> Challenge:
    return Challenge("bearer", {"realm": REALM, "service": "registry.example", **params})


def test_token_request_merges_sorts_and_dedupes_scopes():
    request = TokenRequest.for_challenge(
        bearer(scope="repository:b:pull repository:a:pull"), ["repository:a:pull", "repository:c:pull,push"], None
    )
    assert request == TokenRequest(
        RealmURL.parse(REALM),
        "registry.example",
        ("repository:a:pull", "repository:b:pull", "repository:c:pull,push"),
        ANONYMOUS,
    )


def test_token_request_needs_a_bearer_challenge_with_an_http_realm():
    with pytest.raises(TokenError, match="basic"):
        TokenRequest.for_challenge(Challenge("basic", {"realm": REALM}), [], None)
    with pytest.raises(TokenError, match="no realm"):
        TokenRequest.for_challenge(Challenge("bearer", {}), [], None)
    with pytest.raises(TokenError, match="not an http"):
        TokenRequest.for_challenge(Challenge("bearer", {"realm": "file:///etc/passwd"}), [], None)


@pytest.mark.parametrize(
    ("realm", "why"),
    [
        ("https://auth.example:99999/token", "Port out of range"),
        ("https://auth.example:abc/token", "Port could not be cast"),
        ("https://auth.example:0/token", "port 0"),
        ("https://auth.\x01example/token", "control characters"),
        ("https://auth.example/to ken", "spaces"),
        ("https://auth.example/t\u00f6ken", "non-ASCII"),
        ("https://[::1/token", "Invalid IPv6 URL"),
        ("https://[auth.example]/token", "IPv4 or IPv6 address"),
        ("https://auth_example%2f/token", "invalid host name"),
        ("https:///token", "no host name"),
        ("ftp://auth.example/token", "not http or https"),
    ],
)
def test_a_realm_ocigate_cannot_dial_is_a_token_error_saying_why(realm: str, why: str):
    with pytest.raises(TokenError, match=f"not an http\\(s\\) URL ocigate can use \\(.*{why}") as raised:
        TokenRequest.for_challenge(bearer(realm=realm), [], None)
    assert "\x01" not in str(raised.value)


def test_a_realm_is_parsed_into_what_is_dialled():
    assert RealmURL.parse("HTTPS://Auth.Example/token?tenant=x#frag") == RealmURL(
        "https", "auth.example", 443, "/token", "tenant=x"
    )
    assert RealmURL.parse("http://[::1]:5000") == RealmURL("http", "::1", 5000, "/")
    assert RealmURL.parse("http://[::1]:5000").url == "http://[::1]:5000/"
    assert RealmURL.parse("https://auth.example:443/t?a=1").target == "/t?a=1"


# Strings shaped like URLs, with a good or bad piece in each place, besides arbitrary text.
_url_like = st.builds(
    "{}://{}{}{}{}".format,
    st.sampled_from(["http", "https", "HTTP", "ftp", "", "http:"]),
    st.sampled_from(["", "user@", "u:p@", "@"]),
    st.one_of(
        st.sampled_from(["auth.example", "127.0.0.1", "[::1]", "[::1", "[fe80::1%25eth0]", "[v1.x]", "a..b", "-"]),
        st.text(max_size=12),
    ),
    st.one_of(st.just(""), st.integers(-5, 100_000).map(":{}".format), st.text(max_size=6).map(":{}".format)),
    st.one_of(st.just(""), st.text(max_size=20).map("/{}".format)),
)
_DNS_NAME = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*\.?")


@settings(max_examples=500)
@given(st.one_of(st.text(), _url_like))
def test_any_realm_either_parses_into_a_url_ocigate_can_dial_or_is_a_token_error(text: str):
    try:
        realm = TokenRequest.for_challenge(bearer(realm=text), [], None).realm
    except TokenError:
        return
    assert realm.scheme in ("http", "https")
    assert 0 < realm.port < 65536
    if ":" in realm.host:
        assert isinstance(ipaddress.ip_address(realm.host), ipaddress.IPv6Address)
    else:
        assert _DNS_NAME.fullmatch(realm.host)
    assert realm.target.startswith("/") and all("!" <= char <= "~" for char in realm.target)
    # What httpx dials is what was parsed, and the URL shown parses back to the same realm.
    dialled = httpx.URL(realm.url)
    assert (dialled.scheme, dialled.host, dialled.port or realm.port) == (realm.scheme, realm.host, realm.port)
    assert RealmURL.parse(realm.url) == realm


def test_a_realm_with_userinfo_is_never_shown_with_it():
    with pytest.raises(TokenError) as raised:
        TokenRequest.for_challenge(Challenge("bearer", {"realm": "ftp://user:hunter2@auth.example/t"}), [], None)
    assert "hunter2" not in str(raised.value)
    request = TokenRequest.for_challenge(Challenge("bearer", {"realm": "https://u:hunter2@auth.example/t"}), [], None)
    assert request.realm.url == "https://auth.example/t"


def test_identity_is_opaque_and_tells_credentials_apart():
    alice = Credential("alice", "hunter2")
    assert credential_identity(None) == credential_identity(Credential()) == ANONYMOUS
    assert credential_identity(alice) == credential_identity(Credential("alice", "hunter2"))
    assert credential_identity(alice) != credential_identity(Credential("alice", "other"))
    assert credential_identity(alice) != credential_identity(Credential("", "", "hunter2"))
    assert "hunter2" not in credential_identity(alice)
    assert "hunter2" not in repr(alice) and "refresh-xyzzy" not in repr(Credential("", "", "refresh-xyzzy"))


# -- token responses ---------------------------------------------------------------------------------------------


def answer(document: object, status: int = 200, headers=JSON_HEADERS) -> Token:
    return parse_token_response(status, headers, json.dumps(document).encode(), REALM, NOW)


def test_token_and_default_lifetime():
    token = answer({"token": "abc"})
    assert token == Token("abc", NOW + DEFAULT_EXPIRES_IN)
    assert token.authorization == "Bearer abc"
    assert "abc" not in repr(token)


def test_access_token_wins_over_token():
    assert answer({"token": "old", "access_token": "new", "expires_in": 300}) == Token("new", NOW + 300)


@pytest.mark.parametrize("expires_in", [0, -5, "300", None, True, float("nan")])
def test_a_meaningless_expires_in_means_60_seconds(expires_in):
    assert answer({"token": "t", "expires_in": expires_in}).expires_at == NOW + 60


def test_issued_at_counts_from_when_the_token_was_issued():
    # issued 100 s before now (Go writes nanoseconds), lives 300 s: 200 s left
    token = answer({"token": "t", "expires_in": 300, "issued_at": "2023-11-14T22:11:40.123456789Z"})
    assert token.expires_at == pytest.approx(NOW - 100 + 0.123456 + 300)
    offset = answer({"token": "t", "expires_in": 300, "issued_at": "2023-11-15T00:11:40+02:00"})
    assert offset.expires_at == pytest.approx(NOW + 200)


@pytest.mark.parametrize(
    "issued_at",
    ["2023-11-14T22:13:30Z", "2020-01-01T00:00:00Z", "yesterday", "2023-13-45T99:00:00Z"],
    ids=["in the future", "long ago", "not a time", "impossible date"],
)
def test_an_issued_at_the_clocks_disagree_on_counts_from_now(issued_at):
    assert answer({"token": "t", "expires_in": 300, "issued_at": issued_at}).expires_at == NOW + 300


@pytest.mark.parametrize(
    ("status", "headers", "body", "wanted"),
    [
        (401, JSON_HEADERS, b'{"details":"incorrect username or password"}', "HTTP 401 (application/json)"),
        (503, {"content-type": "text/html"}, b"<html>down</html>", "HTTP 503 (text/html)"),
        (200, {"Content-Type": "text/html; charset=utf-8"}, b"<html><body>login", "not JSON (starts with '<html')"),
        (200, {}, b"  <!DOCTYPE html>", "starts with '<!DOCTYPE'"),
        (200, JSON_HEADERS, b"", "empty"),
        (200, JSON_HEADERS, b"not json at all", "not JSON (15 bytes), application/json"),
        (200, JSON_HEADERS, b"\xff\xfe", "not JSON"),
        (200, JSON_HEADERS, b"[1, 2]", "not an object"),
        (200, JSON_HEADERS, b'{"expires_in": 60}', "no token in the JSON"),
        (200, JSON_HEADERS, b'{"token": ""}', "no token in the JSON"),
        (200, JSON_HEADERS, b'{"token": 42}', "no token in the JSON"),
        (200, JSON_HEADERS, b'{"token": "a\\r\\nX-Evil: 1"}', "characters an HTTP header cannot carry"),
    ],
)
def test_bad_token_responses_name_the_realm_and_the_fault(status, headers, body, wanted):
    with pytest.raises(TokenError) as raised:
        parse_token_response(status, headers, body, REALM, NOW)
    assert REALM in str(raised.value)
    assert wanted in str(raised.value)


# -- cache -------------------------------------------------------------------------------------------------------


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


REQUEST = TokenRequest(RealmURL.parse(REALM), "registry.example", ("repository:a:pull",), ANONYMOUS)
OTHER_REQUEST = TokenRequest(RealmURL.parse(REALM), "registry.example", ("repository:b:pull",), ANONYMOUS)


def test_safety_margin_is_a_tenth_capped_at_30_seconds():
    assert usable_until(Token("t", NOW + 60), NOW) == NOW + 54
    assert usable_until(Token("t", NOW + 3600), NOW) == NOW + 3570
    assert usable_until(Token("t", NOW - 1), NOW) == NOW - 1


def test_cache_keeps_a_token_until_its_safety_margin():
    clock = Clock()
    cache = TokenCache(clock=clock)
    token = Token("t", NOW + 60)
    cache.put(REQUEST, token)
    assert cache.get(REQUEST) is token and cache.get(OTHER_REQUEST) is None
    clock.now = NOW + 53.9
    assert cache.get(REQUEST) is token
    clock.now = NOW + 54
    assert cache.get(REQUEST) is None


def test_an_expired_token_is_not_cached():
    cache = TokenCache(clock=Clock())
    cache.put(REQUEST, Token("t", NOW))
    assert cache.get(REQUEST) is None and len(cache) == 0


def test_drop_forgets_only_the_refused_token():
    cache = TokenCache(clock=Clock())
    refused, newer = Token("old", NOW + 60), Token("new", NOW + 60)
    cache.put(REQUEST, newer)
    cache.drop(REQUEST, refused)
    assert cache.get(REQUEST) is newer
    cache.drop(REQUEST, newer)
    assert cache.get(REQUEST) is None
    cache.put(REQUEST, newer)
    cache.drop(REQUEST)
    cache.drop(REQUEST)
    assert cache.get(REQUEST) is None


async def test_concurrent_callers_share_one_fetch_and_the_result_is_cached():
    clock = Clock()
    cache = TokenCache(clock=clock)
    calls = 0
    release = asyncio.Event()

    async def fetch() -> Token:
        nonlocal calls
        calls += 1
        await release.wait()
        return Token(f"t{calls}", clock() + 60)

    waiters = [asyncio.create_task(cache.get_or_fetch(REQUEST, fetch)) for _ in range(20)]
    await asyncio.sleep(0)
    release.set()
    results = await asyncio.gather(*waiters)
    assert calls == 1 and {r.value for r in results} == {"t1"}
    assert (await cache.get_or_fetch(REQUEST, fetch)).value == "t1" and calls == 1
    clock.now += 55
    assert (await cache.get_or_fetch(REQUEST, fetch)).value == "t2" and calls == 2


async def test_different_requests_fetch_separately():
    cache = TokenCache(clock=Clock())
    fetched: list[str] = []

    def fetcher(name: str):
        async def fetch() -> Token:
            fetched.append(name)
            await asyncio.sleep(0)
            return Token(name, NOW + 60)

        return fetch

    a, b = await asyncio.gather(
        cache.get_or_fetch(REQUEST, fetcher("a")), cache.get_or_fetch(OTHER_REQUEST, fetcher("b"))
    )
    assert (a.value, b.value) == ("a", "b") and sorted(fetched) == ["a", "b"]


async def test_a_failed_fetch_reaches_every_waiter_and_is_not_cached():
    cache = TokenCache(clock=Clock())
    calls = 0
    release = asyncio.Event()

    async def failing() -> Token:
        nonlocal calls
        calls += 1
        await release.wait()
        raise TokenError(f"token request to {REALM} failed: HTTP 500")

    waiters = [asyncio.create_task(cache.get_or_fetch(REQUEST, failing)) for _ in range(5)]
    await asyncio.sleep(0)
    release.set()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert calls == 1 and all(isinstance(r, TokenError) for r in results)

    async def working() -> Token:
        nonlocal calls
        calls += 1
        return Token("fine", NOW + 60)

    assert (await cache.get_or_fetch(REQUEST, working)).value == "fine" and calls == 2


async def test_a_cancelled_caller_does_not_cancel_the_shared_fetch():
    cache = TokenCache(clock=Clock())
    release = asyncio.Event()

    async def fetch() -> Token:
        await release.wait()
        return Token("t", NOW + 60)

    first = asyncio.create_task(cache.get_or_fetch(REQUEST, fetch))
    second = asyncio.create_task(cache.get_or_fetch(REQUEST, fetch))
    await asyncio.sleep(0)
    first.cancel()
    release.set()
    assert (await second).value == "t"
    assert first.cancelled()
    assert cache.get(REQUEST) is not None


# -- fetching ----------------------------------------------------------------------------------------------------


class FakeTokenServer:
    """Records every call; answers POST and GET from the given (status, headers, body) or a good token."""

    def __init__(self, post=None, get=None) -> None:
        self.calls: list[tuple[str, str, dict[str, str], bytes | None]] = []
        self.post = post or (200, JSON_HEADERS, b'{"access_token": "from-post", "expires_in": 300}')
        self.get = get or (200, JSON_HEADERS, b'{"token": "from-get"}')

    async def send(self, method, url, headers, body):
        self.calls.append((method, url.url, headers, body))
        return self.post if method == "POST" else self.get


def request_for(credential, realm=REALM, scopes=("repository:b:pull", "repository:a:pull,push")) -> TokenRequest:
    challenge = Challenge("bearer", {"realm": realm, "service": "registry.example"})
    return TokenRequest.for_challenge(challenge, scopes, credential)


async def test_anonymous_is_one_get_with_repeated_scopes_and_no_authorization():
    server = FakeTokenServer()
    token = await fetch_token(request_for(None), None, server.send, clock=Clock())
    assert token == Token("from-get", NOW + 60)
    [(method, url, headers, body)] = server.calls
    assert method == "GET" and body is None
    assert "authorization" not in {name.lower() for name in headers}
    assert url.startswith(REALM + "?")
    assert parse_qsl(urlsplit(url).query) == [
        ("service", "registry.example"),
        ("scope", "repository:a:pull,push"),
        ("scope", "repository:b:pull"),
    ]


async def test_get_keeps_the_realms_own_query():
    server = FakeTokenServer()
    await fetch_token(request_for(None, realm=REALM + "?tenant=x"), None, server.send)
    assert parse_qs(urlsplit(server.calls[0][1]).query)["tenant"] == ["x"]


async def test_password_is_an_oauth_password_grant():
    server = FakeTokenServer()
    alice = Credential("alice", "hunter2")
    token = await fetch_token(request_for(alice), alice, server.send, client_id="ocigate-test", clock=Clock())
    assert token == Token("from-post", NOW + 300)
    [(method, url, headers, body)] = server.calls
    assert (method, url) == ("POST", REALM)
    assert headers["Content-Type"].startswith("application/x-www-form-urlencoded")
    assert "Authorization" not in headers
    assert dict(parse_qsl(body.decode())) == {
        "scope": "repository:a:pull,push repository:b:pull",
        "service": "registry.example",
        "client_id": "ocigate-test",
        "grant_type": "password",
        "username": "alice",
        "password": "hunter2",
    }


async def test_identity_token_is_a_refresh_token_grant():
    server = FakeTokenServer()
    credential = Credential("ignored", "", "refresh-me")
    await fetch_token(request_for(credential), credential, server.send)
    form = dict(parse_qsl(server.calls[0][3].decode()))
    assert form["grant_type"] == "refresh_token" and form["refresh_token"] == "refresh-me"
    assert "username" not in form and "password" not in form


def basic_of(headers: dict[str, str]) -> str:
    scheme, _, encoded = headers["Authorization"].partition(" ")
    assert scheme == "Basic"
    return base64.b64decode(encoded).decode()


@pytest.mark.parametrize("status", [400, 401, 404, 405])
async def test_password_post_refused_falls_back_to_get_with_basic(status):
    server = FakeTokenServer(post=(status, {}, b""))
    alice = Credential("alice", "hunter2")
    token = await fetch_token(request_for(alice), alice, server.send)
    assert token.value == "from-get"
    assert [call[0] for call in server.calls] == ["POST", "GET"]
    assert basic_of(server.calls[1][2]) == "alice:hunter2"
    assert parse_qs(urlsplit(server.calls[1][1]).query)["scope"] == ["repository:a:pull,push", "repository:b:pull"]


async def test_identity_token_falls_back_to_get_with_it_as_the_password():
    server = FakeTokenServer(post=(404, {}, b""))
    credential = Credential("", "", "refresh-me")
    await fetch_token(request_for(credential), credential, server.send)
    assert basic_of(server.calls[1][2]) == ":refresh-me"


@pytest.mark.parametrize(
    ("credential", "status"),
    [(Credential("alice", "hunter2"), 500), (Credential("alice", "hunter2"), 403), (Credential("", "", "rt"), 405)],
)
async def test_other_post_failures_do_not_fall_back(credential, status):
    server = FakeTokenServer(post=(status, {}, b""))
    with pytest.raises(TokenError, match=f"HTTP {status}"):
        await fetch_token(request_for(credential), credential, server.send)
    assert [call[0] for call in server.calls] == ["POST"]


async def test_the_credential_must_be_the_one_the_request_was_made_for():
    with pytest.raises(ValueError):
        await fetch_token(request_for(None), Credential("alice", "hunter2"), FakeTokenServer().send)


async def test_fetch_and_cache_together():
    server = FakeTokenServer()
    cache = TokenCache(clock=Clock())
    request = request_for(None)
    tokens = await asyncio.gather(
        *(cache.get_or_fetch(request, lambda: fetch_token(request, None, server.send, clock=Clock())) for _ in range(5))
    )
    assert len(server.calls) == 1 and {t.value for t in tokens} == {"from-get"}


# -- secrets stay secret -----------------------------------------------------------------------------------------

# The marker keeps a secret from turning up by chance in a message's own words ("TokenRequest", "HTTP").
secret_texts = st.text(string.ascii_letters + string.digits + "+/=_-", min_size=6, max_size=40).map(
    lambda text: "S3CR3T" + text
)


def echoing_responses(secret: str) -> list[tuple[int, dict[str, str], bytes]]:
    """Token endpoints that echo the secret back in every way a careless or hostile one might."""
    encoded = secret.encode()
    return [
        (401, JSON_HEADERS, b'{"details": "bad password ' + encoded + b'"}'),
        (500, {"Content-Type": "text/plain; " + secret}, encoded),
        (200, {"Content-Type": "text/plain"}, encoded),
        (200, {"Content-Type": "text/html"}, b"<html>" + encoded),
        (200, JSON_HEADERS, b'{"tok": "' + encoded + b'"}'),
        (200, JSON_HEADERS, b'{"token": "' + encoded + b'\\n"}'),
        (200, JSON_HEADERS, b'["' + encoded + b'"]'),
        (200, JSON_HEADERS, b'{"token": "x' + encoded),
    ]


@settings(max_examples=50)
@given(secret_texts, st.sampled_from(["password", "identity_token"]))
async def test_no_secret_in_any_error_message(secret, kind):
    credential = Credential("alice", secret) if kind == "password" else Credential("", "", secret)
    assert secret not in repr(credential) and secret not in repr(request_for(credential))
    for response in echoing_responses(secret):
        for server in (
            FakeTokenServer(post=response, get=response),
            FakeTokenServer(post=(404, {}, b""), get=response),
        ):
            with pytest.raises(TokenError) as raised:
                await fetch_token(request_for(credential), credential, server.send)
            assert secret not in str(raised.value)
            assert REALM in str(raised.value)


@given(secret_texts)
def test_no_token_in_a_tokens_repr(secret):
    token = parse_token_response(200, JSON_HEADERS, json.dumps({"token": secret}).encode(), REALM, NOW)
    assert token.value == secret and secret not in repr(token)


def test_at_most_max_tokens_are_cached() -> None:
    cache = TokenCache(clock=Clock())
    for number in range(MAX_TOKENS + 100):
        cache.put(
            TokenRequest(RealmURL.parse(f"https://realm{number}.test/t"), "", (), ANONYMOUS), Token("t", NOW + 60)
        )
    assert len(cache) == MAX_TOKENS


def test_a_token_too_long_to_keep_is_refused() -> None:
    longest = "t" * MAX_TOKEN_LENGTH
    assert parse_token_response(200, JSON_HEADERS, json.dumps({"token": longest}).encode(), REALM, NOW).value == longest
    with pytest.raises(TokenError, match=f"token longer than {MAX_TOKEN_LENGTH} characters"):
        parse_token_response(200, JSON_HEADERS, json.dumps({"token": longest + "t"}).encode(), REALM, NOW)
