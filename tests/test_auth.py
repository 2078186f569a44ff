"""ocigate authenticating to hosts: the addons (taddons) against a small local registry that wants Bearer tokens or
Basic credentials, with its token endpoint on the same host."""

import base64
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from mitmproxy import ctx, exceptions, http
from mitmproxy.options import Options
from mitmproxy.test import tutils

from ocigate.addon import METADATA_KEY
from ocigate.auth import MAX_KNOWN_HOSTS, Access, Authorization, Broker
from ocigate.captures import Redaction
from ocigate.credentials import Credential, OcigateStore
from ocigate.hostclient import HostClient, HostResponse
from ocigate.hoststoml import Host
from ocigate.masters import OcigateMaster
from ocigate.redaction import echo_forms
from ocigate.tokens import Token
from tests.support.http_host import http_host
from tests.test_addon import DIGEST, flow_to, gateway, write_rules

PASSWORD = "s3cret-password-for-tests"


@dataclass
class TokenRegistry:
    """What the fake registry saw: token requests (who asked, for which scopes) and registry requests."""

    port: int
    scheme: str  # "bearer" or "basic"
    users: dict[str, str]
    token_requests: list[tuple[str | None, list[str]]] = field(default_factory=list)
    registry_requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    issued: dict[str, str | None] = field(default_factory=dict)  # token -> the account it was issued to
    refuse_tokens: bool = False  # the registry stops accepting every token issued so far
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def realm(self) -> str:
        return f"http://registry.test:{self.port}/token"

    def account(self, authorization: str | None) -> str | None:
        if not authorization or not authorization.startswith("Basic "):
            return None
        username, _, password = base64.b64decode(authorization[6:]).decode().partition(":")
        return username if self.users.get(username) == password else "<wrong>"

    def answer(self, handler) -> tuple:
        authorization = handler.headers.get("Authorization")
        parts = urlsplit(handler.path)
        with self.lock:
            if parts.path == "/token" and handler.command == "POST":
                # No OAuth2 here, as at GCR: the token is to be had with a GET.
                return 404, b"{}"
            if parts.path == "/token":
                account = self.account(authorization)
                self.token_requests.append((account, parse_qs(parts.query).get("scope", [])))
                if account == "<wrong>":
                    return 401, b'{"details":"bad password"}'
                token = f"token-{len(self.issued)}"
                self.issued[token] = account
                return 200, json.dumps({"token": token, "expires_in": 300}).encode()
            self.registry_requests.append((handler.command, handler.path, authorization))
            if self.scheme == "basic":
                account = self.account(authorization)
                if account in (None, "<wrong>"):
                    return 401, b"{}", {"WWW-Authenticate": 'Basic realm="registry"'}
                return 200, b"{}"
            token = (authorization or "").removeprefix("Bearer ")
            if token not in self.issued or self.refuse_tokens:
                repository = parts.path.removeprefix("/v2/").split("/manifests/")[0].split("/blobs/")[0]
                scope = f',scope="repository:{repository}:pull"' if parts.path != "/v2/" else ""
                challenge = f'Bearer realm="{self.realm}",service="registry.test"{scope}'
                return 401, b'{"errors":[{"code":"UNAUTHORIZED"}]}', {"WWW-Authenticate": challenge}
            return 200, b"{}"


@contextmanager
def token_registry(
    tmp_path: Path, scheme: str = "bearer", users: dict[str, str] | None = None, *, only_host: bool = False
) -> Iterator[tuple]:
    """The fake registry as a mirror of upstream.test (the registry itself, unreachable, comes after it), or as its
    `only_host`; and the gateway in front of it."""
    registry = TokenRegistry(0, scheme, users if users is not None else {"alice": PASSWORD})
    with http_host(registry.answer) as (port, _):
        registry.port = port
        url = f"http://registry.test:{port}"
        rules_text = f'server = "{url}"\n' if only_host else f'[host."{url}"]\n'
        rules = write_rules(tmp_path, "upstream.test", rules_text)
        with gateway(rules, ["registry.test=127.0.0.1", "upstream.test=127.0.0.1"]) as (gw, _):
            yield gw, registry, OcigateStore(rules / "credentials.json")


async def fetch(gw, path: str, method: str = "GET", headers=()) -> http.HTTPFlow:
    flow = flow_to("upstream.test", path, method=method, headers=headers)
    await gw.requestheaders(flow)
    return flow


async def test_one_token_for_many_requests_and_it_goes_up_front_after_the_first_challenge(tmp_path: Path) -> None:
    with token_registry(tmp_path) as (gw, registry, store):
        store.save(f"registry.test:{registry.port}", Credential("alice", PASSWORD))
        flows = [await fetch(gw, "/v2/team/app/manifests/v1") for _ in range(5)]
    assert [f.response.status_code for f in flows] == [200] * 5
    # One token request, as alice, for the scope the request needs.
    assert registry.token_requests == [("alice", ["repository:team/app:pull"])]
    # Only the first request met a challenge; every later one carried the token from the start.
    authorizations = [authorization for _, _, authorization in registry.registry_requests]
    assert authorizations == [None] + ["Bearer token-0"] * 5


async def test_anonymous_tokens_are_fetched_without_credentials_and_cached_per_scope(tmp_path: Path) -> None:
    with token_registry(tmp_path) as (gw, registry, _):
        first = await fetch(gw, "/v2/team/app/manifests/v1")
        second = await fetch(gw, "/v2/team/other/manifests/v1")
        again = await fetch(gw, "/v2/team/app/tags/list")
    assert [f.response.status_code for f in (first, second, again)] == [200, 200, 200]
    assert registry.token_requests == [
        (None, ["repository:team/app:pull"]),
        (None, ["repository:team/other:pull"]),
    ]


async def test_a_refused_cached_token_is_dropped_and_the_request_retried_once_with_a_new_one(tmp_path: Path) -> None:
    with token_registry(tmp_path) as (gw, registry, _):
        await fetch(gw, "/v2/team/app/manifests/v1")
        registry.refuse_tokens = True
        refused = await fetch(gw, "/v2/team/app/manifests/v1")
        registry.refuse_tokens = False
        recovered = await fetch(gw, "/v2/team/app/manifests/v1")
    assert refused.response.status_code == 401
    assert recovered.response.status_code == 200
    # Refused: the cached token, then once with a fresh one. Recovered: neither refused token is used again.
    assert [authorization for _, _, authorization in registry.registry_requests] == [
        None,
        "Bearer token-0",
        "Bearer token-0",
        "Bearer token-1",
        "Bearer token-2",
    ]
    assert len(registry.token_requests) == 3


async def test_the_wrong_password_is_named_with_its_source_and_never_shown(tmp_path: Path) -> None:
    with token_registry(tmp_path) as (gw, registry, store):
        store.save(f"registry.test:{registry.port}", Credential("alice", "not-the-password"))
        flow = await fetch(gw, "/v2/team/app/manifests/v1")
    assert flow.response.status_code == 401
    error = json.loads(flow.response.content)["errors"][0]
    assert error["code"] == "UNAUTHORIZED"
    assert f"no token for registry.test:{registry.port} with the credential of 'alice'" in error["message"]
    assert str(store.path) in error["message"] and "HTTP 401" in error["message"]
    assert "not-the-password" not in error["message"]
    assert "not-the-password" not in json.dumps(flow.metadata[METADATA_KEY])


async def test_basic_credentials_are_sent_to_a_host_that_asks_for_basic(tmp_path: Path) -> None:
    with token_registry(tmp_path, scheme="basic") as (gw, registry, store):
        anonymous = await fetch(gw, "/v2/team/app/manifests/v1")
        store.save(f"registry.test:{registry.port}", Credential("alice", PASSWORD))
        with_credential = await fetch(gw, "/v2/team/app/manifests/v1")
    assert anonymous.response.status_code == 401
    assert "401 unauthorized without credentials" in anonymous.response.text
    assert with_credential.response.status_code == 200
    basic = "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
    assert registry.registry_requests[-1][2] == basic
    assert registry.token_requests == []


async def test_the_credential_for_the_namespace_wins_over_the_hosts(tmp_path: Path) -> None:
    users = {"alice": PASSWORD, "bob": "bobs-password"}
    with token_registry(tmp_path, users=users) as (gw, registry, store):
        host = f"registry.test:{registry.port}"
        store.save(host, Credential("alice", PASSWORD))
        store.save(host, Credential("bob", "bobs-password"), upstream="upstream.test", repository_prefix="team/b")
        await fetch(gw, "/v2/team/a/manifests/v1")
        await fetch(gw, "/v2/team/b/manifests/v1")
    assert registry.token_requests == [("alice", ["repository:team/a:pull"]), ("bob", ["repository:team/b:pull"])]


async def test_a_streamed_blob_carries_the_token_learned_from_the_hosts_ping(tmp_path: Path) -> None:
    with token_registry(tmp_path, only_host=True) as (gw, registry, store):
        store.save(f"registry.test:{registry.port}", Credential("alice", PASSWORD))
        flow = await fetch(gw, f"/v2/team/app/blobs/{DIGEST}", headers=[(b"Authorization", b"Bearer clients")])
        sent = gw.streams.as_sent(flow, flow.request)
    # The blob goes to mitmproxy to stream: its Authorization had to be known before it left. It is added as the
    # request is sent, never kept in the flow that captures and mitmweb see.
    assert flow.response is None
    assert sent.headers["Authorization"] == "Bearer token-0"
    assert flow.request.headers["Authorization"] == "Bearer <redacted>"
    assert registry.registry_requests == [("GET", "/v2/?ns=upstream.test", None)]
    assert registry.token_requests == [("alice", ["repository:team/app:pull"])]
    assert "token-0" not in json.dumps(flow.metadata[METADATA_KEY])


async def test_a_streamed_request_refused_by_the_host_is_answered_naming_the_credential(tmp_path: Path) -> None:
    with token_registry(tmp_path, only_host=True) as (gw, registry, store):
        store.save(f"registry.test:{registry.port}", Credential("alice", PASSWORD))
        flow = await fetch(gw, f"/v2/team/app/blobs/{DIGEST}")
        flow.response = tutils.tresp(status_code=401, content=b"{}")
        gw.responseheaders(flow)
        # None of the host's answer goes on (nor is it kept): the client gets the gateway's error instead.
        sent = [out for piece in (b'{"from": "the host"}', b"") for out in flow.response.stream(piece)]
        gw.response(flow)
        again = await fetch(gw, f"/v2/team/app/blobs/{DIGEST}")
        sent_again = gw.streams.as_sent(again, again.request)
    assert b"".join(sent) == flow.response.content and b"the host" not in flow.response.content
    assert flow.response.status_code == 401
    error = json.loads(flow.response.content)["errors"][0]
    assert error["code"] == "UNAUTHORIZED"
    assert f"registry.test:{registry.port} answered 401 unauthorized with the credential of 'alice'" in error["message"]
    # The refused token is not handed out again.
    assert sent_again.headers["Authorization"] == "Bearer token-1"


async def test_a_registry_token_is_sent_as_it_is(tmp_path: Path) -> None:
    registry_token = "out-of-band-token"
    with token_registry(tmp_path) as (gw, registry, store):
        registry.issued[registry_token] = "alice"
        store.save(f"registry.test:{registry.port}", Credential(registry_token=registry_token))
        flow = await fetch(gw, "/v2/team/app/manifests/v1")
    assert flow.response.status_code == 200
    assert registry.registry_requests[-1][2] == f"Bearer {registry_token}"
    assert registry.token_requests == []


async def test_a_credential_helper_that_fails_is_an_auth_failure_naming_it(tmp_path: Path) -> None:
    with http_host(lambda h: (401, b"{}", {"WWW-Authenticate": 'Basic realm="r"'})) as (port, _):
        rules = write_rules(tmp_path, "upstream.test", f'[host."http://registry.test:{port}"]\n')
        docker = tmp_path / "docker"
        docker.mkdir()
        (docker / "config.json").write_text(json.dumps({"credsStore": "ocigate-test-missing"}))
        with gateway(rules, ["registry.test=127.0.0.1"]) as (gw, tctx):
            tctx.options.update(ocigate_credential_sources=["docker"], ocigate_docker_config=str(docker))
            flow = await fetch(gw, "/v2/team/app/manifests/v1")
    assert flow.response.status_code == 401
    assert "docker-credential-ocigate-test-missing is not on PATH" in flow.response.text


def test_credentials_are_redacted_from_a_flow_once_sent() -> None:
    flow = flow_to("upstream.test", "/v2/", headers=[(b"Authorization", b"Bearer token-0")])
    flow.request.headers.add("Proxy-Authorization", "Basic YWxpY2U6cw==")
    flow.metadata["proxyauth"] = ("builder", "proxy-password")
    Redaction().responseheaders(flow)
    assert flow.request.headers.get_all("Authorization") == ["Bearer <redacted>"]
    assert flow.request.headers.get_all("Proxy-Authorization") == ["Basic <redacted>"]
    assert flow.metadata["proxyauth"] == ("builder", "<redacted>")


def test_a_credential_without_a_scheme_is_redacted_whole() -> None:
    flow = flow_to("upstream.test", "/v2/", headers=[(b"Authorization", b"ghp_TOKEN")])
    Redaction().error(flow)
    assert flow.request.headers["Authorization"] == "<redacted>"


def test_flows_still_under_way_when_the_gateway_stops_are_redacted_before_they_are_saved() -> None:
    redaction = Redaction()
    waiting = flow_to("upstream.test", "/v2/team/app/blobs/x", headers=[(b"Authorization", b"Bearer token-1")])
    redaction.requestheaders(waiting)
    redaction.done()
    assert waiting.request.headers["Authorization"] == "Bearer <redacted>"


async def test_a_registry_token_http_cannot_carry_is_refused_naming_its_source_never_shown(tmp_path: Path) -> None:
    with token_registry(tmp_path) as (gw, registry, store):
        store.save(f"registry.test:{registry.port}", Credential(registry_token="pasted-token-0 "))
        flow = await fetch(gw, "/v2/team/app/manifests/v1")
    assert flow.response.status_code == 401
    assert f"the registry token from ocigate credentials {store.path}" in flow.response.text
    assert "pasted-token-0" not in flow.response.text + flow.response.reason


async def test_the_ocigate_command_runs_its_addons_where_mitmdump_runs_a_script() -> None:
    master = OcigateMaster(Options())
    names = [type(addon).__name__ for addon in master.addons.chain]
    # After proxyauth and scripts, before what shows or saves flows and before mitmproxy's TLS set-up: one entry.
    assert names.count("OneEntry") == 1
    assert names.index("ProxyAuth") < names.index("ScriptLoader") < names.index("OneEntry")
    assert names.index("OneEntry") < min(names.index("Save"), names.index("Dumper"), names.index("TlsConfig"))
    members = [type(addon).__name__ for addon in master.addons.get("ocigate").members]
    assert members.index("Gateway") < members.index("Redaction")


@pytest.mark.parametrize("source", ["docker", "containers", "kubernetes"])
async def test_each_credential_source_is_read_where_its_option_says(tmp_path: Path, source: str) -> None:
    with token_registry(tmp_path / "world", scheme="basic") as (gw, registry, _):
        key = f"registry.test:{registry.port}"
        document = {"auths": {key: {"auth": base64.b64encode(f"alice:{PASSWORD}".encode()).decode()}}}
        # The option, what it is set to, and the file under it that holds the credential.
        option, value, inside = {
            "docker": ("ocigate_docker_config", tmp_path / "docker", "config.json"),
            "containers": ("ocigate_containers_auth", tmp_path / "containers" / "auth.json", ""),
            "kubernetes": ("ocigate_kubernetes_secrets", tmp_path / "secrets", "pull/.dockerconfigjson"),
        }[source]
        path = value / inside if inside else value
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(document))
        ctx.options.update(ocigate_credential_sources=[source], **{option: str(value)})
        flow = await fetch(gw, "/v2/team/app/manifests/v1")
    assert flow.response.status_code == 200
    assert registry.registry_requests[-1][2] == "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode()


def test_an_unknown_credential_source_is_refused_naming_the_choices(tmp_path: Path) -> None:
    with gateway(tmp_path) as (_, tctx), pytest.raises(exceptions.OptionsError, match="unknown source 'vault'"):
        tctx.options.update(ocigate_credential_sources=["ocigate", "vault"])


def test_the_scopes_a_request_needs() -> None:
    assert Access("u.test", "team/app").scopes == ("repository:team/app:pull",)
    assert Access("u.test", "team/app", push=True).scopes == ("repository:team/app:pull,push",)
    assert Access("u.test", None, catalog=True).scopes == ("registry:catalog:*",)
    assert Access("u.test", None).scopes == ()


def test_an_authorization_never_shows_its_secret() -> None:
    authorization = Authorization("Bearer token-0", "ocigate credentials /x", "alice")
    assert "token-0" not in repr(authorization) and "token-0" not in authorization.describe()


def test_a_token_scope_names_the_repository_as_the_host_asked_names_it() -> None:
    access = Access("docker.io", "library/alpine", host_repository="dockerhub-proxy/library/alpine")
    assert access.scopes == ("repository:dockerhub-proxy/library/alpine:pull",)


def test_a_mount_asks_to_pull_from_its_source_too() -> None:
    access = Access("u.test", "team/app", push=True, mounted_from="team/base")
    assert access.scopes == ("repository:team/app:pull,push", "repository:team/base:pull")


async def test_a_streamed_401_from_a_host_thought_open_teaches_the_broker_its_challenge(tmp_path: Path) -> None:
    with token_registry(tmp_path, only_host=True) as (gw, registry, store):
        store.save(f"registry.test:{registry.port}", Credential("alice", PASSWORD))
        # The host's /v2/ let the ping through, so the first blob goes out without credentials ...
        gw.shared.broker.learn(gw.shared.rules.lookup("upstream.test").hosts[0], HostResponse(200, b"OK", (), b"{}"))
        first = await fetch(gw, f"/v2/team/app/blobs/{DIGEST}")
        assert "Authorization" not in first.request.headers
        challenge = f'Bearer realm="{registry.realm}",service="registry.test",scope="repository:team/app:pull"'
        refusal = ((b"WWW-Authenticate", challenge.encode()),)
        first.response = tutils.tresp(status_code=401, content=b"{}", headers=refusal)
        gw.responseheaders(first)
        gw.response(first)
        # ... and the repository's 401 says how to authenticate: the next one carries alice's token.
        second = await fetch(gw, f"/v2/team/app/blobs/{DIGEST}")
        sent = gw.streams.as_sent(second, second.request)
    assert first.response.status_code == 401
    assert sent.headers["Authorization"] == "Bearer token-0"
    assert registry.token_requests == [("alice", ["repository:team/app:pull"])]


@pytest.mark.parametrize("realm", ["http://auth.test:99999/token", "http://auth.test:abc/token", "http://au\x01th/t"])
async def test_a_401_whose_realm_cannot_be_dialled_is_that_hosts_auth_failure_and_the_next_host_is_asked(
    tmp_path: Path, realm: str
) -> None:
    challenge = f'Bearer realm="{realm}",service="registry.test"'.encode("latin-1")
    with (
        http_host(lambda h: (401, b"{}", {"WWW-Authenticate": challenge.decode("latin-1")})) as (bad, _),
        http_host(lambda h: (200, b"{}")) as (good, _),
    ):
        hosts = f'[host."http://bad.test:{bad}"]\n[host."http://good.test:{good}"]\n'
        rules = write_rules(tmp_path, "upstream.test", hosts)
        with gateway(rules, ["bad.test=127.0.0.1", "good.test=127.0.0.1"]) as (gw, _):
            flow = await fetch(gw, "/v2/team/app/manifests/v1")
        only_bad = write_rules(tmp_path / "only", "upstream.test", f'server = "http://bad.test:{bad}"\n')
        with gateway(only_bad, ["bad.test=127.0.0.1"]) as (gw, _):
            failed = await fetch(gw, "/v2/team/app/manifests/v1")
    assert flow.response.status_code == 200
    [(host, result, fell_through)] = [
        (a["host"], a["result"], a["fell_through"]) for a in flow.metadata[METADATA_KEY]["attempts"][:1]
    ]
    assert host == f"http://bad.test:{bad}/v2" and fell_through
    assert result.startswith(f"no token for bad.test:{bad} without credentials: the bearer challenge's realm is not")
    assert failed.response.status_code == 401
    assert "ocigate can use" in json.loads(failed.response.content)["errors"][0]["message"]


async def test_a_token_endpoint_dripping_its_answer_fails_that_hosts_authentication_naming_the_realm(
    tmp_path: Path,
) -> None:
    with (
        http_host(lambda h: (200, b'{"token": "late"}'), drip=0.05) as (auth, _),
        http_host(lambda h: (200, b"{}")) as (good, _),
    ):
        challenge = f'Bearer realm="http://auth.test:{auth}/token",service="registry.test"'
        with http_host(lambda h: (401, b"{}", {"WWW-Authenticate": challenge})) as (bad, _):
            hosts = f'[host."http://bad.test:{bad}"]\n[host."http://good.test:{good}"]\n'
            rules = write_rules(tmp_path, "upstream.test", hosts)
            host_map = ["bad.test=127.0.0.1", "good.test=127.0.0.1", "auth.test=127.0.0.1"]
            with gateway(rules, host_map, read_timeout=1) as (gw, _):
                flow = await fetch(gw, "/v2/team/app/manifests/v1")
    assert flow.response.status_code == 200
    assert [(a["host"], a["result"]) for a in flow.metadata[METADATA_KEY]["attempts"]] == [
        (
            f"http://bad.test:{bad}/v2",
            f"no token for bad.test:{bad} without credentials: token request to http://auth.test:{auth} failed: "
            "answer not complete within 1 s",
        ),
        (f"http://good.test:{good}/v2", "200"),
    ]


def test_at_most_max_known_hosts_have_their_challenge_remembered_the_latest_kept() -> None:
    broker = Broker(HostClient())
    hosts = [Host("https", f"mirror{number}.test", 443, "/v2", frozenset()) for number in range(5000)]
    for number, host in enumerate(hosts):
        challenge = f'Bearer realm="https://realm{number}.test/token"'.encode()
        broker.learn(host, HostResponse(401, b"", ((b"WWW-Authenticate", challenge),), b""))
    assert [host for host in hosts if broker.knows(host)] == hosts[-MAX_KNOWN_HOSTS:]


async def test_the_record_names_the_credential_its_source_and_whether_the_token_was_fetched_or_cached(
    tmp_path: Path,
) -> None:
    with token_registry(tmp_path) as (gw, registry, store):
        store.save(f"registry.test:{registry.port}", Credential("alice", PASSWORD))
        first = await fetch(gw, "/v2/team/app/manifests/v1")
        second = await fetch(gw, "/v2/team/app/manifests/v1")
        blob = await fetch(gw, f"/v2/team/app/blobs/{DIGEST}")
    records = [flow.metadata[METADATA_KEY] for flow in (first, second, blob)]
    assert [r["token"] for r in records] == ["fetched", "cached", "cached"]
    # The credential by its source and the key it was found under, never its value.
    used = f"'alice' from ocigate credentials {tmp_path / 'credentials.json'} (host registry.test:"
    assert all(r["credential"].startswith(used) for r in records)
    assert records[0]["attempts"][0]["token"] == "fetched" and records[1]["attempts"][0]["token"] == "cached"
    # A mirror is asked with ns=, and the record says so; the token and the password are nowhere in it.
    assert all(r["ns"] == "upstream.test" and r["method"] == "GET" for r in records)
    assert not any(secret in json.dumps(records) for secret in (PASSWORD, "token-0"))


def test_the_forms_a_host_could_echo_are_the_authorizations_and_a_tokens_are_worked_out_once() -> None:
    token = Token("tok-0123456789abcdef", expires_at=0.0)
    with_token = Authorization(token.authorization, "ocigate credentials", "alice", token=token)
    forms = with_token.echo_forms()
    assert forms == echo_forms("Bearer tok-0123456789abcdef") and b"tok-0123456789abcdef" in forms
    # Kept with the token: the next request with it gets the same forms without working them out again.
    assert Authorization(token.authorization, token=token).echo_forms() is forms
    basic = Authorization("Basic YWxpY2U6c2VjcmV0LXNlY3JldA==", "ocigate credentials", "alice")
    assert basic.echo_forms() == echo_forms(basic.header) and b"alice:secret-secret" in basic.echo_forms()
    assert Authorization().echo_forms() == ()
    # A header that is not the token's is masked in its own forms.
    other = Authorization("Bearer another-token-0123", token=token)
    assert other.echo_forms() == echo_forms("Bearer another-token-0123")
