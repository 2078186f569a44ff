"""ocigate's own credentials never come back out in what a host answers: masked in headers and bodies, whole or
streamed, with the answer's length kept."""

import base64
import gzip
import json
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mitmproxy import http

from ocigate.attempts import without_echoes
from ocigate.auth import Authorization
from ocigate.credentials import Credential, OcigateStore
from ocigate.hostclient import HostResponse
from ocigate.redaction import MIN_SECRET, Body, MaskingStream, echo_forms, mask, masked_answer, percent_encoded
from ocigate.tokens import basic_authorization
from tests.support.http_host import http_host
from tests.test_addon import flow_to, gateway, write_rules
from tests.test_auth import PASSWORD


def test_every_form_of_a_basic_credential_is_a_secret() -> None:
    header = basic_authorization("alice", 'pa/ss"word')
    forms = echo_forms(header)
    encoded = header.removeprefix("Basic ")
    for form in (header, encoded, 'alice:pa/ss"word', 'alice:pa\\/ss\\"word', "alice%3Apa%2Fss%22word"):
        assert form.encode() in forms, form
    assert forms == tuple(sorted(forms, key=len, reverse=True))


def test_a_bearer_token_is_a_secret_and_short_fragments_are_not() -> None:
    assert b"tok-12345678" in echo_forms("Bearer tok-12345678")
    forms = echo_forms(basic_authorization("bob", "pw"))
    assert b"pw" not in forms and b"bob:pw" not in forms and basic_authorization("bob", "pw").encode() in forms
    assert all(len(form) >= MIN_SECRET for form in forms)
    assert echo_forms(None) == () and echo_forms("") == ()


@given(st.text())
def test_the_percent_encoded_form_is_what_urllib_would_write(text: str) -> None:
    # A host echoing a credential in a query or a form writes it as quote(value, safe="") does.
    try:
        expected = quote(text, safe="")
    except UnicodeEncodeError:  # a lone surrogate: no credential a header carried
        with pytest.raises(UnicodeEncodeError):
            percent_encoded(text)
        return
    assert percent_encoded(text) == expected


def test_masking_keeps_the_length() -> None:
    secrets = echo_forms("Bearer tok-12345678")
    body = b'{"you sent": "Bearer tok-12345678"}'
    masked = mask(body, secrets)
    assert len(masked) == len(body) and b"tok-12345678" not in masked and masked.startswith(b'{"you sent": "')


@given(
    st.lists(st.binary(max_size=20), max_size=6),
    st.lists(st.integers(1, 30), max_size=8),
)
def test_a_streamed_body_is_masked_whatever_pieces_it_comes_in(parts: list[bytes], cuts: list[int]) -> None:
    secret = b"tok-SECRET-123"
    body = secret.join(parts) if parts else secret
    secrets = echo_forms("Bearer " + secret.decode())
    stream, pieces, rest = MaskingStream(secrets), [], body
    for cut in cuts:
        pieces.append(rest[:cut])
        rest = rest[cut:]
    pieces.append(rest)
    out = [piece for chunk in [*[p for p in pieces if p], b""] for piece in stream(chunk)]
    assert b"".join(out) == mask(body, secrets) and secret not in b"".join(out)
    assert b"" not in out


def echoing_mirror(handler) -> tuple:
    """A Basic mirror that, once given credentials, answers 400 echoing the request's headers (as some do)."""
    authorization = handler.headers.get("Authorization")
    if authorization is None:
        return 401, b"{}", {"WWW-Authenticate": 'Basic realm="mirror"'}
    echo = {"error": "bad request", "headers": dict(handler.headers.items())}
    return 400, json.dumps(echo).encode(), {"X-You-Sent": authorization, "Content-Type": "application/json"}


async def test_a_host_that_echoes_ocigates_credential_hands_it_to_nobody(tmp_path: Path) -> None:
    with http_host(echoing_mirror) as (port, seen):
        rules = write_rules(tmp_path, "upstream.test", f'[host."http://m.test:{port}"]\n')
        OcigateStore(rules / "credentials.json").save(f"m.test:{port}", Credential("alice", PASSWORD))
        with gateway(rules, ["m.test=127.0.0.1"]) as (gw, _):
            manifest = flow_to("upstream.test", "/v2/team/app/manifests/v1")
            await gw.requestheaders(manifest)
            upload = flow_to("upstream.test", "/v2/team/app/blobs/uploads/", method="POST")
            await gw.requestheaders(upload)
            # mitmproxy streams the upload's answer: the host's echo, in two pieces that split the secret.
            sent = basic_authorization("alice", PASSWORD)
            body = json.dumps({"headers": {"Authorization": sent}}).encode()
            upload.response = http.Response.make(400, b"", {"X-You-Sent": sent, "Content-Length": str(len(body))})
            gw.responseheaders(upload)
            middle = body.index(b"Basic") + 10
            relayed = [out for piece in (body[:middle], body[middle:], b"") for out in upload.response.stream(piece)]
    assert any(headers.get("Authorization") == sent for _, _, headers in seen), "the mirror was never sent it"
    encoded = sent.removeprefix("Basic ").encode()
    for where in (manifest.response.content, bytes(manifest.response.headers["X-You-Sent"], "latin-1")):
        assert encoded not in where and PASSWORD.encode() not in where and b"*" * len(encoded) in where
    assert manifest.response.status_code == 400
    assert len(manifest.response.content) == int(manifest.response.headers["Content-Length"])
    relayed_body = b"".join(relayed)
    assert len(relayed_body) == len(body) and encoded not in relayed_body
    assert encoded.decode() not in upload.response.headers["X-You-Sent"]
    assert base64.b64decode(encoded).decode() == f"alice:{PASSWORD}"


def test_an_error_answer_in_a_content_coding_that_could_hide_an_echo_is_dropped() -> None:
    sent = basic_authorization("alice", PASSWORD)
    echoed = gzip.compress(json.dumps({"you sent": sent}).encode())
    answer = HostResponse(
        400, b"Bad Request " + sent.encode(), ((b"Content-Encoding", b"gzip"), (b"X-Echo", sent.encode())), echoed
    )
    cleaned = without_echoes(answer, Authorization(sent, "ocigate store", "alice"))
    assert cleaned.body == b"" and (b"Content-Encoding", b"gzip") not in cleaned.headers
    assert sent.encode() not in cleaned.reason and sent.encode() not in dict(cleaned.headers)[b"X-Echo"]


@pytest.mark.parametrize(
    "codings",
    [
        ((b"Content-Encoding", b"identity"), (b"Content-Encoding", b"gzip")),
        ((b"Content-Encoding", b"identity, gzip"),),
        ((b"Content-Encoding", b" GZIP "),),
    ],
)
def test_a_coding_anywhere_in_the_content_encoding_lines_drops_an_error_body(
    codings: tuple[tuple[bytes, bytes], ...],
) -> None:
    sent = basic_authorization("alice", PASSWORD)
    echoed = gzip.compress(sent.encode())
    cleaned = without_echoes(HostResponse(400, b"", codings, echoed), Authorization(sent, "ocigate store", "alice"))
    assert cleaned.body == b""
    # The streamed path follows the same rule.
    assert masked_answer(400, b"", codings, echo_forms(sent)).body is Body.DROP
    assert masked_answer(400, b"", ((b"Content-Encoding", b"identity"),), echo_forms(sent)).body is Body.MASK


def test_content_is_never_masked_only_what_is_no_content() -> None:
    sent = basic_authorization("alice", PASSWORD)
    manifest = json.dumps({"annotations": {"note": sent}}).encode()
    authorization = Authorization(sent, "ocigate store", "alice")
    assert without_echoes(HostResponse(200, b"OK", (), manifest), authorization).body == manifest
    assert sent.encode() not in without_echoes(HostResponse(404, b"", (), manifest), authorization).body
