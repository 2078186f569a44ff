"""Checking content against digests: manifests whole, blobs while they stream."""

import gzip
import hashlib

from hypothesis import given
from hypothesis import strategies as st

from ocigate.verify import MAX_MANIFEST_SIZE, Problem, StreamVerifier, digest_of, manifest_problem

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


@given(st.lists(st.binary(min_size=1, max_size=64), min_size=1, max_size=20))
def test_a_blob_streams_through_whole_when_it_matches(pieces: list[bytes]) -> None:
    blob = b"".join(pieces)
    verifier = StreamVerifier(digest_of(blob))
    passed = b"".join(verifier(piece) for piece in pieces) + verifier(b"")
    assert passed == blob and verifier.mismatch is None


@given(st.lists(st.binary(min_size=1, max_size=64), min_size=1, max_size=20), st.binary(min_size=1, max_size=8))
def test_a_wrong_blob_never_arrives_whole(pieces: list[bytes], extra: bytes) -> None:
    blob = b"".join(pieces)
    verifier = StreamVerifier(digest_of(blob + extra))
    passed = b"".join(verifier(piece) for piece in pieces) + verifier(b"")
    # The last piece is held back: the client is short of bytes, and told nothing arrived complete.
    assert len(passed) == len(blob) - len(pieces[-1])
    assert verifier.mismatch == f"{len(blob)} bytes that hash to {digest_of(blob)}"
