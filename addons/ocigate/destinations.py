"""Where a connection to a host name may go: a static host map and an address allow-list.

The air-gap box must never reach the internet, and the test gateway must never let a made-up `.test` name reach a
resolver. Both ask the same question of every connection ocigate or mitmproxy opens: which address does this name
dial, and is that address allowed?
"""

import asyncio
import ipaddress
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cachetools import TTLCache

from .routes import RouteError, ip_address, split_host_port

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class DestinationError(Exception):
    """A connection ocigate refuses to open; the message names the destination and the reason."""


def _split_host_port(text: str, what: str) -> tuple[str, int | None]:
    try:
        host, port = split_host_port(text.strip())
    except RouteError as e:
        raise ValueError(f"{what} {text!r}: {e}") from None
    return host.strip("[]"), port


@dataclass(frozen=True)
class Destinations:
    """The dialling policy: `host_map` sends a name (optionally name:port) to an address (optionally address:port);
    `allowed` limits every dialled address to these networks (empty: no limit); with `dns` off, a name that is not
    mapped is refused instead of resolved."""

    host_map: dict[tuple[str, int | None], tuple[str, int | None]] = field(default_factory=dict)
    allowed: tuple[IPNetwork, ...] = ()
    dns: bool = True

    @classmethod
    def from_options(cls, host_map: Iterable[str], allowed: Iterable[str], dns: bool) -> "Destinations":
        """Raises ValueError naming the offending entry."""
        mapping: dict[tuple[str, int | None], tuple[str, int | None]] = {}
        for entry in host_map:
            name, sep, target = entry.partition("=")
            if not sep:
                raise ValueError(f"ocigate_map_hosts entry {entry!r}: expected NAME[:PORT]=ADDRESS[:PORT]")
            mapping[_split_host_port(name, "ocigate_map_hosts name")] = _split_host_port(
                target, "ocigate_map_hosts address"
            )
        networks = []
        for entry in allowed:
            try:
                networks.append(ipaddress.ip_network(entry.strip(), strict=False))
            except ValueError as e:
                raise ValueError(f"ocigate_allow_destinations entry {entry!r}: {e}") from None
        return cls(mapping, tuple(networks), dns)

    def mapped(self, host: str, port: int) -> tuple[str, int] | None:
        # As split_host_port reads the map's names: a fully qualified "name." is the name.
        host = host.lower().strip("[]").removesuffix(".")
        target = self.host_map.get((host, port)) or self.host_map.get((host, None))
        if target is None:
            return None
        return target[0].strip("[]"), target[1] or port

    def check_address(self, host: str, port: int, address: str) -> None:
        if not self.allowed:
            return
        ip = ip_address(address)
        if ip is None or not any(ip in network for network in self.allowed):
            allowed = ", ".join(str(n) for n in self.allowed)
            raise DestinationError(f"{host}:{port} ({address}) is outside the allowed destinations ({allowed})")

    async def resolve(self, host: str, port: int, *, by_address: bool = False) -> tuple[str, int]:
        """The address and port to dial for host:port, resolving names only where the policy allows it. A name is
        left to whoever dials it unless there is an allow-list to check its address against, or `by_address` asks
        for the address (which is then the one dialled)."""
        target_host, target_port = self.mapped(host, port) or (host.strip("[]"), port)
        if ip_address(target_host) is not None:
            self.check_address(host, port, target_host)
            return target_host, target_port
        if not self.dns:
            raise DestinationError(f"{host}:{port} is not in the host map and name resolution is off")
        if not self.allowed and not by_address:
            return target_host, target_port
        # Resolved here once and dialled by address, so the address that was checked is the one connected to.
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(target_host, target_port, type=socket.SOCK_STREAM)
        except OSError as e:
            raise DestinationError(f"{host}:{port}: cannot resolve {target_host}: {e}") from None
        address = str(infos[0][4][0])
        self.check_address(host, port, address)
        return address, target_port


# How many names' addresses are remembered, and how long (seconds): a mirror that moves is known at its new address
# within a minute, and a client asking many names cannot make the gateway hold them all.
ADDRESSES_KEPT = 1024
ADDRESSES_TTL = 60.0

# Addresses with their port, as compared: (address in its canonical text, port).
Endpoints = frozenset[tuple[str, int]]


class Addresses:
    """The addresses a host:port dials, as Destinations dial it (the host map first, names resolved only where it
    resolves them), asked of the resolver asynchronously and remembered for a while: what tells a mirror of the rules
    asked by its address or by another of its names (dialing.Dialing)."""

    def __init__(
        self, kept: int = ADDRESSES_KEPT, ttl: float = ADDRESSES_TTL, timer: Callable[[], float] = time.monotonic
    ) -> None:
        self._known: TTLCache[tuple[str, int], Endpoints] = TTLCache(kept, ttl, timer)
        self._for: Destinations | None = None

    async def of(self, destinations: Destinations, host: str, port: int) -> Endpoints:
        """Every address host:port would dial under `destinations`; empty when name resolution is off and the host
        map does not name it (it cannot be dialled). Raises DestinationError when the resolver fails: not
        remembered, since a name that does not resolve now may the next moment, and nothing is known of it."""
        if destinations is not self._for:
            self._known.clear()  # another host map: what was known may be wrong
            self._for = destinations
        key = (host.lower().strip("[]").removesuffix("."), port)
        known = self._known.get(key)
        if known is None:
            known = await _endpoints(destinations, *key)
            self._known[key] = known
        return known


async def _endpoints(destinations: Destinations, host: str, port: int) -> Endpoints:
    target_host, target_port = destinations.mapped(host, port) or (host, port)
    if ip_address(target_host) is not None:
        return frozenset({(_canonical(target_host), target_port)})
    if not destinations.dns:
        return frozenset()
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(target_host, target_port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise DestinationError(f"{host}:{port}: cannot resolve {target_host}: {e}") from None
    return frozenset((_canonical(str(info[4][0])), target_port) for info in infos)


@dataclass(frozen=True)
class Local:
    """The box's own addresses, where a service listening on every address answers as it does at loopback: every
    loopback address, and `networks` (what the kernel routes to this host). Not `known` when they could not be read
    (`why`): then any address may be one of them."""

    networks: tuple[IPNetwork, ...] = ()
    known: bool = True
    why: str | None = None

    def holds(self, address: str) -> bool:
        ip = ipaddress.ip_address(_canonical(address))
        return ip.is_loopback or any(ip in network for network in self.networks)


# Only loopback: what reaches() knew before it was told the box's addresses.
LOOPBACK = Local()


def reaches(address: str, port: int, endpoints: Endpoints, local: Local = LOOPBACK) -> bool:
    """Whether dialling address:port (an address, not a name) reaches one of `endpoints`: the same port, and the same
    address, an IPv4-mapped IPv6 address being its IPv4 address; or, when both are the box's own addresses (`local`:
    loopback and its interfaces' addresses), any of them: a mirror named at 127.0.0.1 or at the box's 10.1.2.3 that
    listens on every address answers at 127.0.0.2, ::1 and the box's other addresses too. While the box's addresses
    are unknown, any address at an endpoint's port may reach it."""
    address = _canonical(address)
    here = local.holds(address)
    return any(
        port == endpoint_port and (address == endpoint or not local.known or (here and local.holds(endpoint)))
        for endpoint, endpoint_port in endpoints
    )


# Where Linux says which addresses are this host's (in the network namespace of the process reading them).
FIB_TRIE = Path("/proc/net/fib_trie")
IF_INET6 = Path("/proc/net/if_inet6")
# How long the box's addresses read are used before they are read again: a box whose address changes (DHCP, a
# failover address) is guarded at its new one within seconds. Reading them costs two small reads of /proc.
LOCAL_TTL = 5.0


def local_networks(fib_trie: str, if_inet6: str) -> tuple[IPNetwork, ...]:
    """The networks `fib_trie` (/proc/net/fib_trie) routes as LOCAL (each address of an interface as a /32, a range
    routed to the host as itself) and the addresses `if_inet6` (/proc/net/if_inet6) lists, each a /128."""
    found: dict[IPNetwork, None] = {}
    leaf: str | None = None
    for line in fib_trie.splitlines():
        words = line.split()
        if len(words) == 2 and words[0] == "|--":
            leaf = words[1]
        elif leaf is not None and words and words[0].startswith("/") and words[-1] == "LOCAL":
            found[ipaddress.ip_network(f"{leaf}{words[0]}", strict=False)] = None
    for line in if_inet6.splitlines():
        words = line.split()
        if words and len(words[0]) == 32:
            found[ipaddress.ip_network(int(words[0], 16).to_bytes(16, "big"))] = None
    return tuple(found)


def read_local(fib_trie: Path = FIB_TRIE, if_inet6: Path = IF_INET6) -> Local:
    """The box's addresses as Linux lists them, read now (blocking: run it on a thread). A box without IPv6 has no
    if_inet6: no IPv6 address; an unreadable fib_trie leaves them unknown, saying why."""
    try:
        routes = fib_trie.read_text()
        try:
            addresses6 = if_inet6.read_text()
        except FileNotFoundError:
            addresses6 = ""
        return Local(local_networks(routes, addresses6))
    except (OSError, ValueError) as e:
        return Local(known=False, why=f"cannot read the box's own addresses from {fib_trie} and {if_inet6}: {e}")


class LocalAddresses:
    """The box's addresses, read on a thread when first asked, again once `ttl` seconds old or when asked for other
    rules (those loaded meanwhile), one read shared by everyone asking meanwhile."""

    def __init__(
        self,
        read: Callable[[], Local] = read_local,
        ttl: float = LOCAL_TTL,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read, self._ttl, self._timer = read, ttl, timer
        self._reading: asyncio.Future[Local] | None = None
        self._read_at = 0.0
        self._for: object = None

    async def of(self, rules: object) -> Local:
        """The box's addresses, read since `rules` were loaded, within `ttl` seconds."""
        stale = self._for is not rules or self._timer() - self._read_at >= self._ttl
        if self._reading is None or (stale and self._reading.done()):
            self._for, self._read_at = rules, self._timer()
            self._reading = asyncio.ensure_future(asyncio.to_thread(self._read))
        return await asyncio.shield(self._reading)


def unspecified(address: str) -> bool:
    """Whether `address` is 0.0.0.0 or :: (in any spelling): dialled, it connects to the local host, every service
    on it at once as far as telling them apart by address goes."""
    return ipaddress.ip_address(_canonical(address)).is_unspecified


def _canonical(address: str) -> str:
    """One spelling per address: `::ffff:127.0.0.1` is 127.0.0.1, `0:0::1` is ::1."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)
