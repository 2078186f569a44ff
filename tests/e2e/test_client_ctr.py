"""containerd's `ctr` (1.6) pulls `upstream.test/...` through the real gateway, as an unmodified client would.

ctr 1.6 resolves and fetches in its own process: it gets HTTPS_PROXY and trusts the gateway's CA (`--tlscacert`),
and no hosts.toml of its own, so every mirror decision is the gateway's. One private containerd daemon serves the
file; each test pulls into a namespace of its own, and the daemon's isolated content sharing keeps one namespace from
reusing another's blobs, so every blob a test finds was fetched by that test.
"""

import io
import json
import re
import secrets
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.containerd import SNAPSHOTTER, Containerd, running_containerd
from tests.support.images import Image, all_blobs, make_image
from tests.support.world import (
    UPSTREAM,
    World,
    assert_every_request_names_the_upstream,
    assert_manifest_requests_name,
    assert_pushed_to,
    blobs_fetched,
)

CLIENT = "ctr"


@pytest.fixture(scope="module")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    # mktemp's short path keeps the socket under the unix socket path limit.
    with running_containerd(tmp_path_factory.mktemp("ctrd")) as daemon:
        yield daemon


@pytest.fixture
def namespace(request: pytest.FixtureRequest) -> str:
    """A containerd namespace no other test (or earlier run of this one) has used."""
    readable = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name).strip("-")[:48]
    return f"{readable}-{secrets.token_hex(4)}"


def _ctr_ok(result) -> str:
    assert result.returncode == 0, f"ctr {result.args[5:]} failed ({result.returncode}):\n{result.stderr}"
    return result.stdout


def _pull(containerd: Containerd, namespace: str, world: World, home: Path, reference: str, *flags: str) -> str:
    """`ctr images pull` through the gateway; fails the test with ctr's output and the gateway log's tail."""
    result = containerd.ctr(
        namespace,
        "images",
        "pull",
        "--snapshotter",
        SNAPSHOTTER,
        "--tlscacert",
        str(world.gateway.ca_path),
        *flags,
        reference,
        gateway=world.gateway,
        home=home,
    )
    assert result.returncode == 0, (
        f"ctr images pull {reference} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}\n"
        f"gateway log:\n{world.gateway.log_text()[-3000:]}"
    )
    return result.stdout


def _image_targets(containerd: Containerd, namespace: str) -> dict[str, str]:
    """Image name -> the digest of its target, from `ctr images ls` (REF TYPE DIGEST SIZE PLATFORMS LABELS)."""
    lines = _ctr_ok(containerd.ctr(namespace, "images", "ls")).splitlines()
    return {fields[0]: fields[2] for fields in (line.split() for line in lines[1:]) if fields}


def _content_digests(containerd: Containerd, namespace: str) -> set[str]:
    """Every blob in the namespace's content store, from `ctr content ls` (DIGEST SIZE AGE LABELS)."""
    lines = _ctr_ok(containerd.ctr(namespace, "content", "ls")).splitlines()
    return {line.split()[0] for line in lines[1:] if line.strip()}


def _content_bytes(containerd: Containerd, namespace: str, digest: str) -> bytes:
    result = containerd.ctr(namespace, "content", "get", digest, text=False)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stdout


@pytest.mark.matrix(CLIENT, "pull by tag")
def test_ctr_pulls_by_tag(fresh: World, containerd: Containerd, namespace: str, tmp_path: Path) -> None:
    reference = f"{UPSTREAM}/team/app:v1"
    _pull(containerd, namespace, fresh, tmp_path, reference)

    assert _image_targets(containerd, namespace) == {reference: fresh.app.manifest.digest}
    assert {blob.digest for blob in all_blobs(fresh.app)} <= _content_digests(containerd, namespace)
    assert _content_bytes(containerd, namespace, fresh.app.manifest.digest) == fresh.app.manifest.data

    assert_every_request_names_the_upstream(fresh.a, fresh.b)
    assert_manifest_requests_name(fresh.a, "team/app", pull="v1")
    # ctr resolves the tag (HEAD by tag), then fetches the manifest by the digest it resolved to.
    assert assert_manifest_requests_name(fresh.b, "team/app", pull="v1") == {"v1", fresh.app.manifest.digest}
    assert {fresh.app.config.digest, *(b.digest for b in fresh.app.layers)} <= blobs_fetched(fresh.b, "team/app")


@pytest.mark.matrix(CLIENT, "pull by digest")
def test_ctr_pulls_by_digest(fresh: World, containerd: Containerd, namespace: str, tmp_path: Path) -> None:
    digest = fresh.app.manifest.digest
    reference = f"{UPSTREAM}/team/app@{digest}"
    _pull(containerd, namespace, fresh, tmp_path, reference)

    assert _image_targets(containerd, namespace) == {reference: digest}
    assert {blob.digest for blob in all_blobs(fresh.app)} <= _content_digests(containerd, namespace)

    assert_every_request_names_the_upstream(fresh.a, fresh.b)
    assert_manifest_requests_name(fresh.a, "team/app")
    # No tag anywhere: every manifest request is by digest and names the reference by digest.
    assert assert_manifest_requests_name(fresh.b, "team/app") == {digest}
    assert {fresh.app.config.digest, *(b.digest for b in fresh.app.layers)} <= blobs_fetched(fresh.b, "team/app")


@pytest.mark.matrix(CLIENT, "multi-platform index")
def test_ctr_pulls_every_platform_of_an_index(
    fresh: World, containerd: Containerd, namespace: str, tmp_path: Path
) -> None:
    reference = f"{UPSTREAM}/team/multi:v1"
    _pull(containerd, namespace, fresh, tmp_path, reference, "--all-platforms")

    assert _image_targets(containerd, namespace) == {reference: fresh.multi.manifest.digest}
    assert {blob.digest for blob in all_blobs(fresh.multi)} <= _content_digests(containerd, namespace)

    assert_every_request_names_the_upstream(fresh.a, fresh.b)
    assert_manifest_requests_name(fresh.a, "team/multi", pull="v1")
    # The tag, the index by digest, and both platforms' manifests.
    platform_manifests = {image.manifest.digest for image in fresh.multi.images}
    asked = assert_manifest_requests_name(fresh.b, "team/multi", pull="v1")
    assert asked == {"v1", fresh.multi.manifest.digest, *platform_manifests}, asked
    blobs = {blob.digest for image in fresh.multi.images for blob in (image.config, *image.layers)}
    assert blobs <= blobs_fetched(fresh.b, "team/multi")


def _oci_archive(image: Image, name: str) -> bytes:
    """An OCI image layout as a tar, its one manifest named `name` for `ctr images import`."""
    index = {
        "schemaVersion": 2,
        "manifests": [{**image.manifest.descriptor(), "annotations": {"io.containerd.image.name": name}}],
    }
    files = {
        "oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode(),
        "index.json": json.dumps(index).encode(),
        **{f"blobs/sha256/{blob.digest.removeprefix('sha256:')}": blob.data for blob in all_blobs(image)},
    }
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path, data in files.items():
            info = tarfile.TarInfo(path)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.mark.matrix(CLIENT, "push")
def test_ctr_pushes_and_pulls_back(fresh: World, containerd: Containerd, namespace: str, tmp_path: Path) -> None:
    # An image no registry holds yet, put into containerd without any registry, so only the push can deliver it.
    image = make_image(f"pushed-{CLIENT}", layers=2)
    reference = f"{UPSTREAM}/team/pushed-{CLIENT}:v1"
    archive = tmp_path / "pushed.oci.tar"
    archive.write_bytes(_oci_archive(image, reference))
    _ctr_ok(containerd.ctr(namespace, "images", "import", "--no-unpack", str(archive)))
    assert _image_targets(containerd, namespace) == {reference: image.manifest.digest}

    pushed = containerd.ctr(
        namespace,
        "images",
        "push",
        "--tlscacert",
        str(fresh.gateway.ca_path),
        reference,
        gateway=fresh.gateway,
        home=tmp_path,
    )
    assert pushed.returncode == 0, (
        f"ctr images push {reference} failed ({pushed.returncode}):\n{pushed.stderr}\n"
        f"gateway log:\n{fresh.gateway.log_text()[-2000:]}"
    )
    assert_pushed_to(fresh.b, fresh.a, f"team/pushed-{CLIENT}", "v1")

    # Pulled back into a namespace of its own, so nothing comes from the import.
    pulled_back = f"{namespace}-back"
    _pull(containerd, pulled_back, fresh, tmp_path, reference)
    assert _image_targets(containerd, pulled_back) == {reference: image.manifest.digest}
    assert {blob.digest for blob in all_blobs(image)} <= _content_digests(containerd, pulled_back)
