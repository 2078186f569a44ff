"""ocigate's own requests to hosts: one pooled async client per TLS setting, dialled through the destination policy."""

import asyncio
from dataclasses import dataclass

import httpx

from .destinations import DestinationError, Destinations
from .hosttls import HostTLS, python_context
from .rules import Host

# Registries refuse manifests above 4 MiB (distribution's limit); anything much larger is not a manifest.
MAX_SMALL_BODY = 16 * 1024 * 1024


class HostFailed(Exception):
    """The host could not be asked: refused, unreachable, timed out, TLS failure, or an oversized answer.
    The message is short and names no secret, for the per-request log line and the client's error."""


@dataclass(frozen=True)
class HostResponse:
    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes  # as sent on the wire: still content-encoded when Content-Encoding says so


class Upstream:
    def __init__(self, destinations: Destinations, connect_timeout: float, read_timeout: float) -> None:
        self.destinations = destinations
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._clients: dict[HostTLS, httpx.AsyncClient] = {}

    def _client(self, host: Host) -> httpx.AsyncClient:
        tls = HostTLS.of(host)
        client = self._clients.get(tls)
        if client is None:
            verify = python_context(tls) if host.scheme == "https" else True
            client = httpx.AsyncClient(verify=verify, follow_redirects=False, trust_env=False)
            self._clients[tls] = client
        return client

    async def send(
        self,
        host: Host,
        method: str,
        target: str,
        headers: list[tuple[bytes, bytes]],
        max_body: int = MAX_SMALL_BODY,
    ) -> HostResponse:
        """Sends method target (path and query) to host and reads the whole (small) answer."""
        try:
            address, port = await self.destinations.resolve(host.host, host.port)
        except DestinationError as e:
            raise HostFailed(str(e)) from None
        dial_host = f"[{address}]" if ":" in address else address
        url = f"{host.scheme}://{dial_host}:{port}{target}"
        timeout = httpx.Timeout(self.read_timeout, connect=host.dial_timeout or self.connect_timeout)
        request_headers = [(b"Host", host.netloc.encode()), *headers]
        extensions = {"sni_hostname": host.host} if host.scheme == "https" else {}
        client = self._client(host)
        request = client.build_request(method, url, headers=request_headers, timeout=timeout, extensions=extensions)
        _drop_invented_headers(request, headers)
        try:
            response = await client.send(request, stream=True)
            try:
                body = bytearray()
                async for chunk in response.aiter_raw():
                    body += chunk
                    if len(body) > max_body:
                        raise HostFailed(f"answer larger than {max_body} bytes")
            finally:
                await response.aclose()
        except httpx.TimeoutException as e:
            raise HostFailed(f"timed out ({type(e).__name__})") from None
        except httpx.HTTPError as e:
            raise HostFailed(_describe(e)) from None
        return HostResponse(response.status_code, tuple(response.headers.raw), bytes(body))

    async def aclose(self) -> None:
        clients, self._clients = self._clients, {}
        await asyncio.gather(*(c.aclose() for c in clients.values()))


def _drop_invented_headers(request: httpx.Request, sent: list[tuple[bytes, bytes]]) -> None:
    """httpx adds Accept, Accept-Encoding and User-Agent of its own: a host must see the client's request, not
    httpx's (distribution answers an Accept of */* differently from none), and an answer the client did not ask to
    be compressed must not arrive compressed."""
    names = {name.lower() for name, _ in sent}
    for name in (b"accept", b"user-agent"):
        if name not in names:
            del request.headers[name.decode()]
    if b"accept-encoding" not in names:
        request.headers["Accept-Encoding"] = "identity"


def _describe(error: httpx.HTTPError) -> str:
    # httpx wraps the OSError: its innermost cause says "connection refused" or the TLS reason plainly.
    cause: BaseException = error
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__  # type: ignore[assignment]
    text = str(cause) or type(cause).__name__
    if isinstance(cause, ConnectionRefusedError):
        text = "connection refused"
    return text
