"""What captures and other addons see of a flow: no secret once it has reached where it was going.

Whatever records flows (mitmdump's `-w`/save_stream_file, hardump, mitmweb's view and export, the dumper at any
flow_detail) records them in the hooks that come after this addon's (see masters.OcigateMaster), and reads the flow
object itself. So a secret is redacted in the flow, in place, but only once nobody needs it any more (scrub.py says
what is redacted and how):

- a request's secrets (Authorization, Proxy-Authorization, Cookie, secret query fields, a form's password or
  refresh token, a JSON body's tokens) as soon as the flow has them: its headers and query at the requestheaders
  hook, its body at the request hook. The values as the client sent them are held out of the flow until askagain's
  layer sends the request (`as_sent`), and dropped once it is sent, answered by the gateway, or killed. The body of
  a request mitmproxy streams has gone as it came by its request hook: it is redacted there, and never held;
- an answer's headers (Set-Cookie, a Location's userinfo) as soon as the flow has them, at the responseheaders hook
  (a download under way shows them redacted): askagain's layer sends the client the headers as received
  (`answer_as_sent`), streamed or not, wherever ocigate's addons stand in the chain;
- an answer's body (a token endpoint's tokens) once the client has it. mitmproxy sends the client an answer it reads
  whole only after the response hook, where the recorders look at it; so an answer that passes through and may hold
  a secret in its body is streamed to the client instead, as it comes, with a copy kept, and the copy (redacted) is
  what the flow holds at the response hook.

Flows still under way when the gateway stops, and flows that failed, are redacted as they stand before mitmproxy's
save addon writes them; a body cut short that cannot be read whole is dropped with a note.

A flow sent again by mitmproxy's client replay (`replay.client`, mitmweb's replay button, `mitmdump -C`) comes from
such a capture, with placeholders where its secrets were (Replayed).
"""

import logging
import weakref
import zlib
from dataclasses import dataclass, field
from urllib.parse import unquote_plus

from mitmproxy import ctx, http

from . import scrub
from .askagain import Playback
from .passing import MAX_KEPT, Passing, around, keeping
from .record import METADATA_KEY

log = logging.getLogger("ocigate")

_CREDENTIAL_HEADERS = ("Authorization", "Proxy-Authorization")
# Held out of the flow from the request's headers on, and put back only in what is sent (Redaction.as_sent).
_HELD_HEADERS = (*_CREDENTIAL_HEADERS, "Cookie")
# An answer's, redacted in the flow from its headers on, and put back only in what is sent (answer_as_sent).
_ANSWER_HEADERS: dict[str, scrub.Redact] = {"Set-Cookie": scrub.set_cookie, "Location": scrub.url}
# mitmproxy's proxyauth keeps (user, password) of the client's proxy credentials here.
_PROXYAUTH_METADATA = "proxyauth"


@dataclass
class _Held:
    """What a request under way shows redacted in its flow, as the client sent it: put back only in what is sent."""

    headers: list[tuple[str, str, str]] = field(default_factory=list)  # (name, as the flow shows it, as sent)
    path: tuple[str, str] | None = None  # (as the flow shows it, as sent): its query held a secret
    # (as the flow shows it, as sent: in its Content-Encoding), and the Content-Encoding it was sent in
    body: tuple[bytes, bytes] | None = None
    encoding: str | None = None


class Redaction:
    """Redacts every secret of a flow before mitmproxy's recorders see it: a request's as soon as the flow has it
    (what is still to be sent held out of the flow), an answer's headers as soon as the flow has them (held out of it
    the same way) and its body once the client has it. Runs after the gateway
    (whose decisions need the request as the client sent it) and before mitmproxy's save, har and dumper addons,
    mitmweb's view and its intercept."""

    def __init__(self) -> None:
        self._under_way: weakref.WeakSet[http.HTTPFlow] = weakref.WeakSet()
        # Every streamed answer's stream hook, as this addon wrapped it (and what it kept of the body).
        self._passing: weakref.WeakKeyDictionary[http.HTTPFlow, Passing] = weakref.WeakKeyDictionary()
        # A request's secrets as the client sent them, held out of the flow (which shows them redacted from its
        # request headers on) until the request is sent (as_sent).
        self._held: weakref.WeakKeyDictionary[http.HTTPFlow, _Held] = weakref.WeakKeyDictionary()
        # Answers whose headers were redacted before mitmproxy sent them: the answer, and each value redacted (name,
        # as the flow shows it, as received), until askagain's layer sends them (answer_as_sent).
        self._received: weakref.WeakKeyDictionary[http.HTTPFlow, tuple[http.Response, list[tuple[str, str, str]]]] = (
            weakref.WeakKeyDictionary()
        )

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self._under_way.add(flow)
        self._held.pop(flow, None)  # a replayed flow starts again, from its recorded (redacted) request
        _redact_proxyauth(flow)  # checked by proxyauth, before this hook: not held, it goes nowhere
        if flow.response is not None:
            # The gateway answered it (it asked its hosts itself): the request as sent goes nowhere.
            self._redact_request(flow)
            return
        if _replayed_by_mitmproxy(flow):
            return
        request = flow.request
        # Held as the client sent them: the gateway's own, already redacted in the flow, go in as it is sent.
        held = _Held(
            headers=[
                (name, shown, value)
                for name in _HELD_HEADERS
                for value in request.headers.get_all(name)
                if (shown := _redacted(name, value)) != value
            ]
        )
        _redact_held(request.headers)
        shown = _redacted_path(request.path)
        if shown != request.path:
            held.path = (shown, request.path)
            request.path = shown
        if held.headers or held.path:
            self._held[flow] = held

    def request(self, flow: http.HTTPFlow) -> None:
        request = flow.request
        if flow.response is not None:
            # Answered without going anywhere: nothing of it is sent, or held.
            self._held.pop(flow, None)
            self._redact_request(flow)
            return
        data = request.raw_content
        if not data or _replayed_by_mitmproxy(flow):
            return
        if request.stream:
            # Its body went as it came (mitmproxy keeps a copy under store_streamed_bodies): nothing to hold.
            _redact_body(request, data, complete=True)
            return
        encoding = request.headers.get("Content-Encoding")
        _redact_body(request, data, complete=True)
        if request.raw_content != data:
            held = self._held.setdefault(flow, _Held())
            held.body = (request.raw_content or b"", data)
            held.encoding = encoding

    def http_connect_error(self, flow: http.HTTPFlow) -> None:
        # A CONNECT proxyauth refused still carries the Proxy-Authorization it came with (mitmproxy's dumper shows it).
        self._redact_request(flow)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._held.pop(flow, None)  # sent: the values need not outlive the request
        self._redact_request(flow)
        response = flow.response
        if response is None:
            return
        # Redacted in the flow at once (mitmweb's dump of a download under way shows the flow as it stands), and sent
        # to the client as received by askagain's layer, whether the answer is streamed or not.
        self._hold_answer_headers(flow, response)
        content_type = response.headers.get("Content-Type")
        if not response.stream and _passes_through(flow) and scrub.may_hold_fields(content_type):
            # Secrets in its body: streamed to the client as it comes, and a copy kept, redacted at the response hook.
            passing: Passing | None = keeping(response)
        else:
            passing = around(response)
        if passing is not None:
            self._passing[flow] = passing

    def response(self, flow: http.HTTPFlow) -> None:
        self._redact_request(flow)
        passing = self._passing.pop(flow, None)
        response = flow.response
        if response is not None:
            # An answer mitmproxy never streamed (it ended with its headers, whatever its stream hook) goes to the
            # client after this hook, as one it streamed has gone already.
            sent = passing is not None and passing.streaming
            kept = passing if passing is not None and passing.keep else None
            if sent:
                self._received.pop(flow, None)  # its headers have gone
            else:
                # An answer that ended with its headers (or one the gateway made, which had no responseheaders hook)
                # has yet to go: it goes as received (answer_as_sent).
                self._hold_answer_headers(flow, response)
            _redact_response(response, kept, sent=sent, complete=True)
        _redact_record(flow)
        self._under_way.discard(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._ended_early(flow)
        self._under_way.discard(flow)

    def done(self) -> None:
        for flow in list(self._under_way):
            self._ended_early(flow)

    def shown(self, flow: http.HTTPFlow) -> http.HTTPFlow:
        """The flow as a live view may show it while it is under way: a stand-in (same id) whose request and answer
        headers, record and comment hold no secret, though the flow itself still carries what it has yet to send."""
        shown = http.HTTPFlow.from_state(flow.get_state())
        assert isinstance(shown, http.HTTPFlow)
        _redact_request(shown)
        if shown.response is not None:
            _redact_header(shown.response.headers, "Set-Cookie", scrub.set_cookie)
            _redact_header(shown.response.headers, "Location", scrub.url)
        _redact_record(shown)
        return shown

    def _redact_request(self, flow: http.HTTPFlow) -> None:
        _redact_request(flow)

    def as_sent(self, flow: http.HTTPFlow, request: http.Request) -> http.Request:
        """The request as it goes to the host (askagain sends it): its secrets as the client sent them, where the
        flow still shows them as redacted here (an edit made to the flow meanwhile, in mitmweb, goes as edited)."""
        held = self._held.get(flow)
        if held is None:
            return request
        sent = request.copy() if request is flow.request else request
        for name in _HELD_HEADERS:
            # Only a value the flow still shows as redacted goes as sent: one edited meanwhile goes as edited.
            held_values = [(shown, value) for held_name, shown, value in held.headers if held_name == name]
            if held_values and name in sent.headers:
                sent.headers.set_all(name, [_as_held(value, held_values) for value in sent.headers.get_all(name)])
        if held.path is not None and sent.path == held.path[0]:
            sent.path = held.path[1]
        if held.body is not None and sent.raw_content == held.body[0]:
            data = held.body[1]
            sent.raw_content = data
            sent.headers.pop("Content-Encoding", None)
            if held.encoding is not None:
                sent.headers["Content-Encoding"] = held.encoding
            if "Content-Length" in sent.headers:
                sent.headers["Content-Length"] = str(len(data))
        return sent

    def answer_as_sent(self, flow: http.HTTPFlow, response: http.Response) -> http.Response:
        """The answer as it goes to the client (askagain sends it): with its headers as received, where the flow
        still shows them as redacted here (an edit made to the flow meanwhile, in mitmweb, goes as edited)."""
        answer, held = self._received.pop(flow, (None, []))
        if answer is None or response is not answer or response is not flow.response:
            return response
        headers = response.headers.copy()
        for name in _ANSWER_HEADERS:
            held_values = [(shown, value) for held_name, shown, value in held if held_name == name]
            if held_values and name in headers:
                headers.set_all(name, [_as_held(value, held_values) for value in headers.get_all(name)])
        if headers == response.headers:
            return response
        sent = response.copy()
        sent.headers = headers
        return sent

    def _hold_answer_headers(self, flow: http.HTTPFlow, response: http.Response) -> None:
        """Redacts the answer's Set-Cookie and Location in the flow, holding the values as received for
        answer_as_sent (added to those held already for the same answer)."""
        held = [
            (name, shown, value)
            for name, redact in _ANSWER_HEADERS.items()
            for value in response.headers.get_all(name)
            if (shown := redact(value)) != value
        ]
        if not held:
            return
        for name, redact in _ANSWER_HEADERS.items():
            _redact_header(response.headers, name, redact)
        answer, already = self._received.get(flow, (response, []))
        self._received[flow] = (response, [*already, *held] if answer is response else held)

    def _ended_early(self, flow: http.HTTPFlow) -> None:
        """A flow that failed or was cut off: nothing more of it reaches anybody."""
        self._held.pop(flow, None)
        self._received.pop(flow, None)
        self._redact_request(flow)
        passing = self._passing.pop(flow, None)
        if flow.response is not None:
            kept = passing if passing is not None and passing.keep else None
            _redact_response(flow.response, kept, sent=True, complete=False)
        _redact_record(flow)


def _as_held(current: str, held: list[tuple[str, str]]) -> str:
    """A header's value as it is sent: the first held value (taken) the flow still shows as `current`, else `current`
    as it stands (edited in mitmweb, or added by the gateway)."""
    for index, (shown, value) in enumerate(held):
        if shown == current:
            del held[index]
            return value
    return current


def _passes_through(flow: http.HTTPFlow) -> bool:
    """An answer ocigate neither made nor streams itself: from a token realm, a registry without rules, anything
    else the proxy decrypts."""
    return METADATA_KEY not in flow.metadata


def _redacted(name: str, value: str) -> str:
    return scrub.cookie(value) if name.lower() == "cookie" else scrub.credential(value)


def _redact_held(headers: http.Headers) -> None:
    for name in _CREDENTIAL_HEADERS:
        _redact_header(headers, name, scrub.credential)
    _redact_header(headers, "Cookie", scrub.cookie)


def _redact_request(flow: http.HTTPFlow) -> None:
    request = flow.request
    headers = request.headers
    for name in _CREDENTIAL_HEADERS:
        _redact_header(headers, name, scrub.credential)
    _redact_header(headers, "Cookie", scrub.cookie)
    request.path = _redacted_path(request.path)
    if request.raw_content:
        _redact_body(request, request.raw_content, complete=True)
    _redact_proxyauth(flow)


def _redact_proxyauth(flow: http.HTTPFlow) -> None:
    """The proxy password beside the user name: nobody reads it once proxyauth has checked it (ocigate reads only the
    user name, record.proxy_user_of), and mitmweb's dump and the captures write metadata."""
    proxy_user = flow.metadata.get(_PROXYAUTH_METADATA)
    if isinstance(proxy_user, tuple | list) and proxy_user:
        flow.metadata[_PROXYAUTH_METADATA] = (proxy_user[0], scrub.REDACTED)


def _redacted_path(path: str) -> str:
    """A request's path and query with the secret fields of its query redacted."""
    before, question, query = path.partition("?")
    return f"{before}?{scrub.form(query)}" if question else path


def _redact_response(response: http.Response, kept: Passing | None, *, sent: bool, complete: bool) -> None:
    """`sent`: the client has the answer (or will get nothing more of it), so its body may change too."""
    _redact_header(response.headers, "Set-Cookie", scrub.set_cookie)
    _redact_header(response.headers, "Location", scrub.url)
    if not sent:
        return
    if kept is not None and kept.overflowed:
        # The copy was let go past MAX_KEPT; whatever mitmproxy kept of the body itself (store_streamed_bodies) was
        # never looked at: dropped too.
        _drop(response, f"larger than {MAX_KEPT} bytes, too large to look for secrets")
        return
    data = bytes(kept.data) if kept is not None else response.raw_content
    if data:
        _redact_body(response, data, complete=complete)


def _redact_header(headers: http.Headers, name: str, redact: scrub.Redact) -> None:
    values = headers.get_all(name)
    redacted = [redact(value) for value in values]
    if redacted != values:
        headers.set_all(name, redacted)


def _redact_body(message: http.Message, data: bytes, *, complete: bool) -> None:
    """The flow's record of a body that went as `data` (as sent: in its Content-Encoding): `data` itself when it
    holds no secret, else redacted in the same encoding; dropped with a note when it cannot be read to tell."""
    content_type = message.headers.get("Content-Type")
    if not scrub.may_hold_fields(content_type):
        message.raw_content = data
        return
    if len(data) > MAX_KEPT:
        _drop(message, f"larger than {MAX_KEPT} bytes, too large to look for secrets")
        return
    coding = message.headers.get("Content-Encoding")
    decoded = _decoded(data, coding)
    if decoded is None:
        _drop(message, f"in Content-Encoding {coding}, which could not be decoded within {MAX_KEPT} bytes")
        return
    redacted = scrub.body(content_type, decoded)
    if redacted is None and not complete:
        _drop(message, "cut short, so it could not be read whole to look for secrets")
    elif redacted is None or redacted is decoded:
        message.raw_content = data
    else:
        message.content = redacted


def _decoded(data: bytes, coding: str | None) -> bytes | None:
    """`data` decoded, at most MAX_KEPT bytes of it (a small answer may inflate to any size); None when it cannot be,
    or would be larger."""
    name = (coding or "identity").strip().lower()
    if name == "identity":
        return data
    if name not in ("gzip", "deflate", "x-gzip"):
        return None
    inflate = zlib.decompressobj(zlib.MAX_WBITS | 32)  # gzip or zlib, by their headers
    try:
        decoded = inflate.decompress(data, MAX_KEPT + 1)
    except zlib.error:
        if name != "deflate":
            return None
        try:  # a raw deflate stream, as some hosts send for "deflate"
            decoded = zlib.decompressobj(-zlib.MAX_WBITS).decompress(data, MAX_KEPT + 1)
        except zlib.error:
            return None
    return decoded if len(decoded) <= MAX_KEPT else None


def _drop(message: http.Message, why: str) -> None:
    message.headers.pop("Content-Encoding", None)
    message.raw_content = f"{scrub.REDACTED[:-1]}: the body was {why}>".encode()


def _redact_record(flow: http.HTTPFlow) -> None:
    """ocigate's record of the flow, and its comment, name hosts by URL: never with their userinfo."""
    record = flow.metadata.get(METADATA_KEY)
    if record is not None:
        flow.metadata[METADATA_KEY] = scrub.in_strings(record)
    if flow.comment:
        flow.comment = scrub.text_urls(flow.comment)


def without_placeholders(headers: http.Headers) -> list[str]:
    """Drops every header whose value holds a redaction placeholder (a credential, a Cookie, a hosts.toml header as a
    capture holds them): never a value to send. The names dropped."""
    dropped = [name for name, value in headers.items(multi=True) if scrub.REDACTED in value]
    for name in dict.fromkeys(dropped):
        kept = [value for value in headers.get_all(name) if scrub.REDACTED not in value]
        if kept:
            headers.set_all(name, kept)
        else:
            del headers[name]
    return dropped


class Replayed:
    """A flow mitmproxy's client replay sends again was read from a capture (or a view) that holds `<redacted>` in
    place of each secret, whose values nobody holds any more (askagain's layer, which askagain.Playback sends a replay
    through, puts back only what the gateway holds for this sending). So before the gateway sees it, the headers and
    query fields holding a placeholder are dropped, and a body holding one is refused: a request to a ruled upstream
    is authenticated afresh by the gateway, and no host is ever sent a placeholder. ocigate's record of the first
    sending goes too: the gateway writes its own for this one. Runs before the gateway."""

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.is_replay != "request" or not flow.killable:
            return  # the client's own, or a replay refused already (httponly.HttpOnly)
        flow.metadata.pop(METADATA_KEY, None)
        request = flow.request
        without_placeholders(request.headers)
        request.path = without_placeholder_fields(request.path)
        # A body holding a placeholder (a token realm's form, a JSON body's token) or the note a dropped body was
        # replaced by is refused whole rather than edited: a form without its password is another request (an
        # anonymous token, a refresh grant without its token), a JSON or encoded body cannot be edited by field
        # without re-encoding it, and a note is no body at all. Refused, nothing of it is sent anywhere.
        if _holds_placeholder(request):
            log.warning(
                "ocigate: replay of %s %s refused: its body holds a %s placeholder where the capture redacted a "
                "secret, which no host is sent",
                request.method,
                scrub.url(request.pretty_url),
                scrub.REDACTED,
            )
            flow.kill()


def _replayed_by_mitmproxy(flow: http.HTTPFlow) -> bool:
    """A replay sent by mitmproxy's own client replay (`mitmdump -s addons/gateway.py` keeps it), whose HTTP layer
    never puts back what Redaction holds out of a flow: nothing is held for it, so that what it sends is what the flow
    holds (redacted once sent, as any request)."""
    return flow.is_replay == "request" and not isinstance(ctx.master.addons.get("clientplayback"), Playback)


def without_placeholder_fields(path: str) -> str:
    """A path whose query lost every field holding a redaction placeholder (`password=<redacted>`, as a capture holds
    a secret query field), every other field and separator kept as it was."""
    before, question, query = path.partition("?")
    if not question:
        return path
    kept = [pair for pair in query.split("&") if scrub.REDACTED not in unquote_plus(pair)]
    return f"{before}?{'&'.join(kept)}" if kept else before


def _holds_placeholder(request: http.Request) -> bool:
    """The body as it would be sent, and as decoded, holds a placeholder or the note a dropped body was replaced by
    (both start `<redacted`)."""
    marker = scrub.REDACTED[:-1].encode()
    raw = request.raw_content or b""
    return marker in raw or marker in (request.get_content(strict=False) or b"")
