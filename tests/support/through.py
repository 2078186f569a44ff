"""One HTTP/1.1 request through the gateway as a client sends it (CONNECT, then TLS trusting the gateway's CA), read
the way a client reads it: a body that stops short of its framing is seen as broken, not as complete."""

import http.client
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
        return Fetched(response.status, answer, body, None, redirects)
    finally:
        connection.close()
