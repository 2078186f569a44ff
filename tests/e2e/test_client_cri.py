"""The containerd daemon (1.6) pulls `upstream.test/...` through the real gateway for a CRI (kubelet) client, set up as
the README tells a Kubernetes node to be.

A CRI pull is the daemon's own: HTTPS_PROXY and the gateway's CA (`SSL_CERT_FILE=<system roots + CA>`) are in the
containerd daemon's environment, as a containerd.service drop-in puts them, and nowhere else. The client is the
kubelet's side of the CRI, `ImageService/PullImage` over containerd's unix socket (tests/support/cri.py); it has no
proxy, no CA and no network. The daemon has no hosts.toml (`config_path = ""`) and upstream.test resolves nowhere, so
the gateway's rules are the only way it can reach the mirrors.

Each test gets a daemon of its own: the CRI plugin keeps every image in the one `k8s.io` namespace, so a second pull
in the same daemon would find the first one's blobs there and fetch nothing.
"""

from collections.abc import Iterator

import grpc
import pytest

from tests.support.containerd import CRI_NAMESPACE, Containerd, running_containerd
from tests.support.cri import pull_image
from tests.support.images import all_blobs
from tests.support.world import (
    UPSTREAM,
    World,
    assert_every_request_names_the_upstream,
    assert_manifest_requests_name,
    blobs_fetched,
)


@pytest.fixture
def containerd(fresh: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    """A containerd with the CRI plugin on, its daemon reaching registries through the shared world's gateway."""
    # mktemp's short path keeps the socket under the unix socket path limit.
    with running_containerd(tmp_path_factory.mktemp("crid"), cri=True, gateway=fresh.gateway) as daemon:
        yield daemon


def _pull(containerd: Containerd, world: World, reference: str) -> str:
    """A CRI PullImage of `reference`; returns its image_ref, or fails the test with the daemon's and the gateway's
    logs."""
    try:
        return pull_image(containerd.socket_path, reference)
    except grpc.RpcError as error:
        pytest.fail(
            f"CRI PullImage {reference} failed: {error.code()}: {error.details()}\n"
            f"containerd log:\n{containerd.log_text()[-3000:]}\ngateway log:\n{world.gateway.log_text()[-3000:]}"
        )


def _ctr_ok(result) -> str:
    assert result.returncode == 0, f"ctr {result.args[5:]} failed ({result.returncode}):\n{result.stderr}"
    return result.stdout


def _image_targets(containerd: Containerd) -> dict[str, str]:
    """Image name -> the digest of its target in the CRI's namespace, from `ctr images ls`
    (REF TYPE DIGEST SIZE PLATFORMS LABELS)."""
    lines = _ctr_ok(containerd.ctr(CRI_NAMESPACE, "images", "ls")).splitlines()
    return {fields[0]: fields[2] for fields in (line.split() for line in lines[1:]) if fields}


def _content_digests(containerd: Containerd) -> set[str]:
    """Every blob in the CRI namespace's content store, from `ctr content ls` (DIGEST SIZE AGE LABELS)."""
    lines = _ctr_ok(containerd.ctr(CRI_NAMESPACE, "content", "ls")).splitlines()
    return {line.split()[0] for line in lines[1:] if line.strip()}


def _content_bytes(containerd: Containerd, digest: str) -> bytes:
    result = containerd.ctr(CRI_NAMESPACE, "content", "get", digest, text=False)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stdout


def test_cri_pull_by_tag_is_the_daemons_through_the_gateway(fresh: World, containerd: Containerd) -> None:
    reference = f"{UPSTREAM}/team/app:v1"
    manifest = fresh.app.manifest.digest

    # containerd answers with the image's ID: its config's digest.
    assert _pull(containerd, fresh, reference) == fresh.app.config.digest

    # The CRI plugin names the image by the tag, by repository digest and by ID, all with the manifest as target.
    assert _image_targets(containerd) == {
        reference: manifest,
        f"{UPSTREAM}/team/app@{manifest}": manifest,
        fresh.app.config.digest: manifest,
    }
    assert {blob.digest for blob in all_blobs(fresh.app)} <= _content_digests(containerd)
    assert _content_bytes(containerd, manifest) == fresh.app.manifest.data

    assert_every_request_names_the_upstream(fresh.a, fresh.b, some=True)
    assert_manifest_requests_name(fresh.a, "team/app", pull="v1")
    # The daemon resolves the tag (HEAD by tag), then fetches the manifest by the digest it resolved to.
    assert assert_manifest_requests_name(fresh.b, "team/app", pull="v1") == {"v1", manifest}
    assert {fresh.app.config.digest, *(b.digest for b in fresh.app.layers)} <= blobs_fetched(fresh.b, "team/app")


def test_cri_pull_by_digest_is_the_daemons_through_the_gateway(fresh: World, containerd: Containerd) -> None:
    manifest = fresh.app.manifest.digest
    reference = f"{UPSTREAM}/team/app@{manifest}"

    assert _pull(containerd, fresh, reference) == fresh.app.config.digest

    # No tag anywhere: the image is named by its digest reference and its ID only.
    assert _image_targets(containerd) == {reference: manifest, fresh.app.config.digest: manifest}
    assert {blob.digest for blob in all_blobs(fresh.app)} <= _content_digests(containerd)

    assert_every_request_names_the_upstream(fresh.a, fresh.b, some=True)
    assert_manifest_requests_name(fresh.a, "team/app")
    assert assert_manifest_requests_name(fresh.b, "team/app") == {manifest}
    assert {fresh.app.config.digest, *(b.digest for b in fresh.app.layers)} <= blobs_fetched(fresh.b, "team/app")
