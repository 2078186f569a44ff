"""The three ways to start the gateway all give the same gateway: `./run.sh`, the `ocigate` command, and mitmproxy
loading the script. Each answers the ping of an upstream whose name resolves nowhere, which only works when the
gateway runs with connection_strategy=lazy (an eager proxy would dial upstream.test at CONNECT and fail)."""

import ssl
import sys
from pathlib import Path

import httpx
import pytest

from tests.support.gateway import MITMDUMP_SCRIPT, Gateway, running_gateway

REPO = Path(__file__).resolve().parents[2]


def _rules(tmp_path: Path) -> Path:
    (tmp_path / "rules" / "upstream.test").mkdir(parents=True)
    (tmp_path / "rules" / "upstream.test" / "hosts.toml").write_text('[host."https://mirror.test"]\n')
    return tmp_path / "rules"


def _ping(gateway: Gateway) -> httpx.Response:
    context = ssl.create_default_context(cafile=str(gateway.ca_path))
    with httpx.Client(proxy=gateway.proxy_url, verify=context, trust_env=False) as client:
        return client.get("https://upstream.test/v2/")


@pytest.mark.parametrize(
    "entry_point",
    [
        pytest.param((sys.executable, "-m", "ocigate.cli"), id="ocigate-command"),
        pytest.param(MITMDUMP_SCRIPT, id="mitmdump-script"),
        pytest.param((str(REPO / "run.sh"),), id="run.sh"),
    ],
)
def test_entry_point_serves_an_unresolvable_upstream(tmp_path: Path, entry_point: tuple[str, ...]) -> None:
    with running_gateway(tmp_path / "gateway", _rules(tmp_path), entry_point=entry_point) as gateway:
        response = _ping(gateway)
        log = gateway.log_text()
    assert response.status_code == 200
    assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert f"export HTTPS_PROXY={gateway.proxy_url}" in log
    assert str(gateway.ca_path) in log
