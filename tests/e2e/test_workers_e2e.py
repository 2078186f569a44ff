"""`ocigate --workers 2` as a real process tree: both workers serve connections on the one address, skopeo pulls
through them, the parent's SIGTERM stops every worker, a worker killed is started again, and a parent killed takes
its workers with it; with client affinity, each client address stays on one worker, and a pull keeps its context."""

import http.client
import json
import os
import signal
import subprocess
from pathlib import Path

from tests.support.clients import assert_layout_holds, client_env
from tests.support.gateway import Gateway, running_gateway, wait_for_workers
from tests.support.hoststoml import write_mirror_rules
from tests.support.processes import wait_until
from tests.support.world import UPSTREAM, World

CONNECTIONS = 40  # separate connections; the kernel spreads them over the workers by their addresses
REFERENCE = f"{UPSTREAM}/team/app:v1"


def children(pid: int) -> set[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return set()
    return {int(child) for child in text.split()}


def running(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting for whoever adopted it has ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def ping(gateway: Gateway, source: str = "127.0.0.1") -> int:
    """A GET /v2/ for the upstream, which the gateway answers itself, on a connection of its own from `source`."""
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30, source_address=(source, 0))
    try:
        connection.request("GET", f"http://{UPSTREAM}/v2/")
        return connection.getresponse().status
    finally:
        connection.close()


def pull(gateway: Gateway, home: Path, layout: Path) -> subprocess.CompletedProcess[str]:
    """skopeo copies the test image through the gateway into an OCI layout."""
    env = client_env(gateway, home)
    command = ["skopeo", "copy", "--src-cert-dir", str(gateway.cert_dir(home))]
    return subprocess.run(
        [*command, f"docker://{REFERENCE}", f"oci:{layout}:copied"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def start(world: World, tmp_path: Path, access_log: Path) -> tuple[Path, dict[str, str], list[str]]:
    rules = write_mirror_rules(tmp_path / "rules", UPSTREAM, [f"http://{m.name}" for m in (world.a, world.b)])
    host_map = {m.name: f"127.0.0.1:{m.recorder.port}" for m in (world.a, world.b)}
    return rules, host_map, [f"ocigate_access_log={access_log}"]


def test_two_workers_share_the_address_serve_a_pull_and_stop_with_their_parent(fresh: World, tmp_path: Path) -> None:
    access_log = tmp_path / "access.log"
    rules, host_map, options = start(fresh, tmp_path, access_log)
    with running_gateway(tmp_path / "gateway", rules, host_map, options, workers=2) as gateway:
        wait_for_workers(gateway, 2)
        workers = children(gateway.process.pid)
        assert len(workers) == 2
        assert [ping(gateway) for _ in range(CONNECTIONS)] == [200] * CONNECTIONS
        home = tmp_path / "client"
        layout = home / "layout"
        pulled = pull(gateway, home, layout)
        assert pulled.returncode == 0, pulled.stderr
        blob_requests = [r for r in fresh.b.recorder.requests if r.method == "GET" and "/blobs/" in r.path]
        gateway.process.send_signal(signal.SIGTERM)
        assert gateway.process.wait(timeout=60) == 0
        log = gateway.log_text()
    assert_layout_holds(layout, fresh.app)
    assert not {pid for pid in workers if running(pid)}
    assert "ocigate: SIGTERM: stopping the workers" in log and "Traceback" not in log

    # Every access log line is whole JSON, and each worker served some of the connections.
    logged = [json.loads(text) for text in access_log.read_text().splitlines()]
    pings = [line for line in logged if line["kind"] == "ping"]
    assert len(pings) >= CONNECTIONS
    assert {line["worker"] for line in pings} == {0, 1}
    # The pull: its manifest and blobs, each served by one of the workers.
    pulled_lines = [line for line in logged if line["kind"] in ("manifest", "blob")]
    assert {line["status"] for line in pulled_lines} == {200}
    assert {line["worker"] for line in pulled_lines} <= {0, 1}
    # The pull's context is per worker (docs/deploy.md): a blob request served by the worker that served the tag's
    # manifest names the tag; one that another worker served names its own digest. Each says its upstream.
    (manifest,) = [line for line in pulled_lines if line["kind"] == "manifest"]
    assert blob_requests
    for request in blob_requests:
        digest = request.path.rpartition("/")[2]
        served = next(line for line in pulled_lines if line["reference"] == f"{UPSTREAM}/team/app@{digest}")
        own = REFERENCE if served["worker"] == manifest["worker"] else f"{UPSTREAM}/team/app@{digest}"
        assert request.header_values("OCI-Named-Ref") == [own], (request.target, served)
        assert request.query().get("ns") == [UPSTREAM]


def test_a_killed_worker_is_started_again_and_a_killed_parent_leaves_no_worker(fresh: World, tmp_path: Path) -> None:
    access_log = tmp_path / "access.log"
    rules, host_map, options = start(fresh, tmp_path, access_log)
    with running_gateway(tmp_path / "gateway", rules, host_map, options, workers=2) as gateway:
        wait_for_workers(gateway, 2)
        parent = gateway.process.pid
        before = children(parent)
        killed = max(before)  # worker 1: started after worker 0 listened
        os.kill(killed, signal.SIGKILL)
        wait_for_workers(gateway, 2, restarted=[1])
        after = children(parent)
        assert len(after) == 2 and killed not in after and before - {killed} <= after
        assert f"ocigate: worker 1 (pid {killed}) was killed by SIGKILL" in gateway.log_text()
        # Both serve again.
        assert [ping(gateway) for _ in range(CONNECTIONS)] == [200] * CONNECTIONS
        os.kill(parent, signal.SIGKILL)
        gateway.process.wait(timeout=30)
        # Each worker ends of its own once its parent is gone (PR_SET_PDEATHSIG): nothing else stops it here.
        wait_until(
            lambda: not any(running(pid) for pid in after),
            60,
            lambda why: f"workers {sorted(after)} outlived their parent: {why}",
        )
    lines = [json.loads(text) for text in access_log.read_text().splitlines()]
    assert {line["worker"] for line in lines if line["kind"] == "ping"} == {0, 1}


def test_with_client_affinity_each_client_stays_on_one_worker_and_a_pull_keeps_its_context(
    fresh: World, tmp_path: Path
) -> None:
    access_log = tmp_path / "access.log"
    rules, host_map, options = start(fresh, tmp_path, access_log)
    options.append("ocigate_worker_affinity=client")
    with running_gateway(tmp_path / "gateway", rules, host_map, options, workers=2) as gateway:
        wait_for_workers(gateway, 2)
        sources = ["127.0.0.2", "127.0.0.3"]  # an even and an odd address: one for each worker
        assert [ping(gateway, source) for source in sources for _ in range(10)] == [200] * 20
        home = tmp_path / "client"
        layout = home / "layout"
        pulled = pull(gateway, home, layout)
        assert pulled.returncode == 0, pulled.stderr
        blob_requests = [r for r in fresh.b.recorder.requests if r.method == "GET" and "/blobs/" in r.path]
    assert_layout_holds(layout, fresh.app)
    logged = [json.loads(text) for text in access_log.read_text().splitlines()]
    by_client: dict[str, set[int]] = {}
    for line in logged:
        by_client.setdefault(line["client"].rpartition(":")[0], set()).add(line["worker"])
    assert by_client.keys() == {"127.0.0.1", *sources}
    assert all(len(workers) == 1 for workers in by_client.values()), by_client
    assert by_client["127.0.0.2"] != by_client["127.0.0.3"]
    # skopeo's connections all met the worker that served the manifest: every blob is asked as part of the pull.
    assert blob_requests
    for request in blob_requests:
        assert request.header_values("OCI-Named-Ref") == [REFERENCE], request.target
