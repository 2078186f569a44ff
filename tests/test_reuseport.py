"""The kernel's choice of a worker for a connection: by the client's address with client affinity. Real sockets on
loopback (every 127.0.0.0/8 address is this machine's), two listeners in one SO_REUSEPORT group as two workers'."""

import select
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from ocigate.reuseport import keep_clients_together

CLIENTS = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
IPV6_CONNECTIONS = 40


@contextmanager
def group(family: socket.AddressFamily, host: str, count: int) -> Iterator[list[socket.socket]]:
    listeners: list[socket.socket] = []
    port = 0
    try:
        for _ in range(count):
            listener = socket.socket(family)
            listeners.append(listener)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            listener.bind((host, port))
            port = listener.getsockname()[1]
            listener.listen(64)
        yield listeners
    finally:
        for listener in listeners:
            listener.close()


def accepted_by(listeners: list[socket.socket], source: str) -> int:
    """Which listener a new connection from `source` reaches."""
    family, host, port = listeners[0].family, *listeners[0].getsockname()[:2]
    with socket.socket(family) as client:
        client.bind((source, 0))
        client.connect((host, port))
        ready, _, _ = select.select(listeners, [], [], 10)
        assert len(ready) == 1
        connection, _ = ready[0].accept()
        connection.close()
    return listeners.index(ready[0])


def test_every_connection_of_a_client_reaches_the_same_listener_and_the_clients_are_spread() -> None:
    with group(socket.AF_INET, "127.0.0.1", 2) as listeners:
        keep_clients_together(listeners[0], 2)
        chosen = {source: {accepted_by(listeners, source) for _ in range(8)} for source in CLIENTS}
    assert all(len(found) == 1 for found in chosen.values()), chosen
    # The source address modulo 2: .2 and .4 on one, .3 and .5 on the other.
    assert chosen["127.0.0.2"] == chosen["127.0.0.4"] != chosen["127.0.0.3"] == chosen["127.0.0.5"]


def test_without_it_one_clients_connections_are_spread() -> None:
    with group(socket.AF_INET, "127.0.0.1", 2) as listeners:
        chosen = {accepted_by(listeners, "127.0.0.2") for _ in range(40)}
    assert chosen == {0, 1}


def test_it_is_accepted_for_ipv6_listeners() -> None:
    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    # ::1 has one source address only: without affinity its connections would all land on one listener by chance
    # 1 time in 2**(IPV6_CONNECTIONS - 1); the control group shows that this many do spread without it.
    with group(socket.AF_INET6, "::1", 2) as control:
        spread = {accepted_by(control, "::1") for _ in range(IPV6_CONNECTIONS)}
    with group(socket.AF_INET6, "::1", 2) as listeners:
        keep_clients_together(listeners[0], 2)
        together = {accepted_by(listeners, "::1") for _ in range(IPV6_CONNECTIONS)}
    assert spread == {0, 1}
    assert together == {1}  # the last 32 bits of ::1 are 1, and 1 modulo 2 is 1
