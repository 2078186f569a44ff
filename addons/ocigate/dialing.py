"""Where mitmproxy's own connections go: the host map, the destination policy, and each host's TLS settings."""

import logging

from cachetools import LRUCache
from mitmproxy import connection, ctx, tls
from mitmproxy.proxy import server_hooks
from OpenSSL import SSL

from .configuration import MAX_CONNECTIONS, Shared
from .destinations import DestinationError
from .hosttls import openssl_context

log = logging.getLogger("ocigate")


class Dialing:
    """Every connection mitmproxy opens goes where the host map says and only to allowed addresses, as ocigate's own
    requests do, and with the TLS settings its host has in hosts.toml."""

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        # The address each connection was asked for, until it is connected (see server_connect).
        self.asked: LRUCache[str, tuple[str, int]] = LRUCache(MAX_CONNECTIONS)

    async def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        server = data.server
        if server.address is None or server.via is not None or server.error:
            return  # nothing to dial, or refused already (httponly.HttpOnly)
        host, port = server.address
        try:
            server.address = await self.shared.hostclient.destinations.resolve(host, port)
        except DestinationError as e:
            server.error = f"ocigate refused the connection: {e}"
            log.warning("ocigate: refused connection to %s:%s: %s", host, port, e)
            return
        # Put back once connected: the TLS settings belong to the name, and mitmproxy reuses a connection only
        # for a request to the address it was opened for.
        self.asked[server.id] = (host, port)

    def server_connected(self, data: server_hooks.ServerConnectionHookData) -> None:
        asked = self.asked.pop(data.server.id, None)
        if asked is not None:
            # Server refuses a new address once open, to keep a connection from being re-targeted; this only
            # relabels it with the address it was opened for (peername keeps the one dialled).
            object.__setattr__(data.server, "address", asked)

    def server_connect_error(self, data: server_hooks.ServerConnectionHookData) -> None:
        asked = self.asked.pop(data.server.id, None)
        host = self.shared.host_for_connection(data.client.id, asked) if asked else None
        if host is not None:
            self.shared.health.unreachable(host.url, data.server.error or "connection failed")

    def client_disconnected(self, client: connection.Client) -> None:
        self.shared.repointed.pop(client.id, None)

    def tls_start_server(self, tls_start: tls.TlsData) -> None:
        # Runs after mitmproxy's own tlsconfig addon built the connection: swapping the context keeps its SNI,
        # hostname check and ALPN, and trusts and presents what the host's hosts.toml entry says instead.
        server = tls_start.conn
        if not isinstance(server, connection.Server) or server.address is None:
            return
        host = self.shared.host_for_connection(tls_start.context.client.id, server.address)
        if host is None:
            return
        # Even a host with no TLS settings of its own: mitmproxy's context trusts certifi's roots alone, ocigate's
        # own requests the system store too, and a blob must be fetched on whatever a manifest was.
        host_tls = self.shared.hostclient.host_tls(host)
        if tls_start.ssl_conn is None:
            # Loaded as a script, ocigate comes before mitmproxy's tlsconfig: have it build the connection now (it
            # leaves a connection that exists alone), so that there is one to give this host's settings.
            ctx.master.addons.get("tlsconfig").tls_start_server(tls_start)
        ssl_conn = tls_start.ssl_conn
        assert ssl_conn is not None, "mitmproxy's tlsconfig builds every server connection's TLS"
        ssl_conn.set_context(openssl_context(host_tls))
        if host_tls.skip_verify:
            ssl_conn.set_verify(SSL.VERIFY_NONE)
