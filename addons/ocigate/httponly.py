"""Nothing but HTTP goes to a ruled upstream: what ocigate routes is all that leaves for it.

mitmproxy passes a connection through as raw TCP when the client's first bytes do not look like HTTP/1 (a request
written in two pieces, a request line longer than a TLS record), when ignore_hosts, allow_hosts or tcp_hosts say so,
and after a 101 answer; the client's bytes, its Authorization included, would then go to the registry as sent, past
every rule. For a ruled upstream such a connection is read as HTTP, or refused.
"""

import logging
import weakref
from collections.abc import Callable

from mitmproxy import ctx, http, tcp, udp
from mitmproxy.connection import Address
from mitmproxy.net.tls import starts_like_tls_record
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers import ClientTLSLayer, HttpLayer, ServerTLSLayer
from mitmproxy.proxy.layers.http import HTTPMode

from . import scrub
from .askagain import AnswerAsSent, AskAgainHttpLayer, AsSent, Instead, Playback
from .hoststoml import Rule

log = logging.getLogger("ocigate")

# The upstream a request to (host, port, scheme) is for and its rule, when a rule names it; None otherwise.
RuleLookup = Callable[[str, int, str], tuple[str, Rule] | None]

# Layers that end in HTTP (TLS is decrypted, and what it carries is decided again).
_LEADS_TO_HTTP = (ServerTLSLayer, ClientTLSLayer, HttpLayer)


class HttpOnly:
    """Keeps every connection to a ruled upstream HTTP: mitmproxy's raw TCP, UDP and protocol switches are read as
    HTTP or refused; the HTTP it is read as lets the gateway answer for a host that failed before answering
    (`instead`, see askagain). Runs before Gateway (it takes Upgrade off a request before it is routed)."""

    def __init__(
        self,
        upstream_rule: RuleLookup,
        instead: Instead,
        answer_as_sent: AnswerAsSent = lambda flow, response: response,
        as_sent: AsSent = lambda flow, request: request,
    ) -> None:
        self.upstream_rule = upstream_rule
        self.instead = instead
        self.answer_as_sent = answer_as_sent
        self.as_sent = as_sent
        # The upstream of each flow to a ruled one, until its response: a 101 to it is refused.
        self._flows: weakref.WeakKeyDictionary[http.HTTPFlow, str] = weakref.WeakKeyDictionary()
        self._refused: weakref.WeakSet[tcp.TCPFlow | udp.UDPFlow] = weakref.WeakSet()

    def _ruled(self, address: Address | None) -> str | None:
        """The ruled upstream a connection to `address` carries requests for, over TLS or not."""
        if address is None:
            return None
        host, port = address[0], address[1]
        found = self.upstream_rule(host, port, "https") or self.upstream_rule(host, port, "http")
        return found[0] if found else None

    def http_layer(self, context: Context, mode: HTTPMode) -> HttpLayer:
        """The HTTP layer of a connection, a replayed flow's included (askagain.Playback)."""
        return AskAgainHttpLayer(context, mode, self.instead, self.answer_as_sent, self.as_sent)

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        context = nextlayer.context
        decider = ctx.master.addons.get("nextlayer")
        if nextlayer.layer is None and decider is not None:
            # ocigate's hooks run before mitmproxy's NextLayer (as a script's do): have it decide now, to check that.
            decider.next_layer(nextlayer)
        chosen = nextlayer.layer
        if type(chosen) is HttpLayer:
            # Every HTTP layer, the proxy's own (plain http:// requests) included: which host a request goes to is
            # known per request, and the gateway answers only for the flows it streams.
            _drop(context, chosen)
            nextlayer.layer = self.http_layer(context, chosen.mode)
            return
        upstream = self._ruled(context.server.address)
        if upstream is None or chosen is None or isinstance(chosen, _LEADS_TO_HTTP):
            return  # not a ruled upstream's, not decided yet (more bytes to come), HTTP, or TLS to decide again
        _drop(context, chosen)
        if context.client.transport_protocol == "tcp":
            log.debug("ocigate: %s: a connection mitmproxy would pass through as %r is read as HTTP", upstream, chosen)
            nextlayer.layer = _intercepted(
                context, nextlayer.data_client(), self.instead, self.answer_as_sent, self.as_sent
            )
        else:
            _refused(f"a {context.client.transport_protocol.upper()} connection", upstream)
            nextlayer.layer = _Closed(context)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        request = flow.request
        found = self.upstream_rule(request.host, request.port, request.scheme)
        if found is None:
            return
        if flow.is_replay == "request" and not isinstance(ctx.master.addons.get("clientplayback"), Playback):
            # mitmproxy's own client replay (`mitmdump -s addons/gateway.py` keeps it) sends the flow through its own
            # HTTP layer, which never puts in what the gateway keeps out of the flow: its placeholders would go.
            log.warning(
                "ocigate: %s: replay of %s %s refused: only the ocigate command replays a ruled registry's flows",
                found[0],
                request.method,
                scrub.url(request.pretty_url),
            )
            if flow.killable:
                flow.kill()
            return
        self._flows[flow] = found[0]
        # No protocol switch: a server may ignore an Upgrade (RFC 9110 7.8), and after a 101 the connection would be
        # a pipe to whichever host answered.
        if request.headers.pop("Upgrade", None) is not None:
            tokens = [t.strip() for v in request.headers.get_all("Connection") for t in v.split(",")]
            kept = [t for t in tokens if t and t.lower() != "upgrade"]
            request.headers.pop("Connection", None)
            if kept:
                request.headers["Connection"] = ", ".join(kept)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        upstream = self._flows.pop(flow, None)
        response = flow.response
        if upstream is not None and response is not None and response.status_code == 101 and flow.killable:
            _refused("a protocol switch (101)", upstream)
            flow.kill()

    def tcp_start(self, flow: tcp.TCPFlow) -> None:
        self._refuse_stream(flow, "raw TCP")

    def udp_start(self, flow: udp.UDPFlow) -> None:
        self._refuse_stream(flow, "UDP")

    def _refuse_stream(self, flow: tcp.TCPFlow | udp.UDPFlow, what: str) -> None:
        """Whatever still ends up as a stream to a ruled upstream: never connected, and nothing of the client's sent."""
        upstream = self._ruled(flow.server_conn.address)
        if upstream is None:
            return
        _refused(f"a {what} connection", upstream)
        self._refused.add(flow)
        if flow.server_conn.timestamp_start is None:
            flow.server_conn.error = f"ocigate refused a {what} connection to {upstream}"

    def tcp_message(self, flow: tcp.TCPFlow) -> None:
        self._drop_from_client(flow)

    def udp_message(self, flow: udp.UDPFlow) -> None:
        self._drop_from_client(flow)

    def _drop_from_client(self, flow: tcp.TCPFlow | udp.UDPFlow) -> None:
        message = flow.messages[-1]
        if flow in self._refused and message.from_client:
            message.content = b""


def _refused(what: str, upstream: str) -> None:
    log.warning("ocigate: %s: refused %s: only HTTP goes to a ruled registry", upstream, what)


def _drop(context: Context, chosen: layer.Layer) -> None:
    """Takes mitmproxy's choice (and what it stacked on it) off the context's layers, for another to take its place."""
    if chosen in context.layers:
        del context.layers[context.layers.index(chosen) :]


def _intercepted(
    context: Context, data_client: bytes, instead: Instead, answer_as_sent: AnswerAsSent, as_sent: AsSent
) -> layer.Layer:
    """TLS decrypted (what it carries is decided again) or, for anything else, HTTP."""
    if starts_like_tls_record(data_client):
        server_tls = ServerTLSLayer(context)
        server_tls.child_layer = ClientTLSLayer(context)
        return server_tls
    return AskAgainHttpLayer(context, HTTPMode.transparent, instead, answer_as_sent, as_sent)


class _Closed(layer.Layer):
    """Closes the client's connection at once: nothing it sends goes anywhere."""

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.Start):
            yield commands.CloseConnection(self.context.client)
