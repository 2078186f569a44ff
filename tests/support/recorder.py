"""A recording reverse proxy to put in front of a registry: distribution does not log request headers.

Each request is recorded as received (request target and every header line, in order, duplicates kept)
before it is forwarded, so a test that has its response also finds its record. It is then forwarded to
the target over a fresh connection with the same header lines (Host replaced by the target's,
hop-by-hop connection headers dropped), the body streamed through (Content-Length or chunked), and the
response streamed back in pieces with all its header lines. When the target cannot be reached the
client gets 502.

With `redirect_blobs_to`, blob GETs are not forwarded but answered `307` with a Location on that base URL (the
same path and query), as registries send blob downloads to object storage.

Response headers are passed through unchanged, including Location headers of upload sessions that
point at the target itself: a client following them talks to the registry directly, bypassing the
recorder. distribution 2.8 sends absolute Locations built from the Host header it received, which
the recorder sets to the target's; configure the registry with {"http": {"relativeurls": True}} to keep
upload sessions behind the recorder.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import ssl
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PIECE = 64 * 1024
UPSTREAM_TIMEOUT = 30.0
# Idle keep-alive connections end after this, so no handler thread waits forever.
_CLIENT_IDLE_TIMEOUT = 30.0
_SHUTDOWN_TIMEOUT = 5.0
# Headers that describe one connection, not the message: they are not forwarded (RFC 9110 7.6.1).
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade"})


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    target: str  # path + query as received
    headers: tuple[tuple[str, str], ...]  # every header line in order, duplicates kept

    @property
    def path(self) -> str:
        return urllib.parse.urlsplit(self.target).path

    def query(self) -> dict[str, list[str]]:
        return urllib.parse.parse_qs(urllib.parse.urlsplit(self.target).query, keep_blank_values=True)

    def header_values(self, name: str) -> list[str]:
        wanted = name.lower()
        return [value for header, value in self.headers if header.lower() == wanted]


@dataclass
class Recorder:
    host: str
    port: int
    target_url: str
    _requests: list[RecordedRequest] = field(default_factory=list, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot: later requests do not change a list already returned."""
        with self._lock:
            return list(self._requests)

    def clear(self) -> None:
        with self._lock:
            self._requests.clear()

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)


class _RecordingServer(ThreadingHTTPServer):
    daemon_threads = True
    recorder: Recorder
    upstream_scheme: str
    upstream_host: str
    upstream_port: int
    upstream_netloc: str
    upstream_ssl_context: ssl.SSLContext | None
    redirect_blobs_to: str | None

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(address, _ProxyHandler)
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        self._handler_threads: list[threading.Thread] = []

    def process_request(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        with self._connections_lock:
            self._connections.add(request)
        thread = threading.Thread(target=self.process_request_thread, args=(request, client_address))
        thread.daemon = True
        self._handler_threads = [t for t in self._handler_threads if t.is_alive()]
        self._handler_threads.append(thread)
        thread.start()

    def shutdown_request(self, request: socket.socket) -> None:  # type: ignore[override]
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_all(self) -> None:
        """Stop accepting, end open keep-alive connections and wait (bounded) for handler threads."""
        self.shutdown()
        self.server_close()
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        for thread in self._handler_threads:
            thread.join(timeout=_SHUTDOWN_TIMEOUT)


class ForwardingHandler(BaseHTTPRequestHandler):
    """A handler that passes requests on to a target: every method goes to `answer`, which may `forward` the request
    (Host replaced, hop-by-hop headers dropped, the body streamed through) and relay or rework the response. The
    recorder's and the faulty host's. Subclasses say where the target is (`open_target`, `target_url`)."""

    protocol_version = "HTTP/1.1"
    timeout = _CLIENT_IDLE_TIMEOUT
    # What the 502 of an unreachable target calls this proxy.
    name = "forwarding proxy"

    def log_message(self, format: str, *args: object) -> None:
        # Tests read the records, not stderr.
        pass

    def answer(self) -> None:
        raise NotImplementedError

    def open_target(self) -> http.client.HTTPConnection:
        raise NotImplementedError

    @property
    def target_url(self) -> str:
        raise NotImplementedError

    @property
    def target_netloc(self) -> str:
        """The Host header the target is sent."""
        raise NotImplementedError

    def handle_one_request(self) -> None:
        # Same as the base class, but every method goes to one place.
        try:
            self.raw_requestline = self.rfile.readline(65537)
            if len(self.raw_requestline) > 65536:
                self.send_error(414)
                return
            if not self.raw_requestline:
                self.close_connection = True
                return
            if not self.parse_request():
                return
            self.answer()
            self.wfile.flush()
        except (TimeoutError, ConnectionError):
            self.close_connection = True

    def origin_form(self) -> str:
        # A client that treats this as a forward proxy sends an absolute URL; the target wants the path.
        if self.path.startswith(("http://", "https://")):
            parts = urllib.parse.urlsplit(self.path)
            return urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        return self.path

    def header_lines(self) -> tuple[tuple[str, str], ...]:
        return tuple((name, value) for name, value in self.headers.items())

    def forward(self, method: str | None = None) -> tuple[http.client.HTTPResponse | None, http.client.HTTPConnection]:
        """Sends the request on (as `method` when given: a HEAD asked as a GET); the response, or None after answering
        502 itself. The caller closes the connection."""
        connection_tokens = {
            token.strip().lower() for value in self.headers.get_all("Connection", []) for token in value.split(",")
        }
        is_chunked = "chunked" in (self.headers.get("Transfer-Encoding") or "").lower()
        content_length = None if is_chunked else self.headers.get("Content-Length")
        upstream = self.open_target()
        try:
            upstream.putrequest(method or self.command, self.origin_form(), skip_host=True, skip_accept_encoding=True)
            host_sent = False
            for name, value in self.header_lines():
                lowered = name.lower()
                if lowered in HOP_BY_HOP or lowered in connection_tokens:
                    continue
                if lowered == "host":
                    if host_sent:
                        continue
                    value, host_sent = self.target_netloc, True
                upstream.putheader(name, value)
            if not host_sent:
                upstream.putheader("Host", self.target_netloc)
            upstream.endheaders()
            if is_chunked:
                self._relay_chunked_body(upstream)
            elif content_length is not None:
                self._relay_sized_body(upstream, int(content_length))
            return upstream.getresponse(), upstream
        except (OSError, http.client.HTTPException, ValueError) as error:
            self._answer_bad_gateway(error)
            return None, upstream

    def _relay_sized_body(self, upstream: http.client.HTTPConnection, length: int) -> None:
        remaining = length
        while remaining > 0:
            piece = self.rfile.read(min(PIECE, remaining))
            if not piece:
                raise ConnectionError("client closed the connection inside the request body")
            upstream.send(piece)
            remaining -= len(piece)

    def _relay_chunked_body(self, upstream: http.client.HTTPConnection) -> None:
        """Decode the client's chunks and send them on as chunks (the Transfer-Encoding line was kept)."""
        while True:
            size_line = self.rfile.readline(65537)
            if not size_line:
                raise ConnectionError("client closed the connection inside a chunked body")
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                # Trailer lines until the empty line; they are not forwarded.
                for _ in range(1000):
                    line = self.rfile.readline(65537)
                    if line in (b"\r\n", b"\n", b""):
                        break
                upstream.send(b"0\r\n\r\n")
                return
            data = self.rfile.read(size)
            if len(data) != size:
                raise ConnectionError("client closed the connection inside a chunk")
            self.rfile.readline(3)  # the CRLF after the chunk data
            upstream.send(b"%x\r\n%s\r\n" % (size, data))

    def _answer_bad_gateway(self, error: BaseException) -> None:
        body = f"{self.name} could not reach {self.target_url}: {error!r}\n".encode()
        self.send_response_only(502)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        # The request body may be partly unread, so the connection cannot be reused.
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.close_connection = True


class _ProxyHandler(ForwardingHandler):
    server: _RecordingServer
    name = "recording proxy"

    @property
    def target_netloc(self) -> str:
        return self.server.upstream_netloc

    @property
    def target_url(self) -> str:
        return self.server.recorder.target_url

    def answer(self) -> None:
        self.server.recorder._record(RecordedRequest(self.command, self.path, self.header_lines()))
        if self.server.redirect_blobs_to and self.command == "GET" and "/blobs/" in self.origin_form():
            self._redirect(self.server.redirect_blobs_to + self.origin_form())
            return
        response, upstream = self.forward()
        try:
            if response is not None:
                self._relay_response(response)
        finally:
            upstream.close()

    def open_target(self) -> http.client.HTTPConnection:
        server = self.server
        if server.upstream_scheme == "https":
            return http.client.HTTPSConnection(
                server.upstream_host,
                server.upstream_port,
                timeout=UPSTREAM_TIMEOUT,
                context=server.upstream_ssl_context,
            )
        return http.client.HTTPConnection(server.upstream_host, server.upstream_port, timeout=UPSTREAM_TIMEOUT)

    def _redirect(self, location: str) -> None:
        self.send_response_only(307)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _relay_response(self, response: http.client.HTTPResponse) -> None:
        has_body = self.command != "HEAD" and response.status not in (204, 304) and response.status >= 200
        has_length = response.getheader("Content-Length") is not None
        # Without a length the body runs until the target closes: re-chunk it for the client.
        rechunk = has_body and not has_length
        self.send_response_only(response.status, response.reason)
        for name, value in response.msg.items():
            if name.lower() in HOP_BY_HOP or name.lower() == "transfer-encoding":
                continue
            self.send_header(name, value)
        if rechunk:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if not has_body:
            return
        try:
            while True:
                piece = response.read1(PIECE)
                if not piece:
                    break
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if rechunk else piece)
            if rechunk:
                self.wfile.write(b"0\r\n\r\n")
        except (OSError, http.client.HTTPException):
            # Headers are out: the only honest signal left is to drop the connection.
            self.close_connection = True


@contextlib.contextmanager
def recording_proxy(
    target_url: str, *, ssl_context: ssl.SSLContext | None = None, redirect_blobs_to: str | None = None
) -> Iterator[Recorder]:
    """Serve a recording reverse proxy for `target_url` on 127.0.0.1 (free port) until the block ends.

    `ssl_context` is used to reach an https target (e.g. one trusting the throwaway CA); `redirect_blobs_to` is a
    base URL (scheme://host:port) blob GETs are redirected to instead of being forwarded.
    """
    target = urllib.parse.urlsplit(target_url)
    if target.scheme not in ("http", "https") or not target.hostname:
        raise ValueError(f"target must be an http(s) URL, not {target_url!r}")
    server = _RecordingServer(("127.0.0.1", 0))
    host, port = server.server_address[:2]
    recorder = Recorder(host=str(host), port=int(port), target_url=target_url)
    server.recorder = recorder
    server.upstream_scheme = target.scheme
    server.upstream_host = target.hostname
    server.upstream_port = target.port or (443 if target.scheme == "https" else 80)
    server.upstream_netloc = target.netloc
    server.upstream_ssl_context = ssl_context
    server.redirect_blobs_to = redirect_blobs_to.rstrip("/") if redirect_blobs_to else None
    serving = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    serving.start()
    try:
        yield recorder
    finally:
        server.close_all()
        serving.join(timeout=_SHUTDOWN_TIMEOUT)
