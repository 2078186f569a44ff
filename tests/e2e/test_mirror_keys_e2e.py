"""ocigate's own per-mirror keys in hosts.toml, through the real gateway to a real registry with skopeo:
`repository_prefix` (a Harbor proxy-cache project: the upstream's repositories under a path of the mirror's, while
ns= and OCI-Named-Ref still name the upstream's) and `pull_from_mirror` (tag-only and digest-only mirrors)."""

from pathlib import Path

from tests.support.clients import assert_layout_holds, skopeo_copy_to_layout
from tests.support.gateway import running_gateway
from tests.support.images import make_image, push_image
from tests.support.recorder import recording_proxy
from tests.support.registry import running_registry


def test_a_mirror_with_a_repository_prefix_serves_the_upstreams_repository_under_it(tmp_path: Path) -> None:
    image = make_image("prefixed-app", layers=2)
    with running_registry(tmp_path / "registry") as registry, recording_proxy(registry.url) as mirror:
        push_image(registry.url, "proxy/team/app", "v1", image)
        rules = tmp_path / "rules" / "upstream.test"
        rules.mkdir(parents=True)
        (rules / "hosts.toml").write_text(
            'offline = true\n[host."http://harbor.test:5000"]\n  repository_prefix = "proxy"\n'
        )
        host_map = {"harbor.test:5000": f"127.0.0.1:{mirror.port}"}
        with running_gateway(tmp_path / "gateway", tmp_path / "rules", host_map) as gateway:
            result, layout = skopeo_copy_to_layout(gateway, tmp_path / "client", "upstream.test/team/app:v1")
    assert result.returncode == 0, result.stderr.decode()
    assert_layout_holds(layout, image)
    assert mirror.requests, "the mirror was not asked"
    for request in mirror.requests:
        assert request.path.startswith("/v2/proxy/team/app/"), request.target
        assert request.query()["ns"] == ["upstream.test"], request.target
        assert request.header_values("OCI-Named-Ref") == ["upstream.test/team/app:v1"], request.target


def test_pull_from_mirror_sends_pulls_by_tag_and_by_digest_to_their_own_mirrors(tmp_path: Path) -> None:
    image = make_image("split-app", layers=2)
    with (
        running_registry(tmp_path / "registry") as registry,
        recording_proxy(registry.url) as tags_mirror,
        recording_proxy(registry.url) as digests_mirror,
    ):
        push_image(registry.url, "team/app", "v1", image)
        rules = tmp_path / "rules" / "upstream.test"
        rules.mkdir(parents=True)
        (rules / "hosts.toml").write_text(
            'offline = true\n[host."http://digests.test:5000"]\n  pull_from_mirror = "digest-only"\n'
            '[host."http://tags.test:5000"]\n  pull_from_mirror = "tag-only"\n'
        )
        host_map = {
            "tags.test:5000": f"127.0.0.1:{tags_mirror.port}",
            "digests.test:5000": f"127.0.0.1:{digests_mirror.port}",
        }
        results = {}
        for name, reference in (
            ("tag", "upstream.test/team/app:v1"),
            ("digest", f"upstream.test/team/app@{image.manifest.digest}"),
        ):
            # A gateway each: what one pull taught it must not steer the other.
            with running_gateway(tmp_path / f"gateway-{name}", tmp_path / "rules", host_map) as gateway:
                result, _ = skopeo_copy_to_layout(gateway, tmp_path / name, reference)
            results[name] = result, len(tags_mirror.requests), len(digests_mirror.requests)
            tags_mirror.clear()
            digests_mirror.clear()
    for name, (result, _, _) in results.items():
        assert result.returncode == 0, f"pull by {name}: {result.stderr.decode()}"
    # The pull by tag, and everything it referenced, came from the tag-only mirror; the pull by digest from the other.
    assert results["tag"][1] > 0 and results["tag"][2] == 0
    assert results["digest"][1] == 0 and results["digest"][2] > 0
