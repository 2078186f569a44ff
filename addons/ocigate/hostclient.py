"""ocigate's own requests to hosts: kept-alive connections per host (wire.py), dialled through the destination
policy, each answer read whole within a deadline."""

import asyncio
from collections import Counter, OrderedDict
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import h11

from .destinations import DestinationError, Destinations
from .headers import Lines
from .hoststoml import Host
from .hosttls import HostTLS, HostTLSError, python_context
from .verify import MAX_MANIFEST_SIZE
from .wire import Answer as HostResponse  # a host's whole answer, as ocigate read it
from .wire import HostConnections, Request, WireError

# The most ocigate reads of one answer (a manifest, a tag list, a catalog page): a manifest above MAX_MANIFEST_SIZE is
# refused by registries, and anything much larger is no answer ocigate reads whole.
MAX_SMALL_BODY = 4 * MAX_MANIFEST_SIZE
# Clients (each with its idle connections) kept for hosts and token realms. Rules name far fewer hosts; a mirror
# naming a new realm in every challenge could name any number.
MAX_CLIENTS = 256


class HostFailed(Exception):
    """The host could not be asked: refused, unreachable, timed out, TLS failure, or an oversized answer.
    The message is short and names no secret, for the per-request log line and the client's error. `unreachable`:
    the host could not be connected to or did not answer in time (not a policy, TLS or content problem)."""

    def __init__(self, message: str, *, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable


class ClientPool:
    """A client (its connections, wire.HostConnections) per host name, port and TLS settings, for at most `size` of
    them: the least recently used beyond that is retired, like every client when the pool itself is (see retire),
    and a retired client is closed once no request holds it (closing it under a request would break that request)."""

    def __init__(self, size: int = MAX_CLIENTS) -> None:
        self._size = size
        self._clients: OrderedDict[tuple[HostTLS, str, str, int], HostConnections] = OrderedDict()  # oldest use first
        self._holders: Counter[HostConnections] = Counter()  # requests under way with each client
        self._retired: set[HostConnections] = set()  # not handed out any more; closed once idle
        self._closing: set[asyncio.Task[None]] = set()
        self._replaced = False  # see retire

    def hold(self, host: Host, tls: HostTLS) -> HostConnections:
        """The client for a request to `host`, held until release(); HostTLSError when its TLS files cannot be
        loaded."""
        # By host name, not by the address dialled: two names on one address must never share a TLS connection,
        # whose certificate was checked for one of them only. And by scheme: http and https to one port (a realm or
        # Location a host chose) never share a client, whose connections are either TLS or not.
        key = (tls, host.scheme, host.host, host.port)
        client = self._clients.pop(key, None)
        if client is None:
            client = HostConnections(python_context(tls) if host.scheme == "https" else None, host.host)
        self._holders[client] += 1
        if self._replaced:
            self._retired.add(client)
        else:
            self._clients[key] = client
        while len(self._clients) > self._size:
            self._retired.add(self._clients.popitem(last=False)[1])
        self._close_idle()
        return client

    def release(self, client: HostConnections) -> None:
        self._holders[client] -= 1
        if not self._holders[client]:
            del self._holders[client]
        self._close_idle()

    def retire_all(self) -> None:
        self._retired.update(self._clients.values())
        self._clients.clear()
        self._close_idle()

    def retire(self) -> None:
        """Another pool took this one's place: every client is retired, and so is any a request already under way
        still asks for (its next host, its token), which would otherwise stay open with nobody left to close it."""
        self._replaced = True
        self.retire_all()

    def _close_idle(self) -> None:
        idle = [client for client in self._retired if client not in self._holders]
        if not idle:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # retired outside the event loop: closed by the next request, or at shutdown
        for client in idle:
            self._retired.discard(client)
            task = loop.create_task(client.aclose())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        self.retire_all()
        clients, self._retired = self._retired, set()
        await asyncio.gather(*(client.aclose() for client in clients), *self._closing)

    def __len__(self) -> int:
        """Clients handed out to new requests (retired ones not counted): never more than `size`."""
        return len(self._clients)


class HostClient:
    """Sends ocigate's own requests: dialled as `destinations` say, within `connect_timeout` (unless the host has a
    dial_timeout) and `read_timeout`; trusting `roots` instead of the default roots when given, and nothing at all
    when `insecure`. `hosts_by_address`: the one hosts.toml entry for an address that every rule agrees on, the TLS
    settings for connections to it that no plan chose (a token realm on a mirror, a ruled host's passthrough)."""

    def __init__(
        self,
        destinations: Destinations | None = None,
        *,
        connect_timeout: float = 30.0,
        read_timeout: float = 60.0,
        roots: Path | None = None,
        insecure: bool = False,
        hosts_by_address: Mapping[tuple[str, int], Host] | None = None,
    ) -> None:
        self.destinations = Destinations() if destinations is None else destinations
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.roots = roots
        self.insecure = insecure
        self.hosts_by_address: Mapping[tuple[str, int], Host] = dict(hosts_by_address or {})
        self.clients = ClientPool()

    def host_tls(self, host: Host) -> HostTLS:
        return HostTLS.of(host, roots=self.roots, insecure=self.insecure)

    def realm_host(self, scheme: str, host: str, port: int) -> Host:
        """The host to send a token request to: with the TLS settings hosts.toml gives its address, if any."""
        known = self.hosts_by_address.get((host, port))
        if known is not None:
            return replace(known, scheme=scheme, path="", headers=())
        return Host(scheme=scheme, host=host, port=port, path="", capabilities=frozenset())

    def retire(self) -> None:
        """Another host client took this one's place: its requests under way finish, and every client closes once no
        request holds it."""
        self.clients.retire()

    async def send(
        self,
        host: Host,
        method: str,
        target: str,
        headers: Lines,
        max_body: int = MAX_SMALL_BODY,
        body: bytes | None = None,
    ) -> HostResponse:
        """Sends method target (path and query) to host and reads the whole (small) answer: all of it within
        read_timeout of the request being sent, so that a host dripping its answer cannot hold a request (or every
        request waiting for a token) longer than one that sends nothing."""
        try:
            address, port = await self.destinations.resolve(host.host, host.port)
        except DestinationError as e:
            raise HostFailed(str(e)) from None
        loop = asyncio.get_running_loop()
        deadline = asyncio.timeout(None)

        answer_by: list[float] = []
        waiting = [True]  # for a place among the host's MAX_CONNECTIONS: ocigate's own limit, not the host's fault

        def connected() -> None:
            waiting[0] = False
            # Writing the request counts against the answer's time too (connecting has its own timeout): a host that
            # reads nothing holds a request no longer than one that answers nothing.
            deadline.reschedule(loop.time() + connect_timeout + self.read_timeout)

        def sent() -> None:
            # The answer's time starts once the request is sent (connecting has its own timeout); a request sent
            # again on a new connection gets no more time.
            if not answer_by:
                answer_by.append(loop.time() + self.read_timeout)
            deadline.reschedule(answer_by[0])

        lines = ((b"Host", host.netloc.encode()), *_framed(method, headers, body))
        request = Request(method, target, lines, body, max_body)
        connect_timeout = host.dial_timeout or self.connect_timeout
        try:
            client = self.clients.hold(host, self.host_tls(host))
        except HostTLSError as e:
            raise HostFailed(f"TLS settings: {e}") from None
        try:
            async with deadline:
                # Waiting for a place (while MAX_CONNECTIONS requests to the host are under way) has the same bound.
                deadline.reschedule(loop.time() + connect_timeout + self.read_timeout)
                answer = await client.request((address, port), connect_timeout, request, sent, connected)
        except TimeoutError:
            if waiting[0]:
                # The host is busy with ocigate's other requests, not down: no cool-down for it.
                raise HostFailed(f"no connection to it free within {connect_timeout + self.read_timeout:g} s") from None
            raise HostFailed(f"answer not complete within {self.read_timeout:g} s", unreachable=True) from None
        except WireError as e:
            raise HostFailed(str(e), unreachable=e.connecting) from None
        except (h11.LocalProtocolError, UnicodeEncodeError):
            # Its text quotes the offending header line, which may hold a credential.
            raise HostFailed("the request could not be encoded (a header value HTTP does not allow)") from None
        finally:
            self.clients.release(client)
        return answer

    async def aclose(self) -> None:
        await self.clients.aclose()


def _framed(method: str, headers: Lines, body: bytes | None) -> Lines:
    """The client's header lines as they go to the host, with what HTTP needs added: the body's length, and an
    Accept-Encoding of identity when the client named none (without one, a host may compress what the client did not
    ask to be compressed)."""
    names = {name.lower() for name, _ in headers}
    added: list[tuple[bytes, bytes]] = []
    if b"accept-encoding" not in names:
        added.append((b"Accept-Encoding", b"identity"))
    if b"content-length" not in names and b"transfer-encoding" not in names and (body or method in _WITH_BODY):
        added.append((b"Content-Length", str(len(body or b"")).encode()))
    return (*headers, *added)


# Methods whose request says how long its (even empty) body is, as httpx did.
_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})
