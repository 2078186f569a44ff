"""The dialling policy: host map, allowed networks, and names that must never reach a resolver."""

import asyncio
import socket

import pytest

from ocigate.destinations import Addresses, DestinationError, Destinations, reaches, unspecified


async def test_mapped_name_dials_the_mapped_address_and_port() -> None:
    policy = Destinations.from_options(["mirror.test:5000=127.0.0.1:4321"], ["127.0.0.0/8"], dns=False)
    assert await policy.resolve("mirror.test", 5000) == ("127.0.0.1", 4321)


async def test_name_without_port_maps_every_port_and_keeps_it() -> None:
    policy = Destinations.from_options(["mirror.test=127.0.0.2"], [], dns=False)
    assert await policy.resolve("MIRROR.test", 8443) == ("127.0.0.2", 8443)


async def test_a_fully_qualified_name_is_the_mapped_name() -> None:
    policy = Destinations.from_options(["mirror.test.=127.0.0.2", "other.test:5000=127.0.0.3"], [], dns=False)
    assert await policy.resolve("mirror.test", 443) == ("127.0.0.2", 443)
    assert await policy.resolve("other.test.", 5000) == ("127.0.0.3", 5000)


async def test_specific_port_entry_wins_over_the_name_entry() -> None:
    policy = Destinations.from_options(["m.test=127.0.0.2", "m.test:443=127.0.0.3:9"], [], dns=False)
    assert await policy.resolve("m.test", 443) == ("127.0.0.3", 9)
    assert await policy.resolve("m.test", 80) == ("127.0.0.2", 80)


async def test_unmapped_name_is_refused_without_resolving_when_dns_is_off() -> None:
    policy = Destinations.from_options([], ["127.0.0.0/8"], dns=False)
    with pytest.raises(DestinationError, match=r"upstream\.test:443 is not in the host map"):
        await policy.resolve("upstream.test", 443)


async def test_address_outside_the_allowed_networks_is_refused() -> None:
    policy = Destinations.from_options(["m.test=10.1.2.3"], ["127.0.0.0/8"], dns=False)
    with pytest.raises(DestinationError, match=r"10\.1\.2\.3.*outside the allowed destinations"):
        await policy.resolve("m.test", 443)
    with pytest.raises(DestinationError, match="outside"):
        await policy.resolve("192.0.2.1", 443)


async def test_ipv6_literals_and_map_targets() -> None:
    policy = Destinations.from_options(["m.test=[::1]:5000"], ["::1/128"], dns=False)
    assert await policy.resolve("m.test", 443) == ("::1", 5000)
    assert await policy.resolve("[::1]", 80) == ("::1", 80)


async def test_no_limits_passes_names_through_for_the_dialler_to_resolve() -> None:
    assert await Destinations().resolve("registry.example", 443) == ("registry.example", 443)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("mirror.test", "expected NAME"),
        ("m.test=127.0.0.1:99999", "bad port"),
        ("=127.0.0.1", "is invalid"),
    ],
)
def test_bad_host_map_entries_are_named(entry: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as error:
        Destinations.from_options([entry], [], dns=True)
    assert repr(entry.partition("=")[0] if "port" not in message else entry.partition("=")[2]) in str(error.value)


def test_bad_network_is_named() -> None:
    with pytest.raises(ValueError, match=r"ocigate_allow_destinations entry '127\.0\.0\.0/33'"):
        Destinations.from_options([], ["127.0.0.0/33"], dns=True)


async def test_addresses_follow_the_host_map_resolve_names_once_a_while_and_are_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mapped = Destinations.from_options(["mirror.test=127.0.0.2", "alias.test:5000=[::ffff:127.0.0.2]:5000"], [], False)
    addresses = Addresses(kept=2, ttl=60, timer=lambda: now)
    now = 0.0
    assert await addresses.of(mapped, "MIRROR.test.", 5000) == {("127.0.0.2", 5000)}
    assert await addresses.of(mapped, "alias.test", 5000) == {("127.0.0.2", 5000)}
    assert await addresses.of(mapped, "[::1]", 80) == {("::1", 80)}
    assert await addresses.of(mapped, "unmapped.test", 80) == frozenset()  # never resolved with dns off

    asked: list[str] = []

    async def getaddrinfo(host: str, port: int, **kwargs: object) -> list:
        asked.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.7", port))]

    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", getaddrinfo)
    resolving = Destinations(dns=True)
    for _ in range(3):
        assert await addresses.of(resolving, "registry.example", 443) == {("10.0.0.7", 443)}
    assert asked == ["registry.example"]
    now = 61.0
    await addresses.of(resolving, "registry.example", 443)
    assert asked == ["registry.example"] * 2
    await addresses.of(resolving, "a.example", 443)
    await addresses.of(resolving, "b.example", 443)
    assert len(addresses._known) == 2


async def test_a_failed_lookup_is_not_remembered(monkeypatch: pytest.MonkeyPatch) -> None:
    answers: list[Exception | str] = [socket.gaierror(-2, "Name or service not known"), "10.0.0.7"]

    async def getaddrinfo(host: str, port: int, **kwargs: object) -> list:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answer, port))]

    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", getaddrinfo)
    addresses, resolving = Addresses(), Destinations(dns=True)
    with pytest.raises(DestinationError, match=r"mirror\.example:443: cannot resolve mirror\.example: .*not known"):
        await addresses.of(resolving, "mirror.example", 443)
    assert await addresses.of(resolving, "mirror.example", 443) == {("10.0.0.7", 443)}
    assert answers == []


@pytest.mark.parametrize(
    ("address", "port", "reached"),
    [
        ("127.0.0.1", 5000, True),
        ("127.0.0.2", 5000, True),  # every loopback address is the local host
        ("127.255.0.9", 5000, True),
        ("::1", 5000, True),
        ("::ffff:127.0.0.3", 5000, True),
        ("127.0.0.2", 5001, False),  # another service of the local host
        ("::ffff:10.0.0.7", 443, True),  # an IPv4-mapped address is its IPv4 address
        ("10.0.0.7", 443, True),
        ("10.0.0.8", 443, False),
        ("10.0.0.7", 5000, False),
        ("127.0.0.1", 443, False),  # 10.0.0.7 is not a loopback address
    ],
)
def test_a_mirror_is_reached_at_its_address_and_port_and_a_loopback_one_at_any_loopback_address(
    address: str, port: int, reached: bool
) -> None:
    assert reaches(address, port, frozenset({("127.0.0.1", 5000), ("10.0.0.7", 443)})) is reached


@pytest.mark.parametrize(
    ("address", "answer"), [("0.0.0.0", True), ("::", True), ("::ffff:0.0.0.0", True), ("127.0.0.1", False)]
)
def test_the_unspecified_address_in_any_spelling_is_told(address: str, answer: bool) -> None:
    assert unspecified(address) is answer
