"""The dialling policy: host map, allowed networks, and names that must never reach a resolver."""

import pytest

from ocigate.destinations import DestinationError, Destinations


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
