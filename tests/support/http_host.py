"""A small HTTP/1.1 host on loopback for the tests that drive the addons or `ocigate login` without a registry."""

import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import BinaryIO

# What the host answers: the status, the body and, optionally, headers added to (or replacing) its own.
Answer = Callable[[BaseHTTPRequestHandler], tuple[int, bytes] | tuple[int, bytes, dict[str, str]]]
# (method, path and query, the request's headers: looked up by any case, duplicates kept)
Seen = list[tuple[str, str, Message]]


class _Dripping:
    """A connection's writer that sends each byte alone, `pause` seconds after the one before."""

    def __init__(self, out: BinaryIO, pause: float) -> None:
        self._out = out
        self._pause = pause

    def write(self, data: bytes) -> int:
        for at in range(len(data)):
            time.sleep(self._pause)
            self._out.write(data[at : at + 1])
        return len(data)

    def __getattr__(self, name: str) -> object:
        return getattr(self._out, name)


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        # A client that hangs up (a pooled connection closed as the client stops) is no error of the host's: printed,
        # its traceback would land in the output of the test that drives the client.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@contextmanager
def http_host(answer: Answer, *, chunked: bool = False, drip: float = 0) -> Iterator[tuple[int, Seen]]:
    """Serves `answer` on a free loopback port and records every request. The request body is read before `answer`
    is asked, as `handler.body`. Answers carry a Content-Length, or with `chunked` are sent chunked; their
    Content-Type is a manifest's unless `answer` gives one. With `drip`, each byte of an answer (status line, headers
    and body) goes alone, `drip` seconds after the one before: a host never silent for long, yet never done."""
    seen: Seen = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            if drip:
                self.wfile = _Dripping(self.wfile, drip)

        def _serve(self) -> None:
            seen.append((self.command, self.path, self.headers))
            self.body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            status, body, *extra = answer(self)
            self.send_response(status)
            headers = {"Content-Type": "application/vnd.oci.image.manifest.v1+json", **(extra[0] if extra else {})}
            for name, value in headers.items():
                self.send_header(name, value)
            if chunked:
                self.send_header("Transfer-Encoding", "chunked")
            else:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if chunked else body)

        do_GET = do_HEAD = do_POST = _serve

        def log_message(self, *args: object) -> None:
            pass

    server = _Server(("127.0.0.1", 0), Handler)
    # A client's pooled keep-alive connections would hold handler threads open at shutdown.
    server.daemon_threads = True
    server.block_on_close = False
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], seen
    finally:
        server.shutdown()
        server.server_close()
