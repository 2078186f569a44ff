"""wire.HostConnections against a host that answers scripted bytes: every legal framing read whole, kept-alive
connections reused (and sent again once when the host had closed them), and anything else a WireError, never a hang
or another exception."""

import asyncio
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import h11
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ocigate import wire
from ocigate.wire import MAX_HEADER_BYTES, MAX_IDLE, MAX_TARGET, HostConnections, Request, WireError
from tests.support.tls import client_ssl_context, issue_server_cert, make_ca

BODY = b'{"schemaVersion":2}'


@dataclass
class Host:
    """A host on loopback: each connection gets `answer(number, request bytes)` back for each request it reads."""

    answer: Callable[[int, bytes], bytes | None]  # None: close without answering
    keep_alive: bool = True  # False: close after each answer
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    port: int = 0
    open: set[asyncio.StreamWriter] = field(default_factory=set)


async def _serve(host: Host, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    host.connections += 1
    number = host.connections
    host.open.add(writer)
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            lines = head.lower().split(b"\r\n")
            length = next((int(line.split(b":")[1]) for line in lines if line.startswith(b"content-length")), 0)
            request = head + (await reader.readexactly(length) if length else b"")
            host.requests.append(request)
            answer = host.answer(number, request)
            if answer is None:
                return
            writer.write(answer)
            await writer.drain()
            lowered = answer.lower()
            if not host.keep_alive or b"connection: close" in lowered or lowered.startswith(b"http/1.0"):
                return
            if b"content-length" not in lowered and b"chunked" not in lowered:
                return
    finally:
        host.open.discard(writer)
        writer.close()


@asynccontextmanager
async def host(
    answer: Callable[[int, bytes], bytes | None], tls: ssl.SSLContext | None = None, *, keep_alive: bool = True
) -> AsyncIterator[Host]:
    served = Host(answer, keep_alive)
    server = await asyncio.start_server(lambda r, w: _serve(served, r, w), "127.0.0.1", 0, ssl=tls)
    served.port = server.sockets[0].getsockname()[1]
    try:
        yield served
    finally:
        # Connections the client keeps alive are closed by the host, as a host's idle timeout would.
        server.close()
        for writer in list(served.open):
            writer.close()
        await server.wait_closed()


def request(method: str = "GET", target: str = "/v2/", body: bytes | None = None, max_body: int = 1 << 20) -> Request:
    length = ((b"Content-Length", str(len(body)).encode()),) if body is not None else ()
    return Request(method, target, ((b"Host", b"mirror.test"), *length), body, max_body)


async def ask(connections: HostConnections, port: int, req: Request | None = None) -> tuple[int, bytes, dict]:
    sent: list[bool] = []
    answer = await connections.request(("127.0.0.1", port), 5.0, req or request(), lambda: sent.append(True))
    assert sent  # once, or again when sent again on a new connection
    return answer.status, answer.body, {name.lower(): value for name, value in answer.headers}


def ok(body: bytes = BODY, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


@pytest.mark.parametrize(
    "answer",
    [
        ok(),
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n" + BODY[:5] + b"\r\n"
        b"%x\r\n" % (len(BODY) - 5) + BODY[5:] + b"\r\n0\r\nTrailer: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + BODY,  # ended by closing
        b"HTTP/1.0 200 OK\r\n\r\n" + BODY,
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" + ok(),
    ],
    ids=["content-length", "chunked-with-trailer", "close-delimited", "http-1.0", "interim-answers"],
)
async def test_every_legal_framing_is_read_whole(answer: bytes) -> None:
    connections = HostConnections(None, "mirror.test")
    async with host(lambda n, r: answer) as h:
        assert (await ask(connections, h.port))[:2] == (200, BODY)
    await connections.aclose()


async def test_a_head_answer_has_no_body_whatever_its_length_says() -> None:
    connections = HostConnections(None, "mirror.test")
    async with host(lambda n, r: b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\nDocker-Content-Digest: d\r\n\r\n") as h:
        status, body, headers = await ask(connections, h.port, request("HEAD"))
        again = await ask(connections, h.port, request("HEAD"))
    assert (status, body, headers[b"content-length"]) == (200, b"", b"1234") and again[0] == 200
    assert h.connections == 1  # kept alive after a bodyless answer
    await connections.aclose()


async def test_header_names_keep_their_case_and_repeated_lines_stay_repeated() -> None:
    connections = HostConnections(None, "mirror.test")
    answer = ok(extra=b"WWW-Authenticate: Basic realm=a\r\nwww-authenticate: Bearer realm=b\r\n")
    async with host(lambda n, r: answer) as h:
        result = await connections.request(("127.0.0.1", h.port), 5.0, request(), lambda: None)
    assert [(k, v) for k, v in result.headers if k.lower() == b"www-authenticate"] == [
        (b"WWW-Authenticate", b"Basic realm=a"),
        (b"www-authenticate", b"Bearer realm=b"),
    ]
    await connections.aclose()


async def test_a_kept_alive_connection_is_reused() -> None:
    connections = HostConnections(None, "mirror.test")
    async with host(lambda n, r: ok()) as h:
        for _ in range(5):
            assert (await ask(connections, h.port))[0] == 200
    assert h.connections == 1 and len(h.requests) == 5
    await connections.aclose()


async def test_a_get_on_a_connection_the_host_closed_while_idle_is_sent_again_on_a_new_one() -> None:
    connections = HostConnections(None, "mirror.test")
    # The first connection answers once, then closes on the next request without a word.
    async with host(lambda n, r: None if n == 1 and len(h.requests) > 1 else ok()) as h:
        assert (await ask(connections, h.port))[0] == 200
        assert (await ask(connections, h.port))[0] == 200
    assert h.connections == 2 and len(h.requests) == 3
    await connections.aclose()


async def test_a_post_is_never_sent_twice() -> None:
    connections = HostConnections(None, "mirror.test")
    async with host(lambda n, r: None if n == 1 and len(h.requests) > 1 else ok()) as h:
        assert (await ask(connections, h.port, request("POST", "/token", b"a=b")))[0] == 200
        with pytest.raises(WireError, match="closed the connection without answering"):
            await ask(connections, h.port, request("POST", "/token", b"a=b"))
    assert len(h.requests) == 2
    await connections.aclose()


async def test_a_fresh_connection_closed_without_an_answer_is_an_error_not_a_retry() -> None:
    connections = HostConnections(None, "mirror.test")
    async with host(lambda n, r: None) as h:
        with pytest.raises(WireError, match="closed the connection without answering"):
            await ask(connections, h.port)
    assert h.connections == 1
    await connections.aclose()


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + BODY, "without sending complete message body"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabcde\r\n", "incomplete chunked read"),
        (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "illegal status line"),
        (b"HTTP/1.1 200 OK\r\n" + b"X-Big: " + b"a" * 4 * MAX_HEADER_BYTES + b"\r\n\r\n", ""),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", ""),
    ],
    ids=["cut-short", "chunked-cut-short", "not-http", "header-section-too-large", "two-lengths"],
)
async def test_a_broken_answer_is_a_wire_error(answer: bytes, why: str) -> None:
    connections = HostConnections(None, "mirror.test")

    def once_then_close(n: int, r: bytes) -> bytes:
        return answer

    async with host(once_then_close, keep_alive=False) as h:
        with pytest.raises(WireError, match=why):
            await ask(connections, h.port)
    await connections.aclose()


async def test_an_answer_larger_than_allowed_stops_being_read() -> None:
    connections = HostConnections(None, "mirror.test")
    async with host(lambda n, r: ok(b"x" * 10_000)) as h:
        with pytest.raises(WireError, match="answer larger than 1000 bytes"):
            await ask(connections, h.port, request(max_body=1000))
        assert (await ask(connections, h.port))[0] == 200  # on a new connection: the cut one is not kept
    assert h.connections == 2
    await connections.aclose()


async def test_what_is_sent_is_the_request_as_given_with_its_body() -> None:
    connections = HostConnections(None, "mirror.test")
    async with host(lambda n, r: ok()) as h:
        req = Request(
            "POST",
            "/token?service=a%20b",
            ((b"Host", b"mirror.test"), (b"Content-Length", b"7"), (b"X-Case", b"Kept")),
            b"a=b&c=d",
            1 << 20,
        )
        await connections.request(("127.0.0.1", h.port), 5.0, req, lambda: None)
    assert h.requests == [
        b"POST /token?service=a%20b HTTP/1.1\r\nHost: mirror.test\r\nContent-Length: 7\r\nX-Case: Kept\r\n\r\na=b&c=d"
    ]
    await connections.aclose()


@pytest.mark.parametrize(
    "header",
    [(b"Authorization", b"Bearer secret\r\nX-Injected: 1"), (b"Bad Name", b"v"), (b"X", b"trailing space ")],
)
async def test_a_header_http_does_not_allow_is_refused_before_anything_is_sent(header: tuple[bytes, bytes]) -> None:
    connections = HostConnections(None, "mirror.test")
    async with host(lambda n, r: ok()) as h:
        req = Request("GET", "/v2/", ((b"Host", b"mirror.test"), header), None, 1000)
        with pytest.raises(h11.LocalProtocolError):
            await connections.request(("127.0.0.1", h.port), 5.0, req, lambda: None)
    assert h.requests == []
    await connections.aclose()


async def test_a_request_target_longer_than_any_registry_takes_is_not_sent() -> None:
    connections = HostConnections(None, "mirror.test")
    async with host(lambda n, r: ok()) as h:
        with pytest.raises(WireError, match="URL too long"):
            await ask(connections, h.port, request(target="/v2/?" + "a" * MAX_TARGET))
    assert h.connections == 0
    await connections.aclose()


async def test_a_refused_connection_is_a_connecting_error() -> None:
    connections = HostConnections(None, "mirror.test")
    async with host(lambda n, r: ok()) as h:
        port = h.port
    with pytest.raises(WireError, match=r"^connection refused$") as raised:
        await ask(connections, port)
    assert raised.value.connecting


async def test_idle_connections_are_kept_up_to_max_idle() -> None:
    connections = HostConnections(None, "mirror.test")
    async with host(lambda n, r: ok()) as h:
        await asyncio.gather(*(ask(connections, h.port) for _ in range(MAX_IDLE + 4)))
        opened = h.connections
        await asyncio.gather(*(ask(connections, h.port) for _ in range(MAX_IDLE)))
    assert opened == MAX_IDLE + 4  # all at once: one connection each
    assert h.connections == opened  # the next MAX_IDLE reused the kept ones
    await connections.aclose()


async def test_tls_is_verified_against_the_host_name_and_sni_sent(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca")
    issued = issue_server_cert(ca, tmp_path / "server", ["mirror.test"], [])
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(issued.cert_path, issued.key_path)
    names: list[str | None] = []
    server.sni_callback = lambda sock, name, context: names.append(name)  # type: ignore[assignment,misc,func-returns-value]
    trusting = client_ssl_context(ca.cert_path)
    async with host(lambda n, r: ok(), tls=server) as h:
        right = HostConnections(trusting, "mirror.test")
        assert (await ask(right, h.port))[0] == 200
        wrong = HostConnections(trusting, "other.test")
        with pytest.raises(WireError, match="CERTIFICATE_VERIFY_FAILED") as raised:
            await ask(wrong, h.port)
        assert raised.value.connecting
    assert names[0] == "mirror.test"
    await right.aclose()
    await wrong.aclose()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=400), st.sampled_from(["GET", "HEAD"]))
async def test_whatever_bytes_a_host_answers_the_result_is_an_answer_or_a_wire_error(
    answer: bytes, method: str
) -> None:
    connections = HostConnections(None, "mirror.test")
    async with host(lambda n, r: answer, keep_alive=False) as h:
        try:
            async with asyncio.timeout(10):
                await ask(connections, h.port, request(method))
        except WireError:
            pass
    await connections.aclose()


async def test_bytes_after_an_answer_are_never_taken_for_the_next_answer() -> None:
    connections = HostConnections(None, "mirror.test")
    smuggled = ok(b'{"other":"image"}')
    async with host(lambda n, r: ok() + smuggled if n == 1 else ok()) as h:
        assert (await ask(connections, h.port))[1] == BODY
        assert (await ask(connections, h.port))[1] == BODY  # on a new connection, not the bytes left on the first
    assert h.connections == 2
    await connections.aclose()


async def test_an_answer_the_host_sends_unasked_while_the_connection_is_idle_is_not_taken_for_the_next() -> None:
    connections = HostConnections(None, "mirror.test")
    idle = asyncio.Event()

    def answer(number: int, request: bytes) -> bytes:
        if number == 1:
            idle.set()
        return ok()

    async with host(answer) as h:
        assert (await ask(connections, h.port))[1] == BODY
        (writer,) = h.open
        writer.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)  # the bytes reach the client's side of the idle connection
        assert (await ask(connections, h.port))[:2] == (200, BODY)
    assert h.connections == 2
    await connections.aclose()


async def test_a_request_is_sent_again_once_at_most_on_a_new_connection() -> None:
    connections = HostConnections(None, "mirror.test")
    # Two kept-alive connections, both closed by the host at their next request, then one that answers.
    async with host(lambda n, r: ok() if n >= 3 or r.startswith(b"GET /first") else None) as h:
        await asyncio.gather(
            ask(connections, h.port, request(target="/first/1")), ask(connections, h.port, request(target="/first/2"))
        )
        assert h.connections == 2
        assert (await ask(connections, h.port))[0] == 200
    # The stale one taken first, then a new connection (the third), never the other stale one.
    assert h.connections == 3 and len(h.requests) == 4
    await connections.aclose()


async def test_a_connection_idle_longer_than_the_expiry_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    connections = HostConnections(None, "mirror.test")
    async with host(lambda n, r: ok()) as h:
        assert (await ask(connections, h.port))[0] == 200
        monkeypatch.setattr(wire, "IDLE_EXPIRY", 0.0)
        assert (await ask(connections, h.port))[0] == 200
    assert h.connections == 2
    await connections.aclose()


async def test_an_answer_switching_protocols_is_an_error_not_a_spin() -> None:
    connections = HostConnections(None, "mirror.test")
    upgrade = Request("GET", "/v2/", ((b"Host", b"m"), (b"Connection", b"Upgrade"), (b"Upgrade", b"x")), None, 1000)
    async with host(lambda n, r: b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: Upgrade\r\n\r\n") as h:
        with pytest.raises(WireError, match="switches to another protocol"):
            async with asyncio.timeout(10):
                await connections.request(("127.0.0.1", h.port), 5.0, upgrade, lambda: None)
    await connections.aclose()


async def test_an_error_never_quotes_what_the_host_sent() -> None:
    connections = HostConnections(None, "mirror.test")
    echo = b"HTTP/1.1 200 OK\r\nAuthorization : Bearer the-echoed-token\r\nContent-Length: 0\r\n\r\n"
    async with host(lambda n, r: echo, keep_alive=False) as h:
        with pytest.raises(WireError) as raised:
            await ask(connections, h.port)
    assert "the-echoed-token" not in str(raised.value) and "malformed answer" in str(raised.value)
    await connections.aclose()


@asynccontextmanager
async def held_host() -> AsyncIterator[tuple[Host, asyncio.Semaphore]]:
    """A host that answers each request once the test releases an answer."""
    release = asyncio.Semaphore(0)
    served = Host(lambda n, r: ok())

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served.connections += 1
        served.open.add(writer)
        try:
            while True:
                try:
                    served.requests.append(await reader.readuntil(b"\r\n\r\n"))
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                await release.acquire()
                writer.write(ok())
                await writer.drain()
        finally:
            served.open.discard(writer)
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    served.port = server.sockets[0].getsockname()[1]
    try:
        yield served, release
    finally:
        server.close()
        for writer in list(served.open):
            writer.close()
        await server.wait_closed()


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(10):
        while not condition():
            await asyncio.sleep(0.01)


async def test_beyond_max_connections_a_request_waits_for_one_to_come_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "MAX_CONNECTIONS", 2)
    connections = HostConnections(None, "mirror.test")
    async with held_host() as (h, release):
        asks = [asyncio.create_task(ask(connections, h.port)) for _ in range(3)]
        await until(lambda: len(h.requests) == 2)
        await asyncio.sleep(0.1)  # time for a third connection, were one made
        assert h.connections == 2 and not any(task.done() for task in asks)
        release.release()  # one answer: its connection comes back, and the third request is sent on it
        await until(lambda: len(h.requests) == 3)
        release.release()
        release.release()
        assert [(await task)[0] for task in asks] == [200, 200, 200]
    assert h.connections == 2
    await connections.aclose()


async def test_a_request_cancelled_while_waiting_for_a_connection_takes_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "MAX_CONNECTIONS", 1)
    connections = HostConnections(None, "mirror.test")
    async with held_host() as (h, release):
        first = asyncio.create_task(ask(connections, h.port))
        await until(lambda: len(h.requests) == 1)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await ask(connections, h.port)
        release.release()
        assert (await first)[0] == 200
        release.release()
        assert (await ask(connections, h.port))[0] == 200  # the one connection, not held by the cancelled request
    assert h.connections == 1 and len(h.requests) == 2
    await connections.aclose()


async def test_a_connection_that_could_not_be_made_frees_its_place(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "MAX_CONNECTIONS", 1)
    connections = HostConnections(None, "mirror.test")
    async with host(lambda n, r: ok()) as h:
        port = h.port
    for _ in range(2):
        with pytest.raises(WireError, match="connection refused"):
            async with asyncio.timeout(10):
                await ask(connections, port)
    async with host(lambda n, r: ok()) as h:
        assert (await ask(connections, h.port))[0] == 200


async def test_at_max_connections_an_idle_one_to_another_address_gives_way(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "MAX_CONNECTIONS", 1)
    connections = HostConnections(None, "mirror.test")
    async with host(lambda n, r: ok()) as a, host(lambda n, r: ok()) as b:
        assert (await ask(connections, a.port))[0] == 200
        async with asyncio.timeout(10):
            assert (await ask(connections, b.port))[0] == 200
        assert (await ask(connections, a.port))[0] == 200
    assert (a.connections, b.connections) == (2, 1)
    await connections.aclose()


async def test_at_max_connections_a_request_sent_again_after_a_stale_connection_gets_a_new_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(wire, "MAX_CONNECTIONS", 1)
    connections = HostConnections(None, "mirror.test")
    # The first connection answers once, then closes on the next request without a word.
    async with host(lambda n, r: None if n == 1 and len(h.requests) > 1 else ok()) as h:
        assert (await ask(connections, h.port))[0] == 200
        async with asyncio.timeout(10):
            assert (await ask(connections, h.port))[0] == 200
    assert h.connections == 2
    await connections.aclose()


async def test_a_request_waiting_for_a_place_is_told_when_it_has_a_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "MAX_CONNECTIONS", 1)
    connections = HostConnections(None, "mirror.test")
    told: list[str] = []
    async with held_host() as (h, release):
        first = asyncio.create_task(ask(connections, h.port))
        await until(lambda: len(h.requests) == 1)
        second = asyncio.create_task(
            connections.request(
                ("127.0.0.1", h.port), 5.0, request(), lambda: told.append("sent"), lambda: told.append("connected")
            )
        )
        await asyncio.sleep(0.1)
        assert told == []  # waiting for the one place
        release.release()
        await first
        await until(lambda: told == ["connected", "sent"])
        release.release()
        assert (await second).status == 200
    await connections.aclose()
