"""ocigate's own HTTP client (Upstream) against small local hosts."""

import pytest

from ocigate.rules import Host
from ocigate.upstream import HostFailed, Upstream
from tests.support.http_host import http_host

ANSWER = b'{"schemaVersion":2}'


def local(port: int) -> Host:
    return Host(scheme="http", host="127.0.0.1", port=port, path="", capabilities=frozenset())


async def test_a_host_dripping_its_answer_fails_as_unreachable_once_the_read_timeout_is_spent() -> None:
    upstream = Upstream()
    upstream.read_timeout = 1
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
    upstream = Upstream()
    upstream.read_timeout = 1
    with http_host(lambda h: (200, ANSWER), drip=5) as (port, _):
        try:
            with pytest.raises(HostFailed, match=r"^answer not complete within 1 s$"):
                await upstream.send(local(port), "GET", "/v2/", [])
        finally:
            await upstream.aclose()


async def test_an_answer_that_comes_in_time_is_read_whole_even_in_pieces() -> None:
    upstream = Upstream()
    upstream.read_timeout = 10
    with http_host(lambda h: (200, ANSWER), drip=0.001) as (port, _):
        try:
            response = await upstream.send(local(port), "GET", "/v2/", [])
        finally:
            await upstream.aclose()
    assert response.status == 200 and response.body == ANSWER
