"""A mirror the rules name at one of the gateway box's own addresses (10.123.0.1, added to loopback in the tests'
private network namespace) and that listens on every address answers at 127.0.0.1 too: under a policy, a client
asking it there through the gateway goes around the rules and is refused and audited; the pull through the rules
still works."""

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.e2e.test_workers_e2e import pull
from tests.support.clients import assert_layout_holds
from tests.support.gateway import running_gateway
from tests.support.images import make_image, push_image
from tests.support.registry import running_registry
from tests.support.world import UPSTREAM

BOX_ADDRESS = "10.123.0.1"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"  # what the test image is, and the mirror sends only so


def private_network() -> bool:
    """Root in a network namespace with loopback alone (./run.sh test's): an address added there touches nothing."""
    # /proc/net is this process's network namespace's (/sys/class/net may show the host's).
    interfaces = [line.partition(":")[0].strip() for line in Path("/proc/net/dev").read_text().splitlines()[2:]]
    return os.geteuid() == 0 and interfaces == ["lo"]


@contextmanager
def address_on_loopback(address: str) -> Iterator[None]:
    subprocess.run(["ip", "addr", "add", f"{address}/32", "dev", "lo"], check=True, timeout=30)
    try:
        yield
    finally:
        subprocess.run(["ip", "addr", "del", f"{address}/32", "dev", "lo"], check=True, timeout=30)


@pytest.mark.skipif(not private_network(), reason="needs root in a private network namespace (./run.sh test)")
def test_a_mirror_at_the_boxs_own_address_is_refused_at_loopback_and_pulled_through_the_rules(tmp_path: Path) -> None:
    app = make_image("local-address", layers=2)
    with address_on_loopback(BOX_ADDRESS), running_registry(tmp_path / "registry", listen_host="0.0.0.0") as registry:
        push_image(registry.url, "team/app", "v1", app)
        port = registry.port
        rules = tmp_path / "rules"
        (rules / UPSTREAM).mkdir(parents=True)
        mirror = f'[host."http://{BOX_ADDRESS}:{port}"]\n  capabilities = ["pull", "resolve"]\n'
        (rules / UPSTREAM / "hosts.toml").write_text(f'server = "https://{UPSTREAM}"\n\n{mirror}')
        (rules / "policy.toml").write_text(f'[upstream."{UPSTREAM}"]\nblock = ["team/secret"]\n')
        options = [f"ocigate_allow_destinations={BOX_ADDRESS}/32"]
        with running_gateway(tmp_path / "gateway", rules, options=options) as gateway:
            before = len(registry.access_log())
            for tunnel in ((), ("--proxytunnel",)):
                url = f"http://127.0.0.1:{port}/v2/team/app/manifests/v1"
                accept = f"Accept: {OCI_MANIFEST}"
                command = ["curl", "-sS", "--noproxy", "", "-x", gateway.proxy_url, "-H", accept, *tunnel, url]
                result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
                assert "schemaVersion" not in result.stdout, (tunnel, result.stdout)
            assert len(registry.access_log()) == before  # the mirror heard nothing of it
            home = tmp_path / "client"
            pulled = pull(gateway, home, home / "layout")
            assert pulled.returncode == 0, pulled.stderr
            log = gateway.log_text()
    assert_layout_holds(home / "layout", app)
    audits = [line for line in log.splitlines() if f"connection to 127.0.0.1:{port}: refused" in line]
    assert len(audits) == 2, log[-3000:]
    assert all(f"dials {BOX_ADDRESS}:{port}, a mirror of the rules" in line for line in audits), audits
