"""Deterministic OCI test images, built in memory from a seed, and a minimal pusher for them.

Layers are real gzip-compressed tar archives holding seeded pseudo-random (incompressible) data, so a
client that unpacks them can, and blob sizes are what they say. The same seed gives byte-identical blobs
(gzip mtime and tar metadata are fixed) with a given zlib.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import urllib.parse
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"

# Fixed so that configs (and so manifest digests) do not depend on when the test ran.
_CREATED = "2024-01-01T00:00:00Z"


@dataclass(frozen=True)
class Blob:
    media_type: str
    data: bytes
    digest: str  # "sha256:<hex>"
    size: int

    @classmethod
    def of(cls, media_type: str, data: bytes) -> Blob:
        return cls(media_type=media_type, data=data, digest=sha256_digest(data), size=len(data))

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True)
class Image:
    manifest: Blob
    config: Blob
    layers: tuple[Blob, ...]
    platform: tuple[str, str]  # (os, architecture)


@dataclass(frozen=True)
class Index:
    manifest: Blob
    images: tuple[Image, ...]


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _canonical_json(value: Any) -> bytes:
    # Sorted keys and no whitespace: one byte sequence per value, so one digest.
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _pseudo_random(seed: str, size: int) -> bytes:
    return hashlib.shake_256(seed.encode()).digest(size)


def _tar_layer(seed: str, size: int) -> bytes:
    """An uncompressed tar with a directory and one file of `size` seeded bytes, fixed metadata."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        directory = tarfile.TarInfo("ocigate-test")
        directory.type = tarfile.DIRTYPE
        directory.mode = 0o755
        directory.mtime = 0
        tar.addfile(directory)
        content = _pseudo_random(seed, size)
        file_name = "ocigate-test/" + hashlib.sha256(seed.encode()).hexdigest()[:16] + ".bin"
        info = tarfile.TarInfo(file_name)
        info.size = len(content)
        info.mode = 0o644
        info.mtime = 0
        tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def _gzip(data: bytes) -> bytes:
    buffer = io.BytesIO()
    # mtime=0 and an empty file name keep the gzip header free of anything that varies between runs.
    with gzip.GzipFile(filename="", fileobj=buffer, mode="wb", compresslevel=6, mtime=0) as stream:
        stream.write(data)
    return buffer.getvalue()


def make_image(
    seed: str,
    *,
    layers: int = 3,
    layer_size: int = 64 * 1024,
    platform: tuple[str, str] = ("linux", "amd64"),
) -> Image:
    """An OCI image with `layers` layers, each holding `layer_size` bytes of seeded data."""
    os_name, architecture = platform
    layer_blobs = []
    diff_ids = []
    for number in range(layers):
        tar = _tar_layer(f"{seed}/{os_name}/{architecture}/layer/{number}", layer_size)
        diff_ids.append(sha256_digest(tar))
        layer_blobs.append(Blob.of(OCI_LAYER_GZIP, _gzip(tar)))
    config_document = {
        "architecture": architecture,
        "os": os_name,
        "created": _CREATED,
        "config": {"Labels": {"org.ocigate.test.seed": seed}},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": _CREATED, "created_by": f"ocigate test layer {n}"} for n in range(layers)],
    }
    config = Blob.of(OCI_CONFIG, _canonical_json(config_document))
    manifest_document = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.descriptor(),
        "layers": [layer.descriptor() for layer in layer_blobs],
    }
    manifest = Blob.of(OCI_MANIFEST, _canonical_json(manifest_document))
    return Image(manifest=manifest, config=config, layers=tuple(layer_blobs), platform=(os_name, architecture))


def make_index(
    seed: str,
    platforms: Sequence[tuple[str, str]] = (("linux", "amd64"), ("linux", "arm64")),
    layers: int = 2,
    *,
    layer_size: int = 64 * 1024,
) -> Index:
    """An OCI index over one image per platform; each image has its own layers."""
    images = tuple(make_image(seed, layers=layers, layer_size=layer_size, platform=platform) for platform in platforms)
    index_document = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                **image.manifest.descriptor(),
                "platform": {"os": image.platform[0], "architecture": image.platform[1]},
            }
            for image in images
        ],
    }
    return Index(manifest=Blob.of(OCI_INDEX, _canonical_json(index_document)), images=images)


def all_blobs(image_or_index: Image | Index) -> list[Blob]:
    """Every manifest and blob, the top-level manifest first."""
    if isinstance(image_or_index, Index):
        blobs = [image_or_index.manifest]
        for image in image_or_index.images:
            blobs += all_blobs(image)
        return blobs
    return [image_or_index.manifest, image_or_index.config, *image_or_index.layers]


def _expect(response: httpx.Response, statuses: tuple[int, ...], what: str) -> None:
    if response.status_code not in statuses:
        raise AssertionError(
            f"{what}: {response.request.method} {response.request.url} answered {response.status_code}, "
            f"expected {statuses}: {response.text[:2000]}"
        )


@contextmanager
def _client_or_new(client: httpx.Client | None) -> Iterator[httpx.Client]:
    if client is not None:
        yield client
        return
    with httpx.Client(timeout=30.0) as new_client:
        yield new_client


def _with_query_param(url: str, name: str, value: str) -> str:
    """Add a query parameter, keeping any query the URL already has (distribution adds _state=...)."""
    parts = urllib.parse.urlsplit(url)
    extra = urllib.parse.urlencode({name: value})
    query = f"{parts.query}&{extra}" if parts.query else extra
    return urllib.parse.urlunsplit(parts._replace(query=query))


def push_blob(registry_url: str, repository: str, blob: Blob, client: httpx.Client) -> None:
    """Monolithic upload: POST to open a session, PUT the data to its Location with ?digest=."""
    base = registry_url.rstrip("/")
    started = client.post(f"{base}/v2/{repository}/blobs/uploads/")
    _expect(started, (202,), f"start upload of {blob.digest}")
    location = started.headers.get("Location")
    if not location:
        raise AssertionError(f"upload of {blob.digest}: 202 without Location; headers {started.headers}")
    # Location may be relative ("/v2/...") or absolute; resolve against the URL that was asked.
    upload_url = _with_query_param(urllib.parse.urljoin(str(started.url), location), "digest", blob.digest)
    finished = client.put(
        upload_url,
        content=blob.data,
        headers={"Content-Type": "application/octet-stream"},
    )
    _expect(finished, (201,), f"finish upload of {blob.digest}")


def push_manifest(registry_url: str, repository: str, reference: str, manifest: Blob, client: httpx.Client) -> None:
    base = registry_url.rstrip("/")
    response = client.put(
        f"{base}/v2/{repository}/manifests/{reference}",
        content=manifest.data,
        headers={"Content-Type": manifest.media_type},
    )
    _expect(response, (201,), f"push manifest {manifest.digest} as {reference}")
    stored_digest = response.headers.get("Docker-Content-Digest")
    if stored_digest is not None and stored_digest != manifest.digest:
        raise AssertionError(f"registry stored manifest as {stored_digest}, expected {manifest.digest}")


def push_image(
    registry_url: str,
    repository: str,
    tag: str | None,
    image: Image,
    *,
    client: httpx.Client | None = None,
) -> None:
    """Push config and layers, then the manifest by `tag` (or by digest when tag is None)."""
    with _client_or_new(client) as active:
        for blob in (image.config, *image.layers):
            push_blob(registry_url, repository, blob, active)
        push_manifest(registry_url, repository, tag or image.manifest.digest, image.manifest, active)


def push_index(
    registry_url: str,
    repository: str,
    tag: str,
    index: Index,
    *,
    client: httpx.Client | None = None,
) -> None:
    """Push every platform image by digest, then the index by `tag` (the registry checks children exist)."""
    with _client_or_new(client) as active:
        for image in index.images:
            push_image(registry_url, repository, None, image, client=active)
        push_manifest(registry_url, repository, tag, index.manifest, active)
