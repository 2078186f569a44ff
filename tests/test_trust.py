"""Mirrors that lie, go down or hang: the addons (taddons) against small local hosts."""

import hashlib
import json
from dataclasses import replace
from pathlib import Path

from mitmproxy import http
from mitmproxy.test import tutils

from ocigate.addon import METADATA_KEY
from ocigate.auth import Authorization
from ocigate.credentials import Credential, OcigateStore
from ocigate.ocierror import OciError
from ocigate.verify import StreamVerifier
from tests.support.http_host import http_host
from tests.support.registry import free_port
from tests.test_addon import flow_to, gateway, write_rules

MANIFEST = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}'
MANIFEST_DIGEST = "sha256:" + hashlib.sha256(MANIFEST).hexdigest()
BLOB = b"the blob's bytes"
BLOB_DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()


def attempts(flow) -> list[tuple[str, str]]:
    return [(a["host"], a["result"]) for a in flow.metadata[METADATA_KEY]["attempts"]]


async def test_a_manifest_that_is_not_its_digest_falls_through_and_that_host_is_not_asked_for_it_again(
    tmp_path: Path,
) -> None:
    liar = lambda h: (200, MANIFEST.replace(b"2", b"3"), {"Docker-Content-Digest": MANIFEST_DIGEST})  # noqa: E731
    with http_host(liar) as (bad, bad_seen), http_host(lambda h: (200, MANIFEST)) as (good, _):
        rules = write_rules(tmp_path, "upstream.test", f'[host."http://a.test:{bad}"]\n[host."http://b.test:{good}"]\n')
        with gateway(rules, ["a.test=127.0.0.1", "b.test=127.0.0.1"]) as (gw, _):
            first = flow_to("upstream.test", f"/v2/team/app/manifests/{MANIFEST_DIGEST}")
            await gw.requestheaders(first)
            second = flow_to("upstream.test", f"/v2/team/app/manifests/{MANIFEST_DIGEST}")
            await gw.requestheaders(second)
    assert first.response.status_code == 200 and first.response.content == MANIFEST
    (host, result), _ = attempts(first)
    assert host == f"http://a.test:{bad}/v2"
    wrong = "sha256:" + hashlib.sha256(MANIFEST.replace(b"2", b"3")).hexdigest()
    assert result == f"200 but bytes hash to {wrong}, not {MANIFEST_DIGEST} (asked for)"
    assert second.response.content == MANIFEST
    assert attempts(second)[0][1].startswith(f"sent something else for {MANIFEST_DIGEST} before")
    assert len(bad_seen) == 1


async def test_a_tag_whose_docker_content_digest_disagrees_with_its_bytes_falls_through(tmp_path: Path) -> None:
    liar = lambda h: (200, MANIFEST, {"Docker-Content-Digest": "sha256:" + "0" * 64})  # noqa: E731
    with http_host(liar) as (bad, _), http_host(lambda h: (200, MANIFEST)) as (good, _):
        rules = write_rules(tmp_path, "upstream.test", f'[host."http://a.test:{bad}"]\n[host."http://b.test:{good}"]\n')
        with gateway(rules, ["a.test=127.0.0.1", "b.test=127.0.0.1"]) as (gw, _):
            flow = flow_to("upstream.test", "/v2/team/app/manifests/v1")
            await gw.requestheaders(flow)
    assert flow.response.status_code == 200
    assert [host for host, _ in attempts(flow)] == [f"http://a.test:{bad}/v2", f"http://b.test:{good}/v2"]


async def test_an_unreachable_host_cools_down_and_when_none_can_be_reached_the_client_hears_503(
    tmp_path: Path,
) -> None:
    down = free_port()  # nothing listens there: connecting is refused
    with http_host(lambda h: (200, MANIFEST)) as (up, up_seen):
        rules = write_rules(tmp_path, "upstream.test", f'[host."http://a.test:{down}"]\n[host."http://b.test:{up}"]\n')
        with gateway(rules, ["a.test=127.0.0.1", "b.test=127.0.0.1"]) as (gw, _):
            first = flow_to("upstream.test", "/v2/team/app/manifests/v1")
            await gw.requestheaders(first)
            second = flow_to("upstream.test", "/v2/team/app/manifests/v1")
            await gw.requestheaders(second)
    assert attempts(first)[0] == (f"http://a.test:{down}/v2", "connection refused")
    assert attempts(second)[0] == (f"http://a.test:{down}/v2", "connection refused (skipped for 30 s)")
    assert second.response.status_code == 200 and len(up_seen) == 2

    only = write_rules(tmp_path / "only", "upstream.test", f'server = "http://a.test:{down}"\n')
    with gateway(only, ["a.test=127.0.0.1"]) as (gw, _):
        flow = flow_to("upstream.test", "/v2/team/app/manifests/v1")
        await gw.requestheaders(flow)
    assert flow.response.status_code == 503
    error = json.loads(flow.response.content)["errors"][0]
    assert error == {
        "code": "UNAVAILABLE",
        "message": f"no host for upstream.test could be reached (http://a.test:{down}/v2: connection refused)",
    }


async def test_a_mirror_dripping_its_manifest_costs_one_read_timeout_and_cools_down(tmp_path: Path) -> None:
    with (
        http_host(lambda h: (200, MANIFEST), drip=0.05) as (slow, slow_seen),
        http_host(lambda h: (200, MANIFEST)) as (good, _),
    ):
        rules = write_rules(
            tmp_path, "upstream.test", f'[host."http://a.test:{slow}"]\n[host."http://b.test:{good}"]\n'
        )
        with gateway(rules, ["a.test=127.0.0.1", "b.test=127.0.0.1"], read_timeout=1) as (gw, _):
            first = flow_to("upstream.test", f"/v2/team/app/manifests/{MANIFEST_DIGEST}")
            await gw.requestheaders(first)
            second = flow_to("upstream.test", f"/v2/team/app/manifests/{MANIFEST_DIGEST}")
            await gw.requestheaders(second)
    assert first.response.status_code == 200 and first.response.content == MANIFEST
    assert attempts(first) == [
        (f"http://a.test:{slow}/v2", "answer not complete within 1 s"),
        (f"http://b.test:{good}/v2", "200"),
    ]
    assert attempts(second)[0] == (f"http://a.test:{slow}/v2", "answer not complete within 1 s (skipped for 30 s)")
    assert second.response.content == MANIFEST and len(slow_seen) == 1


async def test_a_blob_that_is_not_its_digest_is_cut_short_and_not_asked_of_that_host_again(tmp_path: Path) -> None:
    with http_host(lambda h: (200, BLOB)) as (first_port, _), http_host(lambda h: (200, BLOB)) as (second_port, _):
        rules = write_rules(
            tmp_path, "upstream.test", f'[host."http://a.test:{first_port}"]\n[host."http://b.test:{second_port}"]\n'
        )
        with gateway(rules, ["a.test=127.0.0.1", "b.test=127.0.0.1"]) as (gw, _):
            flow = flow_to("upstream.test", f"/v2/team/app/blobs/{BLOB_DIGEST}")
            await gw.requestheaders(flow)
            assert flow.request.port == first_port
            # mitmproxy streams the host's answer through the verifier: here, bytes that are not the blob.
            flow.response = tutils.tresp(content=b"")
            gw.responseheaders(flow)
            verifier = flow.response.stream
            sent = verifier(b"not the blob's bytes") + verifier(b"")
            gw.response(flow)
            again = flow_to("upstream.test", f"/v2/team/app/blobs/{BLOB_DIGEST}")
            await gw.requestheaders(again)
    assert sent == []  # its last (here: only) piece never reached the client
    assert flow.error is not None and flow.error.msg == "Connection killed."
    assert "transfer aborted" in flow.metadata[METADATA_KEY]["error"]
    assert again.request.port == second_port
    assert attempts(again)[0][1].startswith(f"sent something else for {BLOB_DIGEST} before (20 bytes that hash to")


def test_the_reason_phrase_carries_the_message_in_visible_ascii_for_clients_that_show_only_the_status_line() -> None:
    error = OciError(503, "UNAVAILABLE", "no host (http://m\u00fc.test: refused\r\nX: y)")
    assert error.reason() == "Service Unavailable: no host (http://m?.test: refused??X: y)"
    assert OciError(404, "NAME_UNKNOWN", "").reason() == "Not Found"


async def test_an_offline_rule_answers_what_is_not_the_distribution_api_itself(tmp_path: Path) -> None:
    with http_host(lambda h: (200, b"{}")) as (port, seen):
        rules = write_rules(
            tmp_path,
            "upstream.test",
            f'offline = true\nserver = "http://upstream.test:{port}"\n[host."http://m.test:{port}"]\n',
        )
        with gateway(rules, ["upstream.test=127.0.0.1", "m.test=127.0.0.1"]) as (gw, _):
            token = flow_to("upstream.test", "/v2/token?scope=repository:team/app:pull")
            await gw.requestheaders(token)
            other = flow_to("upstream.test", "/index.html")
            await gw.requestheaders(other)
    for flow in (token, other):
        assert flow.response is not None and flow.response.status_code == 404
        assert "upstream.test is offline" in json.loads(flow.response.content)["errors"][0]["message"]
    assert seen == []


async def streamed_blob(gw, status: int, headers: dict[str, str], request_headers=()) -> http.HTTPFlow:
    flow = flow_to("upstream.test", f"/v2/team/app/blobs/{BLOB_DIGEST}", headers=request_headers)
    await gw.requestheaders(flow)
    flow.response = http.Response.make(status, b"", headers)
    # mitmproxy's response object carries the host's headers only: Response.make adds a Content-Length.
    if "Content-Length" not in headers:
        del flow.response.headers["Content-Length"]
    gw.responseheaders(flow)
    return flow


def through(hook, pieces: list[bytes]) -> list[bytes]:
    out = []
    for piece in [*pieces, b""]:
        result = hook(piece)
        out += [result] if isinstance(result, bytes) else list(result)
    return out


async def test_a_close_delimited_or_encoded_blob_goes_to_the_client_verified_chunked_and_labelled_identity(
    tmp_path: Path,
) -> None:
    with http_host(lambda h: (200, BLOB)) as (port, _):
        rules = write_rules(tmp_path, "upstream.test", f'[host."http://a.test:{port}"]\n')
        with gateway(rules, ["a.test=127.0.0.1"]) as (gw, _):
            flow = await streamed_blob(gw, 200, {"Content-Encoding": "gzip"})
            sent = through(flow.response.stream, [BLOB[:5], BLOB[5:]])
            gw.response(flow)
    assert isinstance(flow.response.stream, StreamVerifier)
    assert flow.response.headers["Transfer-Encoding"] == "chunked"
    assert "Content-Encoding" not in flow.response.headers
    assert b"".join(sent) == BLOB and b"" not in sent
    assert flow.metadata[METADATA_KEY]["verified"] == BLOB_DIGEST


async def test_a_host_whose_blob_get_is_no_blob_sends_the_client_back_for_the_next_host(tmp_path: Path) -> None:
    with http_host(lambda h: (200, BLOB)) as (a, _), http_host(lambda h: (200, BLOB)) as (b, _):
        rules = write_rules(tmp_path, "upstream.test", f'[host."http://a.test:{a}"]\n[host."http://b.test:{b}"]\n')
        with gateway(rules, ["a.test=127.0.0.1", "b.test=127.0.0.1"]) as (gw, _):
            flow = await streamed_blob(gw, 206, {"Content-Range": "bytes 0-3/16", "Content-Length": "4"})
            sent = through(flow.response.stream, [b"the "])
            gw.response(flow)
            again = flow_to("upstream.test", f"/v2/team/app/blobs/{BLOB_DIGEST}")
            await gw.requestheaders(again)
    # None of the host's bytes reach the client: it is sent to ask again, and the next host is asked.
    assert flow.response.status_code == 307
    assert flow.response.headers["Location"] == f"/v2/team/app/blobs/{BLOB_DIGEST}"
    assert sent == []
    assert "206 Partial Content to a request without Range" in flow.metadata[METADATA_KEY]["error"]
    assert again.request.port == b
    assert attempts(again)[0][1].startswith(
        "failed to send it: answered 206 Partial Content to a request without Range (skipped for"
    )


async def test_the_last_host_whose_blob_get_is_no_blob_gives_an_oci_error_naming_every_host(tmp_path: Path) -> None:
    with http_host(lambda h: (200, BLOB)) as (a, _):
        rules = write_rules(tmp_path, "upstream.test", f'[host."http://a.test:{a}"]\n')
        with gateway(rules, ["a.test=127.0.0.1"]) as (gw, _):
            flow = await streamed_blob(gw, 500, {"Content-Length": "19", "Content-Type": "text/html"})
            sent = through(flow.response.stream, [b"<html>oops</html>\n"])
            gw.response(flow)
    assert flow.response.status_code == 502
    error = json.loads(b"".join(sent))["errors"][0]
    assert (
        error["message"]
        == f"no host for upstream.test could answer (http://a.test:{a}/v2: answered 500 to a GET of the blob)"
    )
    assert json.loads(flow.response.content) == json.loads(b"".join(sent))


async def test_a_304_the_client_did_not_ask_for_has_no_body_and_still_gives_the_client_an_oci_error(
    tmp_path: Path,
) -> None:
    with http_host(lambda h: (200, BLOB)) as (a, _):
        rules = write_rules(tmp_path, "upstream.test", f'[host."http://a.test:{a}"]\n')
        with gateway(rules, ["a.test=127.0.0.1"]) as (gw, _):
            flow = await streamed_blob(gw, 304, {})
            # An answer that ends with its headers is read whole by mitmproxy: the body it read (none) is set.
            flow.response.content = b""
            gw.response(flow)
    assert flow.response.status_code == 502
    assert b"304 Not Modified to a request without conditions" in flow.response.content


async def test_a_range_the_client_asked_for_passes_unchecked_and_says_so(tmp_path: Path) -> None:
    with http_host(lambda h: (200, BLOB)) as (a, _):
        rules = write_rules(tmp_path, "upstream.test", f'[host."http://a.test:{a}"]\n')
        with gateway(rules, ["a.test=127.0.0.1"]) as (gw, _):
            flow = await streamed_blob(
                gw, 206, {"Content-Range": "bytes 4-15/16", "Content-Length": "12"}, [(b"Range", b"bytes=4-")]
            )
            sent = through(flow.response.stream, [BLOB[4:10], BLOB[10:]])
            gw.response(flow)
    assert sent == [BLOB[4:10], BLOB[10:]] and flow.response.status_code == 206
    assert flow.metadata[METADATA_KEY]["unchecked"] == "the part of the blob the client's Range asked for"


async def test_a_manifest_is_asked_for_whole_whatever_range_or_condition_the_client_sent(tmp_path: Path) -> None:
    def answer(handler):
        if handler.headers.get("Range"):
            return 206, MANIFEST[:10], {"Content-Range": f"bytes 0-9/{len(MANIFEST)}"}
        return 200, MANIFEST

    with http_host(answer) as (a, seen):
        rules = write_rules(tmp_path, "upstream.test", f'[host."http://a.test:{a}"]\n')
        with gateway(rules, ["a.test=127.0.0.1"]) as (gw, _):
            flow = flow_to(
                "upstream.test",
                f"/v2/team/app/manifests/{MANIFEST_DIGEST}",
                headers=[(b"Range", b"bytes=0-9"), (b"If-None-Match", b'"x"')],
            )
            await gw.requestheaders(flow)
            # Nothing the client sent marked the host: the next client is served by it too.
            again = flow_to("upstream.test", f"/v2/team/app/manifests/{MANIFEST_DIGEST}")
            await gw.requestheaders(again)
    assert flow.response.status_code == 200 and flow.response.content == MANIFEST
    assert all(headers.get("Range") is None and headers.get("If-None-Match") is None for _, _, headers in seen)
    assert again.response.content == MANIFEST and len(seen) == 2


async def test_a_manifest_host_that_answers_a_part_anyway_is_passed_over_but_not_marked_as_lying(
    tmp_path: Path,
) -> None:
    part = lambda h: (206, MANIFEST[:10], {"Content-Range": f"bytes 0-9/{len(MANIFEST)}"})  # noqa: E731
    with http_host(part) as (a, _), http_host(lambda h: (200, MANIFEST)) as (b, _):
        rules = write_rules(tmp_path, "upstream.test", f'[host."http://a.test:{a}"]\n[host."http://b.test:{b}"]\n')
        with gateway(rules, ["a.test=127.0.0.1", "b.test=127.0.0.1"]) as (gw, _):
            flow = flow_to("upstream.test", f"/v2/team/app/manifests/{MANIFEST_DIGEST}")
            await gw.requestheaders(flow)
    assert flow.response.content == MANIFEST
    assert attempts(flow)[0] == (f"http://a.test:{a}/v2", "206 but no manifest in a 206 answer to a whole request")


async def test_a_tag_answered_with_a_page_that_is_no_manifest_is_that_hosts_failure(tmp_path: Path) -> None:
    portal = lambda h: (200, b"<html>log in first</html>", {"Content-Type": "text/html"})  # noqa: E731
    with http_host(portal) as (a, _), http_host(lambda h: (200, MANIFEST)) as (b, _):
        rules = write_rules(tmp_path, "upstream.test", f'[host."http://a.test:{a}"]\n[host."http://b.test:{b}"]\n')
        with gateway(rules, ["a.test=127.0.0.1", "b.test=127.0.0.1"]) as (gw, _):
            flow = flow_to("upstream.test", "/v2/team/app/manifests/v1")
            await gw.requestheaders(flow)
    assert flow.response.content == MANIFEST
    assert attempts(flow)[0] == (f"http://a.test:{a}/v2", "200 but a body of 25 bytes that is not a JSON manifest")


async def test_a_manifest_redirected_elsewhere_is_fetched_and_checked_by_ocigate(tmp_path: Path) -> None:
    wrong = MANIFEST.replace(b"2", b"3")
    with http_host(lambda h: (200, wrong)) as (storage, storage_seen):
        redirect = lambda h: (307, b"", {"Location": f"http://storage.test:{storage}/m"})  # noqa: E731
        with http_host(redirect) as (a, _), http_host(lambda h: (200, MANIFEST)) as (b, _):
            rules = write_rules(tmp_path, "upstream.test", f'[host."http://a.test:{a}"]\n[host."http://b.test:{b}"]\n')
            hosts = ["a.test=127.0.0.1", "b.test=127.0.0.1", "storage.test=127.0.0.1"]
            with gateway(rules, hosts) as (gw, _):
                flow = flow_to("upstream.test", f"/v2/team/app/manifests/{MANIFEST_DIGEST}")
                await gw.requestheaders(flow)
    assert flow.response.status_code == 200 and flow.response.content == MANIFEST
    _, result = attempts(flow)[0]
    assert result.startswith(f"200 (redirected to storage.test:{storage}) but bytes hash to")
    assert len(storage_seen) == 1 and storage_seen[0][2].get("Authorization") is None


async def test_a_blob_head_after_the_gateway_served_its_manifest_is_answered_by_the_mirror_not_the_push_host(
    tmp_path: Path,
) -> None:
    manifest = json.dumps(
        {"schemaVersion": 2, "config": {"digest": BLOB_DIGEST, "size": len(BLOB)}, "layers": []}
    ).encode()
    with (
        http_host(lambda h: (200, manifest)) as (mirror, _),
        http_host(lambda h: (200, b"")) as (server, server_seen),
    ):
        rules = write_rules(
            tmp_path,
            "upstream.test",
            f'server = "http://upstream.test:{server}"\n[host."http://m.test:{mirror}"]\n'
            '  capabilities = ["pull", "resolve"]\n',
        )
        with gateway(rules, ["m.test=127.0.0.1", "upstream.test=127.0.0.1"]) as (gw, _):
            pushing = flow_to("upstream.test", f"/v2/team/app/blobs/{BLOB_DIGEST}", method="HEAD")
            await gw.requestheaders(pushing)
            await gw.requestheaders(flow_to("upstream.test", "/v2/team/app/manifests/v1"))
            pulling = flow_to("upstream.test", f"/v2/team/app/blobs/{BLOB_DIGEST}", method="HEAD")
            await gw.requestheaders(pulling)
    # Before any pull, a HEAD is a pushing client's question for the push host (the registry itself)...
    assert attempts(pushing) == [(f"http://upstream.test:{server}/v2", "200")]
    # ...after the gateway served the manifest referencing it, the pull's hosts answer.
    assert attempts(pulling) == [(f"http://m.test:{mirror}/v2", "200")]
    assert [(m, p.split("?")[0]) for m, p, _ in server_seen] == [("HEAD", f"/v2/team/app/blobs/{BLOB_DIGEST}")]


async def test_an_empty_200_for_a_blob_that_is_not_empty_is_no_blob(tmp_path: Path) -> None:
    with http_host(lambda h: (200, BLOB)) as (a, _):
        rules = write_rules(tmp_path, "upstream.test", f'[host."http://a.test:{a}"]\n')
        with gateway(rules, ["a.test=127.0.0.1"]) as (gw, _):
            flow = await streamed_blob(gw, 200, {"Content-Length": "0"})
            # An answer that ends with its headers never passes the stream hook: mitmproxy reads it whole (nothing).
            flow.response.content = b""
            gw.response(flow)
            again = flow_to("upstream.test", f"/v2/team/app/blobs/{BLOB_DIGEST}")
            await gw.requestheaders(again)
    # Nothing was sent yet: the client gets an OCI error naming the host instead of the empty body.
    assert flow.error is None and flow.response.status_code == 502
    message = json.loads(flow.response.content)["errors"][0]["message"]
    assert f"http://a.test:{a}/v2: sent 0 bytes that hash to" in message
    assert again.response is not None and again.response.status_code == 502
    assert "sent something else" in again.response.content.decode()


async def test_a_close_delimited_blob_from_an_http10_host_goes_on_as_http11(tmp_path: Path) -> None:
    with http_host(lambda h: (200, BLOB)) as (a, _):
        rules = write_rules(tmp_path, "upstream.test", f'[host."http://a.test:{a}"]\n')
        with gateway(rules, ["a.test=127.0.0.1"]) as (gw, _):
            flow = flow_to("upstream.test", f"/v2/team/app/blobs/{BLOB_DIGEST}")
            await gw.requestheaders(flow)
            flow.response = http.Response.make(200, b"", {})
            flow.response.http_version = "HTTP/1.0"
            del flow.response.headers["Content-Length"]
            gw.responseheaders(flow)
    # A chunked body under an HTTP/1.0 status line is read as raw bytes by Go clients.
    assert flow.response.http_version == "HTTP/1.1" and flow.response.headers["Transfer-Encoding"] == "chunked"


async def test_a_404_of_the_only_host_stays_a_404_and_is_not_held_against_it(tmp_path: Path) -> None:
    with http_host(lambda h: (404, b"")) as (a, _):
        rules = write_rules(tmp_path, "upstream.test", f'[host."http://a.test:{a}"]\n')
        with gateway(rules, ["a.test=127.0.0.1"]) as (gw, _):
            flows = [await streamed_blob(gw, 404, {"Content-Length": "0"}) for _ in range(2)]
            for flow in flows:
                flow.response.content = b""
                gw.response(flow)
    for flow in flows:
        assert flow.response.status_code == 404
        assert json.loads(flow.response.content)["errors"][0]["code"] == "BLOB_UNKNOWN"


async def test_a_blob_refusal_of_a_client_that_authenticates_itself_reaches_it_with_its_challenge(
    tmp_path: Path,
) -> None:
    with http_host(lambda h: (200, BLOB)) as (port, _):
        upstream = f"upstream.test:{port}"
        rules = write_rules(tmp_path, upstream, f'authentication = "client"\nserver = "http://{upstream}"\n')
        with gateway(rules, ["upstream.test=127.0.0.1"]) as (gw, _):
            blob = f"/v2/team/app/blobs/{BLOB_DIGEST}"
            flow = flow_to("upstream.test", blob, port=port, headers=[(b"Authorization", b"Bearer expired")])
            await gw.requestheaders(flow)
            challenge = {"WWW-Authenticate": 'Bearer realm="https://auth.test/token"', "Content-Length": "2"}
            flow.response = http.Response.make(401, b"", challenge)
            gw.responseheaders(flow)
            gw.response(flow)
            again = flow_to("upstream.test", blob, port=port)
            await gw.requestheaders(again)
    assert flow.response.status_code == 401 and flow.response.stream is True
    assert flow.response.headers["WWW-Authenticate"].startswith("Bearer realm=")
    # Not a failure of the registry's: the next request goes to it again.
    assert again.response is None and again.request.port == port


async def test_an_offline_rules_mirror_cannot_send_ocigate_to_the_registry_itself(tmp_path: Path) -> None:
    with http_host(lambda h: (200, MANIFEST)) as (registry, registry_seen):
        to_registry = {"Location": f"http://upstream.test:{registry}/v2/team/app/manifests/v1"}
        challenge = {"WWW-Authenticate": f'Bearer realm="http://upstream.test:{registry}/token",service="x"'}
        answers = iter([(307, b"", to_registry), (401, b"{}", challenge)])
        with http_host(lambda h: next(answers)) as (mirror, _):
            rules = write_rules(
                tmp_path,
                f"upstream.test:{registry}",
                f'offline = true\nserver = "http://upstream.test:{registry}"\n[host."http://m.test:{mirror}"]\n',
            )
            with gateway(rules, ["m.test=127.0.0.1", "upstream.test=127.0.0.1"]) as (gw, _):
                redirected = flow_to("upstream.test", "/v2/team/app/manifests/v1", port=registry)
                await gw.requestheaders(redirected)
                challenged = flow_to("upstream.test", "/v2/team/app/manifests/v2", port=registry)
                await gw.requestheaders(challenged)
    assert registry_seen == []
    assert "a redirect to upstream.test" in attempts(redirected)[0][1]
    assert "which its offline rule never contacts" in attempts(challenged)[0][1]


async def test_a_manifest_holding_the_password_ocigate_sent_is_served_whole(tmp_path: Path) -> None:
    password = "2024-01-01T00:00:00Z"
    manifest = json.dumps({"schemaVersion": 2, "annotations": {"created": password}}).encode()
    digest = "sha256:" + hashlib.sha256(manifest).hexdigest()

    def basic(handler):
        if not handler.headers.get("Authorization"):
            return 401, b"{}", {"WWW-Authenticate": 'Basic realm="m"'}
        return 200, manifest

    with http_host(basic) as (port, _):
        rules = write_rules(tmp_path, "upstream.test", f'[host."http://m.test:{port}"]\n')
        OcigateStore(rules / "credentials.json").save(f"m.test:{port}", Credential("bob", password))
        with gateway(rules, ["m.test=127.0.0.1"]) as (gw, _):
            flow = flow_to("upstream.test", f"/v2/team/app/manifests/{digest}")
            await gw.requestheaders(flow)
    assert flow.response.status_code == 200 and flow.response.content == manifest


async def test_a_redirect_elsewhere_never_carries_the_clients_own_credentials(tmp_path: Path) -> None:
    with http_host(lambda h: (200, MANIFEST)) as (elsewhere, elsewhere_seen):
        to_elsewhere = {"Location": f"http://elsewhere.test:{elsewhere}/m"}
        with http_host(lambda h: (307, b"", to_elsewhere)) as (port, seen):
            upstream = f"upstream.test:{port}"
            rules = write_rules(tmp_path, upstream, f'authentication = "client"\nserver = "http://{upstream}"\n')
            with gateway(rules, ["upstream.test=127.0.0.1", "elsewhere.test=127.0.0.1"]) as (gw, _):
                secret = (b"Authorization", b"Bearer the-clients-own-token")
                cookie = (b"Cookie", b"session=the-clients-own-cookie")
                flow = flow_to(
                    "upstream.test", f"/v2/team/app/manifests/{MANIFEST_DIGEST}", port=port, headers=[secret, cookie]
                )
                await gw.requestheaders(flow)
    assert flow.response.status_code == 200 and flow.response.content == MANIFEST
    assert seen[0][2].get("Authorization") == "Bearer the-clients-own-token"  # the registry's own: it may have it
    assert seen[0][2].get("Cookie") == "session=the-clients-own-cookie"
    assert elsewhere_seen and elsewhere_seen[0][2].get("Authorization") is None
    assert elsewhere_seen[0][2].get("Cookie") is None


async def test_what_mitmproxy_says_of_a_failed_host_reaches_nobody_with_ocigates_credential_in_it(
    tmp_path: Path,
) -> None:
    sent = "Basic " + "c2VjcmV0LXBhaXI6cGFzc3dvcmQ="
    with http_host(lambda h: (200, BLOB)) as (a, _):
        rules = write_rules(tmp_path, "upstream.test", f'[host."http://a.test:{a}"]\n')
        with gateway(rules, ["a.test=127.0.0.1"]) as (gw, _):
            flow = flow_to("upstream.test", f"/v2/team/app/blobs/{BLOB_DIGEST}")
            await gw.requestheaders(flow)
            streamed = gw.streams.flows[flow]
            streamed.chosen = replace(streamed.chosen, authorization=Authorization(sent, "ocigate store", "u"))
            flow.server_conn.timestamp_start = flow.request.timestamp_start + 1  # a new connection, not a stale one
            quoted = f"unexpected server response: b'HTTP/1.1 200 OK\\r\\nX-Echo: {sent}\\r\\n" + "x" * 500
            answer = gw.instead(flow, quoted)
    assert answer is not None and answer.status_code == 503
    assert sent.encode() not in answer.content and sent not in answer.reason
    message = json.loads(answer.content)["errors"][0]["message"]
    assert "X-Echo: " + "*" * len(sent) in message and message.count("x") < 300
