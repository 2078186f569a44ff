"""A SIGTERM to a gateway with ocigate_drain: /readyz answers 503 at once while /healthz stays 200 and requests are
still served (a skopeo pull; GETs to each worker of `ocigate --workers 2`, and to `ocigate web`), and the gateway
stops once the drain is over, cleanly."""

import json
import re
import signal
import sys
from pathlib import Path

from tests.e2e.test_deploy_e2e import probe
from tests.e2e.test_workers_e2e import CONNECTIONS, ping, pull, start
from tests.support.clients import assert_layout_holds
from tests.support.gateway import Gateway, running_gateway, wait_for_workers
from tests.support.processes import wait_until
from tests.support.registry import free_port
from tests.support.world import World

DRAIN = 20  # seconds: far more than what is done during it takes


def metrics_ports(gateway: Gateway, count: int) -> list[int]:
    """Each worker's metrics port, as its log line says (ocigate_metrics=127.0.0.1:0: a free one each)."""
    found: dict[int, int] = {}

    def said() -> bool:
        said_lines = re.findall(
            r"^(?:\[w(\d+)\] )?(?:\[[\d:.]+\] )?ocigate: metrics on http://127\.0\.0\.1:(\d+)/",
            gateway.log_text(),
            re.M,
        )
        for index, port in said_lines:
            found[int(index or 0)] = int(port)
        return len(found) == count

    wait_until(
        said, 30, lambda why: f"no metrics port said: {why}:\n{gateway.log_text()[-3000:]}", process=gateway.process
    )
    return [found[index] for index in range(count)]


def sigterm_and_wait_for_the_drain(gateway: Gateway, count: int) -> None:
    gateway.process.send_signal(signal.SIGTERM)
    wait_until(
        lambda: gateway.log_text().count(f"ocigate: SIGTERM: draining for {DRAIN} s") == count,
        30,
        lambda why: f"the gateway did not say it drains: {why}:\n{gateway.log_text()[-3000:]}",
        process=gateway.process,
    )


def test_a_sigterm_drains_the_gateway_not_ready_while_a_pull_is_served(fresh: World, tmp_path: Path) -> None:
    rules, host_map, options = start(fresh, tmp_path, tmp_path / "access.log")
    options += ["ocigate_metrics=127.0.0.1:0", f"ocigate_drain={DRAIN}"]
    home = tmp_path / "client"
    layout = home / "layout"
    with running_gateway(tmp_path / "gateway", rules, host_map, options) as gateway:
        (port,) = metrics_ports(gateway, 1)
        assert probe(port, "/readyz")[0] == 200
        sigterm_and_wait_for_the_drain(gateway, 1)
        assert probe(port, "/readyz") == (503, "not ready: the gateway is shutting down\n")
        assert probe(port, "/healthz")[0] == 200
        pulled = pull(gateway, home, layout)
        assert pulled.returncode == 0, pulled.stderr
        assert gateway.process.wait(timeout=DRAIN + 60) == 0
        log = gateway.log_text()
    assert_layout_holds(layout, fresh.app)
    assert f"ocigate: drained for {DRAIN} s: stopping" in log and "Traceback" not in log


def test_the_workers_each_drain_and_then_stop_with_their_parent(fresh: World, tmp_path: Path) -> None:
    access_log = tmp_path / "access.log"
    rules, host_map, options = start(fresh, tmp_path, access_log)
    options += ["ocigate_metrics=127.0.0.1:0", f"ocigate_drain={DRAIN}"]
    with running_gateway(tmp_path / "gateway", rules, host_map, options, workers=2) as gateway:
        wait_for_workers(gateway, 2)
        ports = metrics_ports(gateway, 2)
        assert [probe(port, "/readyz")[0] for port in ports] == [200, 200]
        sigterm_and_wait_for_the_drain(gateway, 2)
        assert [probe(port, "/readyz")[0] for port in ports] == [503, 503]
        assert [probe(port, "/healthz")[0] for port in ports] == [200, 200]
        # New connections, spread over both workers, are still served.
        assert [ping(gateway) for _ in range(CONNECTIONS)] == [200] * CONNECTIONS
        assert gateway.process.wait(timeout=DRAIN + 60) == 0
        log = gateway.log_text()
    # Every ping came during the drain, and each worker served some.
    pings = [line for line in map(json.loads, access_log.read_text().splitlines()) if line["kind"] == "ping"]
    assert len(pings) >= CONNECTIONS and {line["worker"] for line in pings} == {0, 1}
    drained = re.findall(rf"^\[w(\d)\] \[[\d:.]+\] ocigate: drained for {DRAIN} s: stopping$", log, re.M)
    assert sorted(drained) == ["0", "1"]
    assert "Traceback" not in log


def test_ocigate_web_drains_too(fresh: World, tmp_path: Path) -> None:
    rules, host_map, options = start(fresh, tmp_path, tmp_path / "access.log")
    web = ["web_host=127.0.0.1", f"web_port={free_port()}", "web_open_browser=false"]
    options += [*web, "ocigate_metrics=127.0.0.1:0", f"ocigate_drain={DRAIN}"]
    entry_point = (sys.executable, "-m", "ocigate.cli", "web")
    with running_gateway(tmp_path / "gateway", rules, host_map, options, entry_point=entry_point) as gateway:
        (port,) = metrics_ports(gateway, 1)
        assert probe(port, "/readyz")[0] == 200
        sigterm_and_wait_for_the_drain(gateway, 1)
        assert probe(port, "/readyz")[0] == 503
        assert ping(gateway) == 200
        assert gateway.process.wait(timeout=DRAIN + 60) == 0
        log = gateway.log_text()
    assert f"ocigate: drained for {DRAIN} s: stopping" in log and "Traceback" not in log
