"""What captures and other addons see of a flow: no credential once it has been sent."""

import weakref

from mitmproxy import http


class Redaction:
    """No credential stays in a flow once it has been sent: what mitmproxy shows (flow_detail), writes
    (save_stream_file) or hands to other addons afterwards carries `<scheme> <redacted>` instead, and proxyauth's
    record of the proxy password is redacted too. Flows still under way when the gateway stops are redacted before
    mitmproxy's save addon writes them. Runs before mitmproxy's save and dumper addons (see cli.OcigateMaster)."""

    def __init__(self) -> None:
        self._under_way: weakref.WeakSet[http.HTTPFlow] = weakref.WeakSet()

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self._under_way.add(flow)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        _redact(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        _redact(flow)
        self._under_way.discard(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        _redact(flow)
        self._under_way.discard(flow)

    def done(self) -> None:
        for flow in list(self._under_way):
            _redact(flow)


_CREDENTIAL_HEADERS = ("Authorization", "Proxy-Authorization")
# mitmproxy's proxyauth keeps (user, password) of the client's proxy credentials here.
_PROXYAUTH_METADATA = "proxyauth"


def _redact(flow: http.HTTPFlow) -> None:
    headers = flow.request.headers
    for name in _CREDENTIAL_HEADERS:
        values = headers.get_all(name)
        if values:
            headers.set_all(name, [_redacted(value) for value in values])
    proxy_user = flow.metadata.get(_PROXYAUTH_METADATA)
    if isinstance(proxy_user, tuple | list) and proxy_user:
        flow.metadata[_PROXYAUTH_METADATA] = (proxy_user[0], "<redacted>")


def _redacted(value: str) -> str:
    scheme, space, _ = value.strip().partition(" ")
    return f"{scheme} <redacted>" if space else "<redacted>"
