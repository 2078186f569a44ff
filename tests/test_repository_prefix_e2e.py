"""A mirror that keeps an upstream's repositories under a path of its own (a Harbor proxy-cache project): with
`repository_prefix`, skopeo's pull of `upstream.test/team/app:v1` is served from `proxy/team/app` there, while ns= and
OCI-Named-Ref still name the upstream's repository."""

from pathlib import Path

from tests.support.clients import skopeo_copy_to_layout
from tests.support.gateway import running_gateway
from tests.support.images import make_image, push_image, sha256_digest
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
            (tmp_path / "client").mkdir()
            result, layout = skopeo_copy_to_layout(gateway, tmp_path / "client", "upstream.test/team/app:v1")
    assert result.returncode == 0, result.stderr.decode()
    for blob in (image.manifest, image.config, *image.layers):
        path = layout / "blobs" / "sha256" / blob.digest.removeprefix("sha256:")
        assert sha256_digest(path.read_bytes()) == blob.digest
    assert mirror.requests, "the mirror was not asked"
    for request in mirror.requests:
        assert request.path.startswith("/v2/proxy/team/app/"), request.target
        assert request.query()["ns"] == ["upstream.test"], request.target
        assert request.header_values("OCI-Named-Ref") == ["upstream.test/team/app:v1"], request.target
