"""What of a streamed answer passes to the client: one wrapper around mitmproxy's `response.stream` (whatever hook the
gateway gave it, or True: passed on as it comes) that counts the bytes handed on (the access log's and metrics'
`bytes_sent`), notes whether mitmproxy streamed the answer at all (captures: what was sent), and keeps a copy for the
flow when asked to (captures: a body that may hold secrets, redacted once it ends). One wrapper, whichever addon puts
it on first: a streamed body's every piece costs one Python call more, not one per addon."""

from collections.abc import Callable, Iterable

from mitmproxy import http

StreamHook = Callable[[bytes], bytes | Iterable[bytes]]

# The most of a body passing through that is kept, or decoded, to look for secrets: token answers and forms are
# small; anything larger is dropped from the flow with a note rather than held or inflated in memory.
MAX_KEPT = 4 * 1024 * 1024


class Passing:
    """mitmproxy's `response.stream` for an answer it streams. mitmproxy does not stream an answer that ended with its
    headers, whatever its hook, and sends it only after the response hook: `streaming` says whether it did."""

    def __init__(self, inner: StreamHook | None, *, keep: bool = False) -> None:
        self._inner = inner
        self.keep = keep
        self.data = bytearray()  # the copy kept, while `keep` and no larger than MAX_KEPT
        self.overflowed = False
        self.sent = 0  # bytes handed on to the client (the body, without its framing)
        self.streaming = False  # mitmproxy called it: the client has the headers, and every byte so far

    def __call__(self, chunk: bytes) -> list[bytes]:
        self.streaming = True
        if self.keep and not self.overflowed and len(self.data) + len(chunk) <= MAX_KEPT:
            self.data += chunk
        elif self.keep:
            self.overflowed = True
            self.data.clear()
        if self._inner is None:
            pieces: list[bytes] = [chunk] if chunk else []
        else:
            passed = self._inner(chunk)
            # An empty piece would go out as a chunk of its own: in a chunked answer, the one that ends the body.
            pieces = ([passed] if passed else []) if isinstance(passed, bytes) else list(passed)
        self.sent += sum(len(piece) for piece in pieces)
        return pieces


def around(response: http.Response) -> Passing | None:
    """The answer's stream, wrapped once whichever addon asks first (None: mitmproxy sends it whole). Each addon
    keeps what it got per flow: mitmproxy's stream attribute is the client's path, not a place to look things up.
    Called from responseheaders hooks after the gateway's, which sets the stream hook wrapped."""
    return None if response.stream is False else _wrapped(response)


def keeping(response: http.Response) -> Passing:
    """An answer mitmproxy would have sent whole, streamed instead with a copy of its body kept: the flow may only
    show its body redacted, once the client has it all."""
    if response.stream is False:
        response.stream = True
    passing = _wrapped(response)
    passing.keep = True
    return passing


def _wrapped(response: http.Response) -> Passing:
    stream = response.stream
    if isinstance(stream, Passing):
        return stream
    passing = Passing(None if isinstance(stream, bool) else stream)
    response.stream = passing
    return passing


def bytes_sent(response: http.Response | None, passing: Passing | None) -> int:
    """The bytes of `response`'s body sent to the client: those that passed its stream hook, `passing`, or its
    content when mitmproxy sent it whole."""
    if response is None:
        return 0
    if passing is not None and passing.streaming:
        return passing.sent
    return len(response.raw_content or b"")
