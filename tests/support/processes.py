"""Starting, stopping and waiting for the processes the tests (and bench/) run: daemons, gateways, registries."""

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path


class NotReady(RuntimeError):
    """A process did not get ready: it exited first, or the time ran out."""


def wait_until(
    ready: Callable[[], bool],
    timeout: float,
    describe_failure: Callable[[str], str],
    *,
    process: subprocess.Popen | None = None,
    interval: float = 0.05,
) -> None:
    """Asks `ready()` every `interval` s until it says yes. Raises NotReady with `describe_failure(why)` when `process`
    (if given) exits first (why: "exited with N") or `timeout` s pass first (why: "timed out after T s")."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise NotReady(describe_failure(f"exited with {process.returncode}"))
        if ready():
            return
        time.sleep(interval)
    raise NotReady(describe_failure(f"timed out after {timeout} s"))


def stop(process: subprocess.Popen, timeout: float, *, group: bool = False) -> None:
    """Terminates `process`, waits up to `timeout` s for it to end, and kills it (waiting as long again) if it has not.
    With `group`, the signals go to the process group it leads (it was started with start_new_session=True), and
    whatever is left in that group afterwards is killed too. Safe to call on a process that has already ended."""
    if group:
        _signal_group(process, signal.SIGTERM)
    elif process.poll() is None:
        process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        if group:
            _signal_group(process, signal.SIGKILL)
        else:
            process.kill()
        process.wait(timeout=timeout)
    if group:
        # Anything the process started in its group and left behind.
        _signal_group(process, signal.SIGKILL)


@contextmanager
def running(
    command: Sequence[str],
    log_path: Path,
    *,
    env: Mapping[str, str],
    stop_timeout: float,
    group: bool = False,
) -> Iterator[subprocess.Popen]:
    """Starts `command` with stdin from /dev/null and stdout and stderr into `log_path` (written anew) and stops it
    with stop() when the block ends, whatever happened in it. With `group`, it leads a new session (so a process
    group) of its own, and the whole group is stopped."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=group
        )
    try:
        yield process
    finally:
        stop(process, stop_timeout, group=group)


def _signal_group(process: subprocess.Popen, signal_number: signal.Signals) -> None:
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal_number)
