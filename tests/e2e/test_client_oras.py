"""oras-py (PyPI `oras`) pulls and pushes `upstream.test/...` through the real gateway, the client matrix's oras-py row.

oras-py pulls artifacts: each layer becomes a file named by its title annotation, so the files' sha256 must be the
layer digests. The pull world's images have tar+gzip layers, which oras-py unpacks instead of writing them as
they came, so this module puts an artifact of its own (two file layers) on mirror B, the way `oras push` would.
oras-py cannot pull an index (it has no layers), so there is no multi-platform cell.
"""

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support.images import OCI_MANIFEST, Blob, push_blob, push_manifest
from tests.support.oras_client import OrasRun, oras_pull, oras_push
from tests.support.world import (
    UPSTREAM,
    World,
    assert_every_request_names_the_upstream,
    assert_manifest_requests_name,
    assert_pushed_to,
    blobs_fetched,
)

ARTIFACT_REPOSITORY = "team/oras-artifact"
ARTIFACT_TAG = "v1"
# Not a tar+gzip layer type: oras-py writes such a layer to its file as it came, without unpacking it.
FILE_MEDIA_TYPE = "application/vnd.ocigate.test.file"
UNKNOWN_CONFIG = "application/vnd.unknown.config.v1+json"  # what oras-py itself pushes as an artifact's config
TITLE = "org.opencontainers.image.title"


@dataclass(frozen=True)
class Artifact:
    manifest: Blob
    config: Blob
    files: dict[str, Blob]  # title -> layer


def _make_artifact() -> Artifact:
    files = {
        "notes.txt": Blob.of(FILE_MEDIA_TYPE, b"an artifact pulled by oras-py through ocigate\n"),
        # Seeded pseudo-random bytes: a layer of some size, identical on every run.
        "payload.bin": Blob.of(FILE_MEDIA_TYPE, hashlib.shake_256(b"ocigate oras payload").digest(48 * 1024)),
    }
    config = Blob.of(UNKNOWN_CONFIG, b"{}")
    document = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.descriptor(),
        "layers": [{**blob.descriptor(), "annotations": {TITLE: title}} for title, blob in files.items()],
    }
    manifest = Blob.of(OCI_MANIFEST, json.dumps(document, sort_keys=True, separators=(",", ":")).encode())
    return Artifact(manifest, config, files)


@pytest.fixture(scope="module")
def artifact(pull_world: World) -> Iterator[Artifact]:
    """The artifact, on mirror B only (pushed to the registry directly, not through its recording hop)."""
    made = _make_artifact()
    with httpx.Client(timeout=30.0, trust_env=False) as client:
        for blob in (made.config, *made.files.values()):
            push_blob(pull_world.b.registry.url, ARTIFACT_REPOSITORY, blob, client)
        push_manifest(pull_world.b.registry.url, ARTIFACT_REPOSITORY, ARTIFACT_TAG, made.manifest, client)
    yield made


def _ok(run: OrasRun) -> dict:
    assert run.returncode == 0 and run.result is not None, run.describe()
    return run.result


def _pulled_files(outdir: Path) -> dict[str, str]:
    """File name -> sha256 digest of every file oras-py wrote."""
    return {p.name: "sha256:" + hashlib.sha256(p.read_bytes()).hexdigest() for p in outdir.iterdir() if p.is_file()}


def _assert_mirror_b_was_told_the_upstream(world: World, manifest_reference: str) -> None:
    """Every request that reached B carried ns=upstream.test; each manifest request asked for `manifest_reference`
    and carried the named reference (upstream.test/<repository>:<tag> or @<digest>)."""
    assert_every_request_names_the_upstream(world.b, some=True)
    assert assert_manifest_requests_name(world.b, ARTIFACT_REPOSITORY) == {manifest_reference}


def _assert_layers_fetched_from_b(world: World, artifact: Artifact) -> None:
    assert {blob.digest for blob in artifact.files.values()} <= blobs_fetched(world.b, ARTIFACT_REPOSITORY)


@pytest.mark.matrix("oras-py", "pull by tag")
def test_oras_pull_by_tag(fresh: World, artifact: Artifact, tmp_path: Path) -> None:
    run, outdir = oras_pull(fresh.gateway, tmp_path, f"{UPSTREAM}/{ARTIFACT_REPOSITORY}:{ARTIFACT_TAG}")
    _ok(run)
    assert _pulled_files(outdir) == {title: blob.digest for title, blob in artifact.files.items()}
    _assert_mirror_b_was_told_the_upstream(fresh, ARTIFACT_TAG)
    _assert_layers_fetched_from_b(fresh, artifact)


@pytest.mark.matrix("oras-py", "pull by digest")
def test_oras_pull_by_digest(fresh: World, artifact: Artifact, tmp_path: Path) -> None:
    digest = artifact.manifest.digest
    run, outdir = oras_pull(fresh.gateway, tmp_path, f"{UPSTREAM}/{ARTIFACT_REPOSITORY}@{digest}")
    _ok(run)
    assert _pulled_files(outdir) == {title: blob.digest for title, blob in artifact.files.items()}
    _assert_mirror_b_was_told_the_upstream(fresh, digest)
    _assert_layers_fetched_from_b(fresh, artifact)


def _files_to_push(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    notes = directory / "pushed-notes.txt"
    notes.write_text("pushed by oras-py through ocigate\n")
    payload = directory / "pushed-payload.bin"
    payload.write_bytes(hashlib.shake_256(b"ocigate oras push").digest(32 * 1024))
    return [notes, payload]


@pytest.mark.matrix("oras-py", "push")
def test_oras_push(fresh: World, tmp_path: Path) -> None:
    files = _files_to_push(tmp_path / "push")
    target = f"{UPSTREAM}/team/pushed-oras-py:v1"
    pushed = oras_push(tmp_path / "push", target, files, gateway=fresh.gateway)
    assert pushed.returncode == 0, f"{pushed.describe()}\ngateway log:\n{fresh.gateway.log_text()[-2000:]}"
    assert_pushed_to(fresh.b, fresh.a, "team/pushed-oras-py", "v1")

    run, outdir = oras_pull(fresh.gateway, tmp_path / "pull-back", target)
    _ok(run)
    assert _pulled_files(outdir) == {f.name: "sha256:" + hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
