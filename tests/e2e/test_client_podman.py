"""podman 4.3 (rootful, vfs) pulls `upstream.test/...` through the real gateway: its cells of the client matrix.

Each test gets a podman of its own (fresh storage, blob-info cache and configuration, see tests/support/podman.py),
so every pull really fetches. What podman ended up with is checked with `podman image inspect` and by exporting the
stored layers; what the mirrors were asked is checked on the recording hops in front of them.
"""

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support.images import Image, all_blobs
from tests.support.podman import Podman
from tests.support.recorder import RecordedRequest
from tests.support.world import (
    UPSTREAM,
    World,
    assert_every_request_names_the_upstream,
    assert_manifest_requests_name,
    assert_pushed_to,
    blobs_fetched,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="these tests run podman rootful (as in ./run.sh test)")


@pytest.fixture
def podman(fresh: World, tmp_path: Path) -> Podman:
    return Podman(fresh.gateway, tmp_path / "podman")


def _succeeded(result: subprocess.CompletedProcess, what: str) -> str:
    assert result.returncode == 0, f"{what} failed ({result.returncode}):\n{result.stderr.decode()}"
    return result.stdout.decode()


def _diff_ids(image: Image) -> list[str]:
    return json.loads(image.config.data)["rootfs"]["diff_ids"]


def _config_digest(inspected: dict[str, Any]) -> str:
    # podman's image ID is the hex of the config digest.
    return "sha256:" + inspected["Id"]


def _assert_stored_layers_are(podman: Podman, reference: str, image: Image, export_dir: Path) -> None:
    """Exports the stored image with uncompressed layers: storage rebuilds each layer's tar byte for byte (tar-split),
    so its digest is the layer's diff_id only if what was unpacked is what the mirror served."""
    _succeeded(
        podman.run("save", "--format", "oci-dir", "--uncompressed", "-o", str(export_dir), reference),
        f"podman save {reference}",
    )
    exported = {}
    for blob in (export_dir / "blobs" / "sha256").iterdir():
        digest = f"sha256:{blob.name}"
        assert "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest() == digest, f"{digest} exported corrupt"
        exported[digest] = blob
    [descriptor] = json.loads((export_dir / "index.json").read_text())["manifests"]
    manifest = json.loads(exported[descriptor["digest"]].read_bytes())
    assert manifest["config"]["digest"] == image.config.digest
    assert [layer["digest"] for layer in manifest["layers"]] == _diff_ids(image)


def _manifest_requests(world: World) -> list[RecordedRequest]:
    return [r for r in world.b.recorder.requests if "/manifests/" in r.path]


@pytest.mark.matrix("podman", "pull by tag")
def test_pull_by_tag(fresh: World, podman: Podman, tmp_path: Path) -> None:
    reference = f"{UPSTREAM}/team/app:v1"
    _succeeded(podman.pull(reference), f"podman pull {reference}")

    inspected = podman.inspect(reference)
    assert inspected["Digest"] == fresh.app.manifest.digest
    assert podman.inspect_format(reference, "{{.Digest}}") == fresh.app.manifest.digest
    assert f"{UPSTREAM}/team/app@{fresh.app.manifest.digest}" in inspected["RepoDigests"]
    assert _config_digest(inspected) == fresh.app.config.digest
    assert inspected["RootFS"]["Layers"] == _diff_ids(fresh.app)
    assert (inspected["Os"], inspected["Architecture"]) == fresh.app.platform
    _assert_stored_layers_are(podman, reference, fresh.app, tmp_path / "export")

    assert_every_request_names_the_upstream(fresh.a, fresh.b, some=True)
    manifests = _manifest_requests(fresh)
    assert [r.path for r in manifests] == ["/v2/team/app/manifests/v1"]
    assert_manifest_requests_name(fresh.b, "team/app", pull="v1")
    assert blobs_fetched(fresh.b, "team/app") == {b.digest for b in (fresh.app.config, *fresh.app.layers)}


@pytest.mark.matrix("podman", "pull by digest")
def test_pull_by_digest(fresh: World, podman: Podman, tmp_path: Path) -> None:
    digest = fresh.app.manifest.digest
    reference = f"{UPSTREAM}/team/app@{digest}"
    _succeeded(podman.pull(reference), f"podman pull {reference}")

    inspected = podman.inspect(reference)
    assert inspected["Digest"] == digest
    assert podman.inspect_format(reference, "{{.Digest}}") == digest
    assert inspected["RepoDigests"] == [reference]
    assert inspected["RepoTags"] == []  # nothing asked for a tag
    assert _config_digest(inspected) == fresh.app.config.digest
    assert inspected["RootFS"]["Layers"] == _diff_ids(fresh.app)
    _assert_stored_layers_are(podman, reference, fresh.app, tmp_path / "export")

    assert_every_request_names_the_upstream(fresh.a, fresh.b, some=True)
    manifests = _manifest_requests(fresh)
    assert [r.path for r in manifests] == [f"/v2/team/app/manifests/{digest}"]
    assert_manifest_requests_name(fresh.b, "team/app")
    assert blobs_fetched(fresh.b, "team/app") == {b.digest for b in (fresh.app.config, *fresh.app.layers)}


@pytest.mark.matrix("podman", "multi-platform index")
def test_pull_each_platform_of_an_index(fresh: World, podman: Podman) -> None:
    reference = f"{UPSTREAM}/team/multi:v1"
    index_digest = fresh.multi.manifest.digest
    for image in fresh.multi.images:
        platform = "/".join(image.platform)
        _succeeded(podman.pull(reference, "--platform", platform), f"podman pull --platform {platform} {reference}")
        # Inspected before the next pull moves the tag to the other platform's image.
        inspected = podman.inspect(reference)
        assert (inspected["Os"], inspected["Architecture"]) == image.platform
        assert _config_digest(inspected) == image.config.digest
        assert inspected["RootFS"]["Layers"] == _diff_ids(image)
        # podman reports the index it resolved as the digest, and records the platform's manifest beside it.
        assert inspected["Digest"] == index_digest
        assert set(inspected["RepoDigests"]) == {
            f"{UPSTREAM}/team/multi@{index_digest}",
            f"{UPSTREAM}/team/multi@{image.manifest.digest}",
        }
    # Both platforms' images are stored: the one pulled first lost the tag, not its content.
    stored = podman.run("images", "--all", "--no-trunc", "--format", "{{.ID}}")
    stored_ids = set(_succeeded(stored, "podman images").split())
    assert {image.config.digest for image in fresh.multi.images} <= stored_ids

    assert_every_request_names_the_upstream(fresh.a, fresh.b, some=True)
    manifests = _manifest_requests(fresh)
    by_tag = [r for r in manifests if r.path == "/v2/team/multi/manifests/v1"]
    assert len(by_tag) == 2, "each pull resolves the tag"
    by_digest = [r for r in manifests if r not in by_tag]
    children = {image.manifest.digest for image in fresh.multi.images}
    assert sorted(r.path.rsplit("/", 1)[-1] for r in by_digest) == sorted(children)
    # Each by tag names upstream.test/team/multi:v1, each by digest upstream.test/team/multi@<digest>.
    assert_manifest_requests_name(fresh.b, "team/multi", pull="v1")
    expected_blobs = {b.digest for b in all_blobs(fresh.multi)} - children - {index_digest}
    assert blobs_fetched(fresh.b, "team/multi") == expected_blobs


def _write_oci_layout(image: Image, layout: Path, tag: str) -> None:
    """An OCI image layout holding `image` as `tag`, for podman to load without any registry."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    for blob in all_blobs(image):
        (blobs / blob.digest.removeprefix("sha256:")).write_bytes(blob.data)
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    index = {
        "schemaVersion": 2,
        "manifests": [{**image.manifest.descriptor(), "annotations": {"org.opencontainers.image.ref.name": tag}}],
    }
    (layout / "index.json").write_text(json.dumps(index))


@pytest.mark.matrix("podman", "push")
def test_push_then_pull_back(fresh: World, tmp_path: Path) -> None:
    # The image to push comes from a local OCI layout, not through the gateway: only the push puts it on a mirror.
    pusher = Podman(fresh.gateway, tmp_path / "pusher")
    layout = tmp_path / "layout"
    _write_oci_layout(fresh.app, layout, "v1")
    _succeeded(pusher.run("pull", f"oci:{layout}:v1"), "loading the image from an OCI layout")
    local_id = fresh.app.config.digest.removeprefix("sha256:")
    assert pusher.inspect(local_id)["RootFS"]["Layers"] == _diff_ids(fresh.app)

    destination = f"{UPSTREAM}/team/pushed-podman:v1"
    digest_file = tmp_path / "pushed-digest"
    pushed = pusher.push(local_id, f"docker://{destination}", "--digestfile", str(digest_file))
    assert pushed.returncode == 0, (
        f"podman push failed:\n{pushed.stderr.decode()}\ngateway log:\n{fresh.gateway.log_text()[-3000:]}"
    )
    assert_pushed_to(fresh.b, fresh.a, "team/pushed-podman", "v1")
    pushed_digest = digest_file.read_text().strip()

    puller = Podman(fresh.gateway, tmp_path / "puller")
    _succeeded(puller.pull(destination), f"podman pull {destination}")
    inspected = puller.inspect(destination)
    assert inspected["Digest"] == pushed_digest
    assert _config_digest(inspected) == fresh.app.config.digest
    assert inspected["RootFS"]["Layers"] == _diff_ids(fresh.app)
