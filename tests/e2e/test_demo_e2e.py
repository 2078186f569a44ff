"""`./run.sh demo`, run as a newcomer runs it: it shows a pull through the gateway from a throwaway mirror (what the
mirror was sent, with ns= and OCI-Named-Ref, and the gateway's line per request), ends in bounded time, and leaves no
process and no file behind, also when it is interrupted."""

import os
import re
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.demo import MIRROR, REPOSITORY, TAG, UPSTREAM
from tests.support.processes import stop
from tests.support.world import RUN_SH

# The demo takes seconds; this bounds a hang, and how long a fresh machine's first install may take is not tested here.
DEMO_TIMEOUT = 120
# SIGINT is what Ctrl-C sends to the terminal's whole foreground process group.
CTRL_C = 128 + signal.SIGINT


@contextmanager
def demo(tmp: Path) -> Iterator[subprocess.Popen[str]]:
    """`./run.sh demo` in a session of its own (so whatever it starts can be found by session id), its temp files in
    `tmp`; killed with its session if the test ends first."""
    tmp.mkdir()
    process = subprocess.Popen(
        [str(RUN_SH), "demo"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=os.environ | {"TMPDIR": str(tmp)},
        start_new_session=True,
    )
    try:
        yield process
    finally:
        stop(process, 5, group=True)


def left_in_session(session: int) -> list[str]:
    """The processes still in `session`: pid, parent, state and command name of each."""
    left = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getsid(int(entry.name)) == session:
                # comm is in parentheses and may hold spaces; state and parent follow it.
                stat = (entry / "stat").read_text()
                comm = stat[stat.index("(") + 1 : stat.rindex(")")]
                state, parent = stat[stat.rindex(")") + 2 :].split()[:2]
                left.append(f"{entry.name} (parent {parent}, state {state}) {comm}")
        except (ProcessLookupError, FileNotFoundError, PermissionError):
            continue
    return left


def finished(process: subprocess.Popen[str]) -> str:
    """The rest of the demo's output once it has ended, within DEMO_TIMEOUT."""
    try:
        output, _ = process.communicate(timeout=DEMO_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"./run.sh demo did not end within {DEMO_TIMEOUT} s")
    return output


def test_the_demo_shows_what_the_mirror_was_sent_and_what_the_gateway_decided_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    with demo(tmp_path / "tmp") as process:
        output = finished(process)
        # Looked for before the fixture's own clean-up, which would stop whatever the demo left.
        left = left_in_session(process.pid)
    assert process.returncode == 0, output
    sent = output.split("What the mirror was sent", 1)[1].split("What the gateway decided", 1)[0]
    decided = output.split("What the gateway decided", 1)[1]
    # The manifest by tag, then its config and both layers: each with the registry meant and the image pulled.
    requests = re.findall(r"^   (GET|HEAD) (\S+)\n      OCI-Named-Ref: (\S+)$", sent, re.MULTILINE)
    manifest = f"/v2/{REPOSITORY}/manifests/{TAG}?ns={UPSTREAM}"
    assert ("GET", manifest, f"{UPSTREAM}/{REPOSITORY}:{TAG}") in requests, sent
    blobs = [target for method, target, named in requests if "/blobs/" in target]
    assert len(blobs) == 3 and all(target.endswith(f"?ns={UPSTREAM}") for target in blobs), sent
    assert {named for _, _, named in requests} == {f"{UPSTREAM}/{REPOSITORY}:{TAG}"}, sent
    # One line of the gateway's per request the mirror was sent, naming the mirror that served it.
    assert f"ocigate: GET {UPSTREAM}/{REPOSITORY} manifest {TAG} -> {MIRROR} 200" in decided, decided
    assert len(re.findall(rf"ocigate: GET {UPSTREAM}/{REPOSITORY} blob sha256:\w+ -> {MIRROR} 200", decided)) == 3
    assert not left
    assert not list((tmp_path / "tmp").iterdir())


@pytest.mark.parametrize(
    ("signal_number", "to_group", "exit_status"),
    [
        pytest.param(signal.SIGINT, True, CTRL_C, id="ctrl-c"),
        # Sent to the demo alone, so that the processes it started are stopped by the demo or not at all.
        pytest.param(signal.SIGTERM, False, 128 + signal.SIGTERM, id="sigterm-to-the-demo-alone"),
    ],
)
def test_an_interrupted_demo_stops_what_it_started_and_removes_its_temp_dir(
    tmp_path: Path, signal_number: signal.Signals, to_group: bool, exit_status: int
) -> None:
    with demo(tmp_path / "tmp") as process:
        assert process.stdout is not None
        # Sent once the mirror runs and while the gateway starts, which takes longer than a signal to arrive.
        for line in process.stdout:
            if line.startswith("1. The mirror"):
                break
        else:
            pytest.fail(f"the demo ended before its mirror ran (exit {process.wait()})")
        assert left_in_session(process.pid), "the mirror should be running"
        if to_group:
            os.killpg(process.pid, signal_number)
        else:
            process.send_signal(signal_number)
        output = finished(process)
        left = left_in_session(process.pid)
    assert process.returncode == exit_status, output
    assert "everything the demo started is stopped and its temp dir removed" in output
    assert not left
    assert not list((tmp_path / "tmp").iterdir())
