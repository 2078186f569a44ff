"""Who may pull what, with real clients: two proxy users (mitmproxy's proxyauth) pull through one gateway whose rules
tree has a policy.toml. The one without rights gets DENIED, skopeo says so, and no mirror hears of the request; the
refusal and a push are audit lines in the gateway's log."""

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.clients import assert_layout_holds, client_env
from tests.support.gateway import Gateway, running_gateway
from tests.support.registry import write_htpasswd
from tests.support.secrets import remember
from tests.support.world import UPSTREAM, World, assert_pushed_to

PULLER, PULLER_PASSWORD = "puller", "puller-proxy-secret-for-tests"
OUTSIDER, OUTSIDER_PASSWORD = "outsider", "outsider-proxy-secret-for-tests"
remember(PULLER_PASSWORD)
remember(OUTSIDER_PASSWORD)

POLICY = f"""
[user.{PULLER}]
pull = ["{UPSTREAM}/team"]
push = ["{UPSTREAM}/team/policy-pushed"]

[user.{OUTSIDER}]
pull = ["{UPSTREAM}/public"]
"""


@pytest.fixture(scope="module")
def policed_gateway(pull_world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    workdir = tmp_path_factory.mktemp("policy")
    rules = workdir / "rules"
    (rules / UPSTREAM).mkdir(parents=True)
    hosts_toml = pull_world.workdir / "rules" / UPSTREAM / "hosts.toml"
    (rules / UPSTREAM / "hosts.toml").write_text(hosts_toml.read_text())
    (rules / "policy.toml").write_text(POLICY)
    htpasswd = write_htpasswd(workdir / "htpasswd", {PULLER: PULLER_PASSWORD, OUTSIDER: OUTSIDER_PASSWORD})
    host_map = {m.name: f"127.0.0.1:{m.recorder.port}" for m in (pull_world.a, pull_world.b)}
    options = [f"proxyauth=@{htpasswd}", f"save_stream_file={workdir / 'capture.flows'}"]
    with running_gateway(workdir / "gateway", rules, host_map, options) as gateway:
        yield gateway


def skopeo_as(gateway: Gateway, home: Path, user: str, password: str, *args: str) -> subprocess.CompletedProcess:
    """skopeo through the gateway, authenticated to the proxy as `user` (the credentials in the proxy URL)."""
    home.mkdir(parents=True, exist_ok=True)
    env = client_env(gateway, home)
    proxy = gateway.proxy_url.replace("http://", f"http://{user}:{password}@")
    env.update(HTTPS_PROXY=proxy, HTTP_PROXY=proxy)
    command = ["skopeo", *args]
    return subprocess.run(command, env=env, capture_output=True, timeout=180, check=False)


def audit_lines(gateway: Gateway) -> list[str]:
    return [line for line in gateway.log_text().splitlines() if "ocigate audit:" in line]


def test_the_user_without_rights_is_denied_and_no_mirror_hears_of_it(policed_gateway: Gateway, fresh: World) -> None:
    home = fresh.workdir / "policy-outsider"
    result = skopeo_as(
        policed_gateway,
        home,
        OUTSIDER,
        OUTSIDER_PASSWORD,
        "inspect",
        "--raw",
        "--cert-dir",
        str(policed_gateway.cert_dir(home)),
        f"docker://{UPSTREAM}/team/app:v1",
    )
    stderr = result.stderr.decode()
    assert result.returncode != 0, result.stdout.decode()
    # skopeo shows the registry's error: DENIED with the rule that refused it.
    assert "denied" in stderr.lower() and "policy.toml: user.outsider.pull" in stderr, stderr
    assert fresh.a.recorder.requests == [] and fresh.b.recorder.requests == []
    refusals = [line for line in audit_lines(policed_gateway) if f"proxy user '{OUTSIDER}'" in line]
    assert any(f"GET {UPSTREAM}/team/app:v1 manifest: refused by" in line for line in refusals), refusals
    assert OUTSIDER_PASSWORD not in policed_gateway.log_text()


def test_the_user_with_rights_pulls_and_pushes_and_the_push_is_audited(
    policed_gateway: Gateway, fresh: World, tmp_path: Path
) -> None:
    home = tmp_path / "puller"
    layout = home / "layout"
    cert_dir = str(policed_gateway.cert_dir(home))
    pulled = skopeo_as(
        policed_gateway,
        home,
        PULLER,
        PULLER_PASSWORD,
        "copy",
        "--src-cert-dir",
        cert_dir,
        f"docker://{UPSTREAM}/team/app:v1",
        f"oci:{layout}:copied",
    )
    assert pulled.returncode == 0, pulled.stderr.decode()
    assert_layout_holds(layout, fresh.app)
    assert fresh.b.recorder.requests, "the mirror was not asked"

    target = f"{UPSTREAM}/team/policy-pushed:v1"
    copy_to = ("copy", "--dest-cert-dir", cert_dir, f"oci:{layout}:copied")
    pushed = skopeo_as(policed_gateway, home, PULLER, PULLER_PASSWORD, *copy_to, f"docker://{target}")
    assert pushed.returncode == 0, f"{pushed.stderr.decode()}\n{policed_gateway.log_text()[-2000:]}"
    assert_pushed_to(fresh.b, fresh.a, "team/policy-pushed", "v1")
    audits = [line for line in audit_lines(policed_gateway) if f"proxy user '{PULLER}'" in line]
    manifest_put = f"PUT {target} manifest: allowed by"
    assert any(manifest_put in line and "user.puller.push[0]" in line for line in audits), audits

    # Pulling is not pushing: the same user may not push where it may only pull, and nothing reaches a mirror.
    fresh.a.mark()
    fresh.b.mark()
    refused = skopeo_as(policed_gateway, home, PULLER, PULLER_PASSWORD, *copy_to, f"docker://{UPSTREAM}/team/other:v1")
    assert refused.returncode != 0 and "user.puller.push" in refused.stderr.decode(), refused.stderr.decode()
    writes = [r for r in fresh.a.recorder.requests + fresh.b.recorder.requests if r.method in ("POST", "PATCH", "PUT")]
    assert writes == []
    assert PULLER_PASSWORD not in policed_gateway.log_text()


def test_a_client_asking_a_mirror_at_its_address_is_refused_and_the_mirror_sees_nothing(
    policed_gateway: Gateway, fresh: World
) -> None:
    """The rules name the mirror mirror-a.test:5000, which the host map sends to 127.0.0.1:PORT: a client asking
    127.0.0.1:PORT, plainly or through a CONNECT tunnel, goes around the rules and is refused where they are dialled."""
    address = f"127.0.0.1:{fresh.a.recorder.port}"
    proxy = policed_gateway.proxy_url.replace("http://", f"http://{PULLER}:{PULLER_PASSWORD}@")
    for tunnel in ((), ("--proxytunnel",)):
        command = ["curl", "-sS", "--noproxy", "", "-x", proxy, *tunnel, f"http://{address}/v2/team/app/manifests/v1"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        assert "schemaVersion" not in result.stdout, (tunnel, result.stdout)
    assert fresh.a.recorder.requests == []
    refusals = [line for line in audit_lines(policed_gateway) if f"connection to {address}: refused" in line]
    assert len(refusals) == 2, audit_lines(policed_gateway)
    assert all(f"dials {fresh.a.name}, a mirror of the rules" in line for line in refusals), refusals
