"""The addon that writes the access log and counts the metrics, driven by mitmproxy's test harness with the gateway
in front of it."""

import asyncio
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
from mitmproxy import ctx, exceptions, http
from mitmproxy.test import taddons, tutils

from ocigate.addon import METADATA_KEY, Gateway
from ocigate.configuration import Configuration, Shared
from ocigate.dialing import Dialing
from ocigate.operating import Operating
from ocigate.passing import Passing
from ocigate.probes import Verdict
from ocigate.verify import PASS_SIZE
from tests.support.http_host import http_host
from tests.test_addon import flow_to, write_rules
from tests.test_trust import BLOB, BLOB_DIGEST, through

PING = "/v2/"


@contextmanager
def operating(rules: Path, host_map: list[str] = (), **options: object) -> Iterator[tuple[Gateway, Operating, Shared]]:
    """The gateway's addons in the order make_addons() gives them, with `options` set."""
    shared = Shared()
    configuration, gw = Configuration(shared), Gateway(shared)
    op = Operating(shared, gw.records)
    with taddons.context(Dialing(shared), configuration, gw, op) as tctx:
        tctx.configure(
            configuration,
            ocigate_map_hosts=list(host_map),
            ocigate_allow_destinations=["127.0.0.0/8"],
            ocigate_dns=False,
            ocigate_credential_sources=[],
            ocigate_rules=str(rules),
            **options,
        )
        try:
            yield gw, op, shared
        finally:
            op.done()


def started_now(flow: http.HTTPFlow) -> http.HTTPFlow:
    flow.request.timestamp_start = time.time()
    return flow


def lines(path: Path) -> list[dict]:
    return [json.loads(text) for text in path.read_text().splitlines()]


async def test_a_flow_the_gateway_answered_is_logged_once_with_its_bytes_and_duration(tmp_path: Path) -> None:
    rules = write_rules(tmp_path / "rules", "upstream.test", 'server = "https://upstream.test"\n')
    log = tmp_path / "access.log"
    with operating(rules, ocigate_access_log=str(log)) as (gw, op, _):
        flow = started_now(flow_to("upstream.test", PING))
        await gw.requestheaders(flow)
        gw.response(flow)
        op.response(flow)
        op.error(flow)  # a flow that ends twice (cut short in its response hook) is logged once
        passing = started_now(flow_to("elsewhere.test", "/"))
        op.response(passing)  # not the gateway's: neither logged nor counted
    (logged,) = lines(log)
    assert (logged["kind"], logged["served_by"], logged["status"]) == ("ping", "gateway", 200)
    assert logged["bytes"] == len(flow.response.raw_content) and 0 <= logged["ms"] < 5000
    assert logged["client"] == "{}:{}".format(*flow.client_conn.peername)
    assert flow.metadata[METADATA_KEY]["bytes_sent"] == logged["bytes"]


async def test_a_replayed_flow_is_logged_and_counted_again(tmp_path: Path) -> None:
    # mitmproxy's client replay (and askagain.Playback) sends the same flow object again.
    rules = write_rules(tmp_path / "rules", "upstream.test", 'server = "https://upstream.test"\n')
    log = tmp_path / "access.log"
    with operating(rules, ocigate_access_log=str(log)) as (gw, op, _):
        flow = started_now(flow_to("upstream.test", PING))
        for _ in range(2):
            await gw.requestheaders(flow)
            op.requestheaders(flow)
            gw.response(flow)
            op.response(flow)
        requests = op.metrics.registry.get_sample_value(
            "ocigate_requests_total",
            {"upstream": "upstream.test", "host": "gateway", "kind": "ping", "status": "200"},
        )
    assert [line["kind"] for line in lines(log)] == ["ping", "ping"]
    assert requests == 2


async def test_a_line_the_access_log_dropped_is_counted_in_the_metrics(tmp_path: Path) -> None:
    rules = write_rules(tmp_path / "rules", "upstream.test", 'server = "https://upstream.test"\n')
    with operating(rules, ocigate_access_log=str(tmp_path / "access.log")) as (gw, op, _):
        assert op.access_log is not None
        op.access_log.write = lambda text: False  # type: ignore[method-assign]  # its writer is that far behind
        for _ in range(2):
            flow = started_now(flow_to("upstream.test", PING))
            await gw.requestheaders(flow)
            gw.response(flow)
            op.response(flow)
        assert op.metrics.registry.get_sample_value("ocigate_access_log_dropped_lines_total") == 2


async def test_a_streamed_blob_counts_the_bytes_that_reached_the_client(tmp_path: Path) -> None:
    with http_host(lambda h: (200, BLOB)) as (port, _):
        rules = write_rules(tmp_path / "rules", "upstream.test", f'[host."http://a.test:{port}"]\n')
        log = tmp_path / "access.log"
        with operating(rules, ["a.test=127.0.0.1"], ocigate_access_log=str(log)) as (gw, op, _):
            flow = started_now(flow_to("upstream.test", f"/v2/team/app/blobs/{BLOB_DIGEST}"))
            await gw.requestheaders(flow)
            flow.response = tutils.tresp(content=None)
            gw.responseheaders(flow)
            op.responseheaders(flow)
            assert isinstance(flow.response.stream, Passing)
            sent = through(flow.response.stream, [BLOB[:5], BLOB[5:]])
            gw.response(flow)
            op.response(flow)
    assert b"".join(sent) == BLOB
    (logged,) = lines(log)
    assert (logged["bytes"], logged["verified"]) == (len(BLOB), BLOB_DIGEST)
    assert logged["reference"] == f"upstream.test/team/app@{BLOB_DIGEST}"
    assert logged["served_by"] == f"http://a.test:{port}/v2"


async def test_a_wrong_blob_cut_short_counts_only_what_passed(tmp_path: Path) -> None:
    with http_host(lambda h: (200, BLOB)) as (port, _):
        rules = write_rules(tmp_path / "rules", "upstream.test", f'[host."http://a.test:{port}"]\n')
        log = tmp_path / "access.log"
        with operating(rules, ["a.test=127.0.0.1"], ocigate_access_log=str(log)) as (gw, op, _):
            flow = started_now(flow_to("upstream.test", f"/v2/team/app/blobs/{BLOB_DIGEST}"))
            await gw.requestheaders(flow)
            flow.response = tutils.tresp(content=None)
            gw.responseheaders(flow)
            op.responseheaders(flow)
            # The first piece goes on once it is PASS_SIZE and the next has come; the last is held back, never sent.
            sent = through(flow.response.stream, [b"n" * PASS_SIZE, b"ot the blob's bytes"])
            gw.response(flow)
            op.response(flow)
            gw.error(flow)
            op.error(flow)
    (logged,) = lines(log)
    assert logged["bytes"] == len(b"".join(sent)) == PASS_SIZE
    assert "transfer aborted" in logged["error"] and logged["verified"] is None


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        return answer.read().decode()


async def test_metrics_are_served_on_the_option_and_read_health_on_the_event_loop(tmp_path: Path) -> None:
    rules = write_rules(tmp_path / "rules", "upstream.test", '[host."http://down.test:5000"]\n')
    with operating(rules, ocigate_metrics="127.0.0.1:0") as (gw, op, shared):
        assert op.server is not None
        port = op.server.address.port
        shared.health.unreachable("http://down.test:5000/v2", "connection refused")
        flow = started_now(flow_to("upstream.test", PING))
        await gw.requestheaders(flow)
        gw.response(flow)
        op.response(flow)
        # Scraped from another thread while the loop runs, as Prometheus does.
        text = await asyncio.to_thread(scrape, port)
    assert 'ocigate_requests_total{host="gateway",kind="ping",status="200",upstream="upstream.test"} 1.0' in text
    assert 'ocigate_host_cooling_down{host="http://down.test:5000/v2"} 1.0' in text
    assert 'ocigate_host_cooling_down{host="https://upstream.test/v2"} 0.0' in text
    with pytest.raises(OSError):
        scrape(port)  # stopped when the addon is done


def probe(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


async def test_the_probes_say_ready_once_the_proxy_listens_and_alive_while_the_event_loop_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("ocigate.operating.LIVENESS_TIMEOUT", 0.3)
    rules = write_rules(tmp_path / "rules", "upstream.test", 'server = "https://upstream.test"\n')
    with operating(rules, ocigate_metrics="127.0.0.1:0") as (_, op, shared):
        assert op.server is not None
        port = op.server.address.port
        # Asked from another thread while the loop runs, as a kubelet does.
        assert await asyncio.to_thread(probe, port, "/readyz") == (503, "not ready: the proxy is not listening yet\n")
        op.running()
        assert await asyncio.to_thread(probe, port, "/readyz") == (200, "ready\n")
        assert await asyncio.to_thread(probe, port, "/healthz") == (200, "alive\n")
        # A loop stuck in a blocking call serves no flow: the thread that answers says it is not alive.
        with ThreadPoolExecutor(1) as pool:
            asked = pool.submit(probe, port, "/healthz")
            time.sleep(1.0)
            stuck = asked.result()
        assert stuck == (503, "not alive: the event loop did not answer within 0.3 s\n")
        assert await asyncio.to_thread(probe, port, "/healthz") == (200, "alive\n")
        # Shutting down: the first of the gateway's addons to be done says so, before the host clients close.
        await Configuration(shared).done()
        assert await asyncio.to_thread(probe, port, "/readyz") == (503, "not ready: the gateway is shutting down\n")


def test_a_gateway_without_a_running_event_loop_is_not_alive(tmp_path: Path) -> None:
    rules = write_rules(tmp_path / "rules", "upstream.test", 'server = "https://upstream.test"\n')
    with operating(rules) as (_, op, _):
        assert op.alive() == Verdict(False, "not alive: the event loop is not running")


async def test_turning_the_log_and_metrics_on_and_off_keeps_what_the_gateway_learned(tmp_path: Path) -> None:
    rules = write_rules(tmp_path / "rules", "upstream.test", '[host."http://down.test:5000"]\n')
    with operating(rules) as (_, op, shared):
        services = shared.services
        assert op.access_log is None and op.server is None
        ctx.options.update(ocigate_access_log=str(tmp_path / "access.log"), ocigate_metrics="127.0.0.1:0")
        assert op.access_log is not None and op.server is not None
        ctx.options.update(ocigate_access_log="", ocigate_metrics="")
        assert op.access_log is None and op.server is None
        assert shared.services is services


def test_an_access_log_that_cannot_be_opened_is_an_options_error_naming_the_option_and_path(tmp_path: Path) -> None:
    rules = write_rules(tmp_path / "rules", "upstream.test", 'server = "https://upstream.test"\n')
    path = tmp_path / "missing" / "access.log"
    with (
        pytest.raises(exceptions.OptionsError, match=f"^ocigate_access_log: cannot open {path}: "),
        operating(rules, ocigate_access_log=str(path)),
    ):
        pass


def test_a_metrics_address_in_use_is_an_options_error_naming_the_option_and_address(tmp_path: Path) -> None:
    rules = write_rules(tmp_path / "rules", "upstream.test", 'server = "https://upstream.test"\n')
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with (
            pytest.raises(exceptions.OptionsError, match=f"^ocigate_metrics: cannot listen on 127.0.0.1:{port}: "),
            operating(rules, ocigate_metrics=f"127.0.0.1:{port}"),
        ):
            pass


@pytest.mark.parametrize("option", ["ocigate_access_log={missing}", "ocigate_metrics=127.0.0.1:{taken}"])
def test_the_ocigate_command_stops_at_its_start_naming_a_log_or_address_it_cannot_use(
    option: str, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        value = option.format(missing=tmp_path / "missing" / "access.log", taken=taken.getsockname()[1])
        command = [sys.executable, "-m", "ocigate.cli", "--listen-port", "0", "--set", f"confdir={tmp_path}"]
        started = subprocess.run(
            [*command, "--set", "ocigate_credential_sources=ocigate", "--set", value],
            capture_output=True,
            text=True,
            timeout=60,
        )
    output = started.stdout + started.stderr
    assert started.returncode == 1
    name = value.partition("=")[0]
    assert f"{name}: cannot " in output
    # Refused once and rolled back, not refused again by each option set during the roll-back.
    assert "Traceback" not in output and output.count("setting connection_strategy=lazy") == 1
