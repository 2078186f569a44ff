"""Who may use the gateway: mitmproxy's own proxyauth works with ocigate unchanged. A client without proxy
credentials is turned away with 407 before any rule is applied, so no mirror is ever contacted for it."""

import ssl
from collections.abc import Iterator

import httpx
import pytest

from tests.support.gateway import Gateway, running_gateway
from tests.support.registry import write_htpasswd
from tests.support.secrets import remember
from tests.support.world import UPSTREAM, World

USER, PASSWORD = "builder", "proxy-secret-for-tests"
remember(PASSWORD)


@pytest.fixture(scope="module")
def guarded_gateway(pull_world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    workdir = tmp_path_factory.mktemp("proxyauth")
    htpasswd = write_htpasswd(workdir / "htpasswd", {USER: PASSWORD})
    host_map = {m.name: f"127.0.0.1:{m.recorder.port}" for m in (pull_world.a, pull_world.b)}
    # A capture too: the session's secret scan (conftest) checks that the proxy password is not in it.
    options = [f"proxyauth=@{htpasswd}", f"save_stream_file={workdir / 'capture.flows'}"]
    with running_gateway(workdir / "gateway", pull_world.workdir / "rules", host_map, options) as gateway:
        yield gateway


def _client(gateway: Gateway, credentials: str = "") -> httpx.Client:
    proxy = gateway.proxy_url.replace("http://", f"http://{credentials}@" if credentials else "http://")
    context = ssl.create_default_context(cafile=str(gateway.ca_path))
    return httpx.Client(proxy=proxy, verify=context, trust_env=False)


def test_client_without_proxy_credentials_gets_407_and_no_mirror_is_asked(
    guarded_gateway: Gateway, fresh: World
) -> None:
    with _client(guarded_gateway) as client, pytest.raises(httpx.ProxyError, match="407"):
        client.get(f"https://{UPSTREAM}/v2/team/app/manifests/v1")
    with _client(guarded_gateway, f"{USER}:wrong") as client, pytest.raises(httpx.ProxyError, match="407"):
        client.get(f"https://{UPSTREAM}/v2/team/app/manifests/v1")
    assert fresh.a.recorder.requests == [] and fresh.b.recorder.requests == []


def test_client_with_proxy_credentials_is_routed(guarded_gateway: Gateway, fresh: World) -> None:
    accept = "application/vnd.oci.image.manifest.v1+json"
    with _client(guarded_gateway, f"{USER}:{PASSWORD}") as client:
        response = client.get(f"https://{UPSTREAM}/v2/team/app/manifests/v1", headers={"Accept": accept})
    assert response.status_code == 200 and response.content == fresh.app.manifest.data
    assert fresh.b.recorder.requests, "the mirror was not asked"
    # The client's proxy credentials are the gateway's business only: they never travel on to a host.
    for request in fresh.a.recorder.requests + fresh.b.recorder.requests:
        assert not request.header_values("Proxy-Authorization")
    assert PASSWORD not in guarded_gateway.log_text()
