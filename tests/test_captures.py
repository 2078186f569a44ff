"""Captures safe to share: what scrub.py calls a secret and how it redacts one, and the Redaction addon that applies it
to flows only once the secret has reached where it was going (the client gets its token; the capture does not)."""

import gzip
import json
import time
from collections.abc import Iterable
from urllib.parse import parse_qsl, urlencode

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mitmproxy import http
from mitmproxy.test import tflow

from ocigate import captures, masters, scrub
from ocigate.captures import Redaction
from ocigate.passing import Passing
from ocigate.record import METADATA_KEY
from tests.test_addon import flow_to

R = scrub.REDACTED

# --- scrub: what a secret is, and its redacted form ---


def test_a_credential_keeps_its_scheme() -> None:
    assert scrub.credential("Bearer eyJhbGciOi.x.y") == "Bearer <redacted>"
    assert scrub.credential("Basic YWxpY2U6cw==") == "Basic <redacted>"
    assert scrub.credential("ghp_TOKEN") == "<redacted>"


def test_cookies_keep_their_names_and_attributes() -> None:
    assert scrub.cookie("session=abc123; theme=dark") == f"session={R}; theme={R}"
    assert scrub.cookie("lonevalue") == R
    assert scrub.set_cookie("session=abc123; Path=/; HttpOnly") == f"session={R}; Path=/; HttpOnly"
    assert scrub.set_cookie("session=abc123") == f"session={R}"


def test_urls_lose_their_userinfo_and_secret_query_fields_only() -> None:
    assert scrub.url("https://alice:pw@storage.test/blob?x=1") == f"https://alice:{R}@storage.test/blob?x=1"
    assert scrub.url("https://ghp_TOKEN@storage.test/") == f"https://{R}@storage.test/"
    # The user part is the credential where the password only says so (GitHub's form) or is empty.
    assert scrub.url("https://ghp_TOKEN:x-oauth-basic@github.test/o/r") == f"https://{R}@github.test/o/r"
    assert scrub.url("https://ghp_TOKEN:X-OAuth-Basic@github.test/") == f"https://{R}@github.test/"
    assert scrub.url("https://ghp_TOKEN:@github.test/") == f"https://{R}@github.test/"
    assert scrub.text_urls("cloning https://ghp_TOKEN:x-oauth-basic@github.test/o/r failed") == (
        f"cloning https://{R}@github.test/o/r failed"
    )
    assert scrub.url("https://x-access-token:ghs_TOKEN@github.test/") == f"https://x-access-token:{R}@github.test/"
    # A fragment's fields (OAuth's implicit flow answers with one) and pairs split on `;` too.
    assert (
        scrub.url("https://app.test/cb#access_token=SECRET&state=s") == f"https://app.test/cb#access_token={R}&state=s"
    )
    assert scrub.url("https://app.test/doc#section-2") == "https://app.test/doc#section-2"
    assert scrub.url("https://reg.test/x?a=1;access_token=SECRET") == f"https://reg.test/x?a=1;access_token={R}"
    assert scrub.form("a=1;b=2&c=3") == "a=1;b=2&c=3"
    assert scrub.url("/token?service=s&access_token=abc&scope=a") == f"/token?service=s&access_token={R}&scope=a"
    unchanged = "https://storage.test/blob?X-Amz-Date=20240101&sig=1"
    assert scrub.url(unchanged) is unchanged
    assert scrub.url("http://[::1/x:pw@h") == "http://[::1/x:pw@h"  # no URL: nothing redacted that is not one
    assert scrub.text_urls("GET https://u:pw@h.test/v2: 401 and http://tok@h2.test") == (
        f"GET https://u:{R}@h.test/v2: 401 and http://{R}@h2.test"
    )
    assert scrub.url("http://[::1/x?token=abc") == f"http://[::1/x?token={R}"  # no URL, its secrets redacted still


def test_an_oauth_form_keeps_every_pair_but_its_secrets() -> None:
    sent = "grant_type=password&username=alice&password=p%40ss&scope=repository%3Ateam%2Fapp%3Apull&client_id=c"
    assert scrub.form(sent) == sent.replace("password=p%40ss", f"password={R}")
    assert scrub.form("grant_type=refresh_token&refresh_token=r-1&Password=x") == (
        f"grant_type=refresh_token&refresh_token={R}&Password={R}"
    )
    assert scrub.form("password=&token") == "password=&token"  # nothing to hide


def test_a_token_answer_stays_json_with_its_tokens_redacted() -> None:
    answer = {"token": "t-1", "access_token": "t-1", "refresh_token": "r-1", "expires_in": 300, "issued_at": "now"}
    redacted = scrub.json_body(json.dumps(answer).encode())
    assert redacted is not None
    assert json.loads(redacted) == {**answer, "token": R, "access_token": R, "refresh_token": R}
    docker_login = scrub.json_body(b'{"Status": "Login Succeeded", "IdentityToken": "id-1"}')
    assert docker_login is not None and json.loads(docker_login)["IdentityToken"] == R
    manifest = b'{"schemaVersion": 2,\n "layers": []}'
    assert scrub.json_body(manifest) is manifest  # no secret: the same bytes, so its digest still holds
    assert scrub.json_body(b"\x1f\x8b\x08 binary") is None


def test_a_body_is_read_by_its_type() -> None:
    form = b"grant_type=password&password=pw"
    redacted = f"grant_type=password&password={R}".encode()
    assert scrub.body("application/x-www-form-urlencoded; charset=utf-8", form) == redacted
    assert scrub.body("text/plain", b'{"token": "t"}') == json.dumps({"token": R}).encode()
    errors = b'{"errors": []}'
    assert scrub.body("application/json", errors) is errors
    assert scrub.body("application/json", b"not json") is None
    assert scrub.may_hold_fields(None) and scrub.may_hold_fields("application/vnd.oci.image.index.v1+json")
    assert not scrub.may_hold_fields("application/octet-stream")


def test_a_record_loses_userinfo_in_every_string() -> None:
    record = {"served_by": "https://u:pw@m.test", "attempts": [{"host": "https://u:pw@m.test", "result": "ok"}], "n": 1}
    assert scrub.in_strings(record) == {
        "served_by": f"https://u:{R}@m.test",
        "attempts": [{"host": f"https://u:{R}@m.test", "result": "ok"}],
        "n": 1,
    }


# --- scrub: properties over any input ---

_names = st.one_of(st.sampled_from([*sorted(scrub.SECRET_FIELDS), "Access_Token", "PASSWORD"]), st.text(max_size=12))
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_names, inner, max_size=4),
    max_leaves=20,
)


def _expected_json(value: object) -> object:
    if isinstance(value, dict):
        return {
            k: R if scrub.is_secret_field(k) and v not in (None, "") else _expected_json(v) for k, v in value.items()
        }
    if isinstance(value, list):
        return [_expected_json(item) for item in value]
    return value


@given(_json)
def test_any_json_parses_the_same_with_every_secret_value_and_only_those_redacted(value: object) -> None:
    data = json.dumps(value).encode()
    redacted = scrub.json_body(data)
    assert redacted is not None
    assert json.loads(redacted) == _expected_json(value)
    if _expected_json(value) == value:
        assert redacted == data


_pairs = st.lists(st.tuples(_names, st.text(max_size=16)), max_size=6)


@given(_pairs)
def test_any_form_parses_the_same_with_every_secret_value_and_only_those_redacted(pairs: list) -> None:
    sent = urlencode(pairs)
    redacted = scrub.form(sent)
    expected = [(k, R if scrub.is_secret_field(k) and v else v) for k, v in parse_qsl(sent, keep_blank_values=True)]
    assert parse_qsl(redacted, keep_blank_values=True) == expected


@given(st.lists(st.tuples(st.from_regex(r"[A-Za-z0-9_]{1,8}", fullmatch=True), st.text("abc123+/=", min_size=4))))
def test_no_cookie_value_is_left(cookies: list) -> None:
    header = "; ".join(f"{name}={value}" for name, value in cookies)
    redacted = scrub.cookie(header)
    assert redacted == "; ".join(f"{name}={R}" for name, _ in cookies)


# --- the addon: flows ---

TOKEN_ANSWER = {"token": "jwt-0123456789", "access_token": "jwt-0123456789", "refresh_token": "refresh-0123456789"}


def _passing_through(path: str = "/token", method: str = "GET", headers=(), content: bytes = b"") -> http.HTTPFlow:
    flow = flow_to("tokens.test", path, method, headers=headers)
    flow.request.content = content
    flow.response = None
    return flow


def _answer(flow: http.HTTPFlow, headers: dict[str, str]) -> None:
    """The host's answer as mitmproxy has it at the responseheaders hook: headers, no body yet."""
    fields = [(name.encode(), value.encode()) for name, value in headers.items()]
    flow.response = http.Response(b"HTTP/1.1", 200, b"OK", http.Headers(fields), None, None, time.time(), None)


def _stream(flow: http.HTTPFlow, *chunks: bytes) -> bytes:
    """What mitmproxy hands the client of a streamed answer's body: every piece through `response.stream`."""
    stream = flow.response.stream
    assert callable(stream), "the answer was not streamed"
    sent = b"".join(_pieces(stream(chunk)) for chunk in chunks)
    assert _pieces(stream(b"")) == b""
    return sent


def _pieces(passed: bytes | Iterable[bytes]) -> bytes:
    return passed if isinstance(passed, bytes) else b"".join(passed)


def test_a_token_answer_reaches_the_client_whole_and_the_flow_redacted() -> None:
    redaction = Redaction()
    flow = _passing_through("/token?service=registry&scope=repository%3Ateam%2Fapp%3Apull")
    flow.request.headers["Authorization"] = "Basic YWxpY2U6cGFzc3dvcmQtMDEyMzQ1"
    redaction.requestheaders(flow)
    body = json.dumps({**TOKEN_ANSWER, "expires_in": 300}).encode()
    _answer(flow, {"Content-Type": "application/json", "Content-Length": str(len(body))})
    redaction.responseheaders(flow)
    assert flow.request.headers["Authorization"] == "Basic <redacted>"
    assert _stream(flow, body[:10], body[10:]) == body  # the client got the tokens
    redaction.response(flow)
    recorded = json.loads(flow.response.content)
    assert recorded == {"token": R, "access_token": R, "refresh_token": R, "expires_in": 300}
    assert flow.response.headers["Content-Length"] == str(len(flow.response.raw_content))


def test_a_gzipped_token_answer_is_recorded_redacted_in_its_encoding() -> None:
    redaction = Redaction()
    flow = _passing_through()
    redaction.requestheaders(flow)
    body = gzip.compress(json.dumps(TOKEN_ANSWER).encode())
    _answer(flow, {"Content-Type": "application/json", "Content-Encoding": "gzip"})
    redaction.responseheaders(flow)
    assert _stream(flow, body) == body
    redaction.response(flow)
    assert flow.response.headers["Content-Encoding"] == "gzip"
    assert b"0123456789" not in gzip.decompress(flow.response.raw_content)
    assert json.loads(flow.response.content) == {"token": R, "access_token": R, "refresh_token": R}


def test_a_body_in_an_encoding_that_cannot_be_read_is_dropped_with_a_note() -> None:
    redaction = Redaction()
    flow = _passing_through()
    redaction.requestheaders(flow)
    _answer(flow, {"Content-Type": "application/json", "Content-Encoding": "x-unknown"})
    redaction.responseheaders(flow)
    _stream(flow, b'{"token": "jwt-0123456789"}')
    redaction.response(flow)
    assert b"0123456789" not in flow.response.raw_content
    assert b"could not be decoded" in flow.response.raw_content
    assert "Content-Encoding" not in flow.response.headers


def test_an_oauth_form_cookies_and_query_tokens_are_redacted_as_soon_as_the_flow_has_them() -> None:
    redaction = Redaction()
    form = b"grant_type=refresh_token&refresh_token=refresh-0123456789&service=registry&client_id=skopeo"
    flow = _passing_through(
        "/token?access_token=query-0123456789",
        "POST",
        headers=[(b"Cookie", b"session=cookie-0123456789"), (b"Content-Type", b"application/x-www-form-urlencoded")],
    )
    redaction.requestheaders(flow)  # mitmproxy has the request's headers, not yet its body
    assert flow.request.path == f"/token?access_token={R}"
    assert flow.request.headers["Cookie"] == f"session={R}"
    flow.request.content = form  # as mitmproxy sets it before the request hook
    redaction.request(flow)
    redacted = f"grant_type=refresh_token&refresh_token={R}&service=registry&client_id=skopeo"
    assert flow.request.content == redacted.encode()
    assert flow.request.headers["Content-Length"] == str(len(redacted))
    # What goes to the host is what the client sent, framed for it.
    sent = redaction.as_sent(flow, flow.request)
    assert sent is not flow.request
    assert sent.path == "/token?access_token=query-0123456789"
    assert sent.raw_content == form and sent.headers["Content-Length"] == str(len(form))
    assert sent.headers["Cookie"] == "session=cookie-0123456789"
    assert b"0123456789" not in flow.request.raw_content and "0123456789" not in flow.request.path
    _answer(flow, {"Content-Type": "application/json"})
    redaction.responseheaders(flow)
    assert redaction.as_sent(flow, flow.request) is flow.request  # sent: nothing of it is held any more
    assert flow.request.content == redacted.encode()


def _form_flow(redaction: Redaction, form: bytes = b"grant_type=password&password=pw-0123456789") -> http.HTTPFlow:
    flow = _passing_through("/token", "POST", headers=[(b"Content-Type", b"application/x-www-form-urlencoded")])
    redaction.requestheaders(flow)
    flow.request.content = form
    return flow


def test_a_form_in_an_encoding_that_cannot_be_read_goes_to_the_host_as_sent_and_is_dropped_from_the_flow() -> None:
    redaction = Redaction()
    flow = _passing_through("/token", "POST", headers=[(b"Content-Type", b"application/x-www-form-urlencoded")])
    redaction.requestheaders(flow)
    flow.request.headers["Content-Encoding"] = "x-unknown"
    flow.request.raw_content = b"password=pw-0123456789"
    redaction.request(flow)
    assert b"0123456789" not in flow.request.raw_content and "Content-Encoding" not in flow.request.headers
    sent = redaction.as_sent(flow, flow.request)
    assert sent.raw_content == b"password=pw-0123456789" and sent.headers["Content-Encoding"] == "x-unknown"


def test_a_streamed_request_body_has_gone_by_its_request_hook_so_it_is_redacted_and_not_held() -> None:
    redaction = Redaction()
    flow = _form_flow(redaction)
    flow.request.stream = True  # with store_streamed_bodies, mitmproxy sets the body it streamed just before the hook
    redaction.request(flow)
    assert flow.request.content == f"grant_type=password&password={R}".encode()
    assert redaction.as_sent(flow, flow.request).raw_content == flow.request.raw_content


def test_a_request_to_be_streamed_without_a_body_is_sent_after_its_request_hook_with_what_is_held() -> None:
    redaction = Redaction()
    flow = _passing_through("/v2/team/app/blobs/sha256:0", headers=[(b"Authorization", b"Basic Ym9iOnB3LTAxMjM=")])
    flow.request.stream = True  # as the gateway streams a flow: a GET ends with its headers, so is not streamed
    redaction.requestheaders(flow)
    redaction.request(flow)
    assert flow.request.headers["Authorization"] == f"Basic {R}"
    assert redaction.as_sent(flow, flow.request).headers["Authorization"] == "Basic Ym9iOnB3LTAxMjM="


def test_nothing_is_held_for_a_request_answered_without_being_sent_or_killed_before_it_was() -> None:
    redaction = Redaction()
    answered = _form_flow(redaction)
    answered.request.headers["Authorization"] = "Bearer held-0123456789"
    answered.response = http.Response.make(403)  # an addon answered it at its request hook
    redaction.request(answered)
    assert answered.request.content == f"grant_type=password&password={R}".encode()
    assert redaction.as_sent(answered, answered.request) is answered.request
    killed = _form_flow(redaction)
    redaction.request(killed)
    killed.error = tflow.terr("killed")
    redaction.error(killed)
    assert redaction.as_sent(killed, killed.request) is killed.request
    assert not redaction._held


def test_a_replayed_flow_is_sent_as_recorded_and_an_edit_made_while_held_goes_as_edited() -> None:
    redaction = Redaction()
    flow = _form_flow(redaction)
    redaction.request(flow)
    flow.request.content = b"grant_type=password&password=typed-in-mitmweb"
    assert redaction.as_sent(flow, flow.request).content == b"grant_type=password&password=typed-in-mitmweb"
    _answer(flow, {"Content-Type": "application/json"})
    redaction.responseheaders(flow)
    redaction.response(flow)
    flow.response = None  # replayed: mitmproxy sends the recorded request again
    redaction.requestheaders(flow)
    redaction.request(flow)
    assert redaction.as_sent(flow, flow.request) is flow.request


def test_a_header_edited_while_held_goes_as_edited_and_the_others_as_the_client_sent_them() -> None:
    redaction = Redaction()
    headers = [
        (b"Authorization", b"Bearer client-token-0123456789"),
        (b"Cookie", b"a=cookie-one-0123456789"),
        (b"Cookie", b"b=cookie-two-0123456789"),
    ]
    flow = _passing_through("/v2/", headers=headers)
    redaction.requestheaders(flow)
    assert flow.request.headers.get_all("Cookie") == ["a=<redacted>", "b=<redacted>"]
    # In mitmweb, while the flow is held: a new credential typed in, the second cookie edited.
    flow.request.headers["Authorization"] = "Bearer typed-in-mitmweb"
    flow.request.headers.set_all("Cookie", ["a=<redacted>", "b=typed-in-mitmweb"])
    sent = redaction.as_sent(flow, flow.request)
    assert sent.headers["Authorization"] == "Bearer typed-in-mitmweb"
    assert sent.headers.get_all("Cookie") == ["a=cookie-one-0123456789", "b=typed-in-mitmweb"]
    # Left as it was shown, each goes as the client sent it.
    untouched = _passing_through("/v2/", headers=headers)
    redaction.requestheaders(untouched)
    untouched_sent = redaction.as_sent(untouched, untouched.request).headers
    assert [(name, value) for name, value in untouched_sent.fields if name in (b"Authorization", b"Cookie")] == headers


@given(_pairs, _pairs)
def test_any_request_under_way_shows_no_secret_and_goes_to_the_host_byte_for_byte(query: list, body: list) -> None:
    redaction = Redaction()
    path = f"/token?{urlencode(query)}" if query else "/token"
    form = urlencode(body).encode()
    flow = _passing_through(path, "POST", headers=[(b"Content-Type", b"application/x-www-form-urlencoded")])
    redaction.requestheaders(flow)
    flow.request.content = form
    redaction.request(flow)
    shown_query = parse_qsl(flow.request.path.partition("?")[2], keep_blank_values=True)
    shown_body = parse_qsl(flow.request.get_text() or "", keep_blank_values=True)
    for shown in (shown_query, shown_body):
        assert all(value in ("", R) for name, value in shown if scrub.is_secret_field(name))
    sent = redaction.as_sent(flow, flow.request)
    assert sent.path == path and sent.raw_content == form
    assert sent.headers["Content-Length"] == str(len(form))


def test_set_cookie_and_location_userinfo_are_redacted_from_the_answers_headers_on_and_sent_as_received() -> None:
    redaction = Redaction()
    flow = _passing_through("/v2/team/app/blobs/sha256:0")
    redaction.requestheaders(flow)
    location = "https://u:storage-0123456789@storage.test/blob"
    _answer(flow, {"Set-Cookie": "lb=cookie-0123456789; Path=/", "Location": location, "Content-Type": "text/html"})
    redaction.responseheaders(flow)
    # The flow (mitmweb's dump of it while its body streams) shows them redacted from here on.
    assert flow.response.headers["Location"] == f"https://u:{R}@storage.test/blob"
    assert flow.response.headers["Set-Cookie"] == f"lb={R}; Path=/"
    # mitmproxy sends these headers to the client when the hook returns, through askagain's layer: as received.
    sent = redaction.answer_as_sent(flow, flow.response)
    assert sent.headers["Location"] == location and sent.headers["Set-Cookie"] == "lb=cookie-0123456789; Path=/"
    _stream(flow, b"<a>moved</a>")
    redaction.response(flow)
    assert flow.response.headers["Set-Cookie"] == f"lb={R}; Path=/"
    assert flow.response.headers["Location"] == f"https://u:{R}@storage.test/blob"
    assert flow.response.content == b"<a>moved</a>"


def test_an_answer_that_cannot_hold_secrets_is_left_to_mitmproxy() -> None:
    redaction = Redaction()
    flow = _passing_through("/v2/team/app/blobs/sha256:0")
    redaction.requestheaders(flow)
    _answer(flow, {"Content-Type": "application/octet-stream"})
    redaction.responseheaders(flow)
    assert not flow.response.stream


def test_what_the_gateway_answered_or_streams_itself_is_not_taken_over() -> None:
    redaction = Redaction()
    flow = flow_to("upstream.test", "/v2/team/app/manifests/v1", headers=[(b"Cookie", b"c=cookie-0123456789")])
    manifest = b'{"schemaVersion": 2, "token": "part of the manifest"}'
    flow.response = http.Response.make(200, manifest, {"Set-Cookie": "lb=cookie-0123456789", "Content-Type": "x+json"})
    flow.metadata[METADATA_KEY] = {"served_by": "https://u:pw@mirror.test"}
    redaction.requestheaders(flow)  # the gateway answered it: the request goes nowhere
    assert flow.request.headers["Cookie"] == f"c={R}"
    redaction.responseheaders(flow)
    assert not flow.response.stream
    redaction.response(flow)
    # mitmproxy sends it to the client after this hook: its body stays the manifest (its digest), its cookie is
    # ocigate's own session's, not the client's.
    assert flow.response.content == manifest
    assert flow.response.headers["Set-Cookie"] == f"lb={R}"
    assert flow.metadata[METADATA_KEY] == {"served_by": f"https://u:{R}@mirror.test"}


def test_a_flow_cut_off_mid_answer_keeps_no_secret_it_could_not_read_whole() -> None:
    redaction = Redaction()
    flow = _passing_through()
    redaction.requestheaders(flow)
    _answer(flow, {"Content-Type": "application/json"})
    redaction.responseheaders(flow)
    flow.response.stream(b'{"expires_in": 300, "token": "jwt-01234')
    redaction.done()  # the gateway stops: mitmproxy's save addon writes it next
    assert b"jwt" not in flow.response.raw_content
    assert b"cut short" in flow.response.raw_content


def test_a_failed_flow_is_redacted_as_it_stands() -> None:
    redaction = Redaction()
    flow = _passing_through(headers=[(b"Authorization", b"Bearer jwt-0123456789")])
    redaction.requestheaders(flow)
    flow.error = tflow.terr()
    redaction.error(flow)
    assert flow.request.headers["Authorization"] == "Bearer <redacted>"


def test_redacting_twice_changes_nothing_more() -> None:
    redaction = Redaction()
    flow = _passing_through(headers=[(b"Cookie", b"a=1")])
    redaction.requestheaders(flow)
    _answer(flow, {"Content-Type": "application/json", "Set-Cookie": "b=2"})
    redaction.responseheaders(flow)
    _stream(flow, json.dumps(TOKEN_ANSWER).encode())
    redaction.response(flow)
    once = flow.get_state()
    redaction.error(flow)
    assert flow.get_state() == once


def test_a_flow_under_way_holds_its_credentials_redacted_and_they_go_whole_to_the_host_only() -> None:
    flow = tflow.tflow()
    flow.request.headers["Authorization"] = "Bearer the-gateways-own-token"
    flow.request.headers["Cookie"] = "session=the-session-cookie"
    flow.response = None
    redaction = Redaction()
    redaction.requestheaders(flow)
    shown = masters._redacted_json(redaction, flow)
    text = json.dumps(shown)
    assert not any(secret in text for secret in ("the-gateways-own-token", "the-session-cookie"))
    assert "Bearer <redacted>" in text and shown["id"] == flow.id
    # The request has yet to be sent: the flow holds it redacted already, and what goes to the host is whole.
    assert flow.request.headers["Authorization"] == "Bearer <redacted>"
    sent = redaction.as_sent(flow, flow.request)
    assert sent.headers["Authorization"] == "Bearer the-gateways-own-token"
    assert sent.headers["Cookie"] == "session=the-session-cookie"


def test_a_connect_proxyauth_refused_keeps_no_proxy_credential() -> None:
    flow = tflow.tflow()
    flow.request.method = "CONNECT"
    flow.request.headers["Proxy-Authorization"] = "Basic YWxpY2U6dHlwby1wYXNzd29yZA=="
    Redaction().http_connect_error(flow)
    assert flow.request.headers["Proxy-Authorization"] == "Basic <redacted>"


def test_the_proxy_password_leaves_the_flow_as_soon_as_its_request_headers_are_in() -> None:
    flow = _passing_through()
    flow.metadata["proxyauth"] = ("alice", "the-proxy-password")  # as mitmproxy's proxyauth leaves it
    Redaction().requestheaders(flow)
    assert flow.metadata["proxyauth"] == ("alice", R)  # the user name stays: the record and the policy read it


def test_a_body_too_large_to_look_into_is_neither_kept_nor_inflated() -> None:
    kept = Passing(None, keep=True)
    for _ in range(5):
        assert kept(b"x" * (captures.MAX_KEPT // 4)) == [b"x" * (captures.MAX_KEPT // 4)]  # the client gets it all
    assert kept.overflowed and not kept.data
    bomb = gzip.compress(b'{"access_token": "' + b"a" * (captures.MAX_KEPT * 2) + b'"}')
    assert len(bomb) < captures.MAX_KEPT // 100 and captures._decoded(bomb, "gzip") is None
    flow = tflow.tflow(resp=True)
    flow.response.headers["Content-Type"] = "application/json"
    flow.response.headers["Content-Encoding"] = "gzip"
    captures._redact_body(flow.response, bomb, complete=True)
    assert flow.response.raw_content.startswith(b"<redacted: the body was")


def test_an_answer_too_large_to_keep_is_dropped_from_the_flow_even_where_mitmproxy_stored_it() -> None:
    # store_streamed_bodies has mitmproxy keep a streamed body in the flow: past MAX_KEPT the copy ocigate looks in is
    # let go, and the body mitmproxy kept must not stay in the flow unread.
    redaction = Redaction()
    flow = _passing_through()
    redaction.requestheaders(flow)
    body = b'{"access_token": "tok-0123456789", "pad": "' + b"x" * captures.MAX_KEPT + b'"}'
    _answer(flow, {"Content-Type": "application/json"})
    redaction.responseheaders(flow)
    assert _stream(flow, body[: len(body) // 2], body[len(body) // 2 :]) == body  # the client gets it all
    flow.response.raw_content = body  # as mitmproxy stores a streamed body
    redaction.response(flow)
    assert b"tok-0123456789" not in flow.response.raw_content
    assert flow.response.raw_content.startswith(b"<redacted: the body was larger than")


def _bodyless_redirect() -> http.HTTPFlow:
    flow = tflow.tflow(resp=True)
    flow.metadata.clear()
    flow.response.status_code = 302
    flow.response.headers["Location"] = "https://cdn.test/blob?token=the-cdn-token"
    flow.response.headers["Set-Cookie"] = "session=the-session-cookie; Path=/"
    flow.response.content = b""
    return flow


def test_an_answer_that_ended_with_its_headers_goes_to_the_client_as_received_and_is_recorded_redacted() -> None:
    flow = _bodyless_redirect()
    redaction = Redaction()
    redaction.requestheaders(flow)
    redaction.responseheaders(flow)
    redaction.response(flow)
    recorded = flow.response.headers.copy()  # what save, har, the dumper and mitmweb see, from here on
    sent = redaction.answer_as_sent(flow, flow.response)  # what askagain's layer sends once the hooks are done
    assert "the-cdn-token" not in str(recorded) and "the-session-cookie" not in str(recorded)
    assert sent is not flow.response and flow.response.headers == recorded
    assert sent.headers["Location"] == "https://cdn.test/blob?token=the-cdn-token"
    assert sent.headers["Set-Cookie"] == "session=the-session-cookie; Path=/"
    assert redaction.answer_as_sent(flow, flow.response) is flow.response  # given back once: nothing is kept


def _ended_with_its_headers(method: str, content_type: str) -> tuple[Redaction, http.HTTPFlow]:
    """A passing-through answer with secrets in its headers that mitmproxy never streams (no body): one that may hold
    secrets in its body gets a stream hook at responseheaders, which is never called."""
    redaction = Redaction()
    flow = _passing_through("/v2/team/app/blobs/sha256:0", method)
    redaction.requestheaders(flow)
    location = "https://storage.test/blob?token=the-storage-token"
    _answer(flow, {"Content-Type": content_type, "Location": location, "Set-Cookie": "lb=the-lb-cookie"})
    flow.response.status_code = 307
    redaction.responseheaders(flow)
    assert bool(flow.response.stream) == (content_type == "application/json")
    flow.response.content = b""
    redaction.response(flow)
    return redaction, flow


def test_an_answer_given_a_stream_hook_but_never_streamed_goes_to_the_client_as_received() -> None:
    for method, content_type in [("GET", "application/octet-stream"), ("HEAD", "application/json")]:
        redaction, flow = _ended_with_its_headers(method, content_type)
        assert flow.response.headers["Set-Cookie"] == f"lb={R}"
        assert "the-storage-token" not in flow.response.headers["Location"]
        sent = redaction.answer_as_sent(flow, flow.response)
        assert sent.headers["Location"] == "https://storage.test/blob?token=the-storage-token"
        assert sent.headers["Set-Cookie"] == "lb=the-lb-cookie"


def test_a_stream_hook_set_by_another_addon_and_never_called_leaves_the_answer_to_go_as_received() -> None:
    redaction = Redaction()
    flow = _bodyless_redirect()
    flow.metadata[METADATA_KEY] = {}  # the gateway's: it streams the answer itself (a ruled blob's redirect)
    redaction.requestheaders(flow)
    flow.response.stream = lambda chunk: chunk
    redaction.responseheaders(flow)
    redaction.response(flow)
    assert "the-cdn-token" not in flow.response.headers["Location"]
    assert redaction.answer_as_sent(flow, flow.response).headers["Location"].endswith("token=the-cdn-token")


def test_a_stream_hook_set_by_another_addon_still_shapes_what_the_client_gets() -> None:
    redaction = Redaction()
    flow = _bodyless_redirect()
    flow.metadata[METADATA_KEY] = {}
    redaction.requestheaders(flow)
    flow.response.stream = lambda chunk: chunk.upper()
    redaction.responseheaders(flow)
    assert _stream(flow, b"moved") == b"MOVED"
    redaction.response(flow)
    assert redaction.answer_as_sent(flow, flow.response) is flow.response  # streamed: its headers have gone


def test_an_answer_already_streamed_or_edited_before_it_is_sent_is_not_given_back_what_it_no_longer_shows() -> None:
    redaction = Redaction()
    streamed = _passing_through()
    redaction.requestheaders(streamed)
    _answer(streamed, {"Content-Type": "application/json", "Set-Cookie": "session=the-session-cookie"})
    redaction.responseheaders(streamed)
    _stream(streamed, b"{}")
    redaction.response(streamed)
    assert redaction.answer_as_sent(streamed, streamed.response) is streamed.response
    edited = _bodyless_redirect()
    redaction.requestheaders(edited)
    redaction.responseheaders(edited)
    redaction.response(edited)
    edited.response.headers["Location"] = "https://elsewhere.test/"  # in mitmweb, while it was held
    sent = redaction.answer_as_sent(edited, edited.response)
    # The value edited goes as edited; the one still shown redacted, as received.
    assert sent.headers["Location"] == "https://elsewhere.test/"
    assert sent.headers["Set-Cookie"] == "session=the-session-cookie; Path=/"


def _as_captured() -> http.HTTPFlow:
    """A flow as a capture holds it: its secrets replaced by placeholders, and ocigate's record of it."""
    flow = flow_to(
        "mirror.test",
        "/v2/team/app/blobs/sha256:" + "a" * 64,
        headers=(
            (b"Authorization", b"Bearer <redacted>"),
            (b"Cookie", b"a=<redacted>; b=<redacted>"),
            (b"X-Mirror-Key", b"<redacted>"),
            (b"X-Mirror-Key", b"not-a-secret"),
            (b"Accept", b"*/*"),
        ),
    )
    flow.metadata[METADATA_KEY] = {"upstream": "upstream.test"}
    return flow


def test_a_replayed_flow_sends_no_placeholder_and_loses_the_record_of_its_first_sending() -> None:
    replayed, live = _as_captured(), _as_captured()
    replayed.is_replay = "request"
    for flow in (replayed, live):
        captures.Replayed().requestheaders(flow)
    assert list(replayed.request.headers.items(multi=True)) == [
        ("Host", "mirror.test"),
        ("X-Mirror-Key", "not-a-secret"),
        ("Accept", "*/*"),
    ]
    assert METADATA_KEY not in replayed.metadata
    # A flow that is no replay is the client's own: its values are what it sent.
    assert live.request.headers["Authorization"] == "Bearer <redacted>" and METADATA_KEY in live.metadata


def _replayed_post(content: bytes, content_type: str = "application/x-www-form-urlencoded") -> http.HTTPFlow:
    flow = tflow.tflow()
    flow.request.method = "POST"
    flow.request.url = "https://auth.test/token?service=registry&client_secret=<redacted>&scope=repository%3Aa%3Apull"
    flow.request.headers["Content-Type"] = content_type
    flow.request.raw_content = content
    flow.is_replay = "request"
    return flow


def test_a_replay_loses_the_query_fields_holding_a_placeholder_and_keeps_the_others() -> None:
    flow = _replayed_post(b"grant_type=password&username=alice")
    captures.Replayed().requestheaders(flow)
    assert flow.request.path == "/token?service=registry&scope=repository%3Aa%3Apull"
    assert not flow.error
    assert captures.without_placeholder_fields("/v2/?token=%3Credacted%3E") == "/v2/"
    assert captures.without_placeholder_fields("/v2/?a=1&&b") == "/v2/?a=1&&b"


def test_a_replay_whose_body_holds_a_placeholder_is_refused_naming_it(caplog: pytest.LogCaptureFixture) -> None:
    bodies = [
        _replayed_post(b"grant_type=password&username=alice&password=<redacted>"),
        _replayed_post(b'{"refresh_token": "<redacted>"}', "application/json"),
        _replayed_post(gzip.compress(b"password=<redacted>")),
        _replayed_post(b"<redacted: the body was cut short, so it could not be read whole>"),
    ]
    bodies[2].request.headers["Content-Encoding"] = "gzip"
    for flow in bodies:
        captures.Replayed().requestheaders(flow)
        assert flow.error is not None and flow.error.msg == flow.error.KILLED_MESSAGE, flow.request.raw_content
    assert caplog.text.count("replay of POST https://auth.test/token?service=registry&scope=") == len(bodies)
    # Not a replay: the client's own request, whatever it holds.
    live = _replayed_post(b"password=<redacted>")
    live.is_replay = None
    captures.Replayed().requestheaders(live)
    assert not live.error


@given(st.lists(st.tuples(st.sampled_from(["A", "B", "Cookie"]), st.text(alphabet="ab<redacted>; =", max_size=20))))
def test_no_header_holding_a_placeholder_is_left(fields: list[tuple[str, str]]) -> None:
    headers = http.Headers([(name.encode(), value.encode()) for name, value in fields])
    dropped = captures.without_placeholders(headers)
    assert all(scrub.REDACTED not in value for _, value in headers.items(multi=True))
    assert len(dropped) + len(list(headers.items(multi=True))) == len(fields)


@pytest.mark.parametrize("ocigate_replays", [True, False])
def test_a_replay_sent_by_mitmproxys_own_replay_keeps_its_values_until_sent(ocigate_replays: bool) -> None:
    from mitmproxy.addons.clientplayback import ClientPlayback
    from mitmproxy.test import taddons

    from ocigate.askagain import Playback

    with taddons.context(Playback(lambda context: None) if ocigate_replays else ClientPlayback()):  # type: ignore[arg-type,return-value]
        redaction = Redaction()
        flow = _passing_through(
            "/token?access_token=the-query-token",
            "POST",
            headers=((b"Authorization", b"Basic dXNlcjp0aGUtcGFzc3dvcmQ="),),
            content=b"grant_type=password&password=the-password",
        )
        flow.request.headers["Content-Type"] = "application/x-www-form-urlencoded"
        flow.is_replay = "request"
        redaction.requestheaders(flow)
        redaction.request(flow)
        shown = str(flow.request.headers) + flow.request.path + flow.request.get_text()
        if ocigate_replays:
            # ocigate's layer sends what is held: the flow shows placeholders only.
            assert "the-password" not in shown and "the-query-token" not in shown and "dXNlcjp0aGUt" not in shown
        else:
            # mitmproxy's plain layer sends the flow as it stands: the values stay in it until they are sent.
            assert "the-password" in shown and "the-query-token" in shown and "dXNlcjp0aGUt" in shown
        flow.response = http.Response.make(200, b"{}", {"Content-Type": "application/json"})
        redaction.responseheaders(flow)
        redaction.response(flow)
        shown = str(flow.request.headers) + flow.request.path + flow.request.get_text()
        assert "the-password" not in shown and "the-query-token" not in shown and "dXNlcjp0aGUt" not in shown
