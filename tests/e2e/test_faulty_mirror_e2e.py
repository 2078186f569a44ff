"""A mirror that lies, breaks off or hangs, first in the host list, in front of a real registry; the same registry,
behind a recording hop, as the second mirror. skopeo pulls through the real gateway and must end up with the right
bytes, or fail, never with wrong ones.

Every test starts its own gateway, so what one learns about the faulty host (cool-downs, bad content) starts anew.
"""

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ocigate.hashing import IN_THE_LOOP
from tests.support.clients import assert_layout_holds, skopeo_copy_to_layout
from tests.support.faulty_host import FaultyHost, Shape, running_faulty_host
from tests.support.gateway import Gateway, running_gateway
from tests.support.hoststoml import write_mirror_rules
from tests.support.images import Image, make_image, push_image
from tests.support.recorder import Recorder, recording_proxy
from tests.support.registry import running_registry

UPSTREAM = "upstream.test"
REFERENCE = f"{UPSTREAM}/team/app:v1"


@dataclass
class Mirrors:
    faulty: FaultyHost  # first in the host list
    good: Recorder  # the same registry, second
    image: Image
    rules: Path


@pytest.fixture(scope="module")
def registry_with_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Image, Path]]:
    workdir = tmp_path_factory.mktemp("faulty")
    # Layers larger than what the gateway hashes in its event loop: their bytes are hashed on a thread, as a real
    # image's large layers are.
    image = make_image("faulty-app", layers=3, layer_size=IN_THE_LOOP + 512 * 1024)
    with running_registry(workdir / "registry") as registry:
        push_image(registry.url, "team/app", "v1", image)
        rules = write_mirror_rules(workdir / "rules", UPSTREAM, ["http://faulty.test:5000", "http://good.test:5000"])
        yield registry.url, image, rules


@pytest.fixture
def mirrors(registry_with_image: tuple[str, Image, Path]) -> Iterator[Mirrors]:
    url, image, rules = registry_with_image
    with running_faulty_host(url) as faulty, recording_proxy(url) as good:
        yield Mirrors(faulty, good, image, rules)


def gateway(mirrors: Mirrors, directory: Path, *options: str):
    host_map = {
        "faulty.test:5000": f"127.0.0.1:{mirrors.faulty.port}",
        "good.test:5000": f"127.0.0.1:{mirrors.good.port}",
    }
    return running_gateway(directory, mirrors.rules, host_map, options)


def copy(gateway: Gateway, home: Path):
    return skopeo_copy_to_layout(gateway, home, REFERENCE)


def assert_copied_right(result, layout: Path, image: Image) -> None:
    assert result.returncode == 0, result.stderr.decode()
    assert_layout_holds(layout, image)


def test_a_manifest_with_wrong_bytes_is_passed_over_for_the_next_mirror(mirrors: Mirrors, tmp_path: Path) -> None:
    mirrors.faulty.corrupt_manifest("v1")
    with gateway(mirrors, tmp_path / "gateway") as gw:
        result, layout = copy(gw, tmp_path / "client")
        log = gw.log_text()
    assert_copied_right(result, layout, mirrors.image)
    assert mirrors.faulty.served("corrupt_manifest") >= 1
    assert any(r.path == "/v2/team/app/manifests/v1" for r in mirrors.good.requests)
    assert "http://faulty.test:5000/v2: 200 but bytes hash to" in log


def test_a_blob_with_wrong_bytes_fails_the_transfer_and_the_retry_comes_from_the_next_mirror(
    mirrors: Mirrors, tmp_path: Path
) -> None:
    layer = mirrors.image.layers[1]
    mirrors.faulty.corrupt_blob(layer.digest)
    with gateway(mirrors, tmp_path / "gateway") as gw:
        first, _ = copy(gw, tmp_path / "first")
        second, layout = copy(gw, tmp_path / "second")
        log = gw.log_text()
    # The wrong bytes never arrived whole: skopeo's copy failed rather than storing them.
    assert first.returncode != 0, "a copy with a corrupted layer succeeded"
    assert mirrors.faulty.served("corrupt_blob") == 1
    assert f"sent {layer.size} bytes that hash to" in log and "transfer aborted" in log
    # The retry did not ask the faulty mirror for that layer again.
    assert_copied_right(second, layout, mirrors.image)
    assert f"sent something else for {layer.digest} before" in log
    assert any(r.path == f"/v2/team/app/blobs/{layer.digest}" for r in mirrors.good.requests)


def test_a_hanging_mirror_costs_one_read_timeout_and_is_not_waited_for_again(mirrors: Mirrors, tmp_path: Path) -> None:
    mirrors.faulty.hang(60)
    with gateway(mirrors, tmp_path / "gateway", "ocigate_read_timeout=2") as gw:
        first, first_layout = copy(gw, tmp_path / "first")
        asked_while_hanging = len(mirrors.faulty.requests)
        second, second_layout = copy(gw, tmp_path / "second")
        log = gw.log_text()
    assert_copied_right(first, first_layout, mirrors.image)
    assert_copied_right(second, second_layout, mirrors.image)
    assert "http://faulty.test:5000/v2: answer not complete within 2 s" in log
    # Cooling down: the second copy never went to the hanging mirror.
    assert len(mirrors.faulty.requests) == asked_while_hanging
    assert "answer not complete within 2 s (skipped for" in log


def test_a_refusing_mirror_is_skipped_and_named(mirrors: Mirrors, tmp_path: Path) -> None:
    mirrors.faulty.refuse()
    with gateway(mirrors, tmp_path / "gateway") as gw:
        result, layout = copy(gw, tmp_path / "client")
        log = gw.log_text()
    assert_copied_right(result, layout, mirrors.image)
    assert "http://faulty.test:5000/v2: connection refused" in log


def test_a_healthy_mirror_that_answers_blobs_chunked_serves_skopeos_copy_itself(
    mirrors: Mirrors, tmp_path: Path
) -> None:
    for blob in (mirrors.image.config, *mirrors.image.layers):
        mirrors.faulty.shape(blob.digest, Shape(framing="chunked"))
    with gateway(mirrors, tmp_path / "gateway") as gw:
        result, layout = copy(gw, tmp_path / "client")
    assert_copied_right(result, layout, mirrors.image)
    assert mirrors.faulty.served("shape") == 1 + len(mirrors.image.layers)
    assert not [r for r in mirrors.good.requests if "/blobs/" in r.path], "the good mirror was asked for blobs"


def test_a_close_delimited_wrong_blob_fails_skopeos_copy_and_the_retry_comes_from_the_next_mirror(
    mirrors: Mirrors, tmp_path: Path
) -> None:
    layer = mirrors.image.layers[0]
    mirrors.faulty.shape(layer.digest, Shape(framing="close", corrupt=True))
    with gateway(mirrors, tmp_path / "gateway") as gw:
        first, _ = copy(gw, tmp_path / "first")
        second, layout = copy(gw, tmp_path / "second")
        log = gw.log_text()
    assert first.returncode != 0, "a copy with a corrupted, close-delimited layer succeeded"
    assert "transfer aborted" in log
    assert_copied_right(second, layout, mirrors.image)
    assert any(r.path == f"/v2/team/app/blobs/{layer.digest}" for r in mirrors.good.requests)
