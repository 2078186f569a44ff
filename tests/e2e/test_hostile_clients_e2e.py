"""The hostile-client matrix: clients that send odd but legal bytes to a ruled registry through the real gateway —
their own `ns` and named reference, ranges and conditions on manifests, a fully qualified host name, an
absolute-form target, HTTP/1.0, pipelining, a request in two pieces or with a 70 kB line, an Upgrade, their own
Authorization in any letter case.

For every one: the mirror (a real registry behind a recording hop) hears exactly one `ns=upstream.test`, only the
gateway's named reference and none of the client's credentials; the registry itself (a TLS listener standing for it)
hears nothing at all; and the client gets its answer right, or a clear error. The run ends with one line,
`hostile clients: N odd requests tried, N handled`.
"""

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from tests.support import secrets, tally
from tests.support.gateway import Gateway, running_gateway
from tests.support.images import OCI_MANIFEST, Image, make_image, push_image
from tests.support.recorder import Recorder, recording_proxy
from tests.support.registry import running_registry
from tests.support.through import Fetched, get_through, read_answers, tls_through
from tests.support.tls import issue_server_cert, make_ca
from tests.support.tls_sink import TLSSink, tls_sink

UPSTREAM = "upstream.test"
HOSTILE_CLIENTS = tally.Matrix("hostile clients", "odd requests")
SECRET = "Bearer a-clients-own-token-7d21"
secrets.remember(SECRET)
PIECE_PAUSE = 0.5


@dataclass
class World:
    gateway: Gateway
    mirror: Recorder
    registry_itself: TLSSink
    image: Image

    @property
    def manifest_path(self) -> str:
        return "/v2/team/app/manifests/v1"

    @property
    def by_digest(self) -> str:
        return f"/v2/team/app/manifests/{self.image.manifest.digest}"

    @property
    def layer(self):
        return self.image.layers[0]

    @property
    def layer_path(self) -> str:
        return f"/v2/team/app/blobs/{self.layer.digest}"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    workdir = tmp_path_factory.mktemp("hostile-clients")
    ca = make_ca(workdir / "ca")
    server_tls = issue_server_cert(ca, workdir / "certs", [UPSTREAM], ["127.0.0.1"])
    image = make_image("hostile-clients", layers=1, layer_size=128 * 1024)
    rules = workdir / "rules"
    (rules / UPSTREAM).mkdir(parents=True)
    (rules / UPSTREAM / "hosts.toml").write_text(
        f'server = "https://{UPSTREAM}"\n[host."http://mirror.test:5000"]\n  capabilities = ["pull", "resolve"]\n'
    )
    with running_registry(workdir / "registry") as registry, tls_sink(server_tls) as itself:
        push_image(registry.url, "team/app", "v1", image)
        with recording_proxy(registry.url) as mirror:
            host_map = {"mirror.test:5000": f"127.0.0.1:{mirror.port}", UPSTREAM: f"127.0.0.1:{itself.port}"}
            # The gateway would trust the registry itself: were anything sent there, it would arrive.
            options = [f"ssl_verify_upstream_trusted_ca={ca.cert_path}"]
            with running_gateway(workdir / "gateway", rules, host_map, options) as gateway:
                yield World(gateway, mirror, itself, image)


def raw(world: World, head: str, *, upstream: str = UPSTREAM, pieces: int = 1, answers: int = 1) -> list[Fetched]:
    """Writes `head` (a request head, or several) inside a TLS connection to `upstream`, in `pieces` writes a moment
    apart, and reads `answers` answers."""
    data = head.encode()
    size = -(-len(data) // pieces)
    with tls_through(world.gateway, upstream) as connection:
        for start in range(0, len(data), size):
            connection.sendall(data[start : start + size])
            if pieces > 1:
                time.sleep(PIECE_PAUSE)
        return read_answers(connection, answers)


def is_manifest(world: World, fetched: Fetched) -> bool:
    return fetched.status == 200 and fetched.broken is None and fetched.body == world.image.manifest.data


def is_layer(world: World, fetched: Fetched) -> bool:
    return fetched.status == 200 and fetched.broken is None and fetched.body == world.layer.data


def head(target: str, *lines: str, version: str = "HTTP/1.1", host: str = UPSTREAM) -> str:
    """A manifest request's head as a client writes it, with `lines` among its headers."""
    return (
        "".join(
            f"{line}\r\n" for line in (f"GET {target} {version}", f"Host: {host}", f"Accept: {OCI_MANIFEST}", *lines)
        )
        + "\r\n"
    )


# Each case: what the client does, and whether what it got is right. The mirror and the registry itself are checked
# the same way for all of them (see the test).
CASES: dict[str, Callable[[World], bool]] = {
    "its own ns, spelled n%73": lambda w: is_manifest(
        w, get_through(w.gateway, UPSTREAM, w.manifest_path + "?n%73=evil.test", [("Accept", OCI_MANIFEST)])
    ),
    "its own ns, twice": lambda w: is_manifest(
        w, get_through(w.gateway, UPSTREAM, w.manifest_path + "?ns=evil.test&ns=x.test", [("Accept", OCI_MANIFEST)])
    ),
    "its own OCI-Named-Ref and OCI-Ref": lambda w: is_manifest(
        w,
        get_through(
            w.gateway,
            UPSTREAM,
            w.manifest_path,
            [("Accept", OCI_MANIFEST), ("OCI-Named-Ref", "evil.test/x:y"), ("OCI-Ref", "evil.test/x:y")],
        ),
    ),
    "its own Authorization, in odd letter case": lambda w: is_manifest(
        w, get_through(w.gateway, UPSTREAM, w.manifest_path, [("Accept", OCI_MANIFEST), ("aUTHORIZATION", SECRET)])
    ),
    "a Range on a manifest by digest": lambda w: (
        is_manifest(
            w, get_through(w.gateway, UPSTREAM, w.by_digest, [("Accept", OCI_MANIFEST), ("Range", "bytes=0-9")])
        )
        # ...and the mirror is not held to have sent it wrong: the next plain request is served by it.
        and is_manifest(w, get_through(w.gateway, UPSTREAM, w.by_digest, [("Accept", OCI_MANIFEST)]))
    ),
    "an If-None-Match on a manifest": lambda w: is_manifest(
        w, get_through(w.gateway, UPSTREAM, w.manifest_path, [("Accept", OCI_MANIFEST), ("If-None-Match", '"x"')])
    ),
    "a fully qualified host name (trailing dot)": lambda w: is_manifest(
        w, raw(w, head(w.manifest_path, host=UPSTREAM + "."), upstream=UPSTREAM + ".")[0]
    ),
    "an absolute-form request target": lambda w: is_manifest(
        w, raw(w, head(f"https://{UPSTREAM}{w.manifest_path}"))[0]
    ),
    "HTTP/1.0": lambda w: is_manifest(w, raw(w, head(w.manifest_path, version="HTTP/1.0"))[0]),
    "two requests pipelined in one write": lambda w: all(
        is_manifest(w, answer) for answer in raw(w, head(w.manifest_path) * 2, answers=2)
    ),
    "a request written in two pieces, without ALPN": lambda w: is_manifest(
        w,
        raw(w, head(w.manifest_path, f"Authorization: {SECRET}"), pieces=2)[0],
    ),
    "a request line of 70 kB": lambda w: _oci_error(raw(w, head(f"{w.manifest_path}?pad={'a' * 70_000}"))[0], 502),
    "an Upgrade on a manifest request": lambda w: is_manifest(
        w,
        raw(w, head(w.manifest_path, "Connection: Upgrade", "Upgrade: pipe/1"))[0],
    ),
    "Accept-Encoding: gzip on a blob": lambda w: is_layer(
        w, get_through(w.gateway, UPSTREAM, w.layer_path, [("Accept-Encoding", "gzip")])
    ),
    "a Range on a blob (a resume)": lambda w: (
        lambda part: part.status == 206 and part.body == w.layer.data[100:] and part.broken is None
    )(get_through(w.gateway, UPSTREAM, w.layer_path, [("Range", "bytes=100-")])),
}


def _oci_error(fetched: Fetched, status: int) -> bool:
    try:
        return fetched.status == status and bool(json.loads(fetched.body)["errors"])
    except (ValueError, KeyError, TypeError):
        return False


def mirror_problems(requests) -> list[str]:
    problems = []
    for request in requests:
        what = f"{request.method} {request.target[:120]}"
        # query() decodes the keys: a client's n%73 would show here as a second ns.
        if request.query().get("ns") != [UPSTREAM]:
            problems.append(f"{what}: ns {request.query().get('ns')}")
        if request.header_values("OCI-Ref") or any(
            not v.startswith(f"{UPSTREAM}/team/app") for v in request.header_values("OCI-Named-Ref")
        ):
            problems.append(f"{what}: a client's named reference {request.headers}")
        if any(SECRET in value for _, value in request.headers):
            problems.append(f"{what}: the client's credential")
        if request.header_values("Upgrade"):
            problems.append(f"{what}: an Upgrade")
    return problems


@pytest.mark.parametrize("case", list(CASES))
def test_an_odd_client_request_gets_its_answer_and_only_the_gateway_speaks_to_the_hosts(
    world: World, case: str
) -> None:
    world.mirror.clear()
    answered_right = CASES[case](world)
    problems = mirror_problems(world.mirror.requests)
    heard = world.registry_itself.received
    handled = answered_right and not problems and not heard
    tally.record(HOSTILE_CLIENTS, handled=handled)
    assert handled, (
        f"answered right: {answered_right}; mirror: {problems}; the registry itself heard {heard[:2]}\n"
        + world.gateway.log_text()[-1500:]
    )
