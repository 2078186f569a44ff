"""`ocigate --workers N`: the command line, what a worker knows of itself, its labelled output, and its proxy server
sharing the listening address (the processes themselves: tests/e2e/test_workers_e2e.py)."""

import contextlib
import ctypes
import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from mitmproxy import exceptions
from mitmproxy.options import Options
from mitmproxy.test import taddons

from ocigate import cli, masters, worker
from ocigate.configuration import Shared
from ocigate.settings import MetricsAddress
from ocigate.worker import STOP_GRACE, LabelledLines, SharedListen, end_if_hung
from ocigate.workeridentity import ENVIRONMENT, Identity
from ocigate.workers import split
from tests.support.registry import free_port


def test_workers_is_taken_out_of_the_command_line_wherever_it_is() -> None:
    assert split(["--rules", "r", "--workers", "4", "-v"]) == (4, ["--rules", "r", "-v"])
    assert split(["--workers=2", "--rules", "r"]) == (2, ["--rules", "r"])
    assert split(["--rules", "r"]) == (1, ["--rules", "r"])
    assert split(["--workers", "1"]) == (1, [])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--workers"], "--workers needs a number of gateway processes, 1 or more (not '')"),
        (["--workers", "0"], "--workers needs a number of gateway processes, 1 or more (not '0')"),
        (["--workers=two"], "--workers needs a number of gateway processes, 1 or more (not 'two')"),
        (["--workers", "2", "--workers", "3"], "--workers is given twice"),
    ],
)
def test_a_workers_flag_that_is_not_a_count_is_refused(argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=f"^ocigate: {re.escape(message)}$"):
        split(argv)


def test_ocigate_web_refuses_more_than_one_worker() -> None:
    with pytest.raises(SystemExit, match=r"^ocigate web: --workers cannot be used with mitmweb's UI"):
        cli.main(["web", "--workers", "2"])


def test_a_worker_variable_that_is_not_the_parents_stops_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENVIRONMENT, "x")
    with pytest.raises(SystemExit, match=f"^ocigate: {ENVIRONMENT}='x' is not INDEX/COUNT/PARENT_PID$"):
        cli.main([])


def test_a_worker_whose_parent_is_gone_ends_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its parent died before the worker could ask to be told: nobody would stop it."""
    monkeypatch.setenv(ENVIRONMENT, f"0/2/{os.getppid() + 1}")
    try:
        with pytest.raises(SystemExit, match=r"^ocigate: \[w0\] the parent \(pid \d+\) is gone$"):
            cli.main([])
    finally:
        ctypes.CDLL(None).prctl(1, 0, 0, 0, 0)  # PR_SET_PDEATHSIG: the test run's own process is no worker


# Runs `ocigate --workers 2` up to where the parent starts its workers (workers.run, replaced by a report of what is
# imported by then), in a fresh interpreter: what the parent holds in memory for as long as the gateway runs.
PARENT_IMPORTS = """
import json, sys
from ocigate import cli, workers
workers.run = lambda count, argv: print(json.dumps(sorted(sys.modules))) or 0
cli.main(["--workers", "2", "--rules", "rules"])
"""


def test_the_parent_of_the_workers_imports_neither_mitmproxy_nor_the_gateway() -> None:
    environment = {key: value for key, value in os.environ.items() if key != ENVIRONMENT}
    finished = subprocess.run(
        [sys.executable, "-c", PARENT_IMPORTS], capture_output=True, text=True, env=environment, check=True
    )
    modules = set(json.loads(finished.stdout))
    assert "ocigate.workers" in modules  # the report ran where the parent starts its workers
    assert not {module for module in modules if module.split(".")[0] in ("mitmproxy", "mitmproxy_rs", "httpx")}
    ours = {module for module in modules if module.startswith("ocigate.")}
    assert ours == {"ocigate.cli", "ocigate.workers", "ocigate.supervisor", "ocigate.workeridentity"}


def test_a_worker_is_who_its_environment_says() -> None:
    worker = Identity(1, 3, 4242)
    assert Identity.from_environment(worker.environment()) == worker
    assert Identity.from_environment({}) is None
    assert worker.label == "[w1]"
    for value in ("1/3", "a/3/1", "3/3/1"):
        with pytest.raises(ValueError, match=f"^{ENVIRONMENT}="):
            Identity.from_environment({ENVIRONMENT: value})


def test_each_worker_serves_its_metrics_on_the_port_given_plus_its_index() -> None:
    assert Identity(2, 3, 1).metrics_address(MetricsAddress("127.0.0.1", 9090)) == MetricsAddress("127.0.0.1", 9092)
    assert Identity(2, 3, 1).metrics_address(MetricsAddress("127.0.0.1", 0)) == MetricsAddress("127.0.0.1", 0)
    with pytest.raises(ValueError, match=r"^ocigate_metrics: worker 2 would serve on port 65537, above 65535$"):
        Identity(2, 3, 1).metrics_address(MetricsAddress("127.0.0.1", 65535))


def test_labelled_lines_are_written_whole_each_starting_with_the_label(tmp_path: Path) -> None:
    path = tmp_path / "out"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    writes: list[bytes] = []
    original = os.write

    def noting(to: int, data: bytes) -> int:
        writes.append(bytes(data))
        return original(to, data)

    stream = LabelledLines(fd, "[w1]")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "write", noting)
        print("a line", "in pieces", file=stream)  # print writes each piece and the line end apart
        stream.write("two\nlines\nand a start")
        assert writes == [b"[w1] a line in pieces\n", b"[w1] two\n[w1] lines\n"]
        stream.write(" ended\n")
    os.close(fd)
    assert path.read_text() == "[w1] a line in pieces\n[w1] two\n[w1] lines\n[w1] and a start ended\n"
    assert stream.fileno() == fd and not stream.isatty()


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"save_stream_file": "capture.flows"}, "save_stream_file: the 2 workers of ocigate --workers cannot write"),
        ({"hardump": "flows.har"}, "hardump: the 2 workers of ocigate --workers cannot write one HAR file"),
        ({"listen_port": 0}, "listen_port: 0 would give each worker of ocigate --workers a port of its own"),
        ({"mode": ["wireguard"]}, "mode: wireguard cannot be shared by the workers of ocigate --workers"),
        ({"mode": ["local"]}, "mode: local cannot be shared by the workers of ocigate --workers"),
    ],
)
def test_a_worker_refuses_what_the_workers_cannot_share(option: dict, message: str) -> None:
    with taddons.context(SharedListen(Identity(0, 2, os.getpid()), Shared())) as tctx:
        tctx.options.add_option("save_stream_file", str, "", "as mitmproxy's Save declares it")
        tctx.options.add_option("hardump", str, "", "as mitmproxy's SaveHar declares it")
        with pytest.raises(exceptions.OptionsError, match=f"^{message}"):
            tctx.configure(tctx.master.addons.get("sharedlisten"), **option)


@contextlib.asynccontextmanager
async def listening(worker: Identity | None) -> AsyncIterator[int]:
    """The gateway's proxy server (a worker's when `worker` is given) listening on a free loopback port."""
    port = free_port()
    master = masters.OcigateMaster(Options(), worker=worker, with_termlog=False, with_dumper=False)
    master.options.update(listen_host="127.0.0.1", listen_port=port)
    proxyserver = master.addons.get("proxyserver")
    assert await proxyserver.setup_servers()
    try:
        yield port
    finally:
        await proxyserver.servers.update([])


def reusing_socket() -> socket.socket:
    other = socket.socket()
    other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return other


async def test_a_workers_proxy_server_listens_with_so_reuseport() -> None:
    """A second socket can bind the address the proxy listens on only when both set SO_REUSEPORT."""
    async with listening(Identity(0, 2, os.getpid())) as port:
        with reusing_socket() as other:
            other.bind(("127.0.0.1", port))


async def test_a_gateway_alone_listens_without_it() -> None:
    async with listening(None) as port:
        with reusing_socket() as other, pytest.raises(OSError, match="Address already in use"):
            other.bind(("127.0.0.1", port))


def test_a_worker_whose_parent_died_is_ended_if_it_has_not_stopped_within_the_grace() -> None:
    happened: list[str] = []
    end_if_hung(
        lambda: happened.append("parent gone"),
        lambda seconds: happened.append(f"slept {seconds:g}"),
        happened.append,
        lambda status: happened.append(f"exit {status}"),
    )
    assert happened == [
        "parent gone",
        f"slept {STOP_GRACE:g}",
        f"the parent is gone and this worker has not stopped within {STOP_GRACE:g} s: ending it now",
        "exit 1",
    ]


def test_the_wait_for_the_parent_ends_once_it_has_exited() -> None:
    parent = subprocess.Popen(["sleep", "60"])
    pidfd = os.pidfd_open(parent.pid)
    waiting = threading.Thread(target=worker._wait_readable, args=(pidfd,), daemon=True)
    waiting.start()
    parent.kill()
    parent.wait()
    waiting.join(10)
    os.close(pidfd)
    assert not waiting.is_alive()
