"""The hostile-host matrix: a mirror in front of a real registry answers blob GETs in every legal (and some illegal)
way — framed by Content-Length, chunked or by closing, with or without a Content-Encoding, with statuses a client
did not ask for, corrupted, cut short, dripped — first in the host list, before a good mirror of the same registry.

Through the real gateway, for every answer the client either gets exactly the blob's bytes or a transfer it can see
failed (a short body, a reset, an OCI error); never a complete-looking wrong blob. The host that failed is not asked
again for that blob: the next request is served right, by the good mirror.

Manifests, by tag and by digest, get the same framings and the faults that matter to a body ocigate reads whole
itself (wire.py, its own HTTP/1.1 client) and checks against its digest before answering: the client gets exactly the
manifest, at once, from the faulty host when its answer was legal and from the good mirror otherwise, the faulty one
named in the log. The run ends with one line, `hostile hosts: N hostile answers tried, N handled`.
"""

import gzip
import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.support import tally
from tests.support.faulty_host import FRAMINGS, FaultyHost, Shape, running_faulty_host
from tests.support.gateway import Gateway, running_gateway
from tests.support.hoststoml import write_mirror_rules
from tests.support.images import OCI_MANIFEST, Blob, Image, make_image, push_blob, push_image
from tests.support.recorder import Recorder, recording_proxy
from tests.support.registry import running_registry
from tests.support.through import Fetched, get_through

UPSTREAM = "upstream.test"
REPOSITORY = "team/app"
HOSTILE_HOSTS = tally.Matrix("hostile hosts", "hostile answers")
# Big enough to cross several reads and pieces, small enough for a matrix.
BLOB_SIZE = 300 * 1024

ENCODINGS = {
    "identity": {},
    "gzip label on the blob's own bytes": {"encoding": "gzip"},
    "gzip, compressed anyway": {"encoding": "gzip", "compress": True},
    "br label on the blob's own bytes": {"encoding": "br"},
}
# What else the host does; each a Shape's fields. A healthy mirror answers "as it is" or "dripping".
FAULTS = {
    "as it is": {},
    "dripping": {"drip": 0.05, "pieces": 6},
    "one byte wrong": {"corrupt": True},
    "cut off half way": {"cut": True},
    "206 without Range": {"status": 206},
    "304 without conditions": {"status": 304},
    "404 after its HEAD said 200": {"status": 404},
    "500": {"status": 500},
    "hanging up instead of answering": {"hang_up": True},
    "an empty 200": {"empty": True},
    "as an HTTP/1.0 server": {"http10": True},
}
# HTTP/1.0 has no chunked coding: mitmproxy itself refuses such an answer (a request smuggling guard), before
# ocigate sees it.
CASES = [
    (framing, encoding, fault)
    for framing in FRAMINGS
    for encoding in ENCODINGS
    for fault in FAULTS
    if not (framing == "chunked" and fault == "as an HTTP/1.0 server")
]


# Faults that show before the host's first byte reaches the client: the next host is asked within the same request
# (the client follows the gateway's 307), so the client gets the blob right away.
BEFORE_FIRST_BYTE = {
    "206 without Range",
    "304 without conditions",
    "404 after its HEAD said 200",
    "500",
    "hanging up instead of answering",
}


def healthy(encoding: str, fault: str) -> bool:
    """Whether the host's answer is the blob, framed and labelled legally: it must reach the client from that host."""
    return not ENCODINGS[encoding].get("compress") and fault in ("as it is", "dripping", "as an HTTP/1.0 server")


@dataclass
class Mirrors:
    faulty: FaultyHost
    good: Recorder
    gateway: Gateway
    blobs: dict[tuple[str, str, str], Blob]


@pytest.fixture(scope="module")
def mirrors(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mirrors]:
    workdir = tmp_path_factory.mktemp("hostile-hosts")
    blobs = {case: Blob.of("application/octet-stream", _seeded(" / ".join(case))) for case in CASES}
    with running_registry(workdir / "registry") as registry:
        with httpx.Client(timeout=30) as client:
            for blob in blobs.values():
                push_blob(registry.url, REPOSITORY, blob, client)
        rules = write_mirror_rules(workdir / "rules", UPSTREAM, ["http://faulty.test:5000", "http://good.test:5000"])
        with running_faulty_host(registry.url) as faulty, recording_proxy(registry.url) as good:
            host_map = {"faulty.test:5000": f"127.0.0.1:{faulty.port}", "good.test:5000": f"127.0.0.1:{good.port}"}
            options = ("ocigate_read_timeout=5",)
            with running_gateway(workdir / "gateway", rules, host_map, options) as gateway:
                yield Mirrors(faulty, good, gateway, blobs)


def _seeded(seed: str) -> bytes:
    return hashlib.shake_256(seed.encode()).digest(BLOB_SIZE)


def exact(fetched: Fetched, blob: Blob) -> bool:
    # Go clients read a chunked body under an HTTP/1.0 status line as raw bytes: chunks need HTTP/1.1.
    chunked = "chunked" in (fetched.header("Transfer-Encoding") or "").lower()
    framed_right = not chunked or fetched.version == 11
    return fetched.status == 200 and fetched.broken is None and fetched.body == blob.data and framed_right


def visibly_failed(fetched: Fetched) -> bool:
    """A failure the client cannot take for the blob: a broken transfer, or an OCI error answer."""
    if fetched.broken is not None:
        return True
    if fetched.status is None or fetched.status < 400:
        return False
    try:
        return bool(json.loads(fetched.body)["errors"])
    except (ValueError, KeyError, TypeError):
        return False


def describe(fetched: Fetched) -> str:
    shown = f"status {fetched.status}, {len(fetched.body)} bytes, broken: {fetched.broken}"
    return f"{shown}, {fetched.redirects} redirects"


@pytest.mark.parametrize(("framing", "encoding", "fault"), CASES, ids=[" | ".join(case) for case in CASES])
def test_a_blob_answer_is_the_blob_or_a_visible_failure_and_the_next_request_is_served_right(
    mirrors: Mirrors, framing: str, encoding: str, fault: str
) -> None:
    blob = mirrors.blobs[(framing, encoding, fault)]
    path = f"/v2/{REPOSITORY}/blobs/{blob.digest}"
    mirrors.faulty.shape(blob.digest, Shape(framing=framing, **ENCODINGS[encoding], **FAULTS[fault]))
    first = get_through(mirrors.gateway, UPSTREAM, path)
    second = get_through(mirrors.gateway, UPSTREAM, path)
    good_served = [r for r in mirrors.good.requests if r.method == "GET" and r.path == path]
    if healthy(encoding, fault):
        # A legal answer is served as it came, from the mirror that sent it.
        handled = exact(first, blob) and exact(second, blob) and not good_served
    elif fault in BEFORE_FIRST_BYTE:
        handled = exact(first, blob) and first.redirects == 1 and exact(second, blob) and bool(good_served)
    else:
        handled = (exact(first, blob) or visibly_failed(first)) and exact(second, blob) and bool(good_served)
    tally.record(HOSTILE_HOSTS, handled=handled)
    assert handled, (
        f"first: {describe(first)}; second: {describe(second)}; the good mirror served it {len(good_served)} times\n"
        + mirrors.gateway.log_text()[-2000:]
    )


# Manifests: what ocigate reads whole itself, so every fault must end in the right manifest for the client at once.
MANIFEST_BY = ("tag", "digest")
# Each a Shape's fields, and whether the answer is the manifest, legally framed and labelled (served from that host).
MANIFEST_FAULTS = {
    "as it is": ({}, True),
    "dripping": ({"drip": 0.05, "pieces": 6}, True),
    # A coding is legal HTTP: ocigate checks the decoded bytes against the digest, and the client, which named no
    # coding it reads, gets them decoded.
    "gzip, compressed": ({"encoding": "gzip", "compress": True}, True),
    "gzip label on its own bytes": ({"encoding": "gzip"}, False),
    "one byte wrong": ({"corrupt": True}, False),
    "cut off half way": ({"cut": True}, False),
}
# Why ocigate passed over the host, as its log line says.
SKIPPED_BECAUSE = {
    "gzip label on its own bytes": "200 but a gzip body that does not decode",
    "one byte wrong": "200 but bytes hash to",
    "cut off half way": "peer closed connection without sending complete message body",
}


def skipped_because(framing: str, fault: str) -> str:
    if fault == "cut off half way" and framing == "close":
        return "200 but bytes hash to"  # a close-delimited body cut short looks complete: only its digest tells
    return SKIPPED_BECAUSE[fault]


MANIFEST_CASES = [(by, framing, fault) for by in MANIFEST_BY for framing in FRAMINGS for fault in MANIFEST_FAULTS]


@pytest.fixture(scope="module")
def manifests(mirrors: Mirrors) -> dict[tuple[str, str, str], Image]:
    """An image of its own per manifest case, its tag the case's index, in the mirrors' registry: what the gateway
    learns of the faulty host for one manifest does not touch another."""
    images = {case: make_image(" / ".join(case), layers=1, layer_size=1024) for case in MANIFEST_CASES}
    with httpx.Client(timeout=30) as client:
        for number, image in enumerate(images.values()):
            push_image(mirrors.faulty.target_url, REPOSITORY, f"case{number}", image, client=client)
    return images


@pytest.mark.parametrize(("by", "framing", "fault"), MANIFEST_CASES, ids=[" | ".join(case) for case in MANIFEST_CASES])
def test_a_manifest_answer_ends_in_the_right_manifest_at_once_and_a_wrong_one_names_the_host(
    mirrors: Mirrors, manifests: dict[tuple[str, str, str], Image], by: str, framing: str, fault: str
) -> None:
    manifest = manifests[(by, framing, fault)].manifest
    reference = f"case{MANIFEST_CASES.index((by, framing, fault))}" if by == "tag" else manifest.digest
    path = f"/v2/{REPOSITORY}/manifests/{reference}"
    fields, legal = MANIFEST_FAULTS[fault]
    mirrors.faulty.shape(reference, Shape(framing=framing, **fields))
    log_before, shaped_before = len(mirrors.gateway.log_text()), mirrors.faulty.served("shape")
    fetched = get_through(mirrors.gateway, UPSTREAM, path, [("Accept", OCI_MANIFEST)])
    asked_the_faulty_host = mirrors.faulty.served("shape") == shaped_before + 1
    log = mirrors.gateway.log_text()[log_before:]
    good_served = [r for r in mirrors.good.requests if r.method == "GET" and r.path.startswith(path)]
    # The client sends no Accept-Encoding: whatever the host's coding, it gets the manifest's own bytes.
    right = (
        fetched.status == 200
        and fetched.broken is None
        and fetched.body == manifest.data
        and fetched.header("Content-Encoding") is None
        and fetched.header("Docker-Content-Digest") == manifest.digest
    )
    # A legal answer is served from the host that sent it; a wrong one from the next mirror, the host named.
    if legal:
        from_the_right_host = not good_served
    else:
        why = f"-> good.test:5000 200 (skipped http://faulty.test:5000/v2: {skipped_because(framing, fault)}"
        from_the_right_host = len(good_served) == 1 and why in log
    handled = right and asked_the_faulty_host and from_the_right_host
    tally.record(HOSTILE_HOSTS, handled=handled)
    assert handled, (
        f"{describe(fetched)}, Content-Encoding {fetched.header('Content-Encoding')}, "
        f"right bytes: {fetched.body == manifest.data}, the faulty host asked: {asked_the_faulty_host}; "
        f"the good mirror served it {len(good_served)} times\n" + log
    )


@pytest.mark.parametrize("framing", FRAMINGS)
def test_a_compressed_manifest_reaches_a_client_accepting_gzip_as_the_host_sent_it(
    mirrors: Mirrors, manifests: dict[tuple[str, str, str], Image], framing: str
) -> None:
    manifest = manifests[("digest", framing, "gzip, compressed")].manifest
    mirrors.faulty.shape(manifest.digest, Shape(framing=framing, encoding="gzip", compress=True))
    path = f"/v2/{REPOSITORY}/manifests/{manifest.digest}"
    fetched = get_through(mirrors.gateway, UPSTREAM, path, [("Accept", OCI_MANIFEST), ("Accept-Encoding", "gzip")])
    assert fetched.status == 200 and fetched.header("Content-Encoding") == "gzip", describe(fetched)
    assert gzip.decompress(fetched.body) == manifest.data


@pytest.mark.parametrize("framing", FRAMINGS)
@pytest.mark.parametrize("accepts_gzip", [False, True], ids=["client names no coding", "client accepts gzip"])
def test_a_head_of_a_manifest_the_host_would_compress_names_its_coding_only_to_a_client_that_reads_it(
    mirrors: Mirrors, manifests: dict[tuple[str, str, str], Image], framing: str, accepts_gzip: bool
) -> None:
    manifest = manifests[("digest", framing, "gzip, compressed")].manifest
    mirrors.faulty.shape(manifest.digest, Shape(framing=framing, encoding="gzip", compress=True, head=True))
    path = f"/v2/{REPOSITORY}/manifests/{manifest.digest}"
    headers = [("Accept", OCI_MANIFEST), *([("Accept-Encoding", "gzip")] if accepts_gzip else [])]
    shaped_before = mirrors.faulty.served("shape")
    fetched = get_through(mirrors.gateway, UPSTREAM, path, headers, method="HEAD")
    asked_the_faulty_host = mirrors.faulty.served("shape") == shaped_before + 1
    compressed_length = str(len(gzip.compress(manifest.data)))
    if accepts_gzip:
        # As the host said it: a GET would bring these bytes.
        as_said = fetched.header("Content-Encoding") == "gzip" and fetched.header("Content-Length") in (
            compressed_length,
            None,
        )
    else:
        # A GET would bring the manifest decoded, whose length the host did not say: neither coding nor a length.
        as_said = fetched.header("Content-Encoding") is None and fetched.header("Content-Length") in (
            str(len(manifest.data)),
            None,
        )
    handled = (
        fetched.status == 200
        and fetched.body == b""
        and fetched.header("Docker-Content-Digest") == manifest.digest
        and as_said
        and asked_the_faulty_host
    )
    tally.record(HOSTILE_HOSTS, handled=handled)
    assert handled, (
        f"{describe(fetched)}, Content-Encoding {fetched.header('Content-Encoding')}, Content-Length "
        f"{fetched.header('Content-Length')}, the faulty host asked: {asked_the_faulty_host}\n"
        + mirrors.gateway.log_text()[-3000:]
    )


# A host that stops talking, before its answer or between two pieces of it, for longer than the read timeout.
STALLS = {
    "silent after its HEAD said 200": Shape(stall=30),
    "30 s between two pieces": Shape(drip=30, pieces=2),
}
STALL_TIMEOUT = 1


@pytest.fixture(scope="module")
def stalling(mirrors: Mirrors, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway of its own with a short read timeout, in front of the same mirrors."""
    workdir = tmp_path_factory.mktemp("stalling")
    rules = write_mirror_rules(workdir / "rules", UPSTREAM, ["http://faulty.test:5000", "http://good.test:5000"])
    host_map = {
        "faulty.test:5000": f"127.0.0.1:{mirrors.faulty.port}",
        "good.test:5000": f"127.0.0.1:{mirrors.good.port}",
    }
    with running_gateway(workdir / "gateway", rules, host_map, (f"ocigate_read_timeout={STALL_TIMEOUT}",)) as gateway:
        yield gateway


@pytest.mark.parametrize("stall", list(STALLS))
def test_a_host_that_stops_talking_is_cut_off_after_the_read_timeout_and_the_next_request_goes_elsewhere(
    mirrors: Mirrors, stalling: Gateway, stall: str
) -> None:
    blob = Blob.of("application/octet-stream", _seeded(f"stall / {stall}"))
    with httpx.Client(timeout=30) as client:
        push_blob(mirrors.faulty.target_url, REPOSITORY, blob, client)
    path = f"/v2/{REPOSITORY}/blobs/{blob.digest}"
    mirrors.faulty.shape(blob.digest, STALLS[stall])
    started = time.monotonic()
    first = get_through(stalling, UPSTREAM, path)
    waited = time.monotonic() - started
    second = get_through(stalling, UPSTREAM, path)
    # Silent before its answer, the host is passed over within the request; silent after its first piece, the
    # client sees the transfer fail.
    first_right = exact(first, blob) if stall == "silent after its HEAD said 200" else visibly_failed(first)
    handled = first_right and exact(second, blob)
    tally.record(HOSTILE_HOSTS, handled=handled)
    assert handled, f"first: {describe(first)}; second: {describe(second)}\n" + stalling.log_text()[-2000:]
    # Not a timing assertion on ocigate's speed: the host would have kept the client 30 s.
    assert waited < 20, f"the client waited {waited:.0f} s for a host that stopped talking"
    assert "sent nothing for 1 s: transfer aborted" in stalling.log_text()
