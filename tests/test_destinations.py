"""The dialling policy: host map, allowed networks, and names that must never reach a resolver."""

import asyncio
import ipaddress
import socket
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ocigate.destinations import (
    Addresses,
    DestinationError,
    Destinations,
    Local,
    LocalAddresses,
    local_networks,
    reaches,
    read_local,
    unspecified,
)


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


# What Linux shows for a box with 10.123.0.1/24 on eth0, 10.9.0.0/24 routed to itself (`ip route add local ... dev
# lo`) and loopback, in the main and local tables (trimmed; each leaf may carry several routes).
FIB_TRIE = """Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 10.123.0.0/24 2 0 2
        |-- 10.123.0.0
           /24 link UNICAST
Local:
  +-- 0.0.0.0/0 3 0 5
     +-- 10.9.0.0/24 2 0 2
        |-- 10.9.0.0
           /24 host LOCAL
     +-- 10.123.0.0/24 2 0 2
        |-- 10.123.0.1
           /32 host LOCAL
        |-- 10.123.0.255
           /32 link BROADCAST
     +-- 127.0.0.0/8 2 0 2
        |-- 127.0.0.0
           /32 link BROADCAST
           /8 host LOCAL
        |-- 127.0.0.1
           /32 host LOCAL
"""
IF_INET6 = """00000000000000000000000000000001 01 80 10 80       lo
fd000000000000000000000000000002 04 40 00 82     eth0
fe8000000000000000fc00fffe000001 04 40 20 80     eth0
"""


def test_the_boxs_addresses_are_the_local_routes_and_the_ipv6_addresses() -> None:
    assert local_networks(FIB_TRIE, IF_INET6) == tuple(
        ipaddress.ip_network(n)
        for n in (
            "10.9.0.0/24",
            "10.123.0.1/32",
            "127.0.0.0/8",
            "127.0.0.1/32",
            "::1/128",
            "fd00::2/128",
            "fe80::fc:ff:fe00:1/128",
        )
    )


@given(st.lists(st.ip_addresses(v=4), max_size=5), st.lists(st.ip_addresses(v=6), max_size=5))
def test_every_address_listed_is_read_back(v4: list[ipaddress.IPv4Address], v6: list[ipaddress.IPv6Address]) -> None:
    fib_trie = "Local:\n" + "".join(f"     |-- {a}\n        /32 link BROADCAST\n        /32 host LOCAL\n" for a in v4)
    if_inet6 = "".join(f"{a.packed.hex()} 02 40 00 80 eth{i}\n" for i, a in enumerate(v6))
    found = set(local_networks(fib_trie, if_inet6))
    assert found == {ipaddress.ip_network(a) for a in [*v4, *v6]}


LOCAL = Local(local_networks(FIB_TRIE, IF_INET6))


@pytest.mark.parametrize(
    ("address", "port", "reached"),
    [
        ("10.123.0.1", 5000, True),  # the mirror's own address
        ("127.0.0.1", 5000, True),  # the same host, at loopback
        ("::1", 5000, True),
        ("fd00::2", 5000, True),  # another of its addresses
        ("10.9.0.77", 5000, True),  # a range routed to the host as itself
        ("10.123.0.2", 5000, False),  # another host of its network
        ("127.0.0.1", 5001, False),  # another service of the host
    ],
)
def test_a_mirror_at_one_of_the_boxs_addresses_is_reached_at_every_one_of_them(
    address: str, port: int, reached: bool
) -> None:
    assert reaches(address, port, frozenset({("10.123.0.1", 5000)}), LOCAL) is reached
    # And one named at loopback is reached at the box's other addresses.
    assert reaches(address, port, frozenset({("127.0.0.1", 5000)}), LOCAL) is reached


def test_a_mirror_elsewhere_is_reached_at_its_address_only() -> None:
    assert not reaches("127.0.0.1", 443, frozenset({("10.0.0.7", 443)}), LOCAL)
    assert reaches("10.0.0.7", 443, frozenset({("10.0.0.7", 443)}), LOCAL)


def test_while_the_boxs_addresses_are_unknown_any_address_at_a_mirrors_port_may_reach_it() -> None:
    unknown = Local(known=False, why="no /proc")
    assert reaches("192.0.2.9", 443, frozenset({("10.0.0.7", 443)}), unknown)
    assert not reaches("192.0.2.9", 444, frozenset({("10.0.0.7", 443)}), unknown)


def test_reading_the_boxs_addresses(tmp_path: Path) -> None:
    (tmp_path / "fib_trie").write_text(FIB_TRIE)
    (tmp_path / "if_inet6").write_text(IF_INET6)
    assert read_local(tmp_path / "fib_trie", tmp_path / "if_inet6") == LOCAL
    # Without IPv6 there is no if_inet6: no IPv6 address, nothing unknown.
    assert read_local(tmp_path / "fib_trie", tmp_path / "none").networks == LOCAL.networks[:4]
    unread = read_local(tmp_path / "none", tmp_path / "if_inet6")
    assert not unread.known and unread.why is not None and "none" in unread.why


def test_this_boxs_addresses_hold_its_loopback() -> None:
    local = read_local()
    assert local.known and local.holds("127.0.0.1")


class Reads:
    """A reader of the box's addresses that answers when the test lets it (from another thread)."""

    def __init__(self) -> None:
        self.count = 0
        self.go = threading.Event()

    def __call__(self) -> Local:
        self.count += 1
        assert self.go.wait(10)
        return Local(known=False, why=f"read {self.count}")


async def test_the_boxs_addresses_are_read_once_for_everyone_and_again_when_old_or_for_other_rules() -> None:
    now = [0.0]
    reads = Reads()
    local = LocalAddresses(reads, ttl=5.0, timer=lambda: now[0])
    rules = object()
    together = [asyncio.ensure_future(local.of(rules)) for _ in range(3)]
    await asyncio.sleep(0)
    reads.go.set()
    assert {answer.why for answer in await asyncio.gather(*together)} == {"read 1"}
    now[0] = 4.9
    assert (await local.of(rules)).why == "read 1"
    now[0] = 5.0
    assert (await local.of(rules)).why == "read 2"
    assert (await local.of(object())).why == "read 3"  # rules loaded meanwhile
    assert reads.count == 3
