"""Checking that what a host sends is what was asked for: manifests before the client sees them, blobs while they
stream through.

A digest names its algorithm; sha256 and sha512 are checked (the two the OCI image spec registers). Content under a
digest of another algorithm cannot be checked and passes as it is.
"""

import json
import time
import weakref
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from .hashing import ALGORITHMS as _ALGORITHMS
from .hashing import BackgroundHash
from .headers import Lines, header_value

# distribution refuses larger manifest bodies (registry/handlers/manifests.go, maxManifestBodySize), and clients
# (containerd's MaxManifestSize) do not take them either.
MAX_MANIFEST_SIZE = 4 * 1024 * 1024
# A blob's bytes go on to the client gathered into pieces of about this size. mitmproxy sends each piece a stream hook
# hands it through its HTTP and TLS layers to the client at about the same cost whatever its size, and the pieces it
# reads from a host can be small (down to a few bytes, see reads.py); the hash thread too then takes fewer, larger
# pieces (see hashing). Measured in docs/benchmarks.md.
PASS_SIZE = 256 * 1024
# ...and sooner when the host sends slowly: bytes gathered go on with the first piece that comes this long after the
# last ones went, so a host dripping its blob has it reach the client piece by piece (one piece later, the one held
# back). A stream hook can hand bytes on only when the host sends some: what a burst left gathered goes on when the
# host sends again after a pause (or ends the blob; a silent host is cut off, ocigate_read_timeout).
PASS_AFTER = 0.05
# Blobs streaming at once up to which a new one's pieces are gathered, and hosts' connections read in larger pieces
# (reads.py). Each such blob holds up to a piece and PASS_SIZE more than mitmproxy alone would, and its connection a
# larger read: for every blob, under 200 pulls at once, that took the gateway from 170 to 343 MiB
# (docs/benchmarks.md). Beyond it the loop's time is shared between many blobs anyway, and their pieces go on as they
# come.
GATHERING_BLOBS = 16
# Go's and Python's names for the content codings a registry could apply to a manifest.
_DECODERS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def checkable(digest: str) -> bool:
    return digest.partition(":")[0] in _ALGORITHMS


def digest_of(data: bytes, algorithm: str = "sha256") -> str:
    hasher = _ALGORITHMS[algorithm]()
    hasher.update(data)
    return f"{algorithm}:{hasher.hexdigest()}"


def decodable(coding: str) -> bool:
    """Whether `decoded_body` decodes a body in this Content-Encoding (one coding ocigate knows)."""
    return coding.strip().lower() in _DECODERS


def decoded_body(body: bytes, coding: str | None) -> bytes:
    """A small body read whole, decoded as its Content-Encoding says (bounded by MAX_MANIFEST_SIZE); ValueError
    names why it cannot be."""
    coding = (coding or "identity").strip().lower()
    if coding == "identity":
        return body
    if coding not in _DECODERS:
        raise ValueError(f"content coding {coding!r} that ocigate cannot check")
    decoder = zlib.decompressobj(_DECODERS[coding])
    try:
        # Bounded: a small compressed body must not become gigabytes in the gateway's memory.
        content = decoder.decompress(body, MAX_MANIFEST_SIZE + 1)
    except zlib.error:
        raise ValueError(f"a {coding} body that does not decode") from None
    if len(content) > MAX_MANIFEST_SIZE or decoder.unconsumed_tail:
        raise ValueError(f"a {coding} body that decodes to more than {MAX_MANIFEST_SIZE} bytes")
    return content


@dataclass(frozen=True)
class Problem:
    """Why a manifest answer is not used. `wrong`: the host sent something else than what was asked for (not to be
    asked for it again), as opposed to an answer ocigate could not check."""

    text: str
    wrong: bool


def manifest_problem(requested_digest: str | None, headers: Lines, body: bytes, *, head: bool) -> Problem | None:
    """Why a host's 2xx answer to a manifest request cannot be trusted, or None when it can.

    By digest, the bytes must hash to that digest; any request's `Docker-Content-Digest` must name the bytes sent
    and, by digest, the digest asked for. A HEAD answer has no bytes, so only its header can be checked."""
    claimed = header_value(headers, b"docker-content-digest")
    if requested_digest and claimed and claimed != requested_digest:
        return Problem(f"Docker-Content-Digest {claimed} for a request of {requested_digest}", wrong=True)
    if head:
        return None
    try:
        content = decoded_body(body, header_value(headers, b"content-encoding"))
    except ValueError as e:
        return Problem(str(e), wrong=False)
    for expected, what in ((requested_digest, "asked for"), (claimed, "Docker-Content-Digest")):
        if expected and checkable(expected):
            algorithm = expected.partition(":")[0]
            actual = digest_of(content, algorithm)
            if actual != expected:
                return Problem(f"bytes hash to {actual}, not {expected} ({what})", wrong=True)
    if requested_digest is None and not _is_json_object(content):
        # Nothing names the bytes of a tag: what is not even a manifest (an empty body, a captive portal's page) is
        # that host's failure, not an answer. A manifest by digest was checked by its hash above.
        return Problem(f"a body of {len(content)} bytes that is not a JSON manifest", wrong=False)
    return None


def _is_json_object(content: bytes) -> bool:
    # Every manifest format (OCI, Docker v2 and its lists, signed schema 1) is one JSON object.
    if not content.lstrip().startswith(b"{"):
        return False
    try:
        return isinstance(json.loads(content), dict)
    except ValueError:
        return False


_streaming: "weakref.WeakSet[StreamVerifier]" = weakref.WeakSet()  # not finished or closed, nor collected


def few_blobs_streaming() -> bool:
    return len(_streaming) < GATHERING_BLOBS


class StreamVerifier:
    """Hashes a blob while it streams to the client (past its first MiBs on a thread of its own, see hashing),
    holding back its last piece: a blob that turns out not to be what its digest says then never arrives complete.
    The host's pieces are passed on gathered (PASS_SIZE, PASS_AFTER).

    It hands mitmproxy a list of pieces, empty while nothing is to pass: an empty bytes object would go out as a
    chunk of its own, which in a chunked answer is the one that ends the body."""

    def __init__(self, digest: str, clock: Callable[[], float] = time.monotonic) -> None:
        algorithm = digest.partition(":")[0]
        self.digest = digest
        self._clock = clock
        self.last_piece = clock()  # when the host last sent a piece: a stalled host is cut off (see addon)
        self._hash = BackgroundHash(algorithm)  # off the event loop
        self._gathered: list[bytes] = []
        self._gathered_size = 0
        self._passed_at = self.last_piece  # when the gathered bytes last went on
        self._pass_size = PASS_SIZE if few_blobs_streaming() else 0  # 0: each piece goes on as the next one comes
        _streaming.add(self)
        self._held = b""
        self.size = 0
        self.finished = False  # the end (b"") was seen
        self.mismatch: str | None = None  # set at the end when the bytes were not the blob

    def __call__(self, chunk: bytes) -> list[bytes]:
        """mitmproxy's stream hook: each piece from the host in, what goes on to the client out; b"" at the end."""
        if chunk:
            now = self.last_piece = self._clock()
            self.size += len(chunk)
            self._hash.update(chunk)
            if self._held:
                self._gathered.append(self._held)
                self._gathered_size += len(self._held)
            self._held = chunk
            if not self._gathered or (self._gathered_size < self._pass_size and now - self._passed_at < PASS_AFTER):
                return []
            self._passed_at = now
            return [self._take_gathered()]
        self.finished = True
        _streaming.discard(self)
        actual = f"{self.digest.partition(':')[0]}:{self._hash.hexdigest()}"
        if actual != self.digest:
            self.mismatch = f"{self.size} bytes that hash to {actual}"
            return []
        passed, held, self._held = self._take_gathered(), self._held, b""
        return [piece for piece in (passed, held) if piece]

    def _take_gathered(self) -> bytes:
        """The pieces gathered since the last ones went on, as one (not copied when it is one)."""
        piece = b"".join(self._gathered)
        self._gathered, self._gathered_size = [], 0
        return piece

    def close(self) -> None:
        """The blob will not be finished (its flow failed or ended otherwise): its hashing thread ends."""
        _streaming.discard(self)
        self._hash.close()


REDIRECTS = frozenset({301, 302, 303, 307, 308})
_CONDITIONS = (b"if-none-match", b"if-modified-since")


@dataclass(frozen=True)
class BlobAnswer:
    """What becomes of a host's answer to a blob GET streamed to the client, decided from its status and headers
    before any of its bytes pass. Exactly one of `verify`, `unchecked` and `failed` is set."""

    verify: bool = False  # the bytes are the blob: hashed as they pass, the last piece held back
    unchecked: str | None = None  # why the answer passes as the host sent it, without a check
    failed: str | None = None  # why the answer is not the blob: the client gets an error instead, never its bytes
    # The host is at fault (not the client's own limits): it is passed over for that blob during a cool-down.
    hosts_fault: bool = True
    # Verified bytes go to the client as they came, labelled as what they are: a Content-Encoding a host added
    # though ocigate asked for identity would have the client decode the blob's bytes into something else.
    drop_encoding: bool = False
    # A body the host ended by closing its connection reaches an HTTP/1.1 client chunked: cut short, it then lacks
    # its last chunk, where an answer delimited by the close would look complete.
    chunked: bool = False


def judge_blob_answer(
    status: int,
    response_headers: Lines,
    request_headers: Lines,
    digest: str,
    *,
    client: str,
) -> BlobAnswer:
    """The blob GET's answer as the client (speaking HTTP version `client`, "HTTP/1.1") may have it. Only a 200 is
    the blob; a 206 or 304 is what the client asked for when it sent a Range or a condition; a redirect sends the
    client elsewhere. Anything else is no blob, whatever its body says; so is a body ended by closing the connection
    for an HTTP/1.0 client, which could not tell it from one cut short."""
    if status == 200:
        if not checkable(digest):
            return BlobAnswer(unchecked=f"a {digest.partition(':')[0]} digest ocigate cannot check")
        coding = (header_value(response_headers, b"content-encoding") or "identity").lower()
        framed = (
            header_value(response_headers, b"content-length") is not None
            or "chunked" in (header_value(response_headers, b"transfer-encoding") or "").lower()
        )
        if not framed and client == "HTTP/1.0":
            return BlobAnswer(failed="a body ended by closing the connection, to an HTTP/1.0 client", hosts_fault=False)
        chunked = not framed and client.startswith("HTTP/1")
        return BlobAnswer(verify=True, drop_encoding=coding != "identity", chunked=chunked)
    if status == 206:
        if header_value(request_headers, b"range") is not None:
            return BlobAnswer(unchecked="the part of the blob the client's Range asked for")
        return BlobAnswer(failed="206 Partial Content to a request without Range")
    if status == 304:
        if any(header_value(request_headers, name) is not None for name in _CONDITIONS):
            return BlobAnswer(unchecked="304 to the client's own condition")
        return BlobAnswer(failed="304 Not Modified to a request without conditions")
    if status in REDIRECTS:
        return BlobAnswer(unchecked=f"a redirect ({status}) to storage the host chose")
    return BlobAnswer(failed=f"{status} to a GET of the blob")
