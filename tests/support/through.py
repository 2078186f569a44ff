"""One HTTP/1.1 request through the gateway as a client sends it (CONNECT, then TLS trusting the gateway's CA), read
the way a client reads it: a body that stops short of its framing is seen as broken, not as complete."""

import http.client
import socket
import ssl
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass

from .gateway import Gateway

_TIMEOUT = 30.0
# What Go's http.Client follows before it gives up.
MAX_REDIRECTS = 10


@dataclass(frozen=True)
class Fetched:
    status: int | None  # None: no answer at all
    headers: tuple[tuple[str, str], ...]
    body: bytes
    broken: str | None  # why the transfer visibly failed (a short body, a reset), None when it ended cleanly
    redirects: int  # how many redirects were followed to get here
    version: int = 11  # the status line's HTTP version, as http.client numbers it (10, 11)

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


def get_through(
    gateway: Gateway, host: str, path: str, headers: Sequence[tuple[str, str]] = (), *, method: str = "GET"
) -> Fetched:
    """Asks `host` (as https://host/) for `path` through the gateway, following redirects as Go's client does."""
    context = ssl.create_default_context(cafile=str(gateway.ca_path))
    for redirects in range(MAX_REDIRECTS + 1):
        fetched = _once(gateway, context, host, path, headers, method, redirects)
        location = fetched.header("Location")
        if fetched.status not in (301, 302, 303, 307, 308) or location is None:
            return fetched
        url = urllib.parse.urlsplit(urllib.parse.urljoin(f"https://{host}{path}", location))
        if url.hostname != host:
            return fetched  # storage elsewhere: not the gateway's to answer
        path = url.path + (f"?{url.query}" if url.query else "")
    return fetched


def _once(
    gateway: Gateway,
    context: ssl.SSLContext,
    host: str,
    path: str,
    headers: Sequence[tuple[str, str]],
    method: str,
    redirects: int,
) -> Fetched:
    connection = http.client.HTTPSConnection("127.0.0.1", gateway.port, timeout=_TIMEOUT, context=context)
    connection.set_tunnel(host, 443)
    try:
        connection.putrequest(method, path, skip_accept_encoding=True)
        for name, value in headers:
            connection.putheader(name, value)
        connection.endheaders()
        try:
            response = connection.getresponse()
        except (OSError, http.client.HTTPException) as e:
            return Fetched(None, (), b"", f"no answer: {e!r}", redirects)
        answer = tuple(response.getheaders())
        try:
            body = response.read()
        except http.client.IncompleteRead as e:
            return Fetched(response.status, answer, e.partial, f"incomplete body ({len(e.partial)} bytes)", redirects)
        except (OSError, http.client.HTTPException) as e:
            return Fetched(response.status, answer, b"", f"broken body: {e!r}", redirects)
        return Fetched(response.status, answer, body, None, redirects, response.version)
    finally:
        connection.close()


def tls_through(gateway: Gateway, upstream: str, *, timeout: float = _TIMEOUT) -> ssl.SSLSocket:
    """A TLS connection to `upstream` (as the client's CONNECT names it) through the gateway, trusting its CA, without
    ALPN: what a client writes on it is up to the caller, byte for byte."""
    raw = socket.create_connection(("127.0.0.1", gateway.port), timeout=timeout)
    raw.sendall(f"CONNECT {upstream}:443 HTTP/1.1\r\nHost: {upstream}:443\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        piece = raw.recv(1)
        assert piece, f"the gateway closed the CONNECT tunnel: {head!r}"
        head += piece
    assert head.startswith(b"HTTP/1.1 200"), head
    return ssl.create_default_context(cafile=str(gateway.ca_path)).wrap_socket(
        raw, server_hostname=upstream.rstrip(".")
    )


def read_answers(connection: ssl.SSLSocket, count: int, *, method: str = "GET") -> list[Fetched]:
    """The next `count` answers on `connection`, read as a client reads them (pipelined answers one after another)."""
    stream = connection.makefile("rb")

    class _Shared:  # the one stream every answer is read from: an answer read to its end must not close it
        def __getattr__(self, name: str) -> object:
            return getattr(stream, name)

        def close(self) -> None:
            pass

    class _Sock:  # http.client reads an answer from what its socket's makefile gives
        def makefile(self, *args: object, **kwargs: object) -> object:
            return _Shared()

    answers = []
    for _ in range(count):
        response = http.client.HTTPResponse(_Sock(), method=method)  # type: ignore[arg-type]
        try:
            response.begin()
        except (OSError, http.client.HTTPException) as e:
            answers.append(Fetched(None, (), b"", f"no answer: {e!r}", 0))
            break
        headers = tuple(response.getheaders())
        try:
            answers.append(Fetched(response.status, headers, response.read(), None, 0))
        except http.client.IncompleteRead as e:
            answers.append(Fetched(response.status, headers, e.partial, "incomplete body", 0))
            break
    return answers
