"""A registry host that misbehaves on demand, to sit first in a gateway's host list in end-to-end tests.

`running_faulty_host(target_url)` serves a reverse proxy on 127.0.0.1 (free port) in front of a real registry. It is
a tests/support/recorder.py recorder with that module's forwarding handler: it records every request as received
(request target and every header line) and forwards it unchanged until a test sets a fault. Faults can be set and
cleared at any time from any thread; each request reads them once, when it arrives. They match by path, whatever
the query string (the gateway appends ?ns=...):

- corrupt_manifest(reference): GET /v2/<repo>/manifests/<reference> answers the registry's status and headers
  (Content-Type, Docker-Content-Digest, Content-Length) with a body of the same length and one byte changed. The byte
  changed is a hex digit of a digest inside the manifest when there is one, so the body is still valid JSON and only
  a digest check can catch it. HEAD is forwarded unchanged (it has no body to corrupt).
- lie_about_digest(reference): GET and HEAD of that manifest answer the right bytes with a wrong
  Docker-Content-Digest.
- corrupt_blob(digest): GET /v2/<repo>/blobs/<digest> answers 200 with the right Content-Length and the middle byte
  flipped; HEAD is forwarded unchanged.
- truncate_blob(digest, after): GET of that blob sends the headers (full Content-Length), `after` bytes, and closes.
- hang(seconds): every request is read and recorded, then nothing happens for `seconds` (ended early by shutdown),
  then it is forwarded; hang(0) clears it.
- echo_headers(): every request that carries an Authorization is answered 400 with every header it carried, in a JSON
  body and in X-You-Sent-* headers, as some mirrors echo a request they reject.
- shape(name, Shape(...)): a GET of the blob with digest `name` or of the manifest with reference `name` answers the
  registry's bytes reshaped as a mirror legally (or not) might: framed by Content-Length, chunked or by closing the
  connection; labelled with a Content-Encoding (and compressed, or not); with another status; corrupted or cut short;
  dripped piece by piece. HEAD is forwarded unchanged, unless the Shape says `head`: then it is answered with the
  headers the shaped GET would have (its coding, its framing, the length of its body as sent), no body.
- refuse(): the listening socket is closed, so new connections get a real "connection refused" (TCP RST to the SYN),
  and open keep-alive connections are shut down so a pooled connection cannot slip past. accept_again() binds the same
  port again (SO_REUSEADDR; it raises OSError if something else took the port meanwhile, which on loopback with an
  ephemeral port is unlikely).

A manifest reference is matched as written in the path: corrupt_manifest("v1") does not touch GET .../manifests/sha256:
of the same manifest. `served(name)` counts how many times each fault fired (a refused connection never reaches this
process, so "refuse" has no counter).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import json
import re
import socket
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

from tests.support.recorder import HOP_BY_HOP, PIECE, UPSTREAM_TIMEOUT, ForwardingHandler, RecordedRequest, Recorder

_SHUTDOWN_TIMEOUT = 5.0
# How often the accept loop looks at its stop flag: also how long refuse() may take.
_ACCEPT_POLL = 0.05
# The repository name may hold slashes; the last segment is the reference or digest.
_MANIFEST_PATH = re.compile(r"^/v2/(?P<repository>.+)/manifests/(?P<reference>[^/]+)$")
_BLOB_PATH = re.compile(r"^/v2/(?P<repository>.+)/blobs/(?P<digest>[^/]+)$")
_EMBEDDED_DIGEST = re.compile(rb"sha256:[0-9a-f]{64}")
FAULT_NAMES = ("corrupt_manifest", "lie_about_digest", "corrupt_blob", "truncate_blob", "hang", "shape", "echo_headers")
FRAMINGS = ("length", "chunked", "close")
# What a shaped answer sets itself.
_FRAMING_HEADERS = frozenset({"transfer-encoding", "content-length", "content-encoding"})


@dataclass(frozen=True)
class Shape:
    """How a GET is answered instead of as the registry would. The body is the registry's, read whole first."""

    framing: str = "length"  # one of FRAMINGS: Content-Length, chunked, or ended by closing the connection
    encoding: str | None = None  # a Content-Encoding label
    compress: bool = False  # the body really gzip-compressed (under whatever label `encoding` gives)
    # Another status: 206 sends the first half with a Content-Range, 304 no body, anything else a small HTML page.
    status: int | None = None
    corrupt: bool = False  # the middle byte flipped
    cut: bool = False  # half the body, then the connection is closed (whatever the framing promised)
    drip: float = 0.0  # seconds between pieces
    stall: float = 0.0  # seconds of silence before the answer (after the request was read)
    hang_up: bool = False  # the connection is closed instead of answering
    empty: bool = False  # a 200 with no body at all
    http10: bool = False  # the answer's status line says HTTP/1.0, as an HTTP/1.0 server's does
    pieces: int = 4  # how many pieces the body is sent in
    head: bool = False  # a HEAD too: the shaped GET's headers (its coding, framing and length), no body

    def __post_init__(self) -> None:
        if self.framing not in FRAMINGS:
            raise ValueError(f"framing must be one of {FRAMINGS}, not {self.framing!r}")


@dataclass(frozen=True)
class _Faults:
    """One consistent view of the faults; a request takes a snapshot when it arrives."""

    corrupt_manifests: frozenset[str] = frozenset()
    lying_manifests: frozenset[str] = frozenset()
    corrupt_blobs: frozenset[str] = frozenset()
    truncated_blobs: tuple[tuple[str, int], ...] = ()
    hang_seconds: float = 0.0
    shapes: tuple[tuple[str, Shape], ...] = ()
    echo_headers: bool = False

    def truncate_after(self, digest: str) -> int | None:
        return dict(self.truncated_blobs).get(digest)

    def shape_of(self, name: str | None) -> Shape | None:
        return dict(self.shapes).get(name) if name else None


def wrong_digest(digest: str) -> str:
    """A well-formed sha256 digest that is not `digest` (and is the same every time for the same `digest`)."""
    return "sha256:" + hashlib.sha256(b"ocigate faulty host: not " + digest.encode()).hexdigest()


def corrupted_manifest(body: bytes) -> bytes:
    """`body` with one byte changed, same length: a hex digit of the digest nearest the middle when there is one, so
    the manifest still parses and only its digest tells; otherwise the middle byte flipped."""
    if not body:
        return body
    middle = len(body) // 2
    digests = list(_EMBEDDED_DIGEST.finditer(body))
    if digests:
        nearest = min(digests, key=lambda match: abs((match.start() + match.end()) // 2 - middle))
        position = nearest.end() - 1
        digit = int(body[position : position + 1], 16)
        replacement = b"0123456789abcdef"[(digit + 1) % 16]
        return body[:position] + bytes([replacement]) + body[position + 1 :]
    return body[:middle] + bytes([body[middle] ^ 0xFF]) + body[middle + 1 :]


@dataclass
class FaultyHost(Recorder):
    """A recorder (its `requests`, `clear`, `url`) whose answers can be made wrong."""

    _faults: _Faults = field(default_factory=_Faults, repr=False)
    _served: Counter[str] = field(default_factory=Counter, repr=False)
    _core: _Core | None = field(default=None, repr=False)

    def served(self, fault: str) -> int:
        """How many times `fault` (one of FAULT_NAMES) changed an answer (or, for "hang", delayed a request)."""
        if fault not in FAULT_NAMES:
            raise ValueError(f"unknown fault {fault!r}; known: {', '.join(FAULT_NAMES)}")
        with self._lock:
            return self._served[fault]

    # Faults.

    def corrupt_manifest(self, reference: str) -> None:
        self._change(lambda f: replace(f, corrupt_manifests=f.corrupt_manifests | {reference}))

    def lie_about_digest(self, reference: str) -> None:
        self._change(lambda f: replace(f, lying_manifests=f.lying_manifests | {reference}))

    def corrupt_blob(self, digest: str) -> None:
        self._change(lambda f: replace(f, corrupt_blobs=f.corrupt_blobs | {digest}))

    def truncate_blob(self, digest: str, after: int) -> None:
        if after < 0:
            raise ValueError("after must be >= 0")
        self._change(
            lambda f: replace(
                f, truncated_blobs=(*((d, n) for d, n in f.truncated_blobs if d != digest), (digest, after))
            )
        )

    def shape(self, name: str, shape: Shape) -> None:
        """Answer GETs of the blob `name` (a digest) or the manifest `name` (a reference as written) as `shape` says."""
        self._change(lambda f: replace(f, shapes=(*((n, s) for n, s in f.shapes if n != name), (name, shape))))

    def echo_headers(self) -> None:
        """Answer every request that carries an Authorization 400, echoing its headers."""
        self._change(lambda f: replace(f, echo_headers=True))

    def hang(self, seconds: float) -> None:
        """Delay every request by `seconds` after reading it (0 clears); shutdown ends a delay early."""
        if seconds < 0:
            raise ValueError("seconds must be >= 0")
        self._change(lambda f: replace(f, hang_seconds=float(seconds)))

    def clear_faults(self) -> None:
        """Every fault except refuse(), which only accept_again() undoes (a socket is involved, not a flag)."""
        self._change(lambda f: _Faults())

    def refuse(self) -> None:
        """Close the listening socket (connections get "connection refused") and shut down open connections."""
        assert self._core is not None
        self._core.stop_listening()

    def accept_again(self) -> None:
        """Listen on the same port again; a no-op while listening. OSError if the port was taken meanwhile."""
        assert self._core is not None
        self._core.listen(self.port)

    @property
    def refusing(self) -> bool:
        return self._core is not None and not self._core.listening

    # Used by the handler.

    def _change(self, change: Callable[[_Faults], _Faults]) -> None:
        with self._lock:
            self._faults = change(self._faults)

    def _arrived(self, request: RecordedRequest) -> _Faults:
        with self._lock:
            self._requests.append(request)
            return self._faults

    def _count(self, fault: str) -> None:
        with self._lock:
            self._served[fault] += 1


class _Core:
    """The sockets and threads: an accept loop that can be stopped and started again on the same port."""

    def __init__(self, faulty: FaultyHost, upstream_host: str, upstream_port: int, upstream_netloc: str) -> None:
        self.faulty = faulty
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.upstream_netloc = upstream_netloc
        # Set once, at the end: wakes hanging requests and ends every loop.
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._accept_stop: threading.Event | None = None
        self._accept_thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []

    @property
    def listening(self) -> bool:
        with self._lock:
            return self._accept_thread is not None

    def listen(self, port: int) -> int:
        with self._lock:
            if self._accept_thread is not None:
                return port
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                # Connections accepted before refuse() may linger in TIME_WAIT on this port.
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind(("127.0.0.1", port))
                listener.listen(64)
                listener.settimeout(_ACCEPT_POLL)
            except OSError:
                listener.close()
                raise
            stop = threading.Event()
            thread = threading.Thread(target=self._accept_loop, args=(listener, stop), daemon=True)
            self._accept_stop, self._accept_thread = stop, thread
            thread.start()
            return int(listener.getsockname()[1])

    def stop_listening(self) -> None:
        with self._lock:
            stop, thread = self._accept_stop, self._accept_thread
            self._accept_stop = self._accept_thread = None
        if stop is not None and thread is not None:
            stop.set()
            # The accept thread closes the listener itself: closing it from here would leave it listening until the
            # thread's pending poll returned. After the join the port refuses.
            thread.join(timeout=_SHUTDOWN_TIMEOUT)
        self._shut_down_connections()

    def close(self) -> None:
        self.stopping.set()
        self.stop_listening()
        deadline = time.monotonic() + _SHUTDOWN_TIMEOUT
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def _accept_loop(self, listener: socket.socket, stop: threading.Event) -> None:
        try:
            while not stop.is_set() and not self.stopping.is_set():
                try:
                    connection, address = listener.accept()
                except TimeoutError:
                    continue
                except OSError:
                    return
                connection.settimeout(None)
                thread = threading.Thread(target=self._serve, args=(connection, address), daemon=True)
                with self._lock:
                    self._connections.add(connection)
                    self._threads = [t for t in self._threads if t.is_alive()]
                    self._threads.append(thread)
                thread.start()
        finally:
            listener.close()

    def _serve(self, connection: socket.socket, address: tuple[str, int]) -> None:
        try:
            _FaultyHandler(connection, address, self)
        except (OSError, http.client.HTTPException):
            pass
        finally:
            with self._lock:
                self._connections.discard(connection)
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_WR)
            connection.close()

    def _shut_down_connections(self) -> None:
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class _FaultyHandler(ForwardingHandler):
    server: _Core  # type: ignore[assignment]
    name = "faulty host"

    @property
    def target_url(self) -> str:
        return self.server.faulty.target_url

    @property
    def target_netloc(self) -> str:
        return self.server.upstream_netloc

    def open_target(self) -> http.client.HTTPConnection:
        core = self.server
        return http.client.HTTPConnection(core.upstream_host, core.upstream_port, timeout=UPSTREAM_TIMEOUT)

    def answer(self) -> None:
        faulty = self.server.faulty
        faults = faulty._arrived(RecordedRequest(self.command, self.path, self.header_lines()))
        if faults.hang_seconds > 0:
            faulty._count("hang")
            if self.server.stopping.wait(faults.hang_seconds):
                # Shutting down: leave without an answer, as a host that never answered would.
                self.close_connection = True
                return

        if faults.echo_headers and self.headers.get("Authorization"):
            faulty._count("echo_headers")
            self._echo()
            return

        path = urllib.parse.urlsplit(self.origin_form()).path
        manifest = _MANIFEST_PATH.match(path)
        blob = _BLOB_PATH.match(path)
        reference = manifest["reference"] if manifest else None
        digest = blob["digest"] if blob else None

        shape = faults.shape_of(reference or digest)
        # A shaped HEAD is answered from the GET's body: its length as sent depends on it.
        shaped_head = self.command == "HEAD" and shape is not None and shape.head
        response, upstream = self.forward(method="GET" if shaped_head else None)
        if response is None:
            upstream.close()
            return
        try:
            ok = response.status == 200
            lie = reference is not None and reference in faults.lying_manifests and ok
            if lie:
                faulty._count("lie_about_digest")
            if ok and (self.command == "GET" or shaped_head) and shape is not None:
                faulty._count("shape")
                self._send_shaped(response, shape, head=shaped_head)
            elif ok and self.command == "GET" and reference in faults.corrupt_manifests:
                faulty._count("corrupt_manifest")
                self._send_manifest_corrupted(response, lie)
            elif ok and self.command == "GET" and digest is not None and faults.truncate_after(digest) is not None:
                faulty._count("truncate_blob")
                self._relay(response, stop_after=faults.truncate_after(digest))
            elif ok and self.command == "GET" and digest in faults.corrupt_blobs:
                faulty._count("corrupt_blob")
                self._relay(response, flip_middle=True)
            else:
                self._relay(response, lie=lie)
        finally:
            upstream.close()

    def _send_headers(self, response: http.client.HTTPResponse, *, lie: bool, content_length: int | None) -> None:
        """The registry's status and header lines, with Docker-Content-Digest replaced when lying and Content-Length
        set when the body is sent whole."""
        self.send_response_only(response.status, response.reason)
        for name, value in response.msg.items():
            lowered = name.lower()
            if lowered in HOP_BY_HOP or lowered == "transfer-encoding":
                continue
            if lowered == "content-length" and content_length is not None:
                continue
            if lowered == "docker-content-digest" and lie:
                value = wrong_digest(value)
            self.send_header(name, value)
        if content_length is not None:
            self.send_header("Content-Length", str(content_length))

    def _echo(self) -> None:
        body = json.dumps({"errors": [{"code": "BAD_REQUEST", "detail": dict(self.headers.items())}]}).encode()
        self.send_response_only(400)
        for name, value in self.headers.items():
            self.send_header(f"X-You-Sent-{name}", value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_shaped(self, response: http.client.HTTPResponse, shape: Shape, *, head: bool = False) -> None:
        body = response.read()
        if (shape.stall and self.server.stopping.wait(shape.stall)) or shape.hang_up:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        status, reason, extra = response.status, response.reason, {}
        if shape.status == 206:
            body = body[: len(body) // 2]
            extra["Content-Range"] = f"bytes 0-{max(0, len(body) - 1)}/{len(body) * 2}"
        elif shape.status == 304:
            body = b""
        elif shape.status is not None:
            body = f"<html><body>the mirror says {shape.status}</body></html>".encode()
        if shape.status is not None:
            status, reason = shape.status, http.client.responses.get(shape.status, "Whatever")
        if shape.empty:
            body = b""
        if shape.corrupt and body:
            middle = len(body) // 2
            body = body[:middle] + bytes([body[middle] ^ 0xFF]) + body[middle + 1 :]
        if shape.compress:
            body = gzip.compress(body)
        promised = len(body)
        if shape.cut:
            body = body[: len(body) // 2]
        if shape.http10:
            self.protocol_version = "HTTP/1.0"
            self.close_connection = True
        self.send_response_only(status, reason)
        for name, value in response.msg.items():
            if name.lower() in HOP_BY_HOP or name.lower() in _FRAMING_HEADERS:
                continue
            self.send_header(name, value)
        for name, value in extra.items():
            self.send_header(name, value)
        if shape.encoding:
            self.send_header("Content-Encoding", shape.encoding)
        has_body = status != 304
        if shape.framing == "length" and has_body:
            self.send_header("Content-Length", str(promised))
        elif shape.framing == "chunked" and has_body:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if not has_body or head:
            return
        size = max(1, -(-len(body) // shape.pieces))
        for start in range(0, len(body), size):
            piece = body[start : start + size]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if shape.framing == "chunked" else piece)
            self.wfile.flush()
            if shape.drip and self.server.stopping.wait(shape.drip):
                break
        if shape.cut:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        if shape.framing == "chunked":
            self.wfile.write(b"0\r\n\r\n")

    def _send_manifest_corrupted(self, response: http.client.HTTPResponse, lie: bool) -> None:
        # Manifests are small: read whole, change one byte, send with the registry's headers.
        body = corrupted_manifest(response.read())
        self._send_headers(response, lie=lie, content_length=len(body))
        self.end_headers()
        self.wfile.write(body)

    def _relay(
        self,
        response: http.client.HTTPResponse,
        *,
        lie: bool = False,
        flip_middle: bool = False,
        stop_after: int | None = None,
    ) -> None:
        has_body = self.command != "HEAD" and response.status not in (204, 304) and response.status >= 200
        length_header = response.getheader("Content-Length")
        if flip_middle and length_header is None:
            # The middle is only known with the whole body: read it (a registry sends Content-Length for blobs).
            body = response.read()
            middle = len(body) // 2
            if body:
                body = body[:middle] + bytes([body[middle] ^ 0xFF]) + body[middle + 1 :]
            self._send_headers(response, lie=lie, content_length=len(body))
            self.end_headers()
            self.wfile.write(body)
            return
        # Without a length the body runs until the target closes: re-chunk it for the client.
        rechunk = has_body and length_header is None
        self._send_headers(response, lie=lie, content_length=None)
        if rechunk:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if not has_body:
            return
        flip_at = int(length_header) // 2 if flip_middle and length_header is not None else None
        sent = 0
        try:
            while stop_after is None or sent < stop_after:
                want = PIECE if stop_after is None else min(PIECE, stop_after - sent)
                piece = response.read1(want)
                if not piece:
                    break
                if flip_at is not None and sent <= flip_at < sent + len(piece):
                    offset = flip_at - sent
                    piece = piece[:offset] + bytes([piece[offset] ^ 0xFF]) + piece[offset + 1 :]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if rechunk else piece)
                sent += len(piece)
            if stop_after is not None:
                # Headers promised more: end the connection mid-body (FIN), as a host that died would.
                self.wfile.flush()
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
                return
            if rechunk:
                self.wfile.write(b"0\r\n\r\n")
        except (OSError, http.client.HTTPException):
            # Headers are out: the only honest signal left is to drop the connection.
            self.close_connection = True


@contextlib.contextmanager
def running_faulty_host(target_url: str) -> Iterator[FaultyHost]:
    """Serve a faulty reverse proxy for `target_url` (an http registry) on 127.0.0.1 (free port) until the block ends.

    It forwards everything until a fault is set; on exit it stops listening, wakes hanging requests, shuts down open
    connections and waits (bounded) for its threads.
    """
    target = urllib.parse.urlsplit(target_url)
    if target.scheme != "http" or not target.hostname:
        raise ValueError(f"target must be an http URL, not {target_url!r}")
    faulty = FaultyHost(host="127.0.0.1", port=0, target_url=target_url)
    core = _Core(faulty, target.hostname, target.port or 80, target.netloc)
    faulty._core = core
    faulty.port = core.listen(0)
    try:
        yield faulty
    finally:
        core.close()
