"""Checking content against digests: manifests whole, blobs while they stream."""

import gzip
import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

from hypothesis import given
from hypothesis import strategies as st

from ocigate.verify import (
    GATHERING_BLOBS,
    MAX_MANIFEST_SIZE,
    PASS_AFTER,
    PASS_SIZE,
    BlobAnswer,
    Problem,
    StreamVerifier,
    digest_of,
    few_blobs_streaming,
    judge_blob_answer,
    manifest_problem,
)

MANIFEST = b'{"schemaVersion":2}'
DIGEST = "sha256:" + hashlib.sha256(MANIFEST).hexdigest()
OTHER = "sha256:" + "0" * 64


def headers(**values: str) -> list[tuple[bytes, bytes]]:
    return [(name.replace("_", "-").encode(), value.encode()) for name, value in values.items()]


def test_a_manifest_by_digest_must_hash_to_it() -> None:
    assert manifest_problem(DIGEST, [], MANIFEST, head=False) is None
    assert manifest_problem(DIGEST, [], MANIFEST + b" ", head=False) == Problem(
        f"bytes hash to {digest_of(MANIFEST + b' ')}, not {DIGEST} (asked for)", wrong=True
    )


def test_docker_content_digest_must_name_the_bytes_and_the_digest_asked_for() -> None:
    assert manifest_problem(None, headers(Docker_Content_Digest=DIGEST), MANIFEST, head=False) is None
    wrong_header = manifest_problem(None, headers(Docker_Content_Digest=OTHER), MANIFEST, head=False)
    assert wrong_header == Problem(f"bytes hash to {DIGEST}, not {OTHER} (Docker-Content-Digest)", wrong=True)
    lying = manifest_problem(DIGEST, headers(Docker_Content_Digest=OTHER), MANIFEST, head=False)
    assert lying == Problem(f"Docker-Content-Digest {OTHER} for a request of {DIGEST}", wrong=True)


def test_a_head_answer_is_checked_by_its_header_only() -> None:
    assert manifest_problem(DIGEST, headers(Docker_Content_Digest=DIGEST), b"", head=True) is None
    assert manifest_problem(DIGEST, headers(Docker_Content_Digest=OTHER), b"", head=True) is not None
    assert manifest_problem(DIGEST, [], b"", head=True) is None


def test_an_encoded_manifest_is_checked_decoded_and_an_unknown_coding_is_a_problem() -> None:
    assert manifest_problem(DIGEST, headers(Content_Encoding="gzip"), gzip.compress(MANIFEST), head=False) is None
    # What cannot be checked is no proof of a lie: the host is not marked as having sent something else.
    assert manifest_problem(DIGEST, headers(Content_Encoding="br"), MANIFEST, head=False) == Problem(
        "content coding 'br' that ocigate cannot check", wrong=False
    )
    assert manifest_problem(DIGEST, headers(Content_Encoding="gzip"), MANIFEST, head=False) == Problem(
        "a gzip body that does not decode", wrong=False
    )


def test_a_compressed_manifest_is_not_decoded_beyond_what_a_manifest_can_be() -> None:
    bomb = gzip.compress(b"\0" * (MAX_MANIFEST_SIZE + 1))
    assert len(bomb) < 10_000
    problem = manifest_problem(DIGEST, headers(Content_Encoding="gzip"), bomb, head=False)
    assert problem == Problem(f"a gzip body that decodes to more than {MAX_MANIFEST_SIZE} bytes", wrong=False)


def test_sha512_is_checked_and_other_algorithms_pass_unchecked() -> None:
    sha512 = "sha512:" + hashlib.sha512(MANIFEST).hexdigest()
    assert manifest_problem(sha512, [], MANIFEST, head=False) is None
    assert manifest_problem(sha512, [], MANIFEST + b"x", head=False) is not None
    assert manifest_problem("blake3:" + "a" * 64, [], MANIFEST, head=False) is None


def stream(verifier: StreamVerifier, pieces: list[bytes]) -> list[bytes]:
    """What mitmproxy hands the client: every piece the verifier returns, for each piece and then the end (b"")."""
    return [out for piece in [*pieces, b""] for out in verifier(piece)]


@given(st.lists(st.binary(min_size=1, max_size=64), min_size=1, max_size=20))
def test_a_blob_streams_through_whole_when_it_matches(pieces: list[bytes]) -> None:
    blob = b"".join(pieces)
    verifier = StreamVerifier(digest_of(blob))
    sent = stream(verifier, pieces)
    assert b"".join(sent) == blob and verifier.mismatch is None
    # An empty piece would go out as a chunk of its own: in a chunked answer, the one that ends the body.
    assert b"" not in sent


def test_an_empty_blob_streams_as_nothing_at_all() -> None:
    verifier = StreamVerifier(digest_of(b""))
    assert stream(verifier, []) == [] and verifier.mismatch is None


@given(
    st.lists(st.binary(min_size=1, max_size=64), min_size=1, max_size=20),
    st.binary(min_size=1, max_size=8),
    st.lists(st.sampled_from([0.0, 2 * PASS_AFTER]), min_size=20, max_size=20),
)
def test_a_wrong_blob_never_arrives_whole(pieces: list[bytes], extra: bytes, waits: list[float]) -> None:
    blob = b"".join(pieces)
    clock = Clock(waits)
    verifier = StreamVerifier(digest_of(blob + extra), clock=clock)
    sent = stream(verifier, pieces)
    passed = b"".join(sent)
    assert b"" not in sent
    # The last piece (and what came with it) is held back: the client is short of bytes, and told nothing arrived
    # complete.
    assert blob.startswith(passed) and len(passed) <= len(blob) - len(pieces[-1])
    assert verifier.mismatch == f"{len(blob)} bytes that hash to {digest_of(blob)}"


class Clock:
    """A monotonic clock that moves on by the next of `waits` each time it is read (then stands still)."""

    def __init__(self, waits: list[float]) -> None:
        self.now = 1000.0
        self._waits = list(waits)

    def __call__(self) -> float:
        self.now += self._waits.pop(0) if self._waits else 0.0
        return self.now


def test_a_fast_host_s_pieces_go_on_gathered_and_the_last_is_held_back() -> None:
    piece = bytes(range(256)) * 256  # 64 KiB, as mitmproxy reads a host's answer
    blob = piece * 10
    verifier = StreamVerifier(digest_of(blob), clock=Clock([]))
    sent = [verifier(piece) for _ in range(10)]
    # The last piece is held back; the ones before it go on four at a time.
    assert [[len(out) for out in outs] for outs in sent] == [[]] * 4 + [[PASS_SIZE]] + [[]] * 3 + [[PASS_SIZE]] + [[]]
    assert [len(out) for out in verifier(b"")] == [len(piece), len(piece)]
    assert verifier.mismatch is None and verifier.size == len(blob)


@contextmanager
def many_blobs_streaming() -> Iterator[None]:
    """GATHERING_BLOBS other blobs streaming meanwhile; closed whatever happens (the count is the process's)."""
    others = [StreamVerifier(digest_of(b"")) for _ in range(GATHERING_BLOBS)]
    try:
        yield
    finally:
        for other in others:
            other.close()


def test_under_many_blobs_at_once_a_fast_host_s_pieces_go_on_as_they_come_one_piece_late() -> None:
    with many_blobs_streaming():
        assert not few_blobs_streaming()
        piece = b"p" * 65536
        verifier = StreamVerifier(digest_of(piece * 3), clock=Clock([]))
        assert [verifier(piece) for _ in range(3)] == [[], [piece], [piece]]
        assert verifier(b"") == [piece]
    assert few_blobs_streaming()


def test_a_slow_host_s_pieces_go_on_as_they_come_one_piece_late() -> None:
    pieces = [b"a" * 10, b"b" * 10, b"c" * 10]
    # Each piece comes longer than PASS_AFTER after the one before it.
    verifier = StreamVerifier(digest_of(b"".join(pieces)), clock=Clock([0.0] + [2 * PASS_AFTER] * 3))
    assert [verifier(piece) for piece in pieces] == [[], [pieces[0]], [pieces[1]]]
    assert verifier(b"") == [pieces[2]]


def test_a_tag_answered_with_what_is_no_manifest_is_a_problem_but_not_a_lie() -> None:
    for body in (b"", b"<html>Please log in to the hotel's wifi</html>", b"[1, 2]", b'{"truncated": '):
        problem = manifest_problem(None, [], body, head=False)
        assert problem == Problem(f"a body of {len(body)} bytes that is not a JSON manifest", wrong=False), body
    assert manifest_problem(None, [], b'  {"schemaVersion": 2}', head=False) is None
    # By digest, the hash decides: bytes that are what was asked for pass, JSON or not.
    assert manifest_problem(digest_of(b"not json"), [], b"not json", head=False) is None


BLOB_DIGEST = digest_of(b"blob")


def judge(status: int, response=(), request=(), *, client="HTTP/1.1", digest: str = BLOB_DIGEST) -> BlobAnswer:
    return judge_blob_answer(status, headers(**dict(response)), headers(**dict(request)), digest, client=client)


def test_only_a_200_is_the_blob_and_it_is_verified() -> None:
    assert judge(200, {"Content_Length": "4"}) == BlobAnswer(verify=True)
    assert judge(200, {"Transfer_Encoding": "chunked"}) == BlobAnswer(verify=True)


def test_a_close_delimited_blob_goes_chunked_to_an_http1_client_so_that_a_cut_shows() -> None:
    assert judge(200) == BlobAnswer(verify=True, chunked=True)
    # HTTP/2 frames every body itself: no chunked encoding there.
    assert judge(200, client="HTTP/2.0") == BlobAnswer(verify=True)
    # An HTTP/1.0 client can read neither chunks nor a cut from a close: it gets no such body.
    assert judge(200, client="HTTP/1.0").failed == "a body ended by closing the connection, to an HTTP/1.0 client"
    assert judge(200, {"Content_Length": "4"}, client="HTTP/1.0") == BlobAnswer(verify=True)


def test_a_content_encoded_blob_is_verified_as_sent_and_labelled_identity() -> None:
    for coding in ("gzip", "br", "x-anything"):
        answer = judge(200, {"Content_Encoding": coding, "Content_Length": "9"})
        assert answer == BlobAnswer(verify=True, drop_encoding=True), coding
    assert judge(200, {"Content_Encoding": "identity", "Content_Length": "4"}) == BlobAnswer(verify=True)


def test_a_part_or_not_modified_passes_only_when_the_client_asked_for_it() -> None:
    assert judge(206, request={"Range": "bytes=10-"}).unchecked is not None
    assert judge(206) == BlobAnswer(failed="206 Partial Content to a request without Range")
    assert judge(304, request={"If_None_Match": '"x"'}).unchecked is not None
    assert judge(304) == BlobAnswer(failed="304 Not Modified to a request without conditions")


def test_a_redirect_passes_unchecked_and_every_other_status_is_no_blob() -> None:
    for status in (301, 302, 303, 307, 308):
        assert judge(status).unchecked == f"a redirect ({status}) to storage the host chose"
    for status in (201, 203, 204, 300, 400, 404, 429, 500, 502, 503):
        assert judge(status) == BlobAnswer(failed=f"{status} to a GET of the blob"), status


def test_a_digest_of_an_algorithm_ocigate_cannot_hash_passes_unchecked() -> None:
    assert judge(200, digest="blake3:" + "a" * 64) == BlobAnswer(unchecked="a blake3 digest ocigate cannot check")


@given(
    st.integers(100, 599),
    st.dictionaries(
        st.sampled_from(["Content-Length", "Transfer-Encoding", "Content-Encoding", "Location"]), st.text(max_size=8)
    ),
    st.dictionaries(st.sampled_from(["Range", "If-None-Match", "If-Modified-Since", "Accept"]), st.text(max_size=8)),
    st.sampled_from(["HTTP/1.1", "HTTP/2.0"]),
)
def test_every_answer_is_judged_exactly_one_way(status: int, response: dict, request: dict, client: str) -> None:
    def lines(values: dict) -> list[tuple[bytes, bytes]]:
        return [(k.encode(), v.encode("utf-8")) for k, v in values.items()]

    answer = judge_blob_answer(status, lines(response), lines(request), BLOB_DIGEST, client=client)
    assert [answer.verify, answer.unchecked is not None, answer.failed is not None].count(True) == 1
    assert answer.verify == (status == 200)
