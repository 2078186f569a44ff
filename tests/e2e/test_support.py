"""Fast tests of the test-support fixtures against the real docker-registry; the environment smoke test."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.support.images import (
    OCI_INDEX,
    OCI_MANIFEST,
    Image,
    Index,
    all_blobs,
    make_image,
    make_index,
    push_image,
    push_index,
    sha256_digest,
)
from tests.support.recorder import recording_proxy
from tests.support.registry import Registry, running_registry, write_htpasswd
from tests.support.tls import client_ssl_context, issue_client_cert, issue_server_cert, make_ca

ACCEPT_ALL = f"{OCI_MANIFEST}, {OCI_INDEX}"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with running_registry(tmp_path_factory.mktemp("registry")) as started:
        yield started


@pytest.fixture(scope="module")
def pushed(registry: Registry) -> tuple[Image, Index]:
    image = make_image("support-image", layers=2, layer_size=16 * 1024)
    index = make_index("support-index", layers=1, layer_size=16 * 1024)
    push_image(registry.url, "test/image", "v1", image)
    push_index(registry.url, "test/multi", "v1", index)
    return image, index


def test_images_are_deterministic_and_consistent() -> None:
    first = make_image("same-seed", layers=2, layer_size=4096)
    assert first == make_image("same-seed", layers=2, layer_size=4096)
    assert first != make_image("other-seed", layers=2, layer_size=4096)

    config = json.loads(first.config.data)
    assert (config["os"], config["architecture"]) == first.platform == ("linux", "amd64")
    for layer, diff_id in zip(first.layers, config["rootfs"]["diff_ids"], strict=True):
        tar_bytes = gzip.decompress(layer.data)
        assert sha256_digest(tar_bytes) == diff_id
        with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
            (member,) = [m for m in tar.getmembers() if m.isfile()]
            assert member.size == 4096
        # Seeded random content does not compress: the blob is at least as big as its payload.
        assert layer.size >= 4096

    manifest = json.loads(first.manifest.data)
    assert manifest["config"]["digest"] == first.config.digest
    assert [d["size"] for d in manifest["layers"]] == [layer.size for layer in first.layers]


def test_pushed_manifests_and_blobs_read_back(registry: Registry, pushed: tuple[Image, Index]) -> None:
    image, index = pushed
    with httpx.Client(base_url=registry.url, headers={"Accept": ACCEPT_ALL}) as client:
        for repository, tag, top in (
            ("test/image", "v1", image.manifest),
            ("test/multi", "v1", index.manifest),
        ):
            response = client.get(f"/v2/{repository}/manifests/{tag}")
            assert response.status_code == 200, response.text
            assert response.headers["Docker-Content-Digest"] == top.digest
            assert response.headers["Content-Type"] == top.media_type
            assert sha256_digest(response.content) == top.digest

        for repository, source in (("test/image", image), ("test/multi", index)):
            for blob in all_blobs(source):
                kind = "manifests" if blob.media_type in (OCI_MANIFEST, OCI_INDEX) else "blobs"
                response = client.get(f"/v2/{repository}/{kind}/{blob.digest}")
                assert response.status_code == 200, (blob.digest, response.text)
                assert hashlib.sha256(response.content).hexdigest() == blob.digest.removeprefix("sha256:")
                assert len(response.content) == blob.size


def test_recorder_keeps_duplicate_accept_lines_and_query(registry: Registry, pushed: tuple[Image, Index]) -> None:
    _, index = pushed
    # Two recorders in a row: the second proves the first forwarded both Accept lines separately.
    with recording_proxy(registry.url) as inner, recording_proxy(inner.url) as outer:
        target = "/v2/test/multi/manifests/v1?ns=upstream.test"
        with httpx.Client(base_url=outer.url) as client:
            response = client.get(target, headers=[("Accept", OCI_MANIFEST), ("Accept", OCI_INDEX)])
        # distribution answers an OCI index only if some Accept line names the index type (the 2nd here).
        assert response.status_code == 200, response.text
        assert response.headers["Docker-Content-Digest"] == index.manifest.digest
        assert sha256_digest(response.content) == index.manifest.digest

        for recorder in (outer, inner):
            (seen,) = recorder.requests
            assert (seen.method, seen.target) == ("GET", target)
            assert seen.header_values("accept") == [OCI_MANIFEST, OCI_INDEX]
            assert seen.query() == {"ns": ["upstream.test"]}
        # Each hop replaces Host with its target's: the inner recorder received its own address.
        assert outer.requests[0].header_values("Host") == [f"{outer.host}:{outer.port}"]
        assert inner.requests[0].header_values("Host") == [f"{inner.host}:{inner.port}"]

    assert registry.wait_for_uri("ns=upstream.test") == target
    assert target in registry.request_uris()


def test_recorder_streams_uploads_head_and_reports_a_dead_target(registry: Registry, tmp_path: Path) -> None:
    image = make_image("through-recorder", layers=1, layer_size=200 * 1024)
    with recording_proxy(registry.url) as recorder:
        # Monolithic uploads with Content-Length bodies go through the recorder.
        push_image(recorder.url, "test/recorded", "v1", image)
        # distribution answers with absolute upload Locations built from the Host it saw (the
        # registry's), so the PUTs that finish uploads go to the registry directly.
        methods = [(r.method, r.path.split("/")[-2]) for r in recorder.requests]
        assert methods == [("POST", "uploads"), ("POST", "uploads"), ("PUT", "manifests")]

        layer = image.layers[0]
        with httpx.Client(base_url=recorder.url) as client:
            head = client.head(f"/v2/test/recorded/blobs/{layer.digest}")
            assert head.status_code == 200
            assert int(head.headers["Content-Length"]) == layer.size

            # A chunked request body (an iterator has no length) is re-chunked to the registry.
            started = client.post("/v2/test/recorded/blobs/uploads/")
            assert started.status_code == 202
            payload = b"chunked upload body " * 1000
            location = urllib.parse.urlsplit(started.headers["Location"])
            patched = client.patch(
                f"{location.path}?{location.query}",
                content=iter([payload[:5000], payload[5000:]]),
                headers={"Content-Type": "application/octet-stream"},
            )
            assert patched.status_code == 202, patched.text
            assert patched.headers["Range"] == f"0-{len(payload) - 1}"
            assert recorder.requests[-1].header_values("Transfer-Encoding") == ["chunked"]

            streamed = client.get(f"/v2/test/recorded/blobs/{layer.digest}")
            assert sha256_digest(streamed.content) == layer.digest

    # A recorder whose target is gone still records, and answers 502.
    with running_registry(tmp_path / "short-lived") as short_lived:
        dead_url = short_lived.url
    with recording_proxy(dead_url) as recorder, httpx.Client(base_url=recorder.url) as client:
        response = client.get("/v2/?ns=gone.test", headers=[("Accept", "a"), ("Accept", "b")])
        assert response.status_code == 502
        (seen,) = recorder.requests
        assert seen.header_values("Accept") == ["a", "b"]
        assert seen.query() == {"ns": ["gone.test"]}
        recorder.clear()
        assert recorder.requests == []


def test_tls_registry_with_throwaway_ca_and_htpasswd(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "pki")
    server_tls = issue_server_cert(ca, tmp_path / "pki", ["localhost"], ["127.0.0.1"])
    htpasswd = write_htpasswd(tmp_path / "htpasswd", {"alice": "secret"})
    with running_registry(tmp_path / "registry", tls=server_tls, htpasswd=htpasswd) as registry:
        assert registry.url.startswith("https://127.0.0.1:")
        verify = client_ssl_context(server_tls.ca_path)
        assert httpx.get(f"{registry.url}/v2/", verify=verify).status_code == 401
        assert httpx.get(f"{registry.url}/v2/", verify=verify, auth=("alice", "secret")).status_code == 200
        # The system trust store does not know the throwaway CA.
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{registry.url}/v2/")
        # A 401 has no "response completed" line, but the access log has it.
        assert registry.request_uris().count("/v2/") >= 1


def test_registry_requiring_client_certificates(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "pki")
    server_tls = issue_server_cert(ca, tmp_path / "pki", [], ["127.0.0.1"])
    client_cert = issue_client_cert(ca, tmp_path / "pki", "skopeo")
    extra = {"http": {"tls": {"clientcas": [str(ca.cert_path)]}}}
    with running_registry(tmp_path / "registry", tls=server_tls, extra_config=extra) as registry:
        with_cert = client_ssl_context(server_tls.ca_path, client_cert)
        assert httpx.get(f"{registry.url}/v2/", verify=with_cert).status_code == 200
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{registry.url}/v2/", verify=client_ssl_context(server_tls.ca_path))


def test_relative_urls_keep_upload_sessions_behind_the_recorder(tmp_path: Path) -> None:
    image = make_image("relative-urls", layers=1, layer_size=1024)
    extra = {"http": {"relativeurls": True}}
    with (
        running_registry(tmp_path, extra_config=extra) as registry,
        recording_proxy(registry.url) as recorder,
    ):
        push_image(recorder.url, "test/relative", "v1", image)
        methods = [r.method for r in recorder.requests]
        assert methods == ["POST", "PUT", "POST", "PUT", "PUT"]
        assert all(r.query()["digest"] for r in recorder.requests if r.method == "PUT" and "uploads" in r.path)


class _EchoHandler(BaseHTTPRequestHandler):
    """A target that answers chunked, with duplicate header lines, echoing the header lines it got."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        body = json.dumps(list(self.headers.items())).encode()
        self.send_response(200)
        self.send_header("X-Dup", "one")
        self.send_header("X-Dup", "two")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for start in range(0, len(body), 7):
            piece = body[start : start + 7]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        self.wfile.write(b"0\r\n\r\n")


def test_recorder_forwards_header_lines_and_rechunks_a_chunked_response() -> None:
    target = ThreadingHTTPServer(("127.0.0.1", 0), _EchoHandler)
    serving = threading.Thread(target=target.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    serving.start()
    try:
        target_url = f"http://127.0.0.1:{target.server_address[1]}"
        with recording_proxy(target_url) as recorder, httpx.Client(base_url=recorder.url) as client:
            response = client.get("/echo", headers=[("Accept", "a"), ("Accept", "b"), ("Connection", "close")])
        assert response.status_code == 200
        assert response.headers.get_list("X-Dup") == ["one", "two"]
        assert response.headers["Transfer-Encoding"] == "chunked"
        received = [tuple(line) for line in response.json()]
        assert [value for name, value in received if name == "Accept"] == ["a", "b"]
        assert ("Host", target_url.removeprefix("http://")) in received
        # Connection is about the client's hop only.
        assert not [name for name, _ in received if name.lower() == "connection"]
        assert recorder.requests[0].header_values("Connection") == ["close"]
    finally:
        target.shutdown()
        target.server_close()
        serving.join(timeout=5)
