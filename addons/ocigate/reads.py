"""Larger reads from the hosts mitmproxy dials: a blob crosses mitmproxy's layers in a fifth of the trips.

mitmproxy reads each server connection 65535 bytes at a time (`ConnectionHandler.handle_connection`), while asyncio
takes up to 256 KiB from the socket at once: a blob from a fast host came in four pieces of 64 KiB and one of 4 bytes
for every 256 KiB, each a trip through mitmproxy's layers (server event, HTTP/1, the stream hook, HTTP/1 and TLS to the
client) that costs the event loop about as much whatever its size. Reading all that is buffered, up to READ_SIZE, takes
in one trip what asyncio holds already: the event loop's time per GiB streamed went down by a quarter
(docs/benchmarks.md). No byte waits longer (a read returns what is there, as before), but each connection has more bytes
in flight: under many blobs at once (verify.GATHERING_BLOBS) reads stay as they were.
"""

import asyncio

from mitmproxy import ctx
from mitmproxy.proxy import server_hooks

from .verify import few_blobs_streaming

READ_SIZE = 1024 * 1024


class _LargerReads(asyncio.StreamReader):
    async def read(self, n: int = -1) -> bytes:
        # Only while few blobs stream: under many at once, what each connection holds counts more (see verify).
        return await super().read(max(n, READ_SIZE) if n > 0 and few_blobs_streaming() else n)


class LargerReads:
    """Every server connection mitmproxy opens is read in pieces of up to READ_SIZE."""

    def server_connected(self, data: server_hooks.ServerConnectionHookData) -> None:
        # Reached as streaming._cut_server_connection reaches it: mitmproxy has no option for its read size. When
        # its proxy server is not running or changed, its reads stay as they are.
        proxyserver = ctx.master.addons.get("proxyserver")
        handler = getattr(proxyserver, "connections", {}).get(data.client.id)
        transport = getattr(handler, "transports", {}).get(data.server)
        reader = getattr(transport, "reader", None)
        if type(reader) is asyncio.StreamReader:  # a TCP connection (UDP ones are mitmproxy_rs streams)
            reader.__class__ = _LargerReads
