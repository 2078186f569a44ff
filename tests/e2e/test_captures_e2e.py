"""Captures safe to share: an authenticated pull through the gateway (token auth, and basic auth) with flow_detail=4,
a `-w` capture and a HAR capture, in which every secret the test handed out or was issued is searched for (as text,
base64 and URL-encoded) in the capture, the HAR and the log: found nowhere; while the redacted forms are there, and
every client got its secrets whole.

The client authenticates itself (`authentication = "client"`), so its requests carry its credentials through the
gateway, and its token realm (plain HTTP, by a name only the gateway's host map knows) is reached through the gateway
too: the token exchange is a recorded flow. An HTTP client then makes the OAuth2 exchanges skopeo does not (password
and refresh-token forms) and visits a host that sets a cookie, answers a token gzip'd and redirects with userinfo.
"""

import base64
import gzip
import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, quote

import httpx
from mitmproxy import http, io

from ocigate.credentials import Credential, OcigateStore
from tests.support.clients import assert_layout_holds, skopeo_copy_to_layout
from tests.support.gateway import MITMDUMP_SCRIPT, Gateway, running_gateway
from tests.support.http_host import http_host
from tests.support.images import make_image, push_image
from tests.support.processes import wait_until
from tests.support.registry import running_registry, write_htpasswd
from tests.support.secrets import forms, remember
from tests.support.token_server import running_token_server

REDACTED = "<redacted>"
ALICE, ALICE_PASSWORD = "alice", "captures-alice-password-0451"  # the token server's account
BOB, BOB_PASSWORD = "bob", "captures-bob-password-0452"  # the htpasswd registry's
COOKIE = "captures-session-cookie-0453"
GZIPPED_TOKEN = "captures-gzipped-token-0454"
LOCATION_PASSWORD = "captures-location-password-0455"
QUERY_TOKEN = "captures-query-token-0456"
remember(ALICE_PASSWORD, BOB_PASSWORD, COOKIE, GZIPPED_TOKEN, LOCATION_PASSWORD, QUERY_TOKEN)

STORAGE = f"https://storage-user:{LOCATION_PASSWORD}@storage.test/blob"


@dataclass
class Recorded:
    """One exchange as a capture holds it, whether mitmproxy's own format or HAR."""

    url: str
    request_headers: list[tuple[str, str]]
    request_body: str
    response_headers: list[tuple[str, str]]
    response_body: str

    def request_header(self, name: str) -> list[str]:
        return [v for k, v in self.request_headers if k.lower() == name.lower()]

    def response_header(self, name: str) -> list[str]:
        return [v for k, v in self.response_headers if k.lower() == name.lower()]


def from_flows(path: Path) -> list[Recorded]:
    with path.open("rb") as capture:
        flows = [f for f in io.FlowReader(capture).stream() if isinstance(f, http.HTTPFlow)]
    return [
        Recorded(
            f.request.pretty_url,
            [(k, v) for k, v in f.request.headers.items(multi=True)],
            f.request.get_text(strict=False) or "",
            [(k, v) for k, v in f.response.headers.items(multi=True)] if f.response else [],
            (f.response.get_text(strict=False) or "") if f.response else "",
        )
        for f in flows
    ]


def from_har(path: Path) -> list[Recorded]:
    entries = json.loads(path.read_text())["log"]["entries"]
    return [
        Recorded(
            e["request"]["url"],
            [(h["name"], h["value"]) for h in e["request"]["headers"]],
            e["request"].get("postData", {}).get("text") or "",
            [(h["name"], h["value"]) for h in e["response"]["headers"]],
            e["response"]["content"].get("text", "") if e["response"]["content"].get("encoding") != "base64" else "",
        )
        for e in entries
    ]


def assert_nowhere(secrets: list[str], *outputs: Path) -> None:
    for output in outputs:
        data = output.read_bytes()
        for secret in secrets:
            for form in forms(secret):
                assert form not in data, f"{output.name} holds {secret!r} (as {form!r})"


def basic(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def start_gateway(directory: Path, rules: Path, host_map: dict[str, str]):
    options = [
        "flow_detail=4",
        f"save_stream_file={directory / 'capture.flows'}",
        f"hardump={directory / 'capture.har'}",
    ]
    return running_gateway(directory, rules, host_map, options)


def outputs_of(gateway: Gateway) -> tuple[Path, Path, Path]:
    directory = gateway.log_path.parent
    return directory / "capture.flows", directory / "capture.har", gateway.log_path


def client_auth_rule(rules: Path, upstream: str) -> None:
    (rules / upstream).mkdir(parents=True)
    (rules / upstream / "hosts.toml").write_text(f'authentication = "client"\nserver = "http://{upstream}"\n')


def write_client_auth(home: Path, registry: str, user: str, password: str) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "auth.json").write_text(json.dumps({"auths": {registry: {"auth": basic(user, password)}}}))


def cookie_host_answer(handler) -> tuple[int, bytes, dict[str, str]]:
    if handler.path.startswith("/session"):
        body = gzip.compress(json.dumps({"token": GZIPPED_TOKEN, "expires_in": 60}).encode())
        headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
        return 200, body, headers | {"Set-Cookie": f"session={COOKIE}; Path=/; HttpOnly"}
    if handler.path.startswith("/empty"):
        # An answer that ends with its headers: mitmproxy sends it only after every response hook.
        return 302, b"", {"Location": STORAGE, "Set-Cookie": f"session={COOKIE}; Path=/"}
    return 302, b"moved to storage", {"Location": STORAGE, "Content-Type": "text/plain"}


def recorded(gateway_dir: Path) -> Iterator[tuple[str, list[Recorded]]]:
    yield "-w", from_flows(gateway_dir / "capture.flows")
    yield "HAR", from_har(gateway_dir / "capture.har")


def test_a_token_auth_pull_and_its_token_exchanges_leave_no_secret_in_the_capture_the_har_or_the_log(
    tmp_path: Path,
) -> None:
    image = make_image("captures-token", layers=2)
    upstream = "t.test:5000"
    with (
        running_token_server(tmp_path / "tokens", {ALICE: ALICE_PASSWORD}) as tokens,
        http_host(cookie_host_answer) as (cookie_port, _),
    ):
        realm_host = f"tokens.test:{tokens.port}"
        auth = tokens.registry_auth_config()
        auth["auth"]["token"]["realm"] = f"http://{realm_host}/token"
        with running_registry(tmp_path / "registry", extra_config=auth) as registry:
            pusher = tokens.mint("pusher", [{"type": "repository", "name": "team/app", "actions": ["pull", "push"]}])
            with httpx.Client(headers={"Authorization": f"Bearer {pusher}"}) as pushing:
                push_image(registry.url, "team/app", "v1", image, client=pushing)
            rules = tmp_path / "rules"
            client_auth_rule(rules, upstream)
            cookies = f"cookies.test:{cookie_port}"
            host_map = {
                upstream: f"127.0.0.1:{registry.port}",
                realm_host: f"127.0.0.1:{tokens.port}",
                cookies: f"127.0.0.1:{cookie_port}",
            }
            home = tmp_path / "client"
            write_client_auth(home, upstream, ALICE, ALICE_PASSWORD)
            gateway_dir = tmp_path / "gateway"
            with start_gateway(gateway_dir, rules, host_map) as gateway:
                result, layout = skopeo_copy_to_layout(gateway, home, f"{upstream}/team/app:v1")
                assert result.returncode == 0, f"{result.stderr.decode()}\n{gateway.log_text()[-4000:]}"
                assert_layout_holds(layout, image)
                issued = oauth_exchanges(gateway, f"http://{realm_host}/token", tokens.service, f"http://{cookies}")
    # skopeo fetched its token through the gateway, as alice.
    assert any(r.account == ALICE and r.method == "GET" and r.status == 200 for r in tokens.requests)
    jwt_header = pusher.split(".")[0]  # every token this server signs starts with it
    secrets = [
        ALICE_PASSWORD,
        basic(ALICE, ALICE_PASSWORD),
        f"{ALICE}:{ALICE_PASSWORD}",
        jwt_header,
        *issued,
        *tokens.identity_tokens,  # every refresh token it issued
        COOKIE,
        GZIPPED_TOKEN,
        LOCATION_PASSWORD,
        QUERY_TOKEN,
    ]
    remember(*issued, *tokens.identity_tokens)
    assert_nowhere(secrets, *outputs_of(gateway))

    # And what is there instead, in both captures: each exchange still explained.
    for name, flows in recorded(gateway_dir):
        realm = [f for f in flows if f.url.startswith(f"http://{realm_host}/token")]
        assert f"Basic {REDACTED}" in {v for f in realm for v in f.request_header("Authorization")}, name
        answers = [json.loads(f.response_body) for f in realm if f.response_body.startswith("{")]
        assert {"token": REDACTED, "access_token": REDACTED} in [
            {k: a[k] for k in ("token", "access_token") if k in a} for a in answers
        ], name
        assert any(a.get("refresh_token") == REDACTED for a in answers), name
        posted = [dict(parse_qsl(f.request_body)) for f in realm if f.request_body]
        assert any(
            p.get("grant_type") == "password" and p.get("password") == REDACTED and p.get("username") == ALICE
            for p in posted
        ), name
        assert any(p.get("grant_type") == "refresh_token" and p.get("refresh_token") == REDACTED for p in posted), name
        assert any(f.url.endswith(f"access_token={REDACTED}") for f in realm), name
        assert f"session={REDACTED}" in {v for f in flows for v in f.request_header("Cookie")}, name
        registry_flows = [f for f in flows if f"://{upstream}/v2/team/app/" in f.url]
        assert registry_flows and all(
            f.request_header("Authorization") == [f"Bearer {REDACTED}"] for f in registry_flows
        ), name
        session = next(f for f in flows if f.url.startswith(f"http://{cookies}/session"))
        assert session.response_header("Set-Cookie") == [f"session={REDACTED}; Path=/; HttpOnly"], name
        assert json.loads(session.response_body) == {"token": REDACTED, "expires_in": 60}, name
        moved = next(f for f in flows if f.url.startswith(f"http://{cookies}/moved"))
        assert moved.response_header("Location") == [f"https://storage-user:{REDACTED}@storage.test/blob"], name
    log = gateway.log_path.read_text(errors="replace")
    assert f"Bearer {REDACTED}" in log and f"Basic {REDACTED}" in log and f"session={REDACTED}" in log


def oauth_exchanges(gateway: Gateway, realm: str, service: str, cookie_host: str) -> list[str]:
    """What skopeo does not do, through the gateway: OAuth2's password and refresh-token forms (with a cookie),
    distribution's offline token by GET, a token in a query, and a host that sets a cookie, answers a token gzip'd
    and redirects to a URL with userinfo. Each client gets its secrets whole. Returns the tokens it was issued."""
    scope = "repository:team/app:pull"
    form = {"service": service, "scope": scope, "client_id": "captures-test", "access_type": "offline"}
    with httpx.Client(proxy=gateway.proxy_url, trust_env=False, timeout=30) as client:
        by_password = client.post(
            realm,
            data=form | {"grant_type": "password", "username": ALICE, "password": ALICE_PASSWORD},
            headers={"Cookie": f"session={COOKIE}"},
        )
        assert by_password.status_code == 200, by_password.text
        refresh_token = by_password.json()["refresh_token"]
        by_refresh = client.post(realm, data=form | {"grant_type": "refresh_token", "refresh_token": refresh_token})
        assert by_refresh.status_code == 200 and by_refresh.json()["refresh_token"] == refresh_token
        offline = client.get(
            realm, params={"service": service, "scope": scope, "offline_token": "true"}, auth=(ALICE, ALICE_PASSWORD)
        )
        assert offline.status_code == 200 and offline.json()["refresh_token"]
        client.get(realm, params={"service": service, "access_token": QUERY_TOKEN})
        session = client.get(f"{cookie_host}/session")
        assert session.json()["token"] == GZIPPED_TOKEN and session.cookies["session"] == COOKIE
        moved = client.get(f"{cookie_host}/moved", follow_redirects=False)
        assert moved.status_code == 302 and moved.headers["Location"] == STORAGE
        # Without a body, and asked by HEAD: the client still gets the headers as the host sent them.
        empty = client.get(f"{cookie_host}/empty", follow_redirects=False)
        assert empty.headers["Location"] == STORAGE and empty.headers["Set-Cookie"] == f"session={COOKIE}; Path=/"
        head = client.head(f"{cookie_host}/session")
        assert head.headers["Set-Cookie"] == f"session={COOKIE}; Path=/; HttpOnly"
    return [
        *(answer.json()[key] for answer in (by_password, by_refresh, offline) for key in ("token", "access_token")),
        refresh_token,
        offline.json()["refresh_token"],
    ]


def test_a_basic_auth_pull_leaves_no_password_in_the_capture_the_har_or_the_log(tmp_path: Path) -> None:
    image = make_image("captures-basic", layers=2)
    htpasswd = write_htpasswd(tmp_path / "htpasswd", {BOB: BOB_PASSWORD})
    with running_registry(tmp_path / "registry", htpasswd=htpasswd) as registry:
        with httpx.Client(auth=(BOB, BOB_PASSWORD)) as pushing:
            push_image(registry.url, "team/app", "v1", image, client=pushing)
        rules = tmp_path / "rules"
        # b.test: the client's own basic credential goes through; d.test: the gateway's, from its store.
        client_auth_rule(rules, "b.test:5000")
        (rules / "d.test").mkdir(parents=True)
        (rules / "d.test" / "hosts.toml").write_text('[host."http://basic.test:5000"]\n')
        host_map = {"b.test:5000": f"127.0.0.1:{registry.port}", "basic.test:5000": f"127.0.0.1:{registry.port}"}
        gateway_dir = tmp_path / "gateway"
        OcigateStore(gateway_dir / "ocigate-credentials.json").save("basic.test:5000", Credential(BOB, BOB_PASSWORD))
        client_home, plain_home = tmp_path / "client", tmp_path / "plain"
        write_client_auth(client_home, "b.test:5000", BOB, BOB_PASSWORD)
        with start_gateway(gateway_dir, rules, host_map) as gateway:
            for home, reference in ((client_home, "b.test:5000/team/app:v1"), (plain_home, "d.test/team/app:v1")):
                result, layout = skopeo_copy_to_layout(gateway, home, reference)
                assert result.returncode == 0, f"{result.stderr.decode()}\n{gateway.log_text()[-4000:]}"
                assert_layout_holds(layout, image)
    assert_nowhere([BOB_PASSWORD, basic(BOB, BOB_PASSWORD), f"{BOB}:{BOB_PASSWORD}"], *outputs_of(gateway))
    for name, flows in recorded(gateway_dir):
        for host in ("b.test:5000", "basic.test:5000"):
            blobs = [f for f in flows if f"://{host}/v2/team/app/blobs/" in f.url]
            assert blobs and all(f.request_header("Authorization") == [f"Basic {REDACTED}"] for f in blobs), (
                name,
                host,
                [f.url for f in flows],
            )
    assert f"Basic {REDACTED}" in gateway.log_path.read_text(errors="replace")


FORM_PASSWORD = "captures-form-password-0457"
FORM_QUERY_TOKEN = "captures-form-query-token-0458"
JSON_TOKEN = "captures-json-token-0459"
remember(FORM_PASSWORD, FORM_QUERY_TOKEN, JSON_TOKEN)


def test_a_request_whose_body_and_query_are_held_out_of_the_flow_reaches_its_host_byte_for_byte(
    tmp_path: Path,
) -> None:
    """The flow shows a request's form, JSON body and query redacted from the moment it has them; what goes to the
    host is what the client sent, its Content-Length fitting the body it carries."""
    bodies: list[bytes] = []

    def token_endpoint(handler) -> tuple[int, bytes, dict[str, str]]:
        bodies.append(handler.body)
        return 200, b'{"expires_in": 60}', {"Content-Type": "application/json"}

    rules = tmp_path / "rules"
    client_auth_rule(rules, "unused.test:5000")  # the token endpoint is no ruled upstream: its flows pass through
    form = f"grant_type=password&username={ALICE}&password={quote(FORM_PASSWORD)}&service=registry".encode()
    document = json.dumps({"username": ALICE, "token": JSON_TOKEN, "padding": "x" * 300}).encode()
    gateway_dir = tmp_path / "gateway"
    with http_host(token_endpoint) as (port, seen):
        endpoint = f"http://forms.test:{port}"
        with (
            start_gateway(gateway_dir, rules, {f"forms.test:{port}": f"127.0.0.1:{port}"}) as gateway,
            httpx.Client(proxy=gateway.proxy_url, trust_env=False, timeout=30) as client,
        ):
            posted = client.post(
                f"{endpoint}/token?access_token={FORM_QUERY_TOKEN}&scope=pull",
                content=form,
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            )
            assert posted.status_code == 200, gateway.log_text()[-3000:]
            as_json = client.post(f"{endpoint}/login", content=document, headers={"Content-Type": "text/plain"})
            assert as_json.status_code == 200, gateway.log_text()[-3000:]
    assert bodies == [form, document]
    assert [(method, path) for method, path, _ in seen] == [
        ("POST", f"/token?access_token={FORM_QUERY_TOKEN}&scope=pull"),
        ("POST", "/login"),
    ]
    assert [headers["Content-Length"] for _, _, headers in seen] == [str(len(form)), str(len(document))]
    assert_nowhere([FORM_PASSWORD, FORM_QUERY_TOKEN, JSON_TOKEN], *outputs_of(gateway))
    for name, flows in recorded(gateway_dir):
        token = next(f for f in flows if f.url.startswith(f"{endpoint}/token"))
        login = next(f for f in flows if f.url.startswith(f"{endpoint}/login"))
        assert token.url == f"{endpoint}/token?access_token={REDACTED}&scope=pull", name
        assert dict(parse_qsl(token.request_body))["password"] == REDACTED, name
        assert json.loads(login.request_body)["token"] == REDACTED, name


def test_under_mitmdump_s_a_bodyless_redirect_reaches_the_client_whole_and_the_capture_redacted(
    tmp_path: Path,
) -> None:
    """Loaded as a script, ocigate's addons stand before mitmproxy's recorders and not after them: an answer sent only
    after every hook still goes to the client as received, since askagain's layer puts its headers back as it sends
    them."""
    rules = tmp_path / "rules"
    client_auth_rule(rules, "unused.test:5000")
    gateway_dir = tmp_path / "gateway"
    with http_host(cookie_host_answer) as (port, _):
        host = f"cookies.test:{port}"
        options = [f"save_stream_file={gateway_dir / 'capture.flows'}", "flow_detail=4"]
        with (
            running_gateway(
                gateway_dir, rules, {host: f"127.0.0.1:{port}"}, options, entry_point=MITMDUMP_SCRIPT
            ) as gateway,
            httpx.Client(proxy=gateway.proxy_url, trust_env=False, timeout=30) as client,
        ):
            empty = client.get(f"http://{host}/empty", follow_redirects=False)
    assert empty.status_code == 302 and empty.headers["Location"] == STORAGE
    assert empty.headers["Set-Cookie"] == f"session={COOKIE}; Path=/"
    assert_nowhere([COOKIE, LOCATION_PASSWORD], gateway_dir / "capture.flows", gateway_dir / "gateway.log")
    (recorded_empty,) = from_flows(gateway_dir / "capture.flows")
    assert recorded_empty.response_header("Set-Cookie") == [f"session={REDACTED}; Path=/"]
    assert recorded_empty.response_header("Location") == [f"https://storage-user:{REDACTED}@storage.test/blob"]


BAD_LINE_PASSWORD = "captures-bad-line-password-0460"
BAD_LINE_TOKEN = "captures-bad-line-token-0463"
remember(BAD_LINE_PASSWORD, BAD_LINE_TOKEN)


def test_mitmproxys_own_log_line_for_a_bad_request_line_holds_no_url_userinfo_nor_query_secret(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    client_auth_rule(rules, "unused.test:5000")
    with running_gateway(tmp_path / "gateway", rules, options=["flow_detail=4"]) as gateway:
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as client:
            # A port mitmproxy cannot read: the request line is refused, and quoted in its protocol error.
            target = f"http://builder:{BAD_LINE_PASSWORD}@bad.test:99999/v2/?scope=x&access_token={BAD_LINE_TOKEN}"
            client.sendall(f"GET {target} HTTP/1.1\r\n\r\n".encode())
            answer = client.recv(65536)
        assert answer.startswith(b"HTTP/1.1 400"), answer
        wait_until(
            lambda: "Bad HTTP request line" in gateway.log_text(),
            30,
            lambda why: f"mitmproxy never logged the bad request line: {why}:\n{gateway.log_text()}",
            process=gateway.process,
        )
    log = gateway.log_text()
    assert f"builder:{REDACTED}@bad.test" in log and f"&access_token={REDACTED}" in log
    assert_nowhere([BAD_LINE_PASSWORD, BAD_LINE_TOKEN], gateway.log_path)


STORAGE_TOKEN = "captures-storage-token-0461"
MIRROR_COOKIE = "captures-mirror-cookie-0462"
remember(STORAGE_TOKEN, MIRROR_COOKIE)
SIGNED = f"https://storage.test/blob?token={STORAGE_TOKEN}"
BLOB = "sha256:" + "ab" * 32


def redirecting_mirror(handler) -> tuple[int, bytes, dict[str, str]]:
    if "/blobs/" in handler.path:
        # Without a body: mitmproxy never streams it, though the gateway gave it a stream hook.
        return 307, b"", {"Location": SIGNED, "Set-Cookie": f"lb={MIRROR_COOKIE}"}
    return 200, b"{}", {"Content-Type": "application/json", "Docker-Distribution-API-Version": "registry/2.0"}


def test_a_ruled_blobs_bodyless_redirect_from_a_mirror_reaches_the_client_whole_and_the_capture_redacted(
    tmp_path: Path,
) -> None:
    """A mirror that sends blobs to signed storage URLs: the client is given the URL and cookie as the mirror sent
    them, never the placeholders the capture holds."""
    rules = tmp_path / "rules"
    gateway_dir = tmp_path / "gateway"
    with http_host(redirecting_mirror) as (port, mirror_seen):
        mirror = f"mirror.test:{port}"
        (rules / "upstream.test").mkdir(parents=True)
        (rules / "upstream.test" / "hosts.toml").write_text(
            f'server = "http://upstream.test"\n[host."http://{mirror}"]\ncapabilities = ["pull"]\n'
        )
        with (
            start_gateway(gateway_dir, rules, {mirror: f"127.0.0.1:{port}"}) as gateway,
            httpx.Client(proxy=gateway.proxy_url, trust_env=False, timeout=30) as client,
        ):
            moved = client.get(
                f"http://upstream.test/v2/team/app/blobs/{BLOB}",
                headers={"Cookie": "session=the-upstreams-own"},
                follow_redirects=False,
            )
    assert moved.status_code == 307, moved.text
    # The client's cookies are for the upstream it named: the mirror gets none.
    assert mirror_seen and all(headers.get("Cookie") is None for _, _, headers in mirror_seen)
    assert moved.headers["Location"] == SIGNED and moved.headers["Set-Cookie"] == f"lb={MIRROR_COOKIE}"
    assert_nowhere([STORAGE_TOKEN, MIRROR_COOKIE], gateway_dir / "capture.flows", gateway_dir / "gateway.log")
    (recorded_blob,) = [r for r in from_flows(gateway_dir / "capture.flows") if "/blobs/" in r.url]
    assert recorded_blob.response_header("Location") == [f"https://storage.test/blob?token={REDACTED}"]
    assert recorded_blob.response_header("Set-Cookie") == [f"lb={REDACTED}"]
