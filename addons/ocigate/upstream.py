"""ocigate's own requests to hosts: pooled async clients, dialled through the destination policy."""

import asyncio
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from .destinations import DestinationError, Destinations
from .hosttls import HostTLS, HostTLSError, python_context
from .rules import Host

# Registries refuse manifests above 4 MiB (distribution's limit); anything much larger is not a manifest.
MAX_SMALL_BODY = 16 * 1024 * 1024


class HostFailed(Exception):
    """The host could not be asked: refused, unreachable, timed out, TLS failure, or an oversized answer.
    The message is short and names no secret, for the per-request log line and the client's error. `unreachable`:
    the host could not be connected to or did not answer in time (not a policy, TLS or content problem)."""

    def __init__(self, message: str, *, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable


@dataclass(frozen=True)
class HostResponse:
    status: int
    reason: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes  # as sent on the wire: still content-encoded when Content-Encoding says so


class Upstream:
    """Timeouts and trust roots are set from the options before the first request."""

    def __init__(self) -> None:
        self.destinations = Destinations()
        self.connect_timeout = 30.0
        self.read_timeout = 60.0
        self.roots: Path | None = None
        self.insecure = False
        # The one hosts.toml entry for an address that every rule agrees on: the TLS settings for connections to it
        # that no plan chose (a token realm on a mirror, a ruled host's passthrough).
        self.hosts_by_address: dict[tuple[str, int], Host] = {}
        self._clients: dict[tuple[HostTLS, str, int], httpx.AsyncClient] = {}
        self._retired: list[httpx.AsyncClient] = []

    def host_tls(self, host: Host) -> HostTLS:
        return HostTLS.of(host, roots=self.roots, insecure=self.insecure)

    def realm_host(self, url: str) -> Host:
        """The host to send a request for `url` to (a token realm): with the TLS settings hosts.toml gives its
        address, if any."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        port = parts.port or (443 if scheme == "https" else 80)
        known = self.hosts_by_address.get((parts.hostname or "", port))
        if known is not None:
            return replace(known, scheme=scheme, path="", headers=())
        return Host(scheme=scheme, host=parts.hostname or "", port=port, path="", capabilities=frozenset())

    def _client(self, host: Host) -> httpx.AsyncClient:
        # Pooled by host name, not by the address dialled: two names on one address must never share a TLS
        # connection, whose certificate was checked for one of them only.
        tls = self.host_tls(host)
        key = (tls, host.host, host.port)
        client = self._clients.get(key)
        if client is None:
            verify = python_context(tls) if host.scheme == "https" else True
            client = httpx.AsyncClient(verify=verify, follow_redirects=False, trust_env=False)
            self._clients[key] = client
        return client

    def forget_clients(self) -> None:
        """Rules or trust settings changed: new requests get new clients; the old ones close at shutdown."""
        self._retired += self._clients.values()
        self._clients = {}

    async def send(
        self,
        host: Host,
        method: str,
        target: str,
        headers: list[tuple[bytes, bytes]],
        max_body: int = MAX_SMALL_BODY,
        body: bytes | None = None,
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
        try:
            client = self._client(host)
        except HostTLSError as e:
            raise HostFailed(f"TLS settings: {e}") from None
        try:
            request = client.build_request(
                method, url, headers=request_headers, content=body, timeout=timeout, extensions=extensions
            )
        except httpx.InvalidURL as e:
            # A request target longer than httpx builds (64 kB): a 70 kB request line is no internal error.
            raise HostFailed(f"the request could not be sent: {e}") from None
        _drop_invented_headers(request, headers)
        try:
            response = await client.send(request, stream=True)
            try:
                answer = bytearray()
                async for chunk in response.aiter_raw():
                    answer += chunk
                    if len(answer) > max_body:
                        raise HostFailed(f"answer larger than {max_body} bytes")
            finally:
                await response.aclose()
        except httpx.TimeoutException as e:
            raise HostFailed(f"timed out ({type(e).__name__})", unreachable=True) from None
        except httpx.ConnectError as e:
            raise HostFailed(_describe(e), unreachable=True) from None
        except httpx.LocalProtocolError:
            # Its text quotes the offending header line, which may hold a credential.
            raise HostFailed("the request could not be encoded (a header value HTTP does not allow)") from None
        except httpx.HTTPError as e:
            raise HostFailed(_describe(e)) from None
        reason = response.extensions.get("reason_phrase", b"")
        return HostResponse(response.status_code, reason, tuple(response.headers.raw), bytes(answer))

    async def aclose(self) -> None:
        self.forget_clients()
        clients, self._retired = self._retired, []
        await asyncio.gather(*(c.aclose() for c in clients))


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
