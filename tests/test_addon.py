"""The addons driven by mitmproxy's own test harness (taddons, tflow), against small local HTTP hosts."""

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from mitmproxy import connection, exceptions, http, tls
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.proxy import server_hooks
from mitmproxy.proxy.context import Context
from mitmproxy.test import taddons, tflow, tutils

from ocigate import configuration
from ocigate import dialing as dialing_module
from ocigate.addon import METADATA_KEY, Gateway
from ocigate.configuration import Configuration, Shared
from ocigate.dialing import Dialing
from ocigate.record import FAILED_MARK
from ocigate.verify import StreamVerifier
from tests.support.http_host import http_host
from tests.support.registry import free_port

DIGEST = "sha256:" + "b" * 64


def write_rules(root: Path, upstream: str, text: str) -> Path:
    (root / upstream).mkdir(parents=True, exist_ok=True)
    (root / upstream / "hosts.toml").write_text(text)
    return root


@contextmanager
def gateway(rules: Path, host_map: list[str] = (), read_timeout: int = 5) -> Iterator[tuple[Gateway, taddons.context]]:
    """The addons as the gateway runs them; credentials only from ocigate's own store, `<rules>/credentials.json`."""
    shared = Shared()
    dialing, configuration = Dialing(shared), Configuration(shared)
    gw = Gateway(shared)
    with taddons.context(dialing, configuration, gw) as tctx:
        tctx.configure(
            configuration,
            ocigate_map_hosts=list(host_map),
            ocigate_allow_destinations=["127.0.0.0/8"],
            ocigate_dns=False,
            ocigate_credential_sources=["ocigate"],
            ocigate_credentials=str(rules / "credentials.json"),
            ocigate_rules=str(rules),
            ocigate_connect_timeout=2,
            ocigate_read_timeout=read_timeout,
        )
        yield gw, tctx


def flow_to(host: str, path: str, method: str = "GET", port: int = 443, headers=()) -> http.HTTPFlow:
    flow = tflow.tflow()
    flow.request = tutils.treq(
        scheme=b"https",
        host=host.encode(),
        port=port,
        path=path.encode(),
        method=method.encode(),
        headers=((b"Host", host.encode()), *headers),
        content=b"",
    )
    return flow


def test_broken_rules_refuse_configuration_naming_the_file(tmp_path: Path) -> None:
    rules = write_rules(tmp_path, "upstream.test", '[host."https://m.test"]\ncapabilities = ["pul"]\n')
    with pytest.raises(exceptions.OptionsError, match=r"upstream\.test/hosts\.toml.*pul"), gateway(rules):
        pass


def test_missing_rules_directory_is_an_options_error(tmp_path: Path) -> None:
    with pytest.raises(exceptions.OptionsError, match="does-not-exist"), gateway(tmp_path / "does-not-exist"):
        pass


def test_connection_strategy_is_forced_lazy(tmp_path: Path) -> None:
    with gateway(write_rules(tmp_path, "upstream.test", 'server = "https://upstream.test"\n')) as (_, tctx):
        tctx.master.addons.add(Proxyserver())
        tctx.options.update(connection_strategy="eager")
        assert tctx.options.connection_strategy == "lazy"


def test_bad_named_ref_header_name_is_refused(tmp_path: Path) -> None:
    with (
        gateway(write_rules(tmp_path, "upstream.test", "")) as (gw, tctx),
        pytest.raises(exceptions.OptionsError, match="ocigate_named_ref_headers"),
    ):
        tctx.configure(gw, ocigate_named_ref_headers=["OCI Named Ref"])


async def test_ping_of_a_ruled_upstream_is_answered_by_the_gateway(tmp_path: Path) -> None:
    with gateway(write_rules(tmp_path, "upstream.test", 'server = "https://upstream.test"\n')) as (gw, _):
        flow = flow_to("upstream.test", "/v2/")
        await gw.requestheaders(flow)
        assert flow.response.status_code == 200
        assert flow.response.headers["Docker-Distribution-API-Version"] == "registry/2.0"
        assert flow.metadata[METADATA_KEY]["served_by"] == "gateway"


async def test_a_ruled_upstream_written_with_a_trailing_dot_is_routed_as_that_upstream(tmp_path: Path) -> None:
    rules = write_rules(
        tmp_path,
        "upstream.test",
        'server = "https://upstream.test"\ncapabilities = ["resolve"]\n'
        '[host."http://mirror.test:5000"]\ncapabilities = ["pull"]\n',
    )
    with gateway(rules, ["mirror.test=127.0.0.1"]) as (gw, _):
        flow = flow_to("upstream.test.", f"/v2/team/app/blobs/{DIGEST}")
        await gw.requestheaders(flow)
    assert (flow.request.host, flow.request.port) == ("mirror.test", 5000)
    assert flow.request.path == f"/v2/team/app/blobs/{DIGEST}?ns=upstream.test"
    assert flow.metadata[METADATA_KEY]["upstream"] == "upstream.test"


async def test_unruled_host_and_non_registry_paths_pass_untouched(tmp_path: Path) -> None:
    with gateway(write_rules(tmp_path, "upstream.test", 'server = "https://upstream.test"\n')) as (gw, _):
        other = flow_to("other.test", "/v2/")
        page = flow_to("upstream.test", "/index.html")
        for flow in (other, page):
            await gw.requestheaders(flow)
            assert flow.response is None and METADATA_KEY not in flow.metadata
        assert other.request.host == "other.test" and page.request.path == "/index.html"


async def test_malformed_route_gets_an_oci_error(tmp_path: Path) -> None:
    with gateway(write_rules(tmp_path, "upstream.test", 'server = "https://upstream.test"\n')) as (gw, _):
        flow = flow_to("upstream.test", "/v2/Team/App/manifests/v1")
        await gw.requestheaders(flow)
        assert flow.response.status_code == 400
        assert json.loads(flow.response.content)["errors"][0]["code"] == "NAME_INVALID"


async def test_no_host_with_push_answers_405_naming_the_rule_file(tmp_path: Path) -> None:
    rules = write_rules(tmp_path, "upstream.test", '[host."https://m.test"]\ncapabilities = ["pull", "resolve"]\n')
    text = (
        'server = "https://upstream.test"\ncapabilities = ["pull"]\n'
        + (rules / "upstream.test" / "hosts.toml").read_text()
    )
    (rules / "upstream.test" / "hosts.toml").write_text(text)
    with gateway(rules) as (gw, _):
        flow = flow_to("upstream.test", "/v2/team/app/blobs/uploads/", method="POST")
        await gw.requestheaders(flow)
        assert flow.response.status_code == 405
        error = json.loads(flow.response.content)["errors"][0]
        assert error["code"] == "UNSUPPORTED" and "hosts.toml" in error["message"] and "push" in error["message"]


async def test_blob_is_repointed_to_the_only_mirror_with_ns_and_without_client_credentials(
    tmp_path: Path,
) -> None:
    # The server keeps only `resolve`, so the mirror is the one host a blob may come from: no probe is needed.
    rules = write_rules(
        tmp_path,
        "upstream.test",
        'server = "https://upstream.test"\ncapabilities = ["resolve"]\n'
        '[host."http://mirror.test:5000"]\ncapabilities = ["pull"]\n',
    )
    with gateway(rules, ["mirror.test=127.0.0.1"]) as (gw, _):
        client_own = ((b"Authorization", b"Bearer client"), (b"Cookie", b"session=client"))
        flow = flow_to("upstream.test", f"/v2/team/app/blobs/{DIGEST}", headers=client_own)
        await gw.requestheaders(flow)
        assert flow.response is None
        request = flow.request
        assert (request.scheme, request.host, request.port) == ("http", "mirror.test", 5000)
        assert request.path == f"/v2/team/app/blobs/{DIGEST}?ns=upstream.test"
        assert "Authorization" not in request.headers and "Cookie" not in request.headers
        assert request.host_header == "mirror.test:5000"
        flow.response = tutils.tresp()
        gw.responseheaders(flow)
        # Streamed, never buffered: through the verifier of its digest.
        assert isinstance(flow.response.stream, StreamVerifier) and flow.response.stream.digest == DIGEST


async def test_manifest_falls_through_refused_and_404_hosts_to_the_first_good_one(tmp_path: Path) -> None:
    manifest = b'{"schemaVersion": 2}'
    with (
        http_host(lambda h: (404, b"{}")) as (port_404, seen_404),
        http_host(lambda h: (200, manifest)) as (port_ok, seen_ok),
    ):
        refused_port = port_404 + 1 if port_404 + 1 != port_ok else port_404 + 2
        rules = write_rules(
            tmp_path,
            "upstream.test",
            f'[host."http://refused.test:{refused_port}"]\n'
            f'[host."http://missing.test:{port_404}"]\n'
            f'[host."http://good.test:{port_ok}"]\n',
        )
        host_map = [
            f"refused.test=127.0.0.1:{refused_port}",
            "missing.test=127.0.0.1",
            "good.test=127.0.0.1",
        ]
        with gateway(rules, host_map) as (gw, _):
            accept = (
                (b"Accept", b"application/vnd.oci.image.index.v1+json"),
                (b"Accept", b"application/vnd.oci.image.manifest.v1+json"),
            )
            flow = flow_to("upstream.test", "/v2/team/app/manifests/v1", headers=accept)
            await gw.requestheaders(flow)
        assert flow.response.status_code == 200 and flow.response.content == manifest
        record = flow.metadata[METADATA_KEY]
        assert [a["fell_through"] for a in record["attempts"]] == [True, True, False]
        assert record["attempts"][0]["result"] == "connection refused"
        assert record["attempts"][1]["result"] == "404"
        _, path, headers = seen_ok[0]
        assert path == "/v2/team/app/manifests/v1?ns=upstream.test"
        assert headers.get_all("Accept") == [
            "application/vnd.oci.image.index.v1+json",
            "application/vnd.oci.image.manifest.v1+json",
        ]
        assert "upstream.test/team/app:v1" in headers.get_all("OCI-Named-Ref")
        # Nothing the client did not send: no User-Agent of the gateway's HTTP library, no compression asked for.
        assert "User-Agent" not in headers and headers["Accept-Encoding"] == "identity"
        assert seen_404 and seen_404[0][1] == "/v2/team/app/manifests/v1?ns=upstream.test"


async def test_a_host_that_does_not_answer_in_time_is_skipped(tmp_path: Path) -> None:
    release = threading.Event()

    def late(handler: BaseHTTPRequestHandler) -> tuple[int, bytes]:
        release.wait(10)
        return 200, b"too late"

    with http_host(late) as (slow, _), http_host(lambda h: (200, b"{}")) as (fast, _):
        rules = write_rules(
            tmp_path, "upstream.test", f'[host."http://slow.test:{slow}"]\n[host."http://fast.test:{fast}"]\n'
        )
        with gateway(rules, ["slow.test=127.0.0.1", "fast.test=127.0.0.1"], read_timeout=1) as (gw, _):
            flow = flow_to("upstream.test", "/v2/team/app/tags/list")
            await gw.requestheaders(flow)
        release.set()
    assert flow.response.status_code == 200 and flow.response.content == b"{}"
    attempts = flow.metadata[METADATA_KEY]["attempts"]
    assert attempts[0]["result"] == "answer not complete within 1 s" and attempts[0]["fell_through"]


CLIENT_AUTHORIZATION = (b"Authorization", b"Bearer client-own-token")


def authorizations(seen: list) -> list[str | None]:
    return [headers.get("Authorization") for _, _, headers in seen]


async def test_hosts_refusing_the_gateway_give_the_client_unauthorized_naming_each_host_and_never_its_token(
    tmp_path: Path,
) -> None:
    with http_host(lambda h: (401, b"{}")) as (port, seen):
        rules = write_rules(
            tmp_path,
            f"upstream.test:{port}",
            f'server = "http://upstream.test:{port}"\n[host."http://m.test:{port}"]\n',
        )
        with gateway(rules, ["upstream.test=127.0.0.1", "m.test=127.0.0.1"]) as (gw, _):
            client_own = [CLIENT_AUTHORIZATION, (b"Cookie", b"session=client-own-cookie")]
            flow = flow_to("upstream.test", "/v2/team/app/manifests/v1", port=port, headers=client_own)
            await gw.requestheaders(flow)
    assert flow.response.status_code == 401
    assert [headers.get("Cookie") for _, _, headers in seen] == [None, None]
    error = json.loads(flow.response.content)["errors"][0]
    assert error["code"] == "UNAUTHORIZED"
    assert f"http://m.test:{port}/v2: 401 unauthorized without credentials" in error["message"]
    assert f"http://upstream.test:{port}/v2: 401 unauthorized without credentials" in error["message"]
    # ocigate authenticates to every host, the registry's own included: the client's token goes to none.
    assert authorizations(seen) == [None, None]


async def test_a_client_authenticating_itself_hears_the_upstreams_challenge_and_only_the_upstream_its_token(
    tmp_path: Path,
) -> None:
    challenge = {"WWW-Authenticate": 'Bearer realm="https://auth.test/token",service="upstream"'}
    with http_host(lambda h: (401, b"{}", challenge)) as (port, seen):
        rules = write_rules(
            tmp_path,
            f"upstream.test:{port}",
            f'authentication = "client"\nserver = "http://upstream.test:{port}"\n[host."http://m.test:{port}"]\n',
        )
        with gateway(rules, ["upstream.test=127.0.0.1", "m.test=127.0.0.1"]) as (gw, _):
            ping = flow_to("upstream.test", "/v2/", port=port)
            await gw.requestheaders(ping)
            flow = flow_to("upstream.test", "/v2/team/app/manifests/v1", port=port, headers=[CLIENT_AUTHORIZATION])
            await gw.requestheaders(flow)
            for answered in (ping, flow):
                gw.response(answered)
    # The ping goes to the registry itself, so the client learns its challenge and fetches its own token.
    assert ping.response.status_code == 401
    # A challenge to a client that sent no credential yet is no failure; its own token refused is.
    assert ping.metadata[METADATA_KEY]["expected"] == "challenge" and ping.marked == ""
    assert "expected" not in flow.metadata[METADATA_KEY] and flow.marked == FAILED_MARK
    assert ping.response.headers["WWW-Authenticate"] == challenge["WWW-Authenticate"]
    assert flow.response.status_code == 401
    mirror, upstream = flow.metadata[METADATA_KEY]["attempts"]
    # The mirror's challenge is ocigate's to answer: an anonymous token from a realm the guard does not let it reach.
    assert mirror["fell_through"] and mirror["result"].startswith(f"no token for m.test:{port} without credentials")
    assert "https://auth.test failed: auth.test:443 is not in the host map" in mirror["result"]
    assert (upstream["result"], upstream["fell_through"]) == ("401", False)
    assert [path for _, path, _ in seen] == [
        "/v2/",
        f"/v2/team/app/manifests/v1?ns=upstream.test%3A{port}",
        "/v2/team/app/manifests/v1",
    ]
    assert authorizations(seen) == [None, None, "Bearer client-own-token"]


async def test_every_host_404_gives_manifest_unknown_naming_each_host(tmp_path: Path) -> None:
    with http_host(lambda h: (404, b"{}")) as (port, _):
        rules = write_rules(
            tmp_path,
            "upstream.test",
            f'server = "http://upstream.test:{port}"\n[host."http://m.test:{port}"]\n',
        )
        host_map = ["upstream.test=127.0.0.1", "m.test=127.0.0.1"]
        with gateway(rules, host_map) as (gw, _):
            flow = flow_to("upstream.test", "/v2/team/app/manifests/v1")
            await gw.requestheaders(flow)
    assert flow.response.status_code == 404
    error = json.loads(flow.response.content)["errors"][0]
    assert error["code"] == "MANIFEST_UNKNOWN"
    assert f"http://m.test:{port}/v2: 404" in error["message"]
    assert f"http://upstream.test:{port}/v2: 404" in error["message"]


async def test_unmapped_host_is_refused_by_the_guard_and_reported(tmp_path: Path) -> None:
    rules = write_rules(tmp_path, "upstream.test", 'server = "https://upstream.test"\n')
    with gateway(rules) as (gw, _):
        flow = flow_to("upstream.test", "/v2/team/app/manifests/v1")
        await gw.requestheaders(flow)
    assert flow.response.status_code == 502
    error = json.loads(flow.response.content)["errors"][0]
    assert "upstream.test:443 is not in the host map" in error["message"]


async def test_blob_probe_skips_a_mirror_that_lacks_it(tmp_path: Path) -> None:
    with http_host(lambda h: (404, b"")) as (missing, _), http_host(lambda h: (200, b"x")) as (has, _):
        rules = write_rules(
            tmp_path,
            "upstream.test",
            f'[host."http://a.test:{missing}"]\n[host."http://b.test:{has}"]\n',
        )
        with gateway(rules, ["a.test=127.0.0.1", "b.test=127.0.0.1"]) as (gw, _):
            flow = flow_to("upstream.test", f"/v2/team/app/blobs/{DIGEST}")
            await gw.requestheaders(flow)
    assert (flow.request.host, flow.request.port) == ("b.test", has)
    assert flow.metadata[METADATA_KEY]["attempts"][0]["result"] == "probe: 404"


@pytest.mark.parametrize("first_down", [False, True])
async def test_a_blob_head_404_is_expected_only_when_every_host_asked_said_not_found(
    tmp_path: Path, first_down: bool
) -> None:
    with http_host(lambda h: (404, b"")) as (missing, _), http_host(lambda h: (404, b"")) as (other, _):
        first = free_port() if first_down else missing  # nothing listens on a free port: the host is down
        rules = write_rules(
            tmp_path,
            "upstream.test",
            # Pull hosts only: no push, so a blob HEAD is a pull's and asks every host in turn.
            f'server = "http://second.test:{other}"\ncapabilities = ["pull", "resolve"]\n'
            f'[host."http://first.test:{first}"]\ncapabilities = ["pull"]\n',
        )
        with gateway(rules, ["first.test=127.0.0.1", "second.test=127.0.0.1"]) as (gw, _):
            flow = flow_to("upstream.test", f"/v2/team/app/blobs/{DIGEST}", method="HEAD")
            await gw.requestheaders(flow)
            gw.response(flow)
    # A host down is no reason to tell a client checking for a blob anything but "not found" (answers.failure)...
    assert flow.response.status_code == 404
    results = [attempt["result"] for attempt in flow.metadata[METADATA_KEY]["attempts"]]
    assert results == ["connection refused" if first_down else "404", "404"]
    # ... but the host that was down may have it: that 404 is no registry's verdict, and stands out.
    assert flow.metadata[METADATA_KEY].get("expected") == (None if first_down else "probe")
    assert flow.marked == (FAILED_MARK if first_down else "")


def test_tls_to_unruled_hosts_is_not_intercepted(tmp_path: Path) -> None:
    with gateway(write_rules(tmp_path, "upstream.test", 'server = "https://upstream.test"\n')) as (gw, tctx):
        cases = ((("upstream.test", 443), False), (("upstream.test.", 443), False), (("other.test", 443), True))
        for address, ignored in cases:
            context = Context(tflow.tclient_conn(), tctx.options)
            context.server.address = address
            data = tls.ClientHelloData(context, None)  # type: ignore[arg-type]
            gw.tls_clienthello(data)
            assert data.ignore_connection is ignored


MANIFEST = b'{"schemaVersion": 2}'


def two_hosts(tmp_path: Path, first: int, second: int, upstream: str = "upstream.test") -> tuple[Path, list[str]]:
    rules = write_rules(
        tmp_path, upstream, f'[host."http://first.test:{first}"]\n[host."http://second.test:{second}"]\n'
    )
    return rules, ["first.test=127.0.0.1", "second.test=127.0.0.1"]


@pytest.mark.parametrize("status", [500, 502, 503, 429])
async def test_overloaded_or_broken_host_falls_through(tmp_path: Path, status: int) -> None:
    with http_host(lambda h: (status, b"{}")) as (broken, _), http_host(lambda h: (200, MANIFEST)) as (good, _):
        rules, host_map = two_hosts(tmp_path, broken, good)
        with gateway(rules, host_map) as (gw, _):
            flow = flow_to("upstream.test", "/v2/team/app/manifests/v1")
            await gw.requestheaders(flow)
    assert flow.response.status_code == 200 and flow.response.content == MANIFEST
    assert flow.metadata[METADATA_KEY]["attempts"][0] == {
        "host": f"http://first.test:{broken}/v2",
        "result": str(status),
        "fell_through": True,
    }


async def test_referrers_fall_through_to_the_next_host(tmp_path: Path) -> None:
    index = b'{"schemaVersion": 2, "manifests": []}'
    with http_host(lambda h: (404, b"{}")) as (missing, _), http_host(lambda h: (200, index)) as (good, seen):
        rules = write_rules(
            tmp_path,
            "upstream.test",
            f'[host."http://first.test:{missing}"]\n  capabilities = ["referrers"]\n'
            f'[host."http://second.test:{good}"]\n  capabilities = ["referrers"]\n',
        )
        with gateway(rules, ["first.test=127.0.0.1", "second.test=127.0.0.1"]) as (gw, _):
            flow = flow_to("upstream.test", f"/v2/team/app/referrers/{DIGEST}")
            await gw.requestheaders(flow)
    assert flow.response.status_code == 200 and flow.response.content == index
    assert seen[0][1] == f"/v2/team/app/referrers/{DIGEST}?ns=upstream.test"


async def test_head_answers_keep_the_hosts_length_and_never_invent_one(tmp_path: Path) -> None:
    with (
        http_host(lambda h: (200, MANIFEST)) as (sized, _),
        http_host(lambda h: (200, MANIFEST), chunked=True) as (chunked, _),
    ):
        for port in (sized, chunked):
            rules = write_rules(tmp_path / str(port), "upstream.test", f'[host."http://m.test:{port}"]\n')
            with gateway(rules, ["m.test=127.0.0.1"]) as (gw, _):
                flow = flow_to("upstream.test", f"/v2/team/app/blobs/{DIGEST}", method="HEAD")
                await gw.requestheaders(flow)
            assert flow.response.status_code == 200 and flow.response.raw_content == b""
            expected = str(len(MANIFEST)) if port == sized else None
            assert flow.response.headers.get("Content-Length") == expected


async def test_chunked_get_answer_gets_its_length(tmp_path: Path) -> None:
    with http_host(lambda h: (200, MANIFEST), chunked=True) as (port, _):
        rules = write_rules(tmp_path, "upstream.test", f'[host."http://m.test:{port}"]\n')
        with gateway(rules, ["m.test=127.0.0.1"]) as (gw, _):
            flow = flow_to("upstream.test", "/v2/team/app/manifests/v1")
            await gw.requestheaders(flow)
    assert flow.response.content == MANIFEST
    assert flow.response.headers["Content-Length"] == str(len(MANIFEST))
    assert "Transfer-Encoding" not in flow.response.headers


async def test_not_found_where_asked_and_down_elsewhere_is_not_found(tmp_path: Path) -> None:
    with http_host(lambda h: (404, b"{}")) as (missing, _):
        refused = missing + 1
        rules, host_map = two_hosts(tmp_path, refused, missing)
        with gateway(rules, host_map) as (gw, _):
            flow = flow_to("upstream.test", "/v2/team/app/manifests/sha256-sig")
            await gw.requestheaders(flow)
    assert flow.response.status_code == 404
    error = json.loads(flow.response.content)["errors"][0]
    assert error["code"] == "MANIFEST_UNKNOWN" and "connection refused" in error["message"]


async def test_repointed_blob_carries_the_hosts_headers(tmp_path: Path) -> None:
    rules = write_rules(
        tmp_path,
        "upstream.test",
        'server = "https://upstream.test"\ncapabilities = ["resolve"]\n'
        '[host."http://mirror.test:5000"]\n  capabilities = ["pull"]\n'
        '  [host."http://mirror.test:5000".header]\n    x-mirror-key = ["a", "b"]\n',
    )
    with gateway(rules, ["mirror.test=127.0.0.1"]) as (gw, _):
        flow = flow_to("upstream.test", f"/v2/team/app/blobs/{DIGEST}", headers=((b"X-Mirror-Key", b"client"),))
        await gw.requestheaders(flow)
        # Added as the request is sent (values in hosts.toml may be secrets), never kept in the flow.
        assert gw.streams.as_sent(flow, flow.request).headers.get_all("x-mirror-key") == ["a", "b"]
    assert flow.request.headers.get_all("x-mirror-key") == ["<redacted>", "<redacted>"]


async def test_named_reference_header_name_is_an_option(tmp_path: Path) -> None:
    with http_host(lambda h: (200, MANIFEST)) as (port, seen):
        rules = write_rules(tmp_path, "upstream.test", f'[host."http://m.test:{port}"]\n')
        with gateway(rules, ["m.test=127.0.0.1"]) as (gw, tctx):
            tctx.configure(gw, ocigate_named_ref_headers=["OCI-Ref"])
            await gw.requestheaders(flow_to("upstream.test", "/v2/team/app/manifests/v1"))
    headers = seen[0][2]
    assert headers["OCI-Ref"] == "upstream.test/team/app:v1" and "OCI-Named-Ref" not in headers


# A named reference of the client's own, under every name a host reads one from (the configured one included).
CLIENT_NAMED_REFS = ((b"OCI-Named-Ref", b"evil.test/x:y"), (b"oci-ref", b"evil.test/x:y"), (b"X-Ref", b"evil.test/x:y"))
NAMED_REF_NAMES = ("OCI-Named-Ref", "OCI-Ref", "X-Ref")


@pytest.mark.parametrize(
    ("path", "named"), [("/v2/team/app/manifests/v1", "upstream.test/team/app:v1"), ("/v2/team/app/tags/list", None)]
)
async def test_a_host_asked_by_the_gateway_hears_only_the_gateways_named_reference(
    tmp_path: Path, path: str, named: str | None
) -> None:
    with http_host(lambda h: (200, MANIFEST)) as (port, seen):
        rules = write_rules(tmp_path, "upstream.test", f'[host."http://m.test:{port}"]\n')
        with gateway(rules, ["m.test=127.0.0.1"]) as (gw, tctx):
            tctx.configure(gw, ocigate_named_ref_headers=["X-Ref"])
            await gw.requestheaders(flow_to("upstream.test", path, headers=CLIENT_NAMED_REFS))
    headers = seen[0][2]
    assert headers.get_all("X-Ref") == ([named] if named else None)
    assert headers.get_all("OCI-Named-Ref") is None and headers.get_all("OCI-Ref") is None


@pytest.mark.parametrize(
    ("method", "path", "named"),
    [
        ("GET", f"/v2/team/app/blobs/{DIGEST}", f"upstream.test/team/app@{DIGEST}"),
        ("POST", "/v2/team/app/blobs/uploads/", None),
    ],
)
async def test_a_streamed_request_carries_only_the_gateways_named_reference(
    tmp_path: Path, method: str, path: str, named: str | None
) -> None:
    with http_host(lambda h: (200, b"{}")) as (port, _):
        rules = write_rules(
            tmp_path, "upstream.test", f'[host."http://m.test:{port}"]\ncapabilities = ["pull", "push"]\n'
        )
        with gateway(rules, ["m.test=127.0.0.1"]) as (gw, tctx):
            tctx.configure(gw, ocigate_named_ref_headers=["X-Ref"])
            flow = flow_to("upstream.test", path, method=method, headers=CLIENT_NAMED_REFS)
            await gw.requestheaders(flow)
    assert flow.response is None and flow.request.host == "m.test"
    assert {name: flow.request.headers.get_all(name) for name in NAMED_REF_NAMES} == {
        "OCI-Named-Ref": [],
        "OCI-Ref": [],
        "X-Ref": [named] if named else [],
    }


@pytest.mark.parametrize("path", ["/v2/token?scope=repository:team/app:pull", "/v2/auth", "/v2/team/app/other"])
async def test_other_paths_under_v2_of_a_ruled_upstream_pass_through(tmp_path: Path, path: str) -> None:
    with gateway(write_rules(tmp_path, "upstream.test", 'server = "https://upstream.test"\n')) as (gw, _):
        flow = flow_to("upstream.test", path)
        await gw.requestheaders(flow)
    assert flow.response is None and flow.request.host == "upstream.test" and flow.request.path == path


async def test_a_request_target_too_long_to_send_is_a_failure_of_each_host_not_an_internal_error(
    tmp_path: Path,
) -> None:
    with http_host(lambda h: (200, MANIFEST)) as (port, seen):
        rules = write_rules(tmp_path, "upstream.test", f'[host."http://m.test:{port}"]\n')
        with gateway(rules, ["m.test=127.0.0.1"]) as (gw, _):
            flow = flow_to("upstream.test", "/v2/team/app/manifests/v1?padding=" + "a" * 70_000)
            await gw.requestheaders(flow)
    assert flow.response.status_code == 502 and seen == []
    message = json.loads(flow.response.content)["errors"][0]["message"]
    assert f"http://m.test:{port}/v2: the request could not be sent: URL too long" in message


async def test_request_target_that_is_not_ascii_is_refused(tmp_path: Path) -> None:
    with gateway(write_rules(tmp_path, "upstream.test", 'server = "https://upstream.test"\n')) as (gw, _):
        flow = flow_to("upstream.test", "/v2/team/app/manifests/v1")
        flow.request.data.path = b"/v2/team/app/manifests/v1?a=\xff"
        await gw.requestheaders(flow)
    assert flow.response.status_code == 400
    assert "not percent-encoded ASCII" in json.loads(flow.response.content)["errors"][0]["message"]


async def test_an_internal_error_answers_500_instead_of_letting_the_request_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("bug")

    monkeypatch.setattr("ocigate.addon.make_plan", broken)
    with gateway(write_rules(tmp_path, "upstream.test", 'server = "https://upstream.test"\n')) as (gw, _):
        flow = flow_to("upstream.test", "/v2/team/app/manifests/v1", headers=((b"Authorization", b"Bearer x"),))
        await gw.requestheaders(flow)
    assert flow.response.status_code == 500
    assert flow.request.host == "upstream.test"


async def test_a_failure_while_a_streamed_request_is_re_pointed_is_answered_by_the_gateway(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("bug")

    monkeypatch.setattr("ocigate.streaming._repoint", broken)
    rules = write_rules(tmp_path, "upstream.test", f'[host."http://mirror.test:{free_port()}"]\n')
    with gateway(rules, ["mirror.test=127.0.0.1"]) as (gw, _):
        flow = flow_to("upstream.test", f"/v2/team/app/blobs/{DIGEST}")
        await gw.requestheaders(flow)
        assert flow not in gw.streams.flows
    # Not half re-pointed and sent anyway: the gateway's own error, and nothing left watching the flow.
    assert flow.response is not None and flow.response.status_code == 500
    assert flow.metadata[METADATA_KEY]["error"].startswith("ocigate failed on this request")


def test_tls_settings_of_an_address_in_two_rules_that_disagree_are_not_guessed(tmp_path: Path) -> None:
    write_rules(tmp_path, "a.test", '[host."https://mirror.test"]\n  skip_verify = true\n')
    write_rules(tmp_path, "b.test", '[host."https://mirror.test"]\n')
    write_rules(tmp_path, "c.test", '[host."https://only.test"]\n  skip_verify = true\n')
    with gateway(tmp_path) as (gw, _):
        assert gw.shared.host_for_connection("client", ("mirror.test", 443)) is None
        assert gw.shared.host_for_connection("client", ("only.test", 443)).skip_verify


async def test_a_streamed_request_whose_hosts_the_policy_refuses_gets_an_oci_error_naming_them(tmp_path: Path) -> None:
    # mitmproxy would answer a connection it cannot open with a page of its own; the gateway answers first.
    with gateway(write_rules(tmp_path, "upstream.test", 'server = "https://upstream.test"\n')) as (gw, _):
        flow = flow_to("upstream.test", "/v2/team/app/blobs/uploads/", method="POST")
        await gw.requestheaders(flow)
    assert flow.response.status_code == 502
    error = json.loads(flow.response.content)["errors"][0]
    assert error["code"] == "UNAVAILABLE"
    assert "https://upstream.test/v2: upstream.test:443 is not in the host map" in error["message"]


async def test_notes_about_connections_are_capped_whether_or_not_their_end_ever_comes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(configuration, "MAX_CONNECTIONS", 3)
    monkeypatch.setattr(dialing_module, "MAX_CONNECTIONS", 3)
    dialing = Dialing(Shared())
    servers = [connection.Server(address=("127.0.0.1", free_port())) for _ in range(10)]
    for server in servers:
        await dialing.server_connect(server_hooks.ServerConnectionHookData(server, tflow.tclient_conn()))
    assert set(dialing.asked) == {server.id for server in servers[-3:]}

    rules = write_rules(
        tmp_path,
        "upstream.test",
        f'server = "https://upstream.test"\ncapabilities = ["resolve"]\n[host."http://mirror.test:{free_port()}"]\n',
    )
    with gateway(rules, ["mirror.test=127.0.0.1"]) as (gw, _):
        flows = [flow_to("upstream.test", f"/v2/team/app/blobs/{DIGEST}") for _ in range(10)]
        for flow in flows:
            await gw.requestheaders(flow)
    assert all(flow.request.host == "mirror.test" for flow in flows)
    assert set(gw.shared.repointed) == {flow.client_conn.id for flow in flows[-3:]}
