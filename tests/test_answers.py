"""What the client gets of a host's answer read whole: a content coding it cannot read is decoded for it."""

import gzip
import zlib

from hypothesis import given
from hypothesis import strategies as st

from ocigate.answers import from_host
from ocigate.headers import accepts_coding
from ocigate.hostclient import HostResponse

MANIFEST = b'{"schemaVersion": 2}'


def compressed(status: int = 200, coding: bytes = b"gzip", *, length: bool = True) -> HostResponse:
    body = gzip.compress(MANIFEST) if coding.lower() in (b"gzip", b"x-gzip") else zlib.compress(MANIFEST)
    headers = [(b"Content-Type", b"application/json"), (b"Content-Encoding", coding)]
    if length:
        headers.append((b"Content-Length", str(len(body)).encode()))
    return HostResponse(status, b"OK", tuple(headers), body)


def test_a_coding_the_client_accepts_is_passed_on_as_it_came() -> None:
    answer = compressed()
    response = from_host(answer, head=False, client_headers=((b"Accept-Encoding", b"gzip, deflate"),))
    assert response.headers["Content-Encoding"] == "gzip"
    assert response.raw_content == answer.body
    assert response.headers["Content-Length"] == str(len(answer.body))


def test_a_coding_the_client_did_not_accept_is_decoded_with_its_length() -> None:
    for client_headers in ((), ((b"Accept-Encoding", b"identity"),), ((b"Accept-Encoding", b"gzip;q=0, br"),)):
        response = from_host(compressed(), head=False, client_headers=client_headers)
        assert "Content-Encoding" not in response.headers
        assert response.raw_content == MANIFEST
        assert response.headers["Content-Length"] == str(len(MANIFEST))


def test_a_chunked_deflate_answer_is_decoded_for_a_client_naming_none() -> None:
    response = from_host(compressed(coding=b"deflate", length=False), head=False, client_headers=())
    assert response.raw_content == MANIFEST and response.headers["Content-Length"] == str(len(MANIFEST))


def test_a_body_that_does_not_decode_passes_as_it_came() -> None:
    broken = HostResponse(200, b"OK", ((b"Content-Encoding", b"gzip"), (b"Content-Length", b"3")), b"abc")
    assert from_host(broken, head=False, client_headers=()).raw_content == b"abc"


def test_a_head_answer_agrees_with_what_a_get_would_bring() -> None:
    # Not accepted: a GET would be decoded, to a length the HEAD cannot know; so it names neither coding nor length.
    head = from_host(compressed(), head=True, client_headers=())
    assert "Content-Encoding" not in head.headers and "Content-Length" not in head.headers
    # Accepted: as the host said.
    answer = compressed()
    accepted = from_host(answer, head=True, client_headers=((b"Accept-Encoding", b"gzip"),))
    assert accepted.headers["Content-Encoding"] == "gzip"
    assert accepted.headers["Content-Length"] == str(len(answer.body))
    # A coding ocigate does not decode: a GET would pass it on as it came, so the HEAD does too.
    unknown = HostResponse(200, b"OK", ((b"Content-Encoding", b"br"), (b"Content-Length", b"9")), b"")
    assert from_host(unknown, head=True, client_headers=()).headers["Content-Length"] == "9"


def test_accept_encoding_is_read_as_rfc_9110_says() -> None:
    def accepts(value: bytes, coding: str = "gzip") -> bool:
        return accepts_coding(((b"Accept-Encoding", value),), coding)

    assert accepts(b"gzip") and accepts(b"GZIP;q=0.5") and accepts(b"x-gzip") and accepts(b"gzip", "x-gzip")
    assert accepts(b"*") and accepts(b"br, *;q=0.1")
    assert not accepts(b"identity") and not accepts(b"") and not accepts(b"gzip;q=0") and not accepts(b"*;q=0")
    assert not accepts(b"gzip;q=0, *")  # named with weight 0: refused, whatever * says
    assert accepts_coding(((b"Accept-Encoding", b"br"), (b"accept-encoding", b"gzip")), "gzip")  # every line
    assert not accepts_coding((), "gzip")


CODINGS = st.sampled_from(["gzip", "x-gzip", "deflate", "br", "identity", "*"])
WEIGHTS = st.sampled_from([None, "0", "0.0", "0.5", "1", "bad"])


@given(st.lists(st.tuples(CODINGS, WEIGHTS), max_size=6), st.sampled_from(["gzip", "x-gzip", "deflate", "br"]))
def test_the_first_entry_naming_a_coding_decides_then_star(entries: list[tuple[str, str | None]], coding: str) -> None:
    value = ", ".join(name if weight is None else f"{name};q={weight}" for name, weight in entries)
    same = {"x-gzip": "gzip"}
    named = [weight for name, weight in entries if same.get(name, name) == same.get(coding, coding)]
    star = [weight for name, weight in entries if name == "*"]
    decisive = named or star
    expected = bool(decisive) and decisive[0] not in ("0", "0.0")
    assert accepts_coding(((b"Accept-Encoding", value.encode()),), coding) == expected


@given(st.binary(max_size=200), st.text(max_size=20))
def test_any_accept_encoding_is_read_without_error(value: bytes, coding: str) -> None:
    accepts_coding(((b"Accept-Encoding", value),), coding)
