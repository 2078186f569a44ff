"""The air-gap box: a rule with `offline = true` only ever contacts its mirrors. With every mirror down, skopeo fails
with the gateway's message naming each mirror and why, and the registry itself (a listener standing in for it) never
hears a thing."""

from pathlib import Path

from tests.support.clients import skopeo_inspect_raw
from tests.support.gateway import running_gateway
from tests.support.recorder import recording_proxy
from tests.support.registry import free_port


def test_an_offline_rule_with_every_mirror_down_never_contacts_the_registry(tmp_path: Path) -> None:
    # Ports nothing listens on: connecting is refused.
    down_a, down_b = free_port(), free_port()
    rules = tmp_path / "rules" / "upstream.test"
    rules.mkdir(parents=True)
    (rules / "hosts.toml").write_text(
        'offline = true\nserver = "https://upstream.test"\n'
        '[host."http://mirror-a.internal:5000"]\n[host."http://mirror-b.internal:5000"]\n'
    )
    # The registry itself: anything reaching it is recorded (its target does not exist, which nobody should learn).
    with recording_proxy(f"http://127.0.0.1:{free_port()}") as registry:
        host_map = {
            "mirror-a.internal:5000": f"127.0.0.1:{down_a}",
            "mirror-b.internal:5000": f"127.0.0.1:{down_b}",
            "upstream.test": f"127.0.0.1:{registry.port}",
            "upstream.test:443": f"127.0.0.1:{registry.port}",
        }
        with running_gateway(tmp_path / "gateway", tmp_path / "rules", host_map) as gateway:
            result = skopeo_inspect_raw(gateway, tmp_path / "client", "upstream.test/team/app:v1")
            log = gateway.log_text()
    stderr = result.stderr.decode()
    assert result.returncode != 0
    assert "no host for upstream.test could be reached" in stderr, stderr
    assert "http://mirror-a.internal:5000/v2: connection refused" in stderr, stderr
    assert "http://mirror-b.internal:5000/v2: connection refused" in stderr, stderr
    assert registry.requests == []
    assert "upstream.test:443" not in log and f"127.0.0.1:{registry.port}" not in log
