"""ocigate authenticating to a real mirror: distribution 2.8 with token auth, whose token server (the tests') records
every token request and the account it was made for. One mirror serves two upstreams, a.test and b.test, each with
its own account; it sends blob downloads to another host (object storage), which must never see a credential.

Every test starts its own gateway (so its token cache starts empty) with flow_detail=3, which prints every header
of every flow, and a capture file: the session's secret scan (conftest) then checks both.
"""

import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from ocigate.credentials import Credential, OcigateStore
from tests.support.clients import skopeo, skopeo_copy_to_layout
from tests.support.faulty_host import running_faulty_host
from tests.support.gateway import Gateway, running_gateway
from tests.support.images import Image, make_image, push_image
from tests.support.recorder import Recorder, recording_proxy
from tests.support.registry import Registry, running_registry, write_htpasswd
from tests.support.secrets import remember
from tests.support.through import get_through
from tests.support.token_server import TokenServer, running_token_server

MIRROR = "mirror.test:5000"
BLOBS = "blobs.test:5000"
ALICE, ALICE_PASSWORD = "alice", "alice-password-for-tests"  # may pull team/*: a.test's account
BOB, BOB_PASSWORD = "bob", "bob-password-for-tests"  # may pull other/*: b.test's account
CAROL, CAROL_PASSWORD = "carol", "carol-password-for-tests"  # may pull team/*: the credential helper's
remember(ALICE_PASSWORD, BOB_PASSWORD, CAROL_PASSWORD)


@dataclass
class AuthWorld:
    workdir: Path
    tokens: TokenServer
    registry: Registry
    mirror: Recorder  # in front of the token-auth registry; redirects blob GETs to BLOBS
    blobs: Recorder  # object storage: the same content, no authentication
    app: Image  # a.test/team/app:v1, five layers
    other: Image  # b.test/other/app:v1
    rules: Path

    def token_requests(self, account: str | None = None) -> list[tuple[str | None, tuple[str, ...]]]:
        return [(r.account, r.scopes) for r in self.tokens.requests if account is None or r.account == account]


@pytest.fixture(scope="module")
def auth_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthWorld]:
    workdir = tmp_path_factory.mktemp("auth")
    access = {ALICE: {"team/*": ["pull"]}, BOB: {"other/*": ["pull"]}, CAROL: {"team/*": ["pull"]}}
    accounts = {ALICE: ALICE_PASSWORD, BOB: BOB_PASSWORD, CAROL: CAROL_PASSWORD}
    app, other = make_image("auth-app", layers=5), make_image("auth-other", layers=2)
    with (
        running_token_server(workdir / "tokens", accounts, access=access) as tokens,
        running_registry(workdir / "registry", extra_config=tokens.registry_auth_config()) as registry,
        # Object storage: a second registry on the same storage, without authentication.
        running_registry(
            workdir / "blob-store",
            extra_config={"storage": {"filesystem": {"rootdirectory": str(registry.root / "storage")}}},
        ) as blob_store,
        recording_proxy(blob_store.url) as blobs,
        recording_proxy(registry.url, redirect_blobs_to=f"http://{BLOBS}") as mirror,
    ):
        for repository, image in (("team/app", app), ("other/app", other)):
            pusher = tokens.mint("pusher", [_repository(repository, "pull", "push")])
            with httpx.Client(headers={"Authorization": f"Bearer {pusher}"}) as client:
                push_image(registry.url, repository, "v1", image, client=client)
        rules = workdir / "rules"
        for upstream in ("a.test", "b.test"):
            (rules / upstream).mkdir(parents=True)
            (rules / upstream / "hosts.toml").write_text(
                f'server = "https://{upstream}"\n[host."http://{MIRROR}"]\n  capabilities = ["pull", "resolve"]\n'
            )
        tokens.clear()
        yield AuthWorld(workdir, tokens, registry, mirror, blobs, app, other, rules)


def _repository(name: str, *actions: str) -> dict:
    return {"type": "repository", "name": name, "actions": list(actions)}


@pytest.fixture
def world(auth_world: AuthWorld) -> AuthWorld:
    auth_world.tokens.clear()
    auth_world.mirror.clear()
    auth_world.blobs.clear()
    return auth_world


@pytest.fixture
def gateway_dir(tmp_path: Path) -> Path:
    return tmp_path / "gateway"


def start_gateway(world: AuthWorld, directory: Path, *options: str, env: dict[str, str] | None = None):
    host_map = {
        MIRROR: f"127.0.0.1:{world.mirror.port}",
        BLOBS: f"127.0.0.1:{world.blobs.port}",
    }
    capture = directory / "capture.flows"
    options = ("flow_detail=3", f"save_stream_file={capture}", *options)
    return running_gateway(directory, world.rules, host_map, options, env=env or {})


def store(directory: Path) -> OcigateStore:
    # The file running_gateway points the gateway's ocigate_credentials at.
    return OcigateStore(directory / "ocigate-credentials.json")


def copy(gateway: Gateway, home: Path, reference: str) -> subprocess.CompletedProcess:
    result, _ = skopeo_copy_to_layout(gateway, home, reference)
    return result


def assert_copied(result: subprocess.CompletedProcess, gateway: Gateway) -> None:
    assert result.returncode == 0, f"{result.stderr.decode()}\ngateway log:\n{gateway.log_text()[-4000:]}"


def test_one_mirror_two_upstreams_each_pulled_with_its_own_account(
    world: AuthWorld, gateway_dir: Path, tmp_path: Path
) -> None:
    credentials = store(gateway_dir)
    credentials.save(MIRROR, Credential(ALICE, ALICE_PASSWORD), upstream="a.test")
    credentials.save(MIRROR, Credential(BOB, BOB_PASSWORD), upstream="b.test")
    with start_gateway(world, gateway_dir) as gateway:
        assert_copied(copy(gateway, tmp_path / "a", "a.test/team/app:v1"), gateway)
        assert_copied(copy(gateway, tmp_path / "b", "b.test/other/app:v1"), gateway)
    assert world.token_requests() == [
        (ALICE, ("repository:team/app:pull",)),
        (BOB, ("repository:other/app:pull",)),
    ]
    # The mirror learned which upstream each request was for. Only the first came without a token: its challenge
    # told the gateway where to get tokens for this host, and every later request carried one from the start.
    requests = world.mirror.requests
    for request in requests:
        assert request.query()["ns"] in (["a.test"], ["b.test"]), request.target
    assert [r for r in requests if not r.header_values("Authorization")] == requests[:1]


def test_a_five_layer_copy_costs_one_token_request_and_blob_storage_never_sees_it(
    world: AuthWorld, gateway_dir: Path, tmp_path: Path
) -> None:
    store(gateway_dir).save(MIRROR, Credential(ALICE, ALICE_PASSWORD), upstream="a.test")
    with start_gateway(world, gateway_dir) as gateway:
        assert_copied(copy(gateway, tmp_path, "a.test/team/app:v1"), gateway)
    assert world.token_requests() == [(ALICE, ("repository:team/app:pull",))]
    blobs = {blob.digest for blob in (world.app.config, *world.app.layers)}
    tokened = [r for r in world.mirror.requests if r.header_values("Authorization")]
    assert len(tokened) >= 1 + len(blobs)  # the manifest and every blob, on one token
    # The mirror redirected every blob download; object storage served them, and saw no credential of any kind.
    assert blobs <= {r.path.rsplit("/", 1)[-1] for r in world.blobs.requests if r.method == "GET"}
    for request in world.blobs.requests:
        assert not request.header_values("Authorization"), request.target
        assert not request.header_values("Proxy-Authorization"), request.target


def test_the_wrong_account_for_a_namespace_fails_unauthorized_naming_it(
    world: AuthWorld, gateway_dir: Path, tmp_path: Path
) -> None:
    # Alice may not pull other/*, and she is what is stored for b.test.
    store(gateway_dir).save(MIRROR, Credential(ALICE, ALICE_PASSWORD), upstream="b.test")
    with start_gateway(world, gateway_dir) as gateway:
        result = copy(gateway, tmp_path, "b.test/other/app:v1")
        log = gateway.log_text()
    assert result.returncode != 0
    stderr = result.stderr.decode()
    assert "unauthorized" in stderr.lower(), stderr
    assert f"http://{MIRROR}/v2: 401 unauthorized with the credential of 'alice' from ocigate credentials" in log
    assert (ALICE, ("repository:other/app:pull",)) in world.token_requests()
    # The token she got allowed nothing, and no other account was tried in her place.
    assert {account for account, _ in world.token_requests()} == {ALICE}


def test_twenty_concurrent_pulls_share_one_token(world: AuthWorld, gateway_dir: Path) -> None:
    store(gateway_dir).save(MIRROR, Credential(ALICE, ALICE_PASSWORD), upstream="a.test")
    with start_gateway(world, gateway_dir) as gateway, ThreadPoolExecutor(max_workers=20) as pool:
        pulled = list(pool.map(lambda _: pull(gateway, world.app), range(20)))
    assert pulled == [world.app.manifest.digest] * 20
    assert world.token_requests() == [(ALICE, ("repository:team/app:pull",))]


def test_an_expired_token_costs_one_more_request(world: AuthWorld, gateway_dir: Path) -> None:
    store(gateway_dir).save(MIRROR, Credential(ALICE, ALICE_PASSWORD), upstream="a.test")
    lifetime = 3.0
    world.tokens.lifetime = lifetime
    try:
        with start_gateway(world, gateway_dir) as gateway:
            pull(gateway, world.app)
            pull(gateway, world.app)
            time.sleep(lifetime + 0.5)
            pull(gateway, world.app)
    finally:
        world.tokens.lifetime = 300
    assert world.token_requests() == [(ALICE, ("repository:team/app:pull",))] * 2


def pull(gateway: Gateway, image: Image) -> str:
    """An HTTP client's pull of a.test/team/app:v1 through the gateway: the manifest by tag, then every blob
    (following the mirror's redirects), each checked against its digest. Returns the manifest's digest."""
    accept = "application/vnd.oci.image.manifest.v1+json"
    with httpx.Client(proxy=gateway.proxy_url, verify=str(gateway.ca_path), trust_env=False, timeout=30) as client:
        response = client.get("https://a.test/v2/team/app/manifests/v1", headers={"Accept": accept})
        assert response.status_code == 200, response.text
        assert response.content == image.manifest.data
        for blob in (image.config, *image.layers):
            got = client.get(f"https://a.test/v2/team/app/blobs/{blob.digest}", follow_redirects=True)
            assert got.status_code == 200 and got.content == blob.data, blob.digest
    return response.headers["Docker-Content-Digest"]


def test_docker_config_auths_and_credential_helpers_and_a_rotated_password(
    world: AuthWorld, gateway_dir: Path, tmp_path: Path
) -> None:
    docker_config = gateway_dir / "docker-config"
    docker_config.mkdir(parents=True)
    config = docker_config / "config.json"

    def write_config(document: dict) -> None:
        # Replaced the way docker writes it (a new file renamed over the old), so the change is one event.
        partial = config.with_suffix(".new")
        partial.write_text(json.dumps(document))
        os.replace(partial, config)

    auth = base64.b64encode(f"{ALICE}:not-her-password".encode()).decode()
    write_config({"auths": {MIRROR: {"auth": auth}}})
    helpers = tmp_path / "bin"
    helpers.mkdir()
    helper_answer = tmp_path / "helper-answer.json"
    helper_answer.write_text(json.dumps({"ServerURL": MIRROR, "Username": CAROL, "Secret": CAROL_PASSWORD}))
    helper = helpers / "docker-credential-ocigate-test"
    helper.write_text(f'#!/bin/sh\n[ "$1" = get ] || exit 1\nread server\ncat {helper_answer}\n')
    helper.chmod(0o755)
    env = {"PATH": f"{helpers}:{os.environ['PATH']}"}
    with start_gateway(world, gateway_dir, "ocigate_credential_sources=docker", env=env) as gateway:
        refused = copy(gateway, tmp_path / "refused", "a.test/team/app:v1")
        assert refused.returncode != 0
        auth = base64.b64encode(f"{ALICE}:{ALICE_PASSWORD}".encode()).decode()
        write_config({"auths": {MIRROR: {"auth": auth}}})
        assert_copied(copy(gateway, tmp_path / "rotated", "a.test/team/app:v1"), gateway)
        write_config({"auths": {MIRROR: {"auth": auth}}, "credHelpers": {MIRROR: "ocigate-test"}})
        assert_copied(copy(gateway, tmp_path / "helper", "a.test/team/app:v1"), gateway)
        log = gateway.log_text()
    assert f"docker config {config}: auths['{MIRROR}']" in log  # the refusal names where the password came from
    # The wrong password was refused at the token server (OAuth2 POST, then GET as containerd does), the rotated one
    # worked without a restart, and then the credential helper's account took over.
    assert [(r.method, r.account, r.status) for r in world.tokens.requests] == [
        ("POST", ALICE, 401),
        ("GET", ALICE, 401),
        ("POST", ALICE, 200),
        ("POST", CAROL, 200),
    ]


def test_ocigate_login_with_a_namespace_is_what_the_gateway_pulls_with(
    world: AuthWorld, gateway_dir: Path, tmp_path: Path
) -> None:
    credentials = gateway_dir / "ocigate-credentials.json"
    login = subprocess.run(
        [
            *(sys.executable, "-m", "ocigate.cli", "login", "--namespace", "a.test", "--credentials", str(credentials)),
            *("--map-host", f"{MIRROR}=127.0.0.1:{world.mirror.port}", "-u", ALICE, "--password-stdin"),
            f"http://{MIRROR}",
        ],
        input=f"{ALICE_PASSWORD}\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert login.returncode == 0, login.stderr
    assert ALICE_PASSWORD not in login.stdout + login.stderr
    # The login was checked against the mirror's /v2/ for that namespace, with a token of alice's.
    assert world.mirror.requests[-1].target == "/v2/?ns=a.test"
    world.tokens.clear()
    with start_gateway(world, gateway_dir) as gateway:
        assert_copied(copy(gateway, tmp_path, "a.test/team/app:v1"), gateway)
    assert world.token_requests() == [(ALICE, ("repository:team/app:pull",))]


def test_a_mirror_with_htpasswd_basic_auth_gets_the_stored_password(tmp_path: Path) -> None:
    users = {ALICE: ALICE_PASSWORD}
    image = make_image("basic-app", layers=2)
    with (
        running_registry(tmp_path / "basic", htpasswd=write_htpasswd(tmp_path / "htpasswd", users)) as registry,
        recording_proxy(registry.url) as mirror,
    ):
        with httpx.Client(auth=(ALICE, ALICE_PASSWORD)) as client:
            push_image(registry.url, "team/app", "v1", image, client=client)
        rules = tmp_path / "rules"
        (rules / "d.test").mkdir(parents=True)
        (rules / "d.test" / "hosts.toml").write_text('[host."http://basic.test:5000"]\n')
        host_map = {"basic.test:5000": f"127.0.0.1:{mirror.port}"}
        gateway_dir = tmp_path / "gateway"
        with running_gateway(gateway_dir, rules, host_map, ["flow_detail=3"]) as gateway:
            anonymous = copy(gateway, tmp_path / "anonymous", "d.test/team/app:v1")
            store(gateway_dir).save("basic.test:5000", Credential(ALICE, ALICE_PASSWORD))
            assert_copied(copy(gateway, tmp_path / "alice", "d.test/team/app:v1"), gateway)
    assert anonymous.returncode != 0 and "unauthorized" in anonymous.stderr.decode().lower()
    basic = "Basic " + base64.b64encode(f"{ALICE}:{ALICE_PASSWORD}".encode()).decode()
    authorized = [r for r in mirror.requests if r.header_values("Authorization") == [basic]]
    assert {r.path for r in authorized} >= {f"/v2/team/app/blobs/{b.digest}" for b in (image.config, *image.layers)}


def test_a_client_that_authenticates_itself_gets_the_registrys_challenge_and_no_mirror_its_token(
    world: AuthWorld, tmp_path: Path
) -> None:
    # c.test:5000 is the token registry itself, its own `server`; an empty registry is its mirror. The gateway has
    # no credentials at all: every token the token server issues is the client's.
    upstream = "c.test:5000"
    with running_registry(tmp_path / "empty") as empty, recording_proxy(empty.url) as empty_mirror:
        rules = tmp_path / "rules"
        (rules / upstream).mkdir(parents=True)
        (rules / upstream / "hosts.toml").write_text(
            f'authentication = "client"\nserver = "http://{upstream}"\n[host."http://empty.test:5000"]\n'
        )
        host_map = {
            upstream: f"127.0.0.1:{world.mirror.port}",
            "empty.test:5000": f"127.0.0.1:{empty_mirror.port}",
            BLOBS: f"127.0.0.1:{world.blobs.port}",
        }
        home = tmp_path / "client"
        home.mkdir()
        (home / "auth.json").write_text(
            json.dumps({"auths": {upstream: {"auth": base64.b64encode(f"{BOB}:{BOB_PASSWORD}".encode()).decode()}}})
        )
        with running_gateway(tmp_path / "gateway", rules, host_map, ["flow_detail=3"]) as gateway:
            assert_copied(copy(gateway, home, f"{upstream}/other/app:v1"), gateway)
    # skopeo heard the registry's own challenge and fetched its token as bob.
    assert (BOB, ("repository:other/app:pull",)) in world.token_requests()
    assert world.mirror.requests[0].path == "/v2/"
    assert all(r.header_values("Authorization") for r in world.mirror.requests[1:])
    # The mirror was asked first, for every request, and never saw the client's token.
    assert empty_mirror.requests, "the mirror was not asked"
    assert not [r.target for r in empty_mirror.requests if r.header_values("Authorization")]


def test_a_mirror_that_echoes_request_headers_never_gets_ocigates_password_to_the_client_the_log_or_a_capture(
    tmp_path: Path,
) -> None:
    users = {ALICE: ALICE_PASSWORD}
    with (
        running_registry(tmp_path / "basic", htpasswd=write_htpasswd(tmp_path / "htpasswd", users)) as registry,
        running_faulty_host(registry.url) as mirror,
    ):
        mirror.echo_headers()
        rules = tmp_path / "rules"
        (rules / "d.test").mkdir(parents=True)
        (rules / "d.test" / "hosts.toml").write_text('[host."http://echo.test:5000"]\n')
        gateway_dir = tmp_path / "gateway"
        capture = gateway_dir / "capture.flows"
        options = ["flow_detail=4", f"save_stream_file={capture}"]
        with running_gateway(gateway_dir, rules, {"echo.test:5000": f"127.0.0.1:{mirror.port}"}, options) as gateway:
            store(gateway_dir).save("echo.test:5000", Credential(ALICE, ALICE_PASSWORD))
            answer = get_through(gateway, "d.test", "/v2/team/app/manifests/v1")
            client_home = tmp_path / "client"
            inspect = skopeo(
                gateway,
                client_home,
                "inspect",
                "--raw",
                "--cert-dir",
                str(gateway.cert_dir(client_home)),
                "docker://d.test/team/app:v1",
            )
        outputs = gateway.log_text().encode() + capture.read_bytes()
    assert mirror.served("echo_headers") >= 2, "the mirror never echoed a request"
    assert answer.status == 400 and b"X-You-Sent" not in answer.body and inspect.returncode != 0
    basic = base64.b64encode(f"{ALICE}:{ALICE_PASSWORD}".encode())
    for secret in (basic, ALICE_PASSWORD.encode(), f"{ALICE}:{ALICE_PASSWORD}".encode()):
        for where, data in (
            ("the client", answer.body + str(answer.headers).encode()),
            ("skopeo", inspect.stderr),
            ("the log or the capture", outputs),
        ):
            assert secret not in data, f"{where} got the secret"
    assert b"*" * len(basic) in answer.body


def test_a_token_registry_mirror_that_echoes_never_gets_ocigates_cached_token_to_the_client_the_log_or_a_capture(
    world: AuthWorld, tmp_path: Path
) -> None:
    """The bearer token ocigate fetched, then sent again from its cache, echoed by the mirror in its headers and body,
    reaches no client, no log line and no capture: masked in every form a host could echo it."""
    with running_faulty_host(world.registry.url) as mirror:
        mirror.echo_headers()
        rules = tmp_path / "rules"
        (rules / "d.test").mkdir(parents=True)
        (rules / "d.test" / "hosts.toml").write_text('[host."http://echo.test:5000"]\n')
        gateway_dir = tmp_path / "gateway"
        capture = gateway_dir / "capture.flows"
        options = ["flow_detail=4", f"save_stream_file={capture}"]
        with running_gateway(gateway_dir, rules, {"echo.test:5000": f"127.0.0.1:{mirror.port}"}, options) as gateway:
            store(gateway_dir).save("echo.test:5000", Credential(ALICE, ALICE_PASSWORD))
            answers = [get_through(gateway, "d.test", "/v2/team/app/manifests/v1") for _ in range(2)]
        outputs = gateway.log_text().encode() + capture.read_bytes()
    sent = {value for request in mirror.requests for value in request.header_values("Authorization")}
    tokens = {value.partition(" ")[2] for value in sent if value.startswith("Bearer ")}
    # One token, fetched once and sent from the cache the second time; both requests echoed.
    assert len(tokens) == 1 and mirror.served("echo_headers") >= 2, sent
    assert world.token_requests(ALICE) == [(ALICE, ("repository:team/app:pull",))]
    (token,) = tokens
    for answer in answers:
        assert answer.status == 400 and b"X-You-Sent" not in answer.body
        assert b"*" * len(token) in answer.body
    for form in (token, f"Bearer {token}", json.dumps(token)[1:-1]):
        for where, data in (
            ("the client", b"".join(answer.body + str(answer.headers).encode() for answer in answers)),
            ("the log or the capture", outputs),
        ):
            assert form.encode() not in data, f"{where} got the token"
