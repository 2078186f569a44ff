"""docker (dockerd 20.10, Debian's docker.io) pulls `upstream.test/...` through the real gateway, as an unmodified
daemon would.

The daemon, not the CLI, talks to registries: dockerd starts with HTTPS_PROXY at the gateway and the gateway's CA in
its private /etc/docker/certs.d/upstream.test/, and has no mirror configuration of its own, so every mirror decision
is the gateway's. One private dockerd serves the file; every test starts with no images in it, so everything a test
finds in the daemon was fetched by that test.
"""

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.dockerd import Dockerd, running_dockerd
from tests.support.images import Image
from tests.support.world import (
    UPSTREAM,
    World,
    assert_every_request_names_the_upstream,
    assert_manifest_requests_name,
    assert_pushed_to,
    blobs_fetched,
)

CLIENT = "docker"


@pytest.fixture(scope="module")
def dockerd(pull_world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dockerd]:
    # mktemp's short path keeps the daemons' sockets under the unix socket path limit.
    with running_dockerd(tmp_path_factory.mktemp("dockerd"), pull_world.gateway, [UPSTREAM]) as daemon:
        yield daemon


@pytest.fixture
def docker(dockerd: Dockerd) -> Dockerd:
    """The module's daemon, emptied of images: a pull cannot find a layer an earlier test fetched."""
    dockerd.remove_all_images()
    return dockerd


def _docker_ok(result) -> str:
    assert result.returncode == 0, f"docker {result.args[3:]} failed ({result.returncode}):\n{result.stderr}"
    return result.stdout


def _pull(docker: Dockerd, world: World, reference: str, *flags: str) -> str:
    """`docker pull` (the daemon fetches through the gateway); fails the test with the CLI's, the gateway's and the
    daemon's words."""
    result = docker.docker("pull", *flags, reference)
    assert result.returncode == 0, (
        f"docker pull {' '.join(flags)} {reference} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}\n"
        f"gateway log:\n{world.gateway.log_text()[-3000:]}\ndockerd log:\n{docker.log_text()[-3000:]}"
    )
    return result.stdout


def _diff_ids(image: Image) -> list[str]:
    return json.loads(image.config.data)["rootfs"]["diff_ids"]


def _assert_daemon_holds(docker: Dockerd, reference: str, image: Image, repo_digest: str) -> dict:
    """The daemon's image under `reference` is `image`, unpacked layer by layer, and remembers where it came from."""
    inspected = docker.inspect_image(reference)
    assert inspected is not None, f"dockerd has no image {reference}"
    # dockerd's image ID is the digest of the config it fetched; its layers are the diff IDs of what it unpacked.
    assert inspected["Id"] == image.config.digest
    assert inspected["RootFS"]["Layers"] == _diff_ids(image)
    assert (inspected["Os"], inspected["Architecture"]) == image.platform
    assert inspected["RepoDigests"] == [repo_digest]
    return inspected


def _blob_digests(image: Image) -> set[str]:
    return {image.config.digest, *(layer.digest for layer in image.layers)}


def test_the_daemon_carries_the_proxy_and_the_cli_does_not(dockerd: Dockerd, pull_world: World) -> None:
    # What the README tells docker users to check; and the CLI's environment has no proxy, so pulls prove the daemon's.
    assert _docker_ok(dockerd.docker("info", "--format", "{{.HTTPSProxy}}")).strip() == pull_world.gateway.proxy_url
    assert _docker_ok(dockerd.docker("version", "--format", "{{.Server.Version}}")).startswith("20.10.")


@pytest.mark.matrix(CLIENT, "pull by tag")
def test_docker_pulls_by_tag(fresh: World, docker: Dockerd) -> None:
    reference = f"{UPSTREAM}/team/app:v1"
    output = _pull(docker, fresh, reference)
    assert f"Digest: {fresh.app.manifest.digest}" in output

    inspected = _assert_daemon_holds(docker, reference, fresh.app, f"{UPSTREAM}/team/app@{fresh.app.manifest.digest}")
    assert inspected["RepoTags"] == [reference]

    assert_every_request_names_the_upstream(fresh.a, fresh.b)
    # dockerd resolves the tag (HEAD by tag), then fetches the manifest by the digest it resolved to; the gateway asks
    # A (which has nothing) before B for each.
    asked = {"v1", fresh.app.manifest.digest}
    assert assert_manifest_requests_name(fresh.b, "team/app", pull="v1") == asked
    assert assert_manifest_requests_name(fresh.a, "team/app", pull="v1") <= asked
    assert _blob_digests(fresh.app) <= blobs_fetched(fresh.b, "team/app")


@pytest.mark.matrix(CLIENT, "pull by digest")
def test_docker_pulls_by_digest(fresh: World, docker: Dockerd) -> None:
    digest = fresh.app.manifest.digest
    reference = f"{UPSTREAM}/team/app@{digest}"
    _pull(docker, fresh, reference)

    inspected = _assert_daemon_holds(docker, reference, fresh.app, reference)
    assert inspected["RepoTags"] == []

    assert_every_request_names_the_upstream(fresh.a, fresh.b)
    # No tag anywhere: every manifest request is by digest and names the reference by digest.
    assert assert_manifest_requests_name(fresh.b, "team/app") == {digest}
    assert assert_manifest_requests_name(fresh.a, "team/app") <= {digest}
    assert _blob_digests(fresh.app) <= blobs_fetched(fresh.b, "team/app")


@pytest.mark.matrix(CLIENT, "multi-platform index")
def test_docker_pulls_each_platform_of_an_index(fresh: World, docker: Dockerd) -> None:
    reference = f"{UPSTREAM}/team/multi:v1"
    index_digest = fresh.multi.manifest.digest
    # docker keeps one platform's image per pull (20.10 needs no experimental mode for --platform). Each pull starts
    # from an empty daemon: dockerd gives the index's digest (`repo@<index digest>`) to the first image pulled through
    # it and never moves it ("Image ID for digest ... changed ..., cannot update" in its log).
    for image in fresh.multi.images:
        docker.remove_all_images()
        output = _pull(docker, fresh, reference, "--platform", "/".join(image.platform))
        assert f"Digest: {index_digest}" in output
        _assert_daemon_holds(docker, reference, image, f"{UPSTREAM}/team/multi@{index_digest}")

    assert_every_request_names_the_upstream(fresh.a, fresh.b)
    # Each pull: the tag (HEAD), the index by its digest, then the platform's manifest by its digest.
    asked = {"v1", index_digest, *(image.manifest.digest for image in fresh.multi.images)}
    assert assert_manifest_requests_name(fresh.b, "team/multi", pull="v1") == asked
    assert assert_manifest_requests_name(fresh.a, "team/multi", pull="v1") <= asked
    for image in fresh.multi.images:
        assert _blob_digests(image) <= blobs_fetched(fresh.b, "team/multi")


def _pushed_digest(push_output: str, tag: str) -> str:
    """The manifest digest `docker push` reports: "<tag>: digest: sha256:... size: N"."""
    found = re.search(rf"^{re.escape(tag)}: digest: (sha256:[0-9a-f]{{64}}) size: \d+$", push_output, re.M)
    assert found, f"no digest in docker push's output:\n{push_output}"
    return found.group(1)


@pytest.mark.matrix(CLIENT, "push")
def test_docker_pushes_and_pulls_back(fresh: World, docker: Dockerd, tmp_path: Path) -> None:
    # Something to push: app:v1, pulled through the gateway (the pull-by-tag cell), under a name no registry holds.
    _pull(docker, fresh, f"{UPSTREAM}/team/app:v1")
    target = f"{UPSTREAM}/team/pushed-docker:v1"
    _docker_ok(docker.docker("tag", f"{UPSTREAM}/team/app:v1", target))

    pushed = docker.push_once(target, tmp_path)
    assert pushed.succeeded, (
        f"docker push {target} did not arrive: {pushed.first_failure or f'exit {pushed.returncode}'}\n"
        f"{pushed.stdout}\n{pushed.stderr}\ngateway log:\n{fresh.gateway.log_text()[-2000:]}"
    )
    assert_pushed_to(fresh.b, fresh.a, "team/pushed-docker", "v1")
    # dockerd pushes a Docker schema 2 manifest of the same config and layers: a digest of its own.
    pushed_digest = _pushed_digest(pushed.stdout, "v1")

    # Pulled back into an empty daemon, so nothing comes from the first pull.
    docker.remove_all_images()
    _pull(docker, fresh, target)
    _assert_daemon_holds(docker, target, fresh.app, f"{UPSTREAM}/team/pushed-docker@{pushed_digest}")
