"""Larger reads from the hosts mitmproxy dials (reads.py)."""

import asyncio
from types import SimpleNamespace

from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.proxy.server import ConnectionIO
from mitmproxy.test import taddons, tflow

from ocigate.reads import READ_SIZE, LargerReads, _LargerReads
from ocigate.verify import GATHERING_BLOBS, StreamVerifier, digest_of


async def test_a_read_takes_all_that_is_buffered_up_to_read_size_and_waits_for_no_more() -> None:
    reader = _LargerReads()
    reader.feed_data(b"x" * (READ_SIZE + 300_000))
    # As mitmproxy asks for it: 65535 bytes at most.
    assert len(await reader.read(65535)) == READ_SIZE
    assert len(await reader.read(65535)) == 300_000
    reader.feed_data(b"tail")
    assert await asyncio.wait_for(reader.read(65535), 5) == b"tail"
    reader.feed_eof()
    assert await reader.read(65535) == b""


async def test_under_many_blobs_at_once_reads_stay_as_mitmproxy_asks() -> None:
    blobs = [StreamVerifier(digest_of(b"")) for _ in range(GATHERING_BLOBS)]
    reader = _LargerReads()
    reader.feed_data(b"x" * 100_000)
    assert len(await reader.read(65535)) == 65535
    for blob in blobs:
        blob.close()
    assert len(await reader.read(65535)) == 100_000 - 65535


class _Proxyserver:
    """mitmproxy's proxy server as reads.py reaches it: its connection handlers by client id, their transports."""

    name = "proxyserver"

    def __init__(self) -> None:
        self.connections: dict[str, SimpleNamespace] = {}


async def test_a_server_connection_s_reader_reads_larger_once_connected() -> None:
    flow = tflow.tflow()
    reader, other = asyncio.StreamReader(), asyncio.StreamReader()
    proxyserver = _Proxyserver()
    proxyserver.connections[flow.client_conn.id] = SimpleNamespace(
        transports={flow.server_conn: ConnectionIO(reader=reader), flow.client_conn: ConnectionIO(reader=other)}
    )
    larger = LargerReads()
    with taddons.context(proxyserver, larger):
        larger.server_connected(SimpleNamespace(client=flow.client_conn, server=flow.server_conn))
    assert type(reader) is _LargerReads
    assert type(other) is asyncio.StreamReader  # only the connection that was connected


def test_mitmproxy_keeps_its_connections_where_reads_py_looks_for_them() -> None:
    # If mitmproxy moves them, reads.py finds nothing and reads stay at 64 KiB: this says so.
    assert isinstance(Proxyserver().connections, dict)
    assert "reader" in ConnectionIO.__dataclass_fields__
