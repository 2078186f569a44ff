"""skopeo pulls `upstream.test/...` through the real gateway from two real registries: A (empty) then B.

upstream.test resolves nowhere: only the gateway's rules know where its content lives. Each mirror sits behind a
recording hop, because distribution does not log request headers.
"""

import hashlib
import json
import ssl
from pathlib import Path
from urllib.parse import unquote

import httpx

from tests.support.clients import skopeo_copy_to_layout, skopeo_inspect_raw
from tests.support.images import all_blobs
from tests.support.world import (
    UPSTREAM,
    World,
    assert_every_request_names_the_upstream,
    assert_manifest_requests_name,
)


def _ok(result) -> str:
    assert result.returncode == 0, f"skopeo failed:\n{result.stderr.decode()}"
    return result.stdout.decode()


def _oci_blobs(layout: Path) -> dict[str, bytes]:
    return {f"sha256:{p.name}": p.read_bytes() for p in (layout / "blobs" / "sha256").iterdir()}


def test_inspect_raw_returns_the_mirror_manifest_bytes(fresh: World, tmp_path: Path) -> None:
    out = skopeo_inspect_raw(fresh.gateway, tmp_path, f"{UPSTREAM}/team/app:v1")
    assert _ok(out).encode() == fresh.app.manifest.data


def test_copy_by_tag_is_served_by_b_after_a_said_404(fresh: World, tmp_path: Path) -> None:
    result, layout = skopeo_copy_to_layout(fresh.gateway, tmp_path, f"{UPSTREAM}/team/app:v1")
    _ok(result)
    blobs = _oci_blobs(layout)
    for digest, data in blobs.items():
        assert "sha256:" + hashlib.sha256(data).hexdigest() == digest
    assert {b.digest for b in all_blobs(fresh.app)} <= set(blobs)

    # A was asked for the tag first, answered 404, and the gateway went on to B.
    a_manifests = [r for r in fresh.a.recorder.requests if "/manifests/" in r.path]
    assert a_manifests, "mirror A was never asked"
    assert any(e.status == 404 and "/manifests/v1" in e.uri for e in fresh.a.registry.access_log())
    b_uris = [unquote(u) for u in fresh.b.registry.request_uris()]
    assert any("/v2/team/app/manifests/v1" in u for u in b_uris)
    for blob in (fresh.app.config, *fresh.app.layers):
        assert any(f"/blobs/{blob.digest}" in u for u in b_uris), f"{blob.digest} not fetched from B"
    assert "mirror-a.test:5000/v2: 404" in fresh.gateway.log_text()
    # Each verified blob's host connection was found where mitmproxy keeps it, and reads larger (reads.py).
    assert "blobs are read in 64 KiB pieces" not in fresh.gateway.log_text()


def test_every_request_that_reached_a_mirror_names_the_upstream(fresh: World, tmp_path: Path) -> None:
    result, _ = skopeo_copy_to_layout(fresh.gateway, tmp_path, f"{UPSTREAM}/team/multi:v1", "--all")
    _ok(result)
    assert_every_request_names_the_upstream(fresh.a, fresh.b, some=True)
    # The registries' own access logs agree: the query reached them, not just the hop in front of them.
    for mirror in (fresh.a, fresh.b):
        served = mirror.served_since_mark()
        assert served, f"{mirror.name} served nothing"
        for entry in served:
            assert "ns=upstream.test" in unquote(entry.uri), entry


def test_blob_requests_carry_the_tag_of_the_manifest_they_came_from(fresh: World, tmp_path: Path) -> None:
    result, _ = skopeo_copy_to_layout(fresh.gateway, tmp_path, f"{UPSTREAM}/team/app:v1")
    _ok(result)
    blob_requests = [r for r in fresh.b.recorder.requests if "/blobs/" in r.path]
    fetched = {r.path.rsplit("/", 1)[1] for r in blob_requests}
    assert fetched >= {b.digest for b in (fresh.app.config, *fresh.app.layers)}
    for request in blob_requests:
        assert request.header_values("OCI-Named-Ref") == [f"{UPSTREAM}/team/app:v1"], request.target


def test_manifest_requests_carry_the_named_reference(fresh: World, tmp_path: Path) -> None:
    result, layout = skopeo_copy_to_layout(fresh.gateway, tmp_path, f"{UPSTREAM}/team/multi:v1", "--all")
    _ok(result)
    # By tag: upstream.test/team/multi:v1; the platform manifests of that index, by digest, belong to that pull too,
    # and so do the blobs of both platforms.
    asked = assert_manifest_requests_name(fresh.b, "team/multi", pull="v1")
    for request in (r for r in fresh.b.recorder.requests if "/blobs/" in r.path):
        assert request.header_values("OCI-Named-Ref") == [f"{UPSTREAM}/team/multi:v1"], request.target
    children = {image.manifest.digest for image in fresh.multi.images}
    assert "v1" in asked and children <= asked, asked
    # The copied index is the one pushed, and both platforms' blobs arrived.
    index = json.loads((layout / "index.json").read_text())
    assert index["manifests"][0]["digest"] == fresh.multi.manifest.digest
    assert {b.digest for b in all_blobs(fresh.multi)} <= set(_oci_blobs(layout))


def test_go_client_accept_lines_reach_the_mirror_as_separate_lines(fresh: World, tmp_path: Path) -> None:
    _ok(skopeo_inspect_raw(fresh.gateway, tmp_path, f"{UPSTREAM}/team/multi:v1"))
    tag_requests = [r for r in fresh.b.recorder.requests if r.path.endswith("/manifests/v1")]
    assert tag_requests
    accept = tag_requests[-1].header_values("Accept")
    assert len(accept) > 1, accept
    assert "application/vnd.oci.image.index.v1+json" in accept


def test_plain_http_registry_without_rule_passes_through(fresh: World) -> None:
    with httpx.Client(proxy=fresh.gateway.proxy_url, trust_env=False) as client:
        response = client.get(f"http://{fresh.b.name}/v2/team/app/tags/list")
    assert response.status_code == 200 and response.json()["tags"] == ["v1"]
    # Untouched: no ns= was added on the way.
    assert fresh.b.recorder.requests[-1].target == "/v2/team/app/tags/list"


def test_gateway_refuses_a_destination_it_may_not_dial(fresh: World) -> None:
    with httpx.Client(proxy=fresh.gateway.proxy_url, trust_env=False) as client:
        response = client.get("http://nowhere.test/v2/")
    assert response.status_code == 502
    assert "nowhere.test:80 is not in the host map and name resolution is off" in fresh.gateway.log_text()


def test_blobs_asked_on_one_client_connection_reuse_one_mirror_connection(fresh: World) -> None:
    # The host map re-points the dialled address; the connection must still be known by the host's own address,
    # or mitmproxy opens (and keeps) one per blob.
    connects = f"server connect 127.0.0.1:{fresh.b.recorder.port}"
    before = fresh.gateway.log_text().count(connects)
    context = ssl.create_default_context(cafile=str(fresh.gateway.ca_path))
    with httpx.Client(proxy=fresh.gateway.proxy_url, verify=context, trust_env=False) as client:
        for layer in fresh.app.layers:
            response = client.get(f"https://{UPSTREAM}/v2/team/app/blobs/{layer.digest}")
            assert response.status_code == 200 and response.content == layer.data
    assert fresh.gateway.log_text().count(connects) - before == 1
