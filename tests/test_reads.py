"""Larger reads from the hosts mitmproxy dials (reads.py)."""

import asyncio
from pathlib import Path
from types import SimpleNamespace

import pytest
from mitmproxy import http
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.proxy.server import ConnectionIO
from mitmproxy.test import taddons, tflow

from ocigate import reads
from ocigate.reads import READ_SIZE, _LargerReads, read_larger
from ocigate.verify import StreamVerifier
from tests.support.http_host import http_host
from tests.test_addon import flow_to, gateway, write_rules
from tests.test_trust import BLOB, BLOB_DIGEST
from tests.test_verify import many_blobs_streaming


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
    reader = _LargerReads()
    reader.feed_data(b"x" * 100_000)
    with many_blobs_streaming():
        assert len(await reader.read(65535)) == 65535
    assert len(await reader.read(65535)) == 100_000 - 65535


class _Proxyserver:
    """mitmproxy's proxy server as reads.py reaches it: its connection handlers by client id, their transports."""

    name = "proxyserver"

    def __init__(self) -> None:
        self.connections: dict[str, SimpleNamespace] = {}

    def readers(self, flow: http.HTTPFlow) -> tuple[asyncio.StreamReader, asyncio.StreamReader]:
        """The flow's server and client connections' readers, as mitmproxy holds them."""
        server, client = asyncio.StreamReader(), asyncio.StreamReader()
        self.connections[flow.client_conn.id] = SimpleNamespace(
            transports={flow.server_conn: ConnectionIO(reader=server), flow.client_conn: ConnectionIO(reader=client)}
        )
        return server, client


async def test_read_larger_swaps_the_flows_host_connection_reader_only() -> None:
    flow = tflow.tflow()
    proxyserver = _Proxyserver()
    server, client = proxyserver.readers(flow)
    with taddons.context(proxyserver):
        assert read_larger(flow) and read_larger(flow)  # again: it is so already
    assert type(server) is _LargerReads
    assert type(client) is asyncio.StreamReader


async def test_without_mitmproxys_connections_it_says_so_and_reads_stay(caplog: pytest.LogCaptureFixture) -> None:
    reads._not_found.cache_clear()  # said once a process: as if this were the first
    with taddons.context():
        assert not read_larger(tflow.tflow())
        assert not read_larger(tflow.tflow())
    assert caplog.text.count("blobs are read in 64 KiB pieces") == 1
    reads._not_found.cache_clear()
    replayed = tflow.tflow()
    replayed.is_replay = "request"
    with taddons.context():
        assert not read_larger(replayed)
    assert caplog.text.count("blobs are read in 64 KiB pieces") == 1  # a replay's connection is elsewhere: unsaid


async def test_only_a_verified_blobs_host_connection_reads_larger(tmp_path: Path) -> None:
    with http_host(lambda h: (200, BLOB)) as (port, _):
        rules = write_rules(tmp_path, "upstream.test", f'[host."http://a.test:{port}"]\n')
        with gateway(rules, ["a.test=127.0.0.1"]) as (gw, tctx):
            proxyserver = _Proxyserver()
            tctx.master.addons.add(proxyserver)
            verified = flow_to("upstream.test", f"/v2/team/app/blobs/{BLOB_DIGEST}")
            ranged = flow_to("upstream.test", f"/v2/team/app/blobs/{BLOB_DIGEST}", headers=[(b"Range", b"bytes=4-")])
            readers, streams = {}, {}
            for flow, status, headers in (
                (verified, 200, {"Content-Length": str(len(BLOB))}),
                (ranged, 206, {"Content-Range": f"bytes 4-{len(BLOB) - 1}/{len(BLOB)}", "Content-Length": "12"}),
            ):
                await gw.requestheaders(flow)
                readers[status], _ = proxyserver.readers(flow)
                flow.response = http.Response.make(status, b"", headers)
                gw.responseheaders(flow)
                streams[status] = flow.response.stream
    assert isinstance(streams[200], StreamVerifier) and callable(streams[206])
    assert type(readers[200]) is _LargerReads
    assert type(readers[206]) is asyncio.StreamReader  # unchecked: read as mitmproxy reads


def test_mitmproxy_keeps_its_connections_where_reads_py_looks_for_them() -> None:
    # If mitmproxy moves them, reads.py finds nothing and reads stay at 64 KiB: this says so.
    assert isinstance(Proxyserver().connections, dict)
    assert "reader" in ConnectionIO.__dataclass_fields__
