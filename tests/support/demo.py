"""`./run.sh demo`: ocigate's main job on this machine alone, for a newcomer, in well under a minute.

A throwaway registry (Debian's docker-registry) on loopback plays the mirror of a made-up registry, `demo.example`,
and gets a small image pushed straight to it. The gateway (the real `ocigate` command) starts with a generated rules
tree that sends demo.example to that mirror only (`offline = true`), and skopeo pulls the image through it. Then the
demo prints what the mirror was sent (`ns=`, `OCI-Named-Ref`: a recording hop in front of the registry notes every
request, since distribution logs no headers) and the gateway's own log line per request.

demo.example resolves nowhere and nothing ever dials it: the gateway's host map knows the mirror, it never resolves a
name (`ocigate_dns=false`) and dials loopback only, as the end-to-end tests run it. Everything lives in one temp
dir, removed at the end; every process is stopped, also on failure, Ctrl-C, SIGTERM or SIGHUP. The pieces are the
end-to-end tests' own (tests/support/), so the demo shows the gateway as the tests prove it.
"""

import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from pathlib import Path
from types import FrameType

from .clients import skopeo_copy_to_layout
from .gateway import Gateway, running_gateway
from .images import Image, make_image, push_image
from .recorder import RecordedRequest, Recorder, recording_proxy
from .registry import running_registry

UPSTREAM = "demo.example"
# The mirror's name in the rules; the gateway's host map sends it to the recording hop in front of the registry.
MIRROR = "mirror.demo.example:5000"
REPOSITORY = "hello/world"
TAG = "v1"
REFERENCE = f"{UPSTREAM}/{REPOSITORY}:{TAG}"
# How long the gateway's log lines of the pull are waited for.
_LOG_WAIT = 5.0
# How long children left over get to end after SIGTERM, before SIGKILL.
_CHILD_STOP_TIMEOUT = 5.0
# What the process answers when a signal stopped it: 128 + the signal's number, as a shell reports it.
_SIGNALLED = 128

RULES = f"""\
# {UPSTREAM} is made up: nothing answers for it but the mirror below.
# offline = true: only the mirrors are ever asked, never {UPSTREAM} itself.
offline = true

[host."http://{MIRROR}"]
  capabilities = ["pull", "resolve"]
"""


class DemoFailed(Exception):
    """A step of the demo did not do what it should: the message says which and shows what there is to see."""


class Stopped(BaseException):
    """SIGTERM or SIGHUP arrived: unwinds like Ctrl-C's KeyboardInterrupt, so every process is stopped on the way."""

    def __init__(self, number: int) -> None:
        super().__init__(signal.Signals(number).name)
        self.number = number


def _stop(number: int, frame: FrameType | None) -> None:
    raise Stopped(number)


def main() -> int:
    for number in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, _stop)
    try:
        with tempfile.TemporaryDirectory(prefix="ocigate-demo-") as workdir:
            try:
                demo(Path(workdir))
            finally:
                _stop_children()
    except DemoFailed as failure:
        say(f"\ndemo failed: {failure}\neverything it started is stopped and its temp dir removed")
        return 1
    except KeyboardInterrupt:
        say("\ninterrupted: everything the demo started is stopped and its temp dir removed")
        return _SIGNALLED + signal.SIGINT
    except Stopped as stopped:
        say(f"\nstopped by {stopped}: everything the demo started is stopped and its temp dir removed")
        return _SIGNALLED + stopped.number
    except BrokenPipeError:
        # Whoever read the output stopped reading (`./run.sh demo | head`); what is still buffered goes nowhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    say("\nDone: the registry, the recording hop and the gateway are stopped, the temp dir is removed.")
    return 0


def _stop_children() -> None:
    """Stops and reaps any child of the demo still there. Each process is stopped where it was started, but Ctrl-C
    landing between a fork and the code that would stop its child (inside subprocess.Popen) leaves a child nobody
    holds a handle to."""
    tasks = Path("/proc/self/task").iterdir()
    children = [int(pid) for task in tasks for pid in (task / "children").read_text().split()]
    for pid in children:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + _CHILD_STOP_TIMEOUT
    for pid in children:
        with suppress(ChildProcessError):
            while os.waitpid(pid, os.WNOHANG) == (0, 0):
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    break
                time.sleep(0.05)


def say(text: str) -> None:
    print(text, flush=True)


def demo(workdir: Path) -> None:
    image = make_image("ocigate-demo", layers=2, layer_size=16 * 1024)
    say(f"ocigate demo, everything under {workdir} (removed at the end)\n")
    with (
        running_registry(workdir / "mirror") as registry,
        recording_proxy(registry.url) as recorder,
    ):
        # Pushed straight to the registry, so that the recording hop sees the pull only.
        push_image(registry.url, REPOSITORY, TAG, image)
        say(f"1. The mirror: docker-registry on {registry.url}, holding {REPOSITORY}:{TAG} (pushed to it directly).")
        say(f"   A recording hop on {recorder.url} in front of it notes every request and header it is sent.")
        rules = workdir / "rules"
        (rules / UPSTREAM).mkdir(parents=True)
        (rules / UPSTREAM / "hosts.toml").write_text(RULES)
        say(f"2. The rules: {rules}/{UPSTREAM}/hosts.toml, a containerd hosts.toml:\n")
        say(_indent(RULES, "     ") + "\n")
        ocigate = Path(sys.executable).parent / "ocigate"
        host_map = {MIRROR: f"127.0.0.1:{recorder.port}"}
        with running_gateway(workdir / "gateway", rules, host_map, entry_point=(str(ocigate),)) as gateway:
            say(f"3. The gateway: ocigate on {gateway.proxy_url}, its CA in {gateway.ca_path}")
            say(f"   ({MIRROR} is mapped to the recording hop; the gateway resolves no name, dials loopback only)")
            _pull(gateway, workdir / "client", image)
            say("\nWhat the mirror was sent (ns= names the registry meant, OCI-Named-Ref the image pulled):\n")
            for request in recorder.requests:
                say("   " + _received(request))
            say("\nWhat the gateway decided, one log line per request (the client's GET /v2/ it answers itself):\n")
            for line in _decisions(gateway, recorder):
                say("   " + line)


def _pull(gateway: Gateway, home: Path, image: Image) -> None:
    say(f"4. The pull: HTTPS_PROXY={gateway.proxy_url} skopeo copy docker://{REFERENCE} oci:{home}/layout:copied")
    try:
        result, layout = skopeo_copy_to_layout(gateway, home, REFERENCE)
    except subprocess.TimeoutExpired as timeout:
        raise DemoFailed(f"skopeo copy did not finish in {timeout.timeout} s\n{_log_tail(gateway)}") from None
    if result.returncode != 0:
        stderr = result.stderr.decode(errors="replace")
        raise DemoFailed(f"skopeo copy exited with {result.returncode}:\n{stderr}{_log_tail(gateway)}")
    missing = [
        blob.digest
        for blob in (image.manifest, image.config, *image.layers)
        if not (layout / "blobs" / "sha256" / blob.digest.removeprefix("sha256:")).is_file()
    ]
    if missing:
        raise DemoFailed(f"skopeo copy succeeded but the copy lacks {', '.join(missing)}")
    say(f"   copied: manifest {image.manifest.digest}, its config and {len(image.layers)} layers")


def _received(request: RecordedRequest) -> str:
    line = f"{request.method} {request.target}"
    for named in request.header_values("OCI-Named-Ref"):
        line += f"\n      OCI-Named-Ref: {named}"
    return line


def _decisions(gateway: Gateway, recorder: Recorder) -> list[str]:
    """The gateway's line for each request of the pull, waited for until there is one naming the mirror per request
    the mirror was sent (a line is written once its answer is complete, a little after the client has it)."""
    deadline = time.monotonic() + _LOG_WAIT
    while True:
        lines = [decision for line in gateway.log_text().splitlines() if (decision := _decision(line))]
        served = [line for line in lines if f" -> {MIRROR} " in line]
        if len(served) >= len(recorder.requests) or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def _decision(line: str) -> str | None:
    """From a line of the gateway's log, `[time] ocigate: GET demo.example/... -> host status`, what follows the
    time; None for any other line."""
    _, found, rest = line.partition("] ocigate: ")
    if found and rest.split(" ", 1)[0] in ("GET", "HEAD") and " -> " in rest:
        return "ocigate: " + rest
    return None


def _log_tail(gateway: Gateway) -> str:
    return "\nthe gateway's log ends:\n" + _indent("\n".join(gateway.log_text().splitlines()[-20:]), "  ")


def _indent(text: str, prefix: str) -> str:
    return "\n".join(prefix + line if line else line for line in text.splitlines())


if __name__ == "__main__":
    sys.exit(main())
