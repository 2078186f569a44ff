"""oras-py (PyPI `oras`, a requests-based client) run through the test gateway in a subprocess of its own.

A subprocess, because requests reads HTTPS_PROXY and REQUESTS_CA_BUNDLE from the environment: setting them in the
test process would send every later httpx/requests call of the session through the gateway too.

What oras-py 0.2 does on the wire, read from its source (oras/provider.py):
- no `GET /v2/` ping: `pull` starts with the manifest, `push` with a HEAD of each blob;
- one `Accept:` line listing OCI manifest, OCI index and the two Docker types, comma-separated;
- `pull` writes each layer of the manifest to `outdir/<org.opencontainers.image.title>` (the digest when there is
  no title), but a layer of media type `application/vnd.oci.image.layer.v1.tar+gzip` is unpacked there instead;
  an index has no layers, so pulling one writes nothing;
- `insecure=True` means plain http; certificates are checked against REQUESTS_CA_BUNDLE (requests' trust_env);
- every request is retried up to 5 times after an exception, sleeping 3, 5, 11, 29, 83 s: a client timeout below
  that keeps a failing run short.
"""

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .clients import client_env
from .gateway import Gateway

# Runs in the subprocess: one action, its result as one JSON line on stdout (oras-py logs to stderr).
_ORAS_SCRIPT = """
import json
import sys

import oras.provider

request = json.loads(sys.argv[1])
client = oras.provider.Registry(insecure=request["insecure"])
if request["action"] == "pull":
    files = client.pull(target=request["target"], outdir=request["outdir"])
    print(json.dumps({"files": files}))
elif request["action"] == "push":
    response = client.push(target=request["target"], files=request["files"], disable_path_validation=True)
    print(json.dumps({"status": response.status_code, "digest": response.headers.get("Docker-Content-Digest")}))
else:
    raise SystemExit(f"unknown action {request['action']!r}")
"""


@dataclass(frozen=True)
class OrasRun:
    returncode: int  # -1 when it timed out
    result: dict[str, Any] | None  # the script's JSON answer, None when it failed before printing one
    stderr: str

    def describe(self) -> str:
        return f"oras-py exited with {self.returncode}:\n{self.stderr[-4000:]}"


def run_oras(home: Path, request: dict[str, Any], *, gateway: Gateway | None = None, timeout: float = 60) -> OrasRun:
    """Runs one oras-py action with `home` as HOME, working and temporary directory. With a gateway, through it and
    trusting its CA; without one, with no proxy at all (for talking to a test registry directly)."""
    home.mkdir(parents=True, exist_ok=True)
    if gateway is not None:
        env = client_env(gateway, home)
    else:
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        # oras-py reads credentials from $DOCKER_CONFIG/config.json or ~/.docker: neither may be the machine's.
        env.update(HOME=str(home), DOCKER_CONFIG=str(home / ".docker"))
    tmp = home / "tmp"
    tmp.mkdir(exist_ok=True)
    env["TMPDIR"] = str(tmp)
    try:
        completed = subprocess.run(
            [sys.executable, "-c", _ORAS_SCRIPT, json.dumps({"insecure": False, **request})],
            env=env,
            cwd=home,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as expired:
        # A failure like any other (oras-py is likely sleeping between retries), so callers assert on one thing.
        partial = (expired.stderr or b"").decode(errors="replace")
        return OrasRun(-1, None, f"timed out after {timeout} s; stderr so far:\n{partial}")
    lines = completed.stdout.decode().strip().splitlines()
    result = json.loads(lines[-1]) if completed.returncode == 0 and lines else None
    return OrasRun(completed.returncode, result, completed.stderr.decode(errors="replace"))


def oras_pull(gateway: Gateway, home: Path, target: str) -> tuple[OrasRun, Path]:
    """`OrasClient().pull(target, outdir=<home>/pulled)` through the gateway."""
    outdir = home / "pulled"
    return run_oras(home, {"action": "pull", "target": target, "outdir": str(outdir)}, gateway=gateway), outdir


def oras_push(home: Path, target: str, files: list[Path], *, gateway: Gateway | None = None) -> OrasRun:
    """`OrasClient().push(target, files)`: through the gateway, or (without one) over plain http to `target`."""
    request = {"action": "push", "target": target, "files": [str(f) for f in files], "insecure": gateway is None}
    return run_oras(home, request, gateway=gateway)
