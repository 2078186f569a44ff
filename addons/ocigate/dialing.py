"""Where mitmproxy's own connections go: the host map, the destination policy, and each host's TLS settings; and,
where a policy restricts anything, never to a mirror of the rules but for a ruled upstream's request."""

import asyncio
import logging

from cachetools import LRUCache
from mitmproxy import connection, ctx, tls
from mitmproxy.proxy import server_hooks
from OpenSSL import SSL

from .configuration import MAX_CONNECTIONS, Shared
from .destinations import Addresses, DestinationError, Endpoints, LocalAddresses, reaches, unspecified
from .hosttls import openssl_context
from .policy import Decision, around_the_rules_at, audit_line

log = logging.getLogger("ocigate")
audit = logging.getLogger("ocigate.audit")


class Dialing:
    """Every connection mitmproxy opens goes where the host map says and only to allowed addresses, as ocigate's own
    requests do, and with the TLS settings its host has in hosts.toml."""

    def __init__(self, shared: Shared, local: LocalAddresses | None = None) -> None:
        self.shared = shared
        # The box's own addresses: a mirror at one of them (or at loopback) that listens on every address answers at
        # all of them.
        self.local = local or LocalAddresses()
        self._unknown_local: str | None = None  # why the box's addresses are unknown, as last logged
        # The address each connection was asked for, until it is connected (see server_connect).
        self.asked: LRUCache[str, tuple[str, int]] = LRUCache(MAX_CONNECTIONS)
        self.addresses = Addresses()

    async def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        server = data.server
        if server.address is None or server.via is not None or server.error:
            return  # nothing to dial, or refused already (httponly.HttpOnly)
        host, port = server.address
        guarded = self._guarded(data.client.id, host, port)
        try:
            # Where a policy guards the mirrors, dialled by the address checked: a name that resolved elsewhere
            # when checked cannot resolve to a mirror when dialled.
            server.address = await self.shared.hostclient.destinations.resolve(host, port, by_address=guarded)
        except DestinationError as e:
            server.error = f"ocigate refused the connection: {e}"
            log.warning("ocigate: refused connection to %s:%s: %s", host, port, e)
            return
        decision = await self._around_the_rules(host, port, *server.address) if guarded else None
        if decision is not None:
            server.error = f"ocigate refused the connection: {decision.describe()}"
            peer = data.client.peername
            who = f"client {peer[0]}:{peer[1]}" if peer else "client"
            audit.warning("ocigate audit: %s", audit_line(who, "connection to", f"{host}:{port}", decision))
            return
        # Put back once connected: the TLS settings belong to the name, and mitmproxy reuses a connection only
        # for a request to the address it was opened for.
        self.asked[server.id] = (host, port)

    def _guarded(self, client_id: str, host: str, port: int) -> bool:
        """Whether a connection must not reach a mirror of the rules: a policy restricts anything, and ocigate did
        not open it for a ruled upstream (its own re-pointed flow, or a request to the upstream, which the policy
        decides one by one). The name check of policy.around_the_rules answers a client better (a 403), but only a
        check of the address dialled sees a mirror's address or another of its names."""
        rules, policy = self.shared.rules, self.shared.services.policy
        if rules is None or not policy.restricts or (host, port) in self.shared.repointed.get(client_id, {}):
            return False
        return not any(self.shared.upstream_rule(host, port, scheme) for scheme in ("https", "http"))

    async def _around_the_rules(self, host: str, port: int, address: str, dial_port: int) -> Decision | None:
        """The refusal of a guarded connection to host:port, dialled at `address`:`dial_port`, that reaches or may
        reach a mirror of the rules (by the host map, then the resolver); None: it cannot."""
        rules = self.shared.rules
        if rules is None:
            return None
        policy = self.shared.services.policy
        if unspecified(address):
            # The local host, at whatever it listens on: no telling which service, a mirror's perhaps.
            return around_the_rules_at(policy, host, port, f"dials {address}, the gateway's own host")
        mirrors = sorted({(h.host, h.port) for rule in rules.rules() for h in rule.hosts if not h.is_server})
        destinations = self.shared.hostclient.destinations
        # Resolved together: a miss costs this connection the slowest lookup, not their sum.
        known: list[Endpoints | BaseException] = await asyncio.gather(
            *(self.addresses.of(destinations, name, mirror_port) for name, mirror_port in mirrors),
            return_exceptions=True,
        )
        local = await self.local.of(rules)
        if local.why != self._unknown_local:
            self._unknown_local = local.why
            if local.why is not None:
                log.warning(
                    "ocigate: %s; until they are read, a connection around the rules to any address at a mirror's "
                    "port is refused",
                    local.why,
                )
        unknown = None
        for (name, mirror_port), endpoints in zip(mirrors, known, strict=True):
            if isinstance(endpoints, DestinationError):
                unknown = (
                    unknown or f"{name}:{mirror_port}, a mirror of the rules whose address is unknown ({endpoints})"
                )
            elif isinstance(endpoints, BaseException):
                raise endpoints
            elif reaches(address, dial_port, endpoints, local):
                return around_the_rules_at(policy, host, port, f"dials {name}:{mirror_port}, a mirror of the rules")
        # A mirror that does not resolve may be where this connection goes: refused until it resolves again.
        return around_the_rules_at(policy, host, port, f"cannot be told from {unknown}") if unknown else None

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
