"""Nothing but HTTP goes to a ruled upstream: mitmproxy's raw TCP, UDP and protocol switches, driven by mitmproxy's own
test harness (taddons, tflow) with its NextLayer addon deciding first. The end-to-end promise (the registry hears
nothing) is in test_http_only_e2e.py."""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from mitmproxy import http, tcp, udp
from mitmproxy.addons import clientplayback
from mitmproxy.addons.next_layer import NextLayer
from mitmproxy.proxy import commands, events, layer, server_hooks
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers import ClientTLSLayer, HttpLayer, ServerTLSLayer, TCPLayer, modes
from mitmproxy.proxy.layers.http import HTTPMode
from mitmproxy.test import taddons, tflow, tutils

from ocigate import askagain
from ocigate.askagain import AskAgainHttpLayer
from ocigate.configuration import Configuration, Shared
from ocigate.dialing import Dialing
from ocigate.httponly import HttpOnly

# What a client sends first inside the decrypted connection when it writes its request in two pieces.
FIRST_PIECE = b"GET /v2/team/app/manifests/v1 HTTP/1.1"
CLIENT_HELLO = bytes.fromhex("16030100") + b"\x00" * 8
REQUEST = b"GET /v2/ HTTP/1.1\r\nHost: upstream.test\r\n\r\n"


@contextmanager
def http_only(tmp_path: Path, **options: object) -> Iterator[tuple[HttpOnly, taddons.context]]:
    """HttpOnly as the gateway runs it, for the ruled upstream upstream.test, beside mitmproxy's NextLayer."""
    (tmp_path / "upstream.test").mkdir()
    (tmp_path / "upstream.test" / "hosts.toml").write_text('[host."http://mirror.test:5000"]\n')
    shared = Shared()
    configuration = Configuration(shared)
    addon = HttpOnly(shared.upstream_rule, lambda flow, why: None)
    with taddons.context(configuration, addon, NextLayer()) as tctx:
        tctx.configure(configuration, ocigate_rules=str(tmp_path))
        tctx.options.update(**options)
        yield addon, tctx


def decide(
    addon: HttpOnly, tctx: taddons.context, server: str, data: bytes, *, transport: str = "tcp"
) -> layer.Layer | None:
    """The layer chosen for a CONNECT tunnel's (or a decrypted connection's) first bytes, without ALPN."""
    client = tflow.tclient_conn()
    client.alpn = None
    client.transport_protocol = transport  # type: ignore[assignment]
    context = Context(client, tctx.options)
    context.server.address = (server, 443)
    context.layers = [modes.HttpProxy(context), HttpLayer(context, HTTPMode.regular)]
    nextlayer = layer.NextLayer(context)
    nextlayer.events.append(events.DataReceived(context.client, data))
    # In the order of the gateway's addons: ocigate's, then mitmproxy's own.
    addon.next_layer(nextlayer)
    tctx.master.addons.get("nextlayer").next_layer(nextlayer)
    return nextlayer.layer


@pytest.mark.parametrize("data", [FIRST_PIECE, b"GET /" + b"a" * 20_000, b"SSH-2.0-OpenSSH_9.6"])
def test_what_mitmproxy_would_pipe_to_a_ruled_upstream_is_read_as_http(tmp_path: Path, data: bytes) -> None:
    with http_only(tmp_path) as (addon, tctx):
        chosen = decide(addon, tctx, "upstream.test", data)
        assert isinstance(chosen, AskAgainHttpLayer)
        assert not any(isinstance(stacked, TCPLayer) for stacked in chosen.context.layers)
        # mitmproxy's own decision, which stands for a host no rule names.
        assert isinstance(decide(addon, tctx, "other.test", data), TCPLayer)


def test_a_ruled_upstream_in_ignore_hosts_is_decrypted_all_the_same(tmp_path: Path) -> None:
    with http_only(tmp_path, ignore_hosts=["upstream"]) as (addon, tctx):
        chosen = decide(addon, tctx, "upstream.test", CLIENT_HELLO)
        assert isinstance(chosen, ServerTLSLayer) and isinstance(chosen.child_layer, ClientTLSLayer)
        assert isinstance(decide(addon, tctx, "upstream.test", REQUEST), AskAgainHttpLayer)
        # A request head not complete yet, whose Host ignore_hosts waits for: decided on the next bytes.
        assert decide(addon, tctx, "upstream.test", REQUEST[:20]) is None


def test_http_gets_the_layer_that_lets_the_gateway_answer_for_a_failed_host_and_tls_is_left_to_mitmproxy(
    tmp_path: Path,
) -> None:
    with http_only(tmp_path) as (addon, tctx):
        for server in ("upstream.test", "other.test"):
            chosen = decide(addon, tctx, server, REQUEST)
            assert isinstance(chosen, AskAgainHttpLayer)
            # It took mitmproxy's HTTP layer's place: one HTTP layer under the proxy's own, the streams' parent.
            http_layers = [stacked for stacked in chosen.context.layers if isinstance(stacked, HttpLayer)]
            assert http_layers[-1] is chosen and type(http_layers[0]) is HttpLayer and len(http_layers) == 2
        assert isinstance(decide(addon, tctx, "upstream.test", CLIENT_HELLO), ServerTLSLayer)


def test_udp_to_a_ruled_upstream_is_closed_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with http_only(tmp_path) as (addon, tctx):
        # Too short for QUIC: plain UDP.
        chosen = decide(addon, tctx, "upstream.test", b"\x00" * 8, transport="udp")
        assert chosen is not None
        first = list(chosen.handle_event(events.Start()))
        assert [type(c) for c in first] == [commands.CloseConnection]
        assert first[0].connection is chosen.context.client
        assert list(chosen.handle_event(events.DataReceived(chosen.context.client, b"more"))) == []
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        "ocigate: upstream.test: refused a UDP connection: only HTTP goes to a ruled registry"
    ]


def flow_to(host: str, headers: tuple[tuple[bytes, bytes], ...]) -> http.HTTPFlow:
    flow = tflow.tflow()
    flow.request = tutils.treq(scheme=b"https", host=host.encode(), port=443, headers=((b"Host", b"x"), *headers))
    return flow


def test_a_request_to_a_ruled_upstream_never_asks_to_switch_protocols(tmp_path: Path) -> None:
    upgrade = ((b"Connection", b"keep-alive, Upgrade"), (b"Upgrade", b"websocket"), (b"Sec-WebSocket-Version", b"13"))
    with http_only(tmp_path) as (addon, _):
        ruled, other = flow_to("upstream.test", upgrade), flow_to("other.test", upgrade)
        addon.requestheaders(ruled)
        addon.requestheaders(other)
    assert "Upgrade" not in ruled.request.headers and ruled.request.headers.get_all("Connection") == ["keep-alive"]
    assert other.request.headers["Upgrade"] == "websocket"


def test_a_switch_of_protocols_answered_for_a_ruled_upstream_is_killed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with http_only(tmp_path) as (addon, _):
        ruled, other = flow_to("upstream.test", ()), flow_to("other.test", ())
        for flow in (ruled, other):
            addon.requestheaders(flow)
            # Re-pointed at a mirror by the Gateway in between: the flow still belongs to its upstream.
            flow.request.host = "mirror.test"
            flow.response = tutils.tresp(status_code=101, headers=((b"Upgrade", b"websocket"),))
            addon.responseheaders(flow)
    assert ruled.error is not None and ruled.error.msg == "Connection killed."
    assert other.error is None
    assert "upstream.test: refused a protocol switch (101)" in caplog.text


def test_a_tcp_stream_to_a_ruled_upstream_is_never_connected_and_carries_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with http_only(tmp_path) as (addon, _):
        ruled, other = tflow.ttcpflow(), tflow.ttcpflow()
        ruled.server_conn.address, other.server_conn.address = ("upstream.test", 443), ("other.test", 443)
        ruled.server_conn.timestamp_start = other.server_conn.timestamp_start = None
        for flow in (ruled, other):
            addon.tcp_start(flow)
            flow.messages.append(tcp.TCPMessage(True, FIRST_PIECE))
            addon.tcp_message(flow)
        assert ruled.server_conn.error == "ocigate refused a raw TCP connection to upstream.test"
        assert ruled.messages[-1].content == b"" and other.messages[-1].content == FIRST_PIECE
        assert other.server_conn.error is None
    assert "upstream.test: refused a raw TCP connection" in caplog.text


def test_a_udp_stream_already_connected_to_a_ruled_upstream_carries_nothing_of_the_client(tmp_path: Path) -> None:
    with http_only(tmp_path) as (addon, _):
        flow = tflow.tudpflow()
        flow.server_conn.address = ("upstream.test", 443)
        addon.udp_start(flow)
        for from_client, content in ((True, b"from the client"), (False, b"from the registry")):
            flow.messages.append(udp.UDPMessage(from_client, content))
            addon.udp_message(flow)
        assert [m.content for m in flow.messages[-2:]] == [b"", b"from the registry"]


async def test_dialing_leaves_a_refused_connection_alone(tmp_path: Path) -> None:
    shared = Shared()
    dialing, configuration = Dialing(shared), Configuration(shared)
    with taddons.context(dialing, configuration) as tctx:
        tctx.configure(configuration, ocigate_dns=False)
        data = tflow.tserver_conn()
        data.address, data.error = ("upstream.test", 443), "ocigate refused a raw TCP connection to upstream.test"
        await dialing.server_connect(server_hooks.ServerConnectionHookData(data, tflow.tclient_conn()))
    assert data.address == ("upstream.test", 443) and dialing.asked == {}


def test_a_replay_is_sent_through_the_gateways_http_layer(tmp_path: Path) -> None:
    with http_only(tmp_path) as (addon, tctx):
        handler = askagain._ReplayHandler(flow_to("upstream.test", ()), tctx.options, addon.http_layer)
    assert type(handler.layer) is AskAgainHttpLayer and handler.layer.mode is HTTPMode.transparent
    assert isinstance(handler.layer.connections[handler.layer.context.client], clientplayback.MockServer)
    assert handler.layer.context.layers == [handler.layer]  # mitmproxy's own layer is gone


def test_a_ruled_replay_not_sent_through_the_gateways_layer_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with http_only(tmp_path) as (addon, tctx):
        flows = [flow_to("upstream.test", ()), flow_to("other.test", ())]
        for flow in flows:
            flow.is_replay = "request"
        tctx.master.addons.add(clientplayback.ClientPlayback())  # mitmproxy's, as `mitmdump -s` keeps it
        for flow in flows:
            addon.requestheaders(flow)
        kept = flow_to("upstream.test", ())
        kept.is_replay = "request"
        tctx.master.addons.chain.remove(tctx.master.addons.lookup.pop("clientplayback"))
        tctx.master.addons.add(askagain.Playback(addon.http_layer))  # ocigate's
        addon.requestheaders(kept)
    assert flows[0].error is not None and flows[1].error is None and kept.error is None
    assert "upstream.test: replay of GET https://x/path refused" in caplog.text
