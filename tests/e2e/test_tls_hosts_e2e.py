"""A host's `ca`, `client` and `skip_verify` hold on every connection to it: ocigate's own (manifests) and the ones
mitmproxy opens for streamed blobs. The mirrors are real registries with TLS from throwaway CAs; one demands a
client certificate, one has a certificate nobody trusts, one a certificate from a CA made as `openssl req -x509`
makes it (no keyUsage extension), one a certificate from a CA in the gateway's system trust store."""

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import httpx
import pytest

from tests.support.clients import assert_layout_holds, skopeo_copy_to_layout
from tests.support.gateway import MITMDUMP_SCRIPT, Gateway, running_gateway
from tests.support.images import Image, all_blobs, make_image, push_image
from tests.support.registry import Registry, running_registry
from tests.support.tls import (
    CA,
    client_ssl_context,
    issue_client_cert,
    issue_server_cert,
    make_ca,
    make_openssl_req_ca,
)


@dataclass
class World:
    gateway: Gateway
    mutual: Registry  # TLS from our CA, client certificate required
    self_signed: Registry  # TLS from a CA the gateway is not told about
    plain: Registry  # TLS from a CA without keyUsage, as `openssl req -x509` makes it
    system: Registry  # TLS from a CA in the gateway's system trust store (SSL_CERT_FILE)
    stranger_ca: CA
    image: Image


def _hosts_toml(rules: Path, upstream: str, body: str) -> Path:
    directory = rules / upstream
    directory.mkdir(parents=True)
    (directory / "hosts.toml").write_text(f'server = "https://{upstream}"\n\n{body}')
    return directory


# mitmproxy calls a script's hooks at another place among its own addons than the ocigate command's: both must work.
@pytest.fixture(scope="module", params=[None, MITMDUMP_SCRIPT], ids=["ocigate", "mitmdump-script"])
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    workdir = tmp_path_factory.mktemp("tls")
    ca = make_ca(workdir / "ca")
    stranger = make_ca(workdir / "stranger-ca", common_name="nobody trusts this CA")
    mutual_tls = issue_server_cert(ca, workdir / "mutual-certs", ["mutual.test"], ["127.0.0.1"])
    stranger_tls = issue_server_cert(stranger, workdir / "stranger-certs", ["stranger.test"], ["127.0.0.1"])
    client_cert = issue_client_cert(ca, workdir / "client", "ocigate")
    plain_ca = make_openssl_req_ca(workdir / "plain-ca", "plain CA")
    other_plain_ca = make_openssl_req_ca(workdir / "other-plain-ca", "plain CA")  # the same name, another key
    plain_tls = issue_server_cert(plain_ca, workdir / "plain-certs", ["plain.test"], ["127.0.0.1"])
    system_ca = make_ca(workdir / "system-ca", common_name="a CA of the system store")
    system_tls = issue_server_cert(system_ca, workdir / "system-certs", ["system.test"], ["127.0.0.1"])
    image = make_image("tls-app", layers=3)
    with (
        running_registry(
            workdir / "mutual",
            tls=mutual_tls,
            extra_config={"http": {"tls": {"clientcas": [str(ca.cert_path)]}}},
        ) as mutual,
        running_registry(workdir / "stranger", tls=stranger_tls) as self_signed,
        running_registry(workdir / "plain", tls=plain_tls) as plain,
        running_registry(workdir / "system", tls=system_tls) as system,
    ):
        with httpx.Client(verify=client_ssl_context(ca.cert_path, client_cert)) as client:
            push_image(mutual.url, "team/app", "v1", image, client=client)
        for registry, registry_ca in ((self_signed, stranger), (plain, plain_ca), (system, system_ca)):
            with httpx.Client(verify=client_ssl_context(registry_ca.cert_path)) as client:
                push_image(registry.url, "team/app", "v1", image, client=client)

        rules = workdir / "rules"
        secure = _hosts_toml(
            rules,
            "secure.test",
            '[host."https://mutual.test:5000"]\n'
            '  capabilities = ["pull", "resolve"]\n'
            '  ca = "ca.pem"\n'
            '  client = [["client.pem", "client-key.pem"]]\n',
        )
        shutil.copy(ca.cert_path, secure / "ca.pem")
        shutil.copy(client_cert[0], secure / "client.pem")
        shutil.copy(client_cert[1], secure / "client-key.pem")
        _hosts_toml(
            rules,
            "insecure.test",
            '[host."https://stranger.test:5000"]\n  capabilities = ["pull", "resolve"]\n  skip_verify = true\n',
        )
        _hosts_toml(
            rules, "verified.test", '[host."https://stranger.test:5000"]\n  capabilities = ["pull", "resolve"]\n'
        )
        for upstream, plain_ca_given in (("plainca.test", plain_ca), ("wrongca.test", other_plain_ca)):
            directory = _hosts_toml(
                rules,
                upstream,
                '[host."https://plain.test:5000"]\n  capabilities = ["pull", "resolve"]\n  ca = "ca.pem"\n',
            )
            shutil.copy(plain_ca_given.cert_path, directory / "ca.pem")
        _hosts_toml(rules, "systemca.test", '[host."https://system.test:5000"]\n  capabilities = ["pull", "resolve"]\n')
        host_map = {
            "mutual.test:5000": f"127.0.0.1:{mutual.port}",
            "stranger.test:5000": f"127.0.0.1:{self_signed.port}",
            "plain.test:5000": f"127.0.0.1:{plain.port}",
            "system.test:5000": f"127.0.0.1:{system.port}",
        }
        entry_point = {"entry_point": request.param} if request.param else {}
        # The gateway's system trust store is the one CA: what OpenSSL, so both of its stacks, read instead of the
        # distribution's bundle.
        env = {"SSL_CERT_FILE": str(system_ca.cert_path)}
        with running_gateway(workdir / "gateway", rules, host_map, env=env, **entry_point) as gateway:
            yield World(gateway, mutual, self_signed, plain, system, stranger, image)


def _copy(world: World, tmp_path: Path, upstream: str):
    return skopeo_copy_to_layout(world.gateway, tmp_path, f"{upstream}/team/app:v1")


def _blob_gets(registry: Registry) -> set[str]:
    return {unquote(e.uri).split("?")[0].rsplit("/", 1)[-1] for e in registry.access_log() if "/blobs/" in e.uri}


def test_host_ca_and_client_certificate_serve_manifests_and_streamed_blobs(world: World, tmp_path: Path) -> None:
    result, layout = _copy(world, tmp_path, "secure.test")
    assert result.returncode == 0, result.stderr.decode()
    copied = {f"sha256:{p.name}" for p in (layout / "blobs" / "sha256").iterdir()}
    assert {b.digest for b in all_blobs(world.image)} <= copied
    # The blobs came over mitmproxy's own connections, which the registry only accepts with the client certificate.
    assert {b.digest for b in world.image.layers} <= _blob_gets(world.mutual)


def test_skip_verify_accepts_an_untrusted_certificate_on_both_paths(world: World, tmp_path: Path) -> None:
    result, _ = _copy(world, tmp_path, "insecure.test")
    assert result.returncode == 0, result.stderr.decode()
    assert {b.digest for b in world.image.layers} <= _blob_gets(world.self_signed)


def test_without_skip_verify_the_untrusted_host_is_refused_and_named(world: World, tmp_path: Path) -> None:
    result, _ = _copy(world, tmp_path, "verified.test")
    assert result.returncode != 0
    log = world.gateway.log_text()
    assert "https://stranger.test:5000/v2: " in log
    assert "CERTIFICATE_VERIFY_FAILED" in log or "certificate verify failed" in log


def test_a_ca_without_key_usage_is_trusted_on_both_paths(world: World, tmp_path: Path) -> None:
    # containerd, docker and skopeo accept such a CA; Python 3.13's default context alone would not.
    result, layout = _copy(world, tmp_path, "plainca.test")
    assert result.returncode == 0, result.stderr.decode()
    assert_layout_holds(layout, world.image)
    assert {b.digest for b in world.image.layers} <= _blob_gets(world.plain)


def test_a_ca_that_did_not_sign_the_mirrors_certificate_is_refused(world: World, tmp_path: Path) -> None:
    result, _ = _copy(world, tmp_path, "wrongca.test")
    assert result.returncode != 0
    log = world.gateway.log_text()
    assert "https://plain.test:5000/v2: " in log
    assert "CERTIFICATE_VERIFY_FAILED" in log or "certificate verify failed" in log


def test_a_ca_of_the_system_store_is_trusted_on_both_paths(world: World, tmp_path: Path) -> None:
    result, layout = _copy(world, tmp_path, "systemca.test")
    assert result.returncode == 0, result.stderr.decode()
    assert_layout_holds(layout, world.image)
    assert {b.digest for b in world.image.layers} <= _blob_gets(world.system)


def test_registry_without_rule_passes_through_undecrypted(world: World) -> None:
    # stranger.test:5000 is a host of other rules but has no rule of its own: a client that trusts only the
    # registry's own CA gets through, so the gateway relayed the TLS bytes instead of presenting its own certificate.
    with httpx.Client(
        proxy=world.gateway.proxy_url, verify=client_ssl_context(world.stranger_ca.cert_path), trust_env=False
    ) as client:
        response = client.get("https://stranger.test:5000/v2/")
    assert response.status_code == 200
    assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert any(e.uri == "/v2/" for e in world.self_signed.access_log())
