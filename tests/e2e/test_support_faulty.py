"""The faulty registry host (tests/support/faulty_host.py) against a real docker-registry."""

from __future__ import annotations

import hashlib
import json
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.support.faulty_host import FaultyHost, corrupted_manifest, running_faulty_host, wrong_digest
from tests.support.images import OCI_MANIFEST, Image, make_image, push_image
from tests.support.registry import Registry, running_registry

REPOSITORY = "team/app"
MANIFEST_PATH = f"/v2/{REPOSITORY}/manifests/v1"
ACCEPT = {"Accept": OCI_MANIFEST}


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with running_registry(tmp_path_factory.mktemp("faulty") / "r") as started:
        yield started


@pytest.fixture(scope="module")
def image(registry: Registry) -> Image:
    pushed = make_image("faulty", layers=2)
    push_image(registry.url, REPOSITORY, "v1", pushed)
    return pushed


@pytest.fixture
def faulty(registry: Registry, image: Image) -> Iterator[FaultyHost]:
    with running_faulty_host(registry.url) as host:
        yield host


def _client(faulty: FaultyHost, timeout: float = 10.0) -> httpx.Client:
    return httpx.Client(base_url=faulty.url, trust_env=False, timeout=timeout)


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_forwards_normally_and_records(faulty: FaultyHost, image: Image) -> None:
    assert faulty.url == f"http://127.0.0.1:{faulty.port}"
    with _client(faulty) as client:
        manifest = client.get(MANIFEST_PATH + "?ns=x", headers=ACCEPT)
        assert manifest.status_code == 200
        assert manifest.content == image.manifest.data
        assert manifest.headers["Docker-Content-Digest"] == image.manifest.digest
        layer = image.layers[0]
        blob = client.get(f"/v2/{REPOSITORY}/blobs/{layer.digest}")
        assert blob.status_code == 200 and blob.content == layer.data
        assert client.get(f"/v2/{REPOSITORY}/manifests/nothing-here", headers=ACCEPT).status_code == 404

    records = faulty.requests
    assert [(r.method, r.target) for r in records] == [
        ("GET", MANIFEST_PATH + "?ns=x"),
        ("GET", f"/v2/{REPOSITORY}/blobs/{image.layers[0].digest}"),
        ("GET", f"/v2/{REPOSITORY}/manifests/nothing-here"),
    ]
    assert records[0].path == MANIFEST_PATH and records[0].query() == {"ns": ["x"]}
    assert records[0].header_values("accept") == [OCI_MANIFEST]
    assert all(faulty.served(name) == 0 for name in ("corrupt_manifest", "corrupt_blob", "truncate_blob", "hang"))
    faulty.clear()
    assert faulty.requests == []
    with pytest.raises(ValueError, match="unknown fault"):
        faulty.served("corupt_blob")


def test_corrupt_manifest_keeps_length_and_headers(faulty: FaultyHost, image: Image) -> None:
    faulty.corrupt_manifest("v1")
    with _client(faulty) as client:
        for target in (MANIFEST_PATH, MANIFEST_PATH + "?ns=x"):
            response = client.get(target, headers=ACCEPT)
            assert response.status_code == 200
            assert len(response.content) == image.manifest.size
            assert int(response.headers["Content-Length"]) == image.manifest.size
            assert _sha256(response.content) != image.manifest.digest
            # The header still names the real manifest; only hashing the body tells.
            assert response.headers["Docker-Content-Digest"] == image.manifest.digest
            assert response.headers["Content-Type"] == OCI_MANIFEST
            # One byte changed, and it is still a JSON document (a digest inside it is wrong).
            assert sum(a != b for a, b in zip(response.content, image.manifest.data, strict=True)) == 1
            json.loads(response.content)
        head = client.head(MANIFEST_PATH, headers=ACCEPT)
        assert head.status_code == 200 and head.headers["Docker-Content-Digest"] == image.manifest.digest
        # By digest it is another reference, so untouched.
        by_digest = client.get(f"/v2/{REPOSITORY}/manifests/{image.manifest.digest}", headers=ACCEPT)
        assert by_digest.content == image.manifest.data
        assert faulty.served("corrupt_manifest") == 2

        faulty.clear_faults()
        assert client.get(MANIFEST_PATH, headers=ACCEPT).content == image.manifest.data


def test_lie_about_digest_serves_right_bytes(faulty: FaultyHost, image: Image) -> None:
    faulty.lie_about_digest("v1")
    with _client(faulty) as client:
        response = client.get(MANIFEST_PATH + "?ns=x", headers=ACCEPT)
        assert response.content == image.manifest.data
        assert response.headers["Docker-Content-Digest"] == wrong_digest(image.manifest.digest)
        assert response.headers["Docker-Content-Digest"] != image.manifest.digest
        head = client.head(MANIFEST_PATH, headers=ACCEPT)
        assert head.headers["Docker-Content-Digest"] == wrong_digest(image.manifest.digest)
    assert faulty.served("lie_about_digest") == 2


def test_corrupt_blob_keeps_length(faulty: FaultyHost, image: Image) -> None:
    layer = image.layers[1]
    faulty.corrupt_blob(layer.digest)
    with _client(faulty) as client:
        response = client.get(f"/v2/{REPOSITORY}/blobs/{layer.digest}?ns=x")
        assert response.status_code == 200
        assert len(response.content) == layer.size == int(response.headers["Content-Length"])
        assert _sha256(response.content) != layer.digest
        assert sum(a != b for a, b in zip(response.content, layer.data, strict=True)) == 1
        head = client.head(f"/v2/{REPOSITORY}/blobs/{layer.digest}")
        assert head.status_code == 200 and int(head.headers["Content-Length"]) == layer.size
        # Another blob is untouched.
        assert client.get(f"/v2/{REPOSITORY}/blobs/{image.config.digest}").content == image.config.data
    assert faulty.served("corrupt_blob") == 1


def test_truncate_blob_closes_mid_body(faulty: FaultyHost, image: Image) -> None:
    layer = image.layers[0]
    faulty.truncate_blob(layer.digest, after=1000)
    with _client(faulty) as client:
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            client.get(f"/v2/{REPOSITORY}/blobs/{layer.digest}?ns=x")
        # What arrived before the close: the full length announced, `after` bytes sent.
        with client.stream("GET", f"/v2/{REPOSITORY}/blobs/{layer.digest}") as response:
            assert int(response.headers["Content-Length"]) == layer.size
            received = b""
            with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
                for piece in response.iter_raw():
                    received += piece
            assert received == layer.data[:1000]
        faulty.clear_faults()
        assert client.get(f"/v2/{REPOSITORY}/blobs/{layer.digest}").content == layer.data
    assert faulty.served("truncate_blob") == 2


def test_hang_times_out_the_client_and_shutdown_stays_bounded(registry: Registry, image: Image) -> None:
    with running_faulty_host(registry.url) as faulty:
        faulty.hang(2)
        with _client(faulty, timeout=0.5) as client, pytest.raises(httpx.TimeoutException):
            client.get(MANIFEST_PATH + "?ns=x", headers=ACCEPT)
        faulty.hang(0)
        with _client(faulty, timeout=5) as client:
            assert client.get(MANIFEST_PATH, headers=ACCEPT).content == image.manifest.data
        assert faulty.served("hang") == 1
        # A request left hanging far longer than the test: leaving the block must not wait for it.
        faulty.hang(60)
        with _client(faulty, timeout=0.5) as client, pytest.raises(httpx.TimeoutException):
            client.get(MANIFEST_PATH, headers=ACCEPT)
        assert [r.method for r in faulty.requests] == ["GET", "GET", "GET"]
        leaving = time.monotonic()
    assert time.monotonic() - leaving < 2.0


def test_refuse_then_accept_again(faulty: FaultyHost, image: Image) -> None:
    port = faulty.port
    with _client(faulty) as client:
        # A pooled keep-alive connection must not slip past refuse().
        assert client.get(MANIFEST_PATH, headers=ACCEPT).status_code == 200
        faulty.refuse()
        assert faulty.refusing
        with pytest.raises(httpx.ConnectError):
            client.get(MANIFEST_PATH + "?ns=x", headers=ACCEPT)
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
    faulty.refuse()  # already refusing: nothing changes

    faulty.accept_again()
    faulty.accept_again()  # already listening: nothing changes
    assert not faulty.refusing and faulty.port == port
    with _client(faulty) as client:
        assert client.get(MANIFEST_PATH + "?ns=x", headers=ACCEPT).content == image.manifest.data
    assert [r.target for r in faulty.requests] == [MANIFEST_PATH, MANIFEST_PATH + "?ns=x"]


def test_corrupted_manifest_without_embedded_digest_flips_the_middle_byte() -> None:
    assert corrupted_manifest(b"abcde") == b"ab" + bytes([ord("c") ^ 0xFF]) + b"de"
    assert corrupted_manifest(b"") == b""
