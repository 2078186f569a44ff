"""ocigate's own HTTP client (HostClient) against small local hosts."""

import asyncio
import threading

import pytest

from ocigate import wire
from ocigate.hostclient import MAX_CLIENTS, ClientPool, HostClient, HostFailed
from ocigate.hoststoml import Host
from ocigate.hosttls import HostTLS, forget_contexts, python_context
from tests.support.http_host import http_host

ANSWER = b'{"schemaVersion":2}'


def local(port: int) -> Host:
    return Host(scheme="http", host="127.0.0.1", port=port, path="", capabilities=frozenset())


async def test_a_host_dripping_its_answer_fails_as_unreachable_once_the_read_timeout_is_spent() -> None:
    upstream = HostClient(read_timeout=1)
    # Never a second without a byte, yet the whole answer would take over ten seconds.
    with http_host(lambda h: (200, ANSWER), drip=0.05) as (port, seen):
        try:
            with pytest.raises(HostFailed) as raised:
                await upstream.send(local(port), "GET", "/v2/team/app/manifests/v1", [])
        finally:
            await upstream.aclose()
    assert str(raised.value) == "answer not complete within 1 s"
    assert raised.value.unreachable
    assert len(seen) == 1


async def test_a_silent_host_fails_the_same_way() -> None:
    upstream = HostClient(read_timeout=1)
    with http_host(lambda h: (200, ANSWER), drip=5) as (port, _):
        try:
            with pytest.raises(HostFailed, match=r"^answer not complete within 1 s$"):
                await upstream.send(local(port), "GET", "/v2/", [])
        finally:
            await upstream.aclose()


async def test_an_answer_that_comes_in_time_is_read_whole_even_in_pieces() -> None:
    upstream = HostClient(read_timeout=10)
    with http_host(lambda h: (200, ANSWER), drip=0.001) as (port, _):
        try:
            response = await upstream.send(local(port), "GET", "/v2/", [])
        finally:
            await upstream.aclose()
    assert response.status == 200 and response.body == ANSWER


def named(name: str) -> Host:
    return Host(scheme="https", host=name, port=443, path="", capabilities=frozenset())


async def test_a_new_realm_host_in_every_challenge_keeps_max_clients_and_closes_the_rest() -> None:
    upstream = HostClient()
    forget_contexts()
    used = []
    for number in range(5000):
        host = upstream.realm_host("https", f"realm{number}.test", 443)
        client = upstream.clients.hold(host, upstream.host_tls(host))
        upstream.clients.release(client)
        used.append(client)
    await asyncio.sleep(0)  # the closing tasks start
    try:
        assert len(upstream.clients) == MAX_CLIENTS
        assert [client.is_closed for client in used] == [True] * (5000 - MAX_CLIENTS) + [False] * MAX_CLIENTS
        # Realms without a hosts.toml entry share one TLS context: nothing per realm is kept there.
        assert python_context.cache_info().currsize == 1
    finally:
        await upstream.aclose()
    assert all(client.is_closed for client in used)


async def test_a_client_pushed_out_or_retired_while_a_request_holds_it_closes_when_that_request_is_done() -> None:
    pool = ClientPool(2)
    busy = pool.hold(named("busy.test"), HostTLS())
    for number in range(3):
        pool.release(pool.hold(named(f"other{number}.test"), HostTLS()))
    await asyncio.sleep(0)
    assert len(pool) == 2 and not busy.is_closed
    pool.release(busy)
    await asyncio.sleep(0)
    assert busy.is_closed

    again = pool.hold(named("again.test"), HostTLS())
    idle = pool.hold(named("idle.test"), HostTLS())
    pool.release(idle)
    pool.retire_all()
    await asyncio.sleep(0)
    assert idle.is_closed and not again.is_closed and len(pool) == 0
    pool.release(again)
    await asyncio.sleep(0)
    assert again.is_closed


async def test_a_request_under_way_finishes_when_its_client_is_pushed_out_of_the_pool() -> None:
    upstream = HostClient()
    upstream.clients = ClientPool(1)
    go_on = threading.Event()

    def slow(handler) -> tuple[int, bytes]:
        go_on.wait(10)
        return 200, ANSWER

    with http_host(slow) as (slow_port, slow_seen), http_host(lambda h: (200, b"{}")) as (quick_port, _):
        try:
            under_way = asyncio.ensure_future(upstream.send(local(slow_port), "GET", "/v2/", []))
            for _ in range(500):
                if slow_seen:
                    break
                await asyncio.sleep(0.01)
            # Another host takes the pool's only place while the first request waits for its answer.
            assert (await upstream.send(local(quick_port), "GET", "/v2/", [])).body == b"{}"
            go_on.set()
            answer = await under_way
        finally:
            go_on.set()
            await upstream.aclose()
    assert answer.status == 200 and answer.body == ANSWER


async def test_a_retired_pool_closes_every_client_once_idle_even_those_handed_out_after_it_retired() -> None:
    pool = ClientPool()
    busy = pool.hold(named("busy.test"), HostTLS())
    idle = pool.hold(named("idle.test"), HostTLS())
    pool.release(idle)
    pool.retire()
    # A request under way when its pool was replaced goes on to its next host.
    late = pool.hold(named("next.test"), HostTLS())
    await asyncio.sleep(0)
    assert idle.is_closed and not busy.is_closed and not late.is_closed and len(pool) == 0
    pool.release(busy)
    pool.release(late)
    await asyncio.sleep(0)
    assert busy.is_closed and late.is_closed


async def test_http_and_https_to_one_port_never_share_a_client() -> None:
    pool = ClientPool()
    plain = Host(scheme="http", host="auth.test", port=443, path="", capabilities=frozenset())
    secure = Host(scheme="https", host="auth.test", port=443, path="", capabilities=frozenset())
    first = pool.hold(plain, HostTLS())
    second = pool.hold(secure, HostTLS())
    assert first is not second
    assert first._tls is None and second._tls is not None
    pool.release(first)
    pool.release(second)
    await pool.aclose()


async def test_a_request_that_waited_for_a_place_too_long_does_not_make_the_host_unreachable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(wire, "MAX_CONNECTIONS", 0)  # every place taken, as by other requests under way
    upstream = HostClient(read_timeout=1, connect_timeout=0.5)
    with http_host(lambda h: (200, ANSWER)) as (port, seen):
        try:
            with pytest.raises(HostFailed) as raised:
                await upstream.send(local(port), "GET", "/v2/", [])
        finally:
            await upstream.aclose()
    assert str(raised.value) == "no connection to it free within 1.5 s"
    assert not raised.value.unreachable and seen == []
