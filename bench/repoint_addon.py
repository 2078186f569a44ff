"""The smallest mitmproxy addon that does what ocigate's blob path does to a flow: re-point it.

Loaded into plain mitmdump for the benchmark's `mitmproxy+tls` leg: the client speaks HTTPS to a made-up name through
the proxy (CONNECT, TLS intercepted with mitmproxy's CA, as with ocigate), and every request is sent to the plain-HTTP
address in `bench_repoint_to`. No rules, no HEAD probe, no own HTTP client: the difference between this leg and
ocigate is ocigate's own work; the difference between this leg and plain mitmproxy is the client-side TLS.
"""

from mitmproxy import ctx, exceptions, http
from mitmproxy.addonmanager import Loader


class Repoint:
    def __init__(self) -> None:
        self.address: tuple[str, int] | None = None

    def load(self, loader: Loader) -> None:
        loader.add_option("bench_repoint_to", str, "", "HOST:PORT every request is sent to, over plain HTTP.")

    def configure(self, updated: set[str]) -> None:
        if "bench_repoint_to" in updated and ctx.options.bench_repoint_to:
            host, _, port = ctx.options.bench_repoint_to.rpartition(":")
            if not host or not port.isdigit():
                raise exceptions.OptionsError(f"bench_repoint_to: {ctx.options.bench_repoint_to!r} is not HOST:PORT")
            self.address = (host, int(port))

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if self.address is None:
            return
        flow.request.scheme = "http"
        flow.request.host, flow.request.port = self.address


addons = [Repoint()]
