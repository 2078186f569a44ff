"""Rules that change live, through the real gateway with skopeo: a hosts.toml edited while the gateway runs sends the
next pull to the mirror it now names; a broken edit keeps the last good rule, and the log names the file and the key
once; fixing it is logged and its rule is in force again. Two recording mirrors in front of one registry say which
one each pull went to."""

import time
from collections.abc import Callable
from pathlib import Path

from tests.support.clients import assert_layout_holds, skopeo_copy_to_layout
from tests.support.gateway import Gateway, running_gateway
from tests.support.images import make_image, push_image
from tests.support.recorder import Recorder, recording_proxy
from tests.support.registry import running_registry

REFERENCE = "upstream.test/team/app:v1"
# The gateway looks at its rules every second and reads a changed directory at the second look; this leaves room for
# a slow machine.
DEADLINE = 30.0


def rule(mirror: str, extra: str = "") -> str:
    return f'offline = true\n[host."http://{mirror}:5000"]\n{extra}'


def until(condition: Callable[[], bool], what: str, gateway: Gateway) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {DEADLINE} s\n{gateway.log_text()[-3000:]}"
        time.sleep(0.1)


def test_a_rules_edit_changes_the_next_pulls_mirror_and_a_broken_edit_keeps_the_last_good_one(tmp_path: Path) -> None:
    image = make_image("live-rules", layers=1)
    with (
        running_registry(tmp_path / "registry") as registry,
        recording_proxy(registry.url) as mirror_a,
        recording_proxy(registry.url) as mirror_b,
    ):
        push_image(registry.url, "team/app", "v1", image)
        hosts_toml = tmp_path / "rules" / "upstream.test" / "hosts.toml"
        hosts_toml.parent.mkdir(parents=True)
        hosts_toml.write_text(rule("mirror-a.test"))
        host_map = {
            "mirror-a.test:5000": f"127.0.0.1:{mirror_a.port}",
            "mirror-b.test:5000": f"127.0.0.1:{mirror_b.port}",
        }
        pulls = iter(range(100))

        def pull_goes_to(mirror: Recorder, other: Recorder) -> None:
            mirror.clear()
            other.clear()
            result, layout = skopeo_copy_to_layout(gateway, tmp_path / f"client-{next(pulls)}", REFERENCE)
            assert result.returncode == 0, result.stderr.decode()
            assert_layout_holds(layout, image)
            assert mirror.requests and not other.requests, (mirror.requests, other.requests)

        with running_gateway(tmp_path / "gateway", tmp_path / "rules", host_map) as gateway:
            pull_goes_to(mirror_a, mirror_b)

            hosts_toml.write_text(rule("mirror-b.test"))
            until(lambda: "read again: hosts http://mirror-b.test:5000/v2" in gateway.log_text(), "the edit", gateway)
            pull_goes_to(mirror_b, mirror_a)

            hosts_toml.write_text(rule("mirror-a.test", 'capabilities = ["pul"]\n'))
            key = 'host."http://mirror-a.test:5000".capabilities'
            until(lambda: key in gateway.log_text(), "the broken edit's warning", gateway)
            pull_goes_to(mirror_b, mirror_a)
            # Looked at again and again meanwhile (the file is fresh for the first seconds): named once.
            time.sleep(3)
            named = [line for line in gateway.log_text().splitlines() if key in line]
            assert len(named) == 1, named
            assert f"{hosts_toml}: {key}: unknown capability 'pul'" in named[0]
            assert "its last good rule stays in force" in named[0]

            hosts_toml.write_text(rule("mirror-a.test"))
            until(lambda: "upstream.test: fixed, in force again" in gateway.log_text(), "the fix", gateway)
            pull_goes_to(mirror_a, mirror_b)
