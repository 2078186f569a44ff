"""skopeo's row of the client matrix: one small test per cell, through the real gateway from mirror B.

tests/test_pull_e2e.py covers skopeo pulls in depth (fallback from A, access logs, Accept lines); these tests are the
matrix cells, each checking what the client got and what the mirror was told.
"""

import hashlib
import json
from pathlib import Path

import pytest

from tests.support.clients import skopeo, skopeo_copy_to_layout
from tests.support.images import all_blobs
from tests.support.world import (
    UPSTREAM,
    World,
    assert_every_request_names_the_upstream,
    assert_manifest_requests_name,
    assert_pushed_to,
)


def _ok(result) -> str:
    assert result.returncode == 0, f"skopeo failed:\n{result.stderr.decode()}"
    return result.stdout.decode()


def _layout_blob_digests(layout: Path) -> set[str]:
    """Digests of the blobs in an OCI layout, each checked against its content (the file name is the claim)."""
    digests = set()
    for path in (layout / "blobs" / "sha256").iterdir():
        digest = f"sha256:{path.name}"
        assert "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest() == digest, f"{path} is not its digest"
        digests.add(digest)
    return digests


def _layout_top_digest(layout: Path) -> str:
    manifests = json.loads((layout / "index.json").read_text())["manifests"]
    assert len(manifests) == 1, manifests
    return manifests[0]["digest"]


@pytest.mark.matrix("skopeo", "pull by tag")
def test_skopeo_pull_by_tag(fresh: World, tmp_path: Path) -> None:
    result, layout = skopeo_copy_to_layout(fresh.gateway, tmp_path, f"{UPSTREAM}/team/app:v1")
    _ok(result)
    assert _layout_top_digest(layout) == fresh.app.manifest.digest
    assert {b.digest for b in all_blobs(fresh.app)} <= _layout_blob_digests(layout)

    assert_every_request_names_the_upstream(fresh.b, some=True)
    # Every manifest request asked for the tag and named upstream.test/team/app:v1.
    assert assert_manifest_requests_name(fresh.b, "team/app", pull="v1") == {"v1"}


@pytest.mark.matrix("skopeo", "pull by digest")
def test_skopeo_pull_by_digest(fresh: World, tmp_path: Path) -> None:
    digest = fresh.app.manifest.digest
    result, layout = skopeo_copy_to_layout(fresh.gateway, tmp_path, f"{UPSTREAM}/team/app@{digest}")
    _ok(result)
    assert _layout_top_digest(layout) == digest
    assert {b.digest for b in all_blobs(fresh.app)} <= _layout_blob_digests(layout)

    assert_every_request_names_the_upstream(fresh.b, some=True)
    # Asked by digest only (and named upstream.test/team/app@<digest>): nothing made the gateway (or skopeo) turn it
    # back into a tag.
    assert assert_manifest_requests_name(fresh.b, "team/app") == {digest}


@pytest.mark.matrix("skopeo", "multi-platform index")
def test_skopeo_copy_all_of_a_multi_platform_index(fresh: World, tmp_path: Path) -> None:
    result, layout = skopeo_copy_to_layout(fresh.gateway, tmp_path, f"{UPSTREAM}/team/multi:v1", "--all")
    _ok(result)
    assert _layout_top_digest(layout) == fresh.multi.manifest.digest
    # all_blobs covers the index, both platforms' manifests, configs and layers.
    assert {b.digest for b in all_blobs(fresh.multi)} <= _layout_blob_digests(layout)

    assert_every_request_names_the_upstream(fresh.b, some=True)
    children = {image.manifest.digest for image in fresh.multi.images}
    asked = assert_manifest_requests_name(fresh.b, "team/multi", pull="v1")
    assert asked == {"v1", *children}, asked


def _home(path: Path) -> Path:
    """A client home of its own for each skopeo run of a test (the helpers put files in it, but do not create it)."""
    path.mkdir(parents=True, exist_ok=True)
    return path


def _push_layout(world: World, home: Path, layout: Path, destination: str, *flags: str):
    """`skopeo copy oci:<layout>:copied docker://<destination>`, trusting the gateway's CA at the destination."""
    return skopeo(
        world.gateway,
        home,
        "copy",
        *flags,
        "--dest-cert-dir",
        str(world.gateway.cert_dir(home)),
        f"oci:{layout}:copied",
        f"docker://{destination}",
    )


@pytest.mark.matrix("skopeo", "push")
def test_skopeo_push(fresh: World, tmp_path: Path) -> None:
    # Something to push: app:v1, pulled through the gateway into an OCI layout (the pull-by-tag cell).
    pulled, layout = skopeo_copy_to_layout(fresh.gateway, _home(tmp_path / "source"), f"{UPSTREAM}/team/app:v1")
    _ok(pulled)
    target = f"{UPSTREAM}/team/pushed-skopeo:v1"
    pushed = _push_layout(fresh, _home(tmp_path / "push"), layout, target)
    assert pushed.returncode == 0, (
        f"skopeo copy to {target} failed ({pushed.returncode}):\n{pushed.stderr.decode()}\n"
        f"gateway log:\n{fresh.gateway.log_text()[-2000:]}"
    )
    assert_pushed_to(fresh.b, fresh.a, "team/pushed-skopeo", "v1")

    pulled_back, back = skopeo_copy_to_layout(fresh.gateway, _home(tmp_path / "pull-back"), target)
    _ok(pulled_back)
    assert _layout_top_digest(back) == fresh.app.manifest.digest
    assert {b.digest for b in all_blobs(fresh.app)} <= _layout_blob_digests(back)
