"""The gateway's health as a probe asks it (a kubelet, systemd, a container's HEALTHCHECK), on the metrics server's
port: `/healthz` answers 200 while the gateway is alive, `/readyz` while it is ready to serve, 503 otherwise, with one
line saying why. Every other path is the metrics'.

Both share the metrics server, so a probe needs no port or thread of its own; what they answer holds no secret, like
the metrics (a verdict names no client, credential or host).
"""

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

LIVENESS_PATH = "/healthz"
READINESS_PATH = "/readyz"
# How long liveness waits for the event loop, which serves every flow, to run a callback. A loop that cannot do that
# within this bound serves no client either; a probe's own timeout must be longer, or the probe fails first.
LIVENESS_TIMEOUT = 2.0


@dataclass(frozen=True)
class Verdict:
    ok: bool
    why: str  # one line, the probe's answer


Check = Callable[[], Verdict]


def with_probes(metrics: WSGIApplication, alive: Check, ready: Check) -> WSGIApplication:
    """`metrics` (the app serving the metrics), with the liveness and readiness paths answered by `alive()` and
    `ready()`, asked for each probe."""
    checks = {LIVENESS_PATH: alive, READINESS_PATH: ready}

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        check = checks.get(environ.get("PATH_INFO", ""))
        if check is None:
            return metrics(environ, start_response)
        verdict = check()
        status = "200 OK" if verdict.ok else "503 Service Unavailable"
        body = f"{verdict.why}\n".encode()
        start_response(status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))])
        return [body]

    return app
