"""The pull world the end-to-end tests share: two real registries as mirrors of `upstream.test` behind recording
hops, mirror A empty and mirror B holding the test images and taking pushes, and a real gateway whose rules send
upstream.test to A then B. upstream.test resolves nowhere: only the gateway's rules know where its content lives."""

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .gateway import Gateway, running_gateway
from .images import Image, Index, make_image, make_index, push_image, push_index
from .recorder import RecordedRequest, Recorder, recording_proxy
from .registry import AccessLogEntry, Registry, running_registry

RUN_SH = Path(__file__).resolve().parents[2] / "run.sh"

UPSTREAM = "upstream.test"


@dataclass
class Mirror:
    name: str  # the netloc hosts.toml uses for it
    registry: Registry
    recorder: Recorder
    log_mark: int = 0

    def mark(self) -> None:
        self.recorder.clear()
        self.log_mark = len(self.registry.access_log())

    def served_since_mark(self) -> list[AccessLogEntry]:
        """What the registry itself logged since mark(): it logs after answering, so wait for the recorded count."""
        deadline = time.monotonic() + 5
        while True:
            entries = self.registry.access_log()[self.log_mark :]
            if len(entries) >= len(self.recorder.requests) or time.monotonic() > deadline:
                return entries
            time.sleep(0.02)


def assert_every_request_names_the_upstream(*mirrors: Mirror, some: bool = False) -> None:
    """Every request the recording hops in front of `mirrors` saw carried ns=upstream.test; with `some`, there was at
    least one."""
    seen = [(mirror, request) for mirror in mirrors for request in mirror.recorder.requests]
    if some:
        assert seen, f"no request reached {' or '.join(mirror.name for mirror in mirrors)}"
    for mirror, request in seen:
        assert request.query().get("ns") == [UPSTREAM], f"{mirror.name}: {request.method} {request.target}"


def _manifest_reference(request: RecordedRequest) -> str | None:
    """The tag or digest a /v2/<repository>/manifests/<reference> request asked for; None for any other request."""
    _, separator, reference = request.path.rpartition("/manifests/")
    return reference if separator else None


def assert_manifest_requests_name(mirror: Mirror, repository: str, pull: str | None = None) -> set[str]:
    """Every manifest request that reached `mirror` was for `repository` and carried OCI-Named-Ref naming the pull it
    belongs to: a request by tag its own `upstream.test/<repository>:<tag>`; one by digest the tag `pull` when it was
    part of a pull of that tag (the manifest the tag resolved to, the platform manifests of its index), else its own
    `@<digest>`. Returns the tags and digests asked for."""
    asked = set()
    for request in mirror.recorder.requests:
        reference = _manifest_reference(request)
        if reference is None:
            continue
        asked.add(reference)
        named = request.header_values("OCI-Named-Ref")
        where = f"{mirror.name}: {request.method} {request.target} with OCI-Named-Ref {named}"
        assert request.path == f"/v2/{repository}/manifests/{reference}", where
        by_digest = reference.startswith("sha256:")
        if by_digest and pull is not None:
            assert named == [f"{UPSTREAM}/{repository}:{pull}"], where
        else:
            assert named == [f"{UPSTREAM}/{repository}{'@' if by_digest else ':'}{reference}"], where
    return asked


def blobs_fetched(mirror: Mirror, repository: str) -> set[str]:
    """The digests of the blobs of `repository` that were fetched (GET) from `mirror`."""
    prefix = f"/v2/{repository}/blobs/"
    return {
        r.path.removeprefix(prefix) for r in mirror.recorder.requests if r.method == "GET" and r.path.startswith(prefix)
    }


def assert_pushed_to(pushed: Mirror, other: Mirror, repository: str, tag: str) -> None:
    """A push of `upstream.test/<repository>:<tag>` landed on `pushed` through the gateway: its recording hop saw the
    upload session (POST, PATCH, PUT under /v2/<repository>/blobs/uploads/) and the manifest PUT by `tag`, each
    carrying ns=upstream.test, and `other` was sent nothing that writes (no POST, PATCH or PUT)."""
    writes = ("POST", "PATCH", "PUT")
    uploads_prefix = f"/v2/{repository}/blobs/uploads/"
    uploads = [r for r in pushed.recorder.requests if r.method in writes and r.path.startswith(uploads_prefix)]
    assert uploads, f"{pushed.name} saw no upload under {uploads_prefix}"
    for request in uploads:
        assert request.query().get("ns") == [UPSTREAM], f"{pushed.name}: {request.method} {request.target}"
    manifest_path = f"/v2/{repository}/manifests/{tag}"
    manifest_puts = [r for r in pushed.recorder.requests if r.method == "PUT" and r.path == manifest_path]
    assert manifest_puts, f"{pushed.name} saw no PUT {manifest_path}"
    for request in manifest_puts:
        assert request.query().get("ns") == [UPSTREAM], f"{pushed.name}: {request.method} {request.target}"
    written = [f"{r.method} {r.target}" for r in other.recorder.requests if r.method in writes]
    assert not written, f"{other.name} was sent writes: {written}"


@dataclass
class World:
    a: Mirror
    b: Mirror
    gateway: Gateway
    app: Image
    multi: Index
    workdir: Path


@contextmanager
def pull_world(workdir: Path) -> Iterator[World]:
    app = make_image("app", layers=4)
    multi = make_index("multi")
    with (
        running_registry(workdir / "registry-a") as registry_a,
        # Relative upload Locations keep a push's upload session behind the recording hop (see recorder.py).
        running_registry(workdir / "registry-b", extra_config={"http": {"relativeurls": True}}) as registry_b,
        recording_proxy(registry_a.url) as recorder_a,
        recording_proxy(registry_b.url) as recorder_b,
    ):
        push_image(registry_b.url, "team/app", "v1", app)
        push_index(registry_b.url, "team/multi", "v1", multi)
        a = Mirror("mirror-a.test:5000", registry_a, recorder_a)
        b = Mirror("mirror-b.test:5000", registry_b, recorder_b)
        rules = workdir / "rules"
        (rules / UPSTREAM).mkdir(parents=True)
        (rules / UPSTREAM / "hosts.toml").write_text(
            f'server = "https://{UPSTREAM}"\n\n'
            f'[host."http://{a.name}"]\n  capabilities = ["pull", "resolve"]\n\n'
            f'[host."http://{b.name}"]\n  capabilities = ["pull", "resolve", "push"]\n'
        )
        host_map = {m.name: f"127.0.0.1:{m.recorder.port}" for m in (a, b)}
        # Started the way the README tells a newcomer to start it, so the client matrix speaks for ./run.sh.
        with running_gateway(workdir / "gateway", rules, host_map, entry_point=(str(RUN_SH),)) as gateway:
            yield World(a, b, gateway, app, multi, workdir)
