"""Mirrors that lie, go down or hang: the addons (taddons) against small local hosts."""

import hashlib
import json
from pathlib import Path

from mitmproxy.test import tutils

from ocigate.addon import METADATA_KEY, reason_phrase
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
    assert sent == b""  # its last (here: only) piece never reached the client
    assert flow.error is not None and flow.error.msg == "Connection killed."
    assert "transfer aborted" in flow.metadata[METADATA_KEY]["error"]
    assert again.request.port == second_port
    assert attempts(again)[0][1].startswith(f"sent something else for {BLOB_DIGEST} before (20 bytes that hash to")


def test_the_reason_phrase_carries_the_message_in_visible_ascii_for_clients_that_show_only_the_status_line() -> None:
    body = {"errors": [{"code": "UNAVAILABLE", "message": "no host (http://m\u00fc.test: refused\r\nX: y)"}]}
    assert reason_phrase(503, body) == "Service Unavailable: no host (http://m?.test: refused??X: y)"
    assert reason_phrase(404, {"errors": []}) == "Not Found"


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
