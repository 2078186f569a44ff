"""Nothing but HTTP goes to a ruled registry: a client whose first bytes inside the intercepted TLS connection have no
line end (a request written in two pieces, or a request line longer than a TLS record), which mitmproxy would pass
through as raw TCP, is read as HTTP and served by the gateway's plan. The registry itself (a TLS listener standing
for it, trusted by the gateway) never hears the client, its Authorization least of all, whether its rule is offline
or not."""

import contextlib
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.support import secrets
from tests.support.gateway import MITMDUMP_SCRIPT, Gateway, running_gateway
from tests.support.images import OCI_MANIFEST, Image, make_image, push_image
from tests.support.registry import running_registry
from tests.support.through import tls_through
from tests.support.tls import issue_server_cert, make_ca
from tests.support.tls_sink import TLSSink, tls_sink

SECRET = "Bearer raw-tcp-secret-4f1c"
secrets.remember(SECRET)
# What the registry answers any request with: a protocol switch, after which the connection would be a pipe.
SWITCH = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: pipe/1\r\nConnection: Upgrade\r\n\r\n"
ANSWER_TIMEOUT = 10.0
# A pause long enough for the gateway to decide on the first piece alone.
PIECE_PAUSE = 0.5


@dataclass
class World:
    gateway: Gateway
    sinks: dict[str, TLSSink]  # by upstream: the registry itself
    image: Image


# ocigate's hooks must come before mitmproxy's own next-layer decision, whether loaded as a command or as a script.
@pytest.fixture(scope="module", params=[None, MITMDUMP_SCRIPT], ids=["ocigate", "mitmdump-script"])
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    workdir = tmp_path_factory.mktemp("http-only")
    ca = make_ca(workdir / "ca")
    server_tls = issue_server_cert(ca, workdir / "certs", ["upstream.test", "airgap.test"], ["127.0.0.1"])
    image = make_image("http-only", layers=1, layer_size=1024)
    rules = workdir / "rules"
    for upstream, offline in (("upstream.test", False), ("airgap.test", True)):
        (rules / upstream).mkdir(parents=True)
        (rules / upstream / "hosts.toml").write_text(
            f'{"offline = true" if offline else ""}\nserver = "https://{upstream}"\n'
            '[host."http://mirror.internal:5000"]\n  capabilities = ["pull", "resolve"]\n'
        )
    with (
        running_registry(workdir / "mirror") as mirror,
        tls_sink(server_tls, answer=SWITCH) as upstream_sink,
        tls_sink(server_tls) as airgap_sink,
    ):
        push_image(mirror.url, "team/app", "v1", image)
        host_map = {
            "mirror.internal:5000": f"127.0.0.1:{mirror.port}",
            "upstream.test": f"127.0.0.1:{upstream_sink.port}",
            "airgap.test": f"127.0.0.1:{airgap_sink.port}",
        }
        # The gateway trusts the registry's certificate: a connection to it would carry the client's bytes.
        options = [f"ssl_verify_upstream_trusted_ca={ca.cert_path}"]
        entry_point = {"entry_point": request.param} if request.param else {}
        with running_gateway(workdir / "gateway", rules, host_map, options, **entry_point) as gateway:
            yield World(gateway, {"upstream.test": upstream_sink, "airgap.test": airgap_sink}, image)


def answer(connection: ssl.SSLSocket) -> bytes:
    """Everything the gateway sends back until it closes the connection (the request asks it to), or what came
    before nothing more did."""
    received = b""
    try:
        while data := connection.recv(65536):
            received += data
    except (ConnectionError, TimeoutError):
        pass
    return received


def request_head(upstream: str, target: str) -> tuple[bytes, bytes]:
    """A request's line, and the rest of its head: the client's Authorization among it."""
    line = f"GET {target} HTTP/1.1".encode()
    headers = f"Host: {upstream}\r\nAccept: {OCI_MANIFEST}\r\nAuthorization: {SECRET}\r\nConnection: close"
    return line, f"\r\n{headers}\r\n\r\n".encode()


def assert_never_heard(registry: TLSSink) -> None:
    received = registry.received
    assert not any(SECRET.encode() in data for data in received), "the client's Authorization reached the registry"
    # The manifest is on the mirror: the plan never gets as far as the registry itself, offline or not.
    assert received == []


@pytest.mark.parametrize("upstream", ["upstream.test", "airgap.test"])
def test_a_request_written_in_two_pieces_is_served_as_http_and_the_registry_hears_nothing(
    world: World, upstream: str
) -> None:
    line, rest = request_head(upstream, "/v2/team/app/manifests/v1")
    with tls_through(world.gateway, upstream, timeout=ANSWER_TIMEOUT) as connection:
        connection.sendall(line)
        time.sleep(PIECE_PAUSE)
        connection.sendall(rest)
        received = answer(connection)
    assert_never_heard(world.sinks[upstream])
    assert received.startswith(b"HTTP/1.1 200 "), received[:300]
    assert world.image.manifest.digest.encode() in received


@pytest.mark.parametrize("upstream", ["upstream.test", "airgap.test"])
@pytest.mark.parametrize(
    ("length", "status"),
    # Longer than a TLS record (16 kB), the first bytes the gateway sees have no line end; longer than the URLs
    # ocigate's own HTTP client builds (64 kB), no host can be asked it.
    [(20_000, b"200"), (70_000, b"502")],
)
def test_a_request_line_longer_than_a_tls_record_is_served_as_http_and_the_registry_hears_nothing(
    world: World, upstream: str, length: int, status: bytes
) -> None:
    line, rest = request_head(upstream, "/v2/team/app/manifests/v1?padding=" + "a" * length)
    with tls_through(world.gateway, upstream, timeout=ANSWER_TIMEOUT) as connection:
        connection.sendall(line + rest)
        received = answer(connection)
    assert_never_heard(world.sinks[upstream])
    assert received.startswith(b"HTTP/1.1 " + status + b" "), received[:300]


def test_a_protocol_switch_never_makes_a_pipe_to_the_registry(world: World) -> None:
    # Not a distribution request: it goes to the registry itself, but without its Upgrade.
    head = "GET /v2/token HTTP/1.1\r\nHost: upstream.test\r\nConnection: Upgrade\r\nUpgrade: pipe/1\r\n\r\n"
    registry = world.sinks["upstream.test"]
    before = len(registry.received)
    with tls_through(world.gateway, "upstream.test", timeout=ANSWER_TIMEOUT) as connection:
        connection.sendall(head.encode())
        received = answer(connection)
        # The registry answers 101 all the same: the gateway ends the client's connection instead of piping it.
        with contextlib.suppress(OSError):
            connection.sendall(f"after the switch: {SECRET}".encode())
    time.sleep(PIECE_PAUSE)
    heard = registry.received[before:]
    assert len(heard) == 1 and heard[0].startswith(b"GET /v2/token HTTP/1.1\r\n"), heard
    assert b"upgrade" not in heard[0].lower()
    assert SECRET.encode() not in heard[0]
    assert not received.startswith(b"HTTP/1.1 101"), received[:300]
