"""A private containerd daemon for end-to-end tests, and `ctr` run against it through the test gateway.

Facts about Debian bookworm's containerd 1.6 this module relies on:

- `ctr images pull` resolves and fetches in the ctr process (only unpacking happens in the daemon), so HTTPS_PROXY
  and the gateway's CA belong in ctr's environment and flags; the daemon gets no proxy at all, which proves it.
- Content is shared between namespaces by default: a pull into a new namespace can succeed without fetching a byte
  if another namespace holds the blobs. `content_sharing_policy = "isolated"` stops that.
- Everything the daemon writes is under `root`, `state`, `temp` and the opt plugin's `path`; the CRI plugin (which
  would want CNI, /etc/cni and a sandbox image) is disabled, and so are the snapshotters that need kernel features
  or devices, so the daemon starts in seconds in a network namespace with only loopback.
- The native snapshotter needs no overlay support. It unpacks through bind mounts, so the daemon runs in a private
  mount namespace (`unshare -m`) where a mount it forgets cannot outlive it.
- A unix socket path is limited to 107 bytes; the socket lives in the (short) work directory.
"""

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .clients import client_env
from .gateway import Gateway
from .processes import running, wait_until

_START_TIMEOUT = 30.0
_STOP_TIMEOUT = 10.0
_SOCKET_PATH_LIMIT = 107
# The only snapshotter the tests use; the others want overlay, btrfs, zfs, devmapper or aufs.
SNAPSHOTTER = "native"
_DISABLED_PLUGINS = (
    "io.containerd.grpc.v1.cri",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.overlayfs",
    "io.containerd.snapshotter.v1.zfs",
)


@dataclass
class Containerd:
    socket_path: Path
    workdir: Path
    log_path: Path
    process: subprocess.Popen

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def ctr(
        self,
        namespace: str,
        *args: str,
        gateway: Gateway | None = None,
        home: Path | None = None,
        timeout: float = 120,
        text: bool = True,
    ) -> subprocess.CompletedProcess:
        """Runs `ctr --address <socket> --namespace <namespace> args...`. With a gateway, ctr runs as an unmodified
        client would: HTTPS_PROXY at the gateway and its CA in the bundle (registry flags such as --tlscacert are the
        caller's); without one, it gets no proxy at all. `text=False` keeps stdout as bytes (`content get`). The caller
        asserts on the result."""
        if gateway is not None:
            if home is None:
                raise ValueError("a ctr run through the gateway needs a home directory for its CA bundle")
            env = client_env(gateway, home)
        else:
            env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        return subprocess.run(
            ["ctr", "--address", str(self.socket_path), "--namespace", namespace, *args],
            env=env,
            capture_output=True,
            text=text,
            timeout=timeout,
            check=False,
        )


def config_toml(workdir: Path, socket_path: Path, disabled_plugins: Sequence[str] = _DISABLED_PLUGINS) -> str:
    disabled = ", ".join(f'"{plugin}"' for plugin in disabled_plugins)
    return f"""version = 2
root = "{workdir / "root"}"
state = "{workdir / "state"}"
temp = "{workdir / "tmp"}"
disabled_plugins = [{disabled}]

[grpc]
  address = "{socket_path}"

[ttrpc]
  address = "{socket_path}.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{workdir / "opt"}"

[plugins."io.containerd.metadata.v1.bolt"]
  content_sharing_policy = "isolated"
"""


@contextmanager
def running_containerd(
    workdir: Path, socket_path: Path | None = None, stop_timeout: float = _STOP_TIMEOUT
) -> Iterator[Containerd]:
    """Starts containerd with all its state under `workdir` (its socket too, unless `socket_path` says where), in a
    private mount namespace and a session of its own; when the block ends, stops it and all its process group."""
    if shutil.which("containerd") is None or shutil.which("ctr") is None:
        raise RuntimeError("containerd and ctr are not installed (Debian package containerd)")
    workdir.mkdir(parents=True, exist_ok=True)
    socket_path = socket_path or workdir / "containerd.sock"
    # The ttrpc socket's name is the longest: "<grpc address>.ttrpc".
    if len(f"{socket_path}.ttrpc") > _SOCKET_PATH_LIMIT:
        raise ValueError(f"{socket_path} is too long for a unix socket: use a shorter work directory")
    (workdir / "tmp").mkdir(exist_ok=True)
    config_path = workdir / "config.toml"
    config_path.write_text(config_toml(workdir, socket_path))
    log_path = workdir / "containerd.log"
    # The daemon fetches nothing itself in these tests; without a proxy it could not even if it tried.
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["TMPDIR"] = str(workdir / "tmp")
    command = ["unshare", "--mount", "--propagation", "private", "containerd", "--config", str(config_path)]
    # unshare execs containerd: the PID is the daemon's.
    with running(command, log_path, env=env, stop_timeout=stop_timeout, group=True) as process:
        daemon = Containerd(socket_path, workdir, log_path, process)
        wait_until(
            lambda: _accepts(socket_path),
            _START_TIMEOUT,
            lambda why: f"containerd did not serve {socket_path}: {why}:\n{daemon.log_text()[-3000:]}",
            process=process,
        )
        yield daemon


def _accepts(socket_path: Path) -> bool:
    if not socket_path.exists():
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(0.5)
            probe.connect(str(socket_path))
        return True
    except OSError:
        return False
