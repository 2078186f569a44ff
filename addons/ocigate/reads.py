"""Larger reads from a host sending a verified blob: it crosses mitmproxy's layers in a fifth of the trips.

mitmproxy reads each server connection 65535 bytes at a time (`ConnectionHandler.handle_connection`), while asyncio
takes up to 256 KiB from the socket at once: a blob from a fast host came in four pieces of 64 KiB and one of 4 bytes
for every 256 KiB, each a trip through mitmproxy's layers (server event, HTTP/1, the stream hook, HTTP/1 and TLS to the
client) that costs the event loop about as much whatever its size. Reading all that is buffered (up to READ_SIZE; on a
socket asyncio holds about 384 KiB at most before it stops reading) takes in one trip what asyncio holds already: the
event loop's time per GiB streamed went down by a quarter (docs/benchmarks.md). No byte waits longer (a read returns
what is there, as before), but the connection has more bytes in flight: so only a connection that brings a verified
blob reads so (streaming.Streams, when its verifier is made), and only while few blobs stream
(verify.GATHERING_BLOBS); tunnels to storage, passed-through hosts and unchecked answers read as mitmproxy reads.
"""

import asyncio
import functools
import logging

from mitmproxy import ctx, http

from .verify import few_blobs_streaming

log = logging.getLogger("ocigate")

READ_SIZE = 1024 * 1024


class _LargerReads(asyncio.StreamReader):
    async def read(self, n: int = -1) -> bytes:
        # Only while few blobs stream: under many at once, what each connection holds counts more (see verify).
        return await super().read(max(n, READ_SIZE) if n > 0 and few_blobs_streaming() else n)


def server_transport(flow: http.HTTPFlow) -> object | None:
    """mitmproxy's transport (`ConnectionIO`: reader, writer, handler task) of the flow's connection to its host, as
    its proxy server keeps it; None when it does not have it (not running, or changed): mitmproxy has no API for it."""
    proxyserver = ctx.master.addons.get("proxyserver")
    handler = getattr(proxyserver, "connections", {}).get(flow.client_conn.id)
    return getattr(handler, "transports", {}).get(flow.server_conn)


def read_larger(flow: http.HTTPFlow) -> bool:
    """The flow's host connection read in larger pieces from now on (it stays so for the connection's next
    requests, which are to the same host; over HTTP/2, for every stream on it). False, and said once, when
    mitmproxy's reader is not where it was (a replay's connection is not among the proxy server's: False, unsaid)."""
    reader = getattr(server_transport(flow), "reader", None)
    if type(reader) is asyncio.StreamReader:  # a TCP connection (UDP ones are mitmproxy_rs streams)
        reader.__class__ = _LargerReads
        return True
    if isinstance(reader, _LargerReads):
        return True
    if not flow.is_replay:  # a replay's connection is not the proxy server's: nothing to say
        _not_found()
    return False


@functools.cache
def _not_found() -> None:
    """Said once a process: a mitmproxy that keeps its connections elsewhere reads blobs as it did."""
    log.warning("ocigate: mitmproxy's host connections are not where ocigate looks: blobs are read in 64 KiB pieces")
