"""HTTP/1.1 on the wire for ocigate's own requests: connections to one host, dialled, kept alive and reused.

httpx cost about a millisecond of the event loop's time for each request ocigate sent (bench/pull.py: a manifest by
tag cost 1.6 ms more through ocigate than through mitmproxy alone, most of it there); h11 on asyncio's streams costs a
fifth of that. h11 frames the messages (Content-Length, chunked, a body ended by closing, HEAD, 1xx) and refuses
what HTTP does not allow, as it did under httpx; this module dials, keeps the idle connections, and tells the caller
when its request is sent, so that the caller's deadline for the answer starts there.
"""

import asyncio
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import h11

# The longest header section of an answer read (httpcore's limit, which ocigate had under httpx).
MAX_HEADER_BYTES = 100 * 1024
# The longest request target sent (httpx's limit): a longer one is no request for a registry.
MAX_TARGET = 64 * 1024
# Idle connections kept for one address of one host, and for how long (httpx's keep-alive expiry, which ocigate had):
# a host or a load balancer before it closes idle connections after some seconds, and a request sent as it does so
# gets no answer.
MAX_IDLE = 8
IDLE_EXPIRY = 5.0
# Connections open at once to one host, idle and in use (httpx's limit per client, which ocigate had): a crowd of
# clients asking at once must not have ocigate open as many connections to a mirror as there are requests. A request
# beyond it waits for a connection to come back or close. It bounds ocigate's own requests (manifests, probes, tokens)
# of one process and one host client: blobs go over mitmproxy's connections, each worker has its own, and a client
# replaced (rules reloaded) while requests hold it keeps its connections until they are done.
MAX_CONNECTIONS = 100
_READ_SIZE = 64 * 1024
# Requests sent once more on a new connection when a kept-alive one turns out closed before any answer, as Go's
# http.Transport does: they change nothing on the host.
_SENT_AGAIN = frozenset({"GET", "HEAD"})

Address = tuple[str, int]


class WireError(Exception):
    """A request that got no complete answer. `connecting`: the connection could not be made (refused, unreachable,
    TLS handshake, or not in time). The message never quotes what the host sent: a host echoing the request would
    have it quote ocigate's credential."""

    def __init__(self, message: str, *, connecting: bool = False) -> None:
        super().__init__(message)
        self.connecting = connecting


@dataclass(frozen=True)
class Answer:
    status: int
    reason: bytes
    headers: tuple[tuple[bytes, bytes], ...]  # as the host sent them, names in its case
    body: bytes  # as sent, chunked framing removed, any content coding kept


@dataclass(frozen=True)
class Request:
    method: str
    target: str
    headers: tuple[tuple[bytes, bytes], ...]  # Host first
    body: bytes | None
    max_body: int


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.protocol = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEADER_BYTES)
        self.idle_since = 0.0

    def idle(self, now: float) -> bool:
        """Fit for another request: between requests, not expired, and nothing from the host since its last answer
        (bytes after that answer, an unasked-for 408, its close), which the next request would take for its own."""
        return (
            self.protocol.our_state is h11.IDLE
            and now - self.idle_since < IDLE_EXPIRY
            and not self.protocol.trailing_data[0]
            and not self.writer.is_closing()
            and not self.reader.at_eof()
            # asyncio reads whatever arrives into the reader's buffer: it has no public way to ask for its length.
            and not self.reader._buffer  # type: ignore[attr-defined]
        )

    def close(self) -> None:
        self.writer.close()

    async def exchange(self, request: Request, sent: Callable[[], None]) -> Answer:
        """The whole answer to `request`; `sent` is called once it is written. _Unanswered when the connection
        failed before a byte of answer came (a kept-alive connection the host had closed), WireError when the
        answer was broken, too large or no HTTP."""
        protocol = self.protocol
        data = protocol.send(h11.Request(method=request.method, target=request.target, headers=list(request.headers)))
        if request.body:
            data = (data or b"") + (protocol.send(h11.Data(data=request.body)) or b"")
        data = (data or b"") + (protocol.send(h11.EndOfMessage()) or b"")
        heard = False
        try:
            self.writer.write(data)
            await self.writer.drain()
            sent()
            head: h11.Response | None = None
            body = bytearray()
            while True:
                event = protocol.next_event()
                if event is h11.NEED_DATA:
                    received = await self.reader.read(_READ_SIZE)
                    heard = heard or bool(received)
                    protocol.receive_data(received)
                elif isinstance(event, h11.Response):
                    head = event
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > request.max_body:
                        raise WireError(f"answer larger than {request.max_body} bytes")
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif not isinstance(event, h11.InformationalResponse):  # 100 Continue, 103: the answer is to come
                    # h11.PAUSED: the host switched protocols (101), which no registry request asks for.
                    raise WireError("an answer that switches to another protocol")
        except (h11.RemoteProtocolError, OSError) as e:
            if not heard:
                closed = isinstance(e, h11.RemoteProtocolError)  # h11 read the end of the connection
                raise _Unanswered("the host closed the connection" if closed else _text(e)) from None
            raise WireError(_text(e) if isinstance(e, OSError) else _protocol_text(e)) from None
        assert head is not None  # h11 gives a Response before any EndOfMessage
        if protocol.our_state is h11.DONE and protocol.their_state is h11.DONE:
            protocol.start_next_cycle()
        headers = tuple((bytes(name), bytes(value)) for name, value in head.headers.raw_items())
        return Answer(head.status_code, bytes(head.reason), headers, bytes(body))


class _Unanswered(Exception):
    pass


class HostConnections:
    """The connections to one host (one name, port and TLS settings), idle ones kept per address dialled, at most
    MAX_CONNECTIONS of them open at once."""

    def __init__(self, tls: ssl.SSLContext | None, server_name: str) -> None:
        self._tls = tls
        self._server_name = server_name
        self._idle: dict[Address, list[_Connection]] = {}
        self._open: set[_Connection] = set()  # idle and in use
        self._dialling = 0  # connections being made: counted against MAX_CONNECTIONS already
        # Requests waiting for a connection to come back or close, first come first served. Woken from code that
        # cannot await (a connection closed, kept idle), which asyncio.Condition's notify cannot be.
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.is_closed = False

    async def request(
        self,
        address: Address,
        connect_timeout: float,
        request: Request,
        sent: Callable[[], None],
        connected: Callable[[], None] = lambda: None,
    ) -> Answer:
        """Sends `request` on an idle connection to `address` or a new one, and reads its whole answer. `connected` is
        called once it has a connection (after any wait for a place under MAX_CONNECTIONS), `sent` once the request is
        written. WireError (and h11's LocalProtocolError for a request HTTP does not
        allow) when no complete answer came; OSError and ssl.SSLError from the connection's own failures."""
        if len(request.target) > MAX_TARGET:
            raise WireError("the request could not be sent: URL too long")
        connection, reused = await self._connection(address, connect_timeout, reuse=True)
        connected()
        while True:
            try:
                answer = await connection.exchange(request, sent)
            except _Unanswered as e:
                self._close(connection)
                if reused and request.method in _SENT_AGAIN:
                    # The host closed it while it was idle: once more, on a new connection.
                    connection, reused = await self._connection(address, connect_timeout, reuse=False)
                    continue
                raise WireError(f"{e} without answering") from None
            except BaseException:
                self._close(connection)
                raise
            self._keep(address, connection)
            return answer

    async def aclose(self) -> None:
        self.is_closed = True
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                self._close(connection)

    async def _connection(self, address: Address, connect_timeout: float, *, reuse: bool) -> tuple[_Connection, bool]:
        """An idle connection to `address` (when `reuse`) or a new one, and whether it was idle; waits while
        MAX_CONNECTIONS are open and in use. Cancelled while waiting, it has taken nothing."""
        while True:
            connection = self._take_idle(address) if reuse else None
            if connection is not None:
                return connection, True
            if len(self._open) + self._dialling >= MAX_CONNECTIONS:
                # One idle at another address (or at this one when a new connection is asked for) gives way.
                idle = next((connections[0] for connections in self._idle.values() if connections), None)
                if idle is None:
                    await self._wait()
                    continue
                self._close(idle)
            self._dialling += 1
            try:
                connection = await self._dial(address, connect_timeout)
            except BaseException:
                self._dialling -= 1
                self._wake()  # its place is free again
                raise
            self._dialling -= 1
            self._open.add(connection)
            return connection, False

    async def _wait(self) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._wake()  # woken, then cancelled before using it: the next one waiting gets its turn
            raise
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _wake(self) -> None:
        """Wakes the first request waiting, if any: a connection came back or a place became free."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _close(self, connection: _Connection) -> None:
        connection.close()
        if connection in self._open:
            self._open.discard(connection)
            self._wake()
        for connections in self._idle.values():
            if connection in connections:
                connections.remove(connection)

    def _take_idle(self, address: Address) -> _Connection | None:
        self._sweep()
        connections = self._idle.get(address)
        return connections.pop() if connections else None

    def _keep(self, address: Address, connection: _Connection) -> None:
        connection.idle_since = time.monotonic()
        if self.is_closed or not connection.idle(connection.idle_since):
            self._close(connection)
            return
        connections = self._idle.setdefault(address, [])
        connections.append(connection)
        while len(connections) > MAX_IDLE:
            self._close(connections[0])
        self._sweep()
        self._wake()

    def _sweep(self) -> None:
        """Closes the idle connections no longer fit for a request (expired, closed by the host, sent to since), at
        every address: none lingers half-closed, and addresses no longer dialled are forgotten."""
        now = time.monotonic()
        for address, connections in list(self._idle.items()):
            for connection in [connection for connection in connections if not connection.idle(now)]:
                self._close(connection)
            if not connections:
                del self._idle[address]

    async def _dial(self, address: Address, timeout: float) -> _Connection:
        host, port = address
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(
                    host,
                    port,
                    ssl=self._tls,
                    server_hostname=self._server_name if self._tls is not None else None,
                    ssl_handshake_timeout=timeout if self._tls is not None else None,
                )
        except TimeoutError:
            raise WireError("timed out (ConnectTimeout)", connecting=True) from None
        except (OSError, ssl.SSLError) as e:
            raise WireError(_text(e), connecting=True) from None
        return _Connection(reader, writer)


def _protocol_text(error: h11.RemoteProtocolError) -> str:
    """h11's reason without the bytes it quotes ("illegal header line: bytearray(b'...')"): what the host sent may be
    an echo of ocigate's own request."""
    text = str(error)
    if "b'" in text or 'b"' in text:
        return f"a malformed answer ({text.partition(':')[0]})"
    return text


def _text(error: BaseException) -> str:
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"[SSL: CERTIFICATE_VERIFY_FAILED] {error.verify_message}"
    return str(error) or type(error).__name__
