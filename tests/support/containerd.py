"""A private containerd daemon for end-to-end tests, and `ctr` run against it through the test gateway.

Facts about Debian bookworm's containerd 1.6 this module relies on:

- `ctr images pull` resolves and fetches in the ctr process (only unpacking happens in the daemon), so HTTPS_PROXY
  and the gateway's CA belong in ctr's environment and flags; the daemon gets no proxy at all, which proves it.
- A CRI (kubelet) pull is the daemon's own: with `cri=True` the CRI plugin is enabled, and with a gateway the daemon
  gets HTTPS_PROXY and `SSL_CERT_FILE=<system roots + the gateway's CA>` in its environment (the CRI plugin's
  registry transport takes the environment's proxy; Go's crypto/x509 reads SSL_CERT_FILE). Its registry
  `config_path` is empty, so the daemon has no hosts.toml and no mirrors of its own: it asks `https://<upstream>`
  through the proxy.
- The CRI plugin keeps its state under containerd's root and state (`io.containerd.grpc.v1.cri`) and puts images in
  the `k8s.io` namespace. Pulls need none of what a pod needs: it runs with cgroups off, an OOM score it may not
  raise, the native snapshotter and empty CNI directories of its own (the missing network config is logged as an
  error at start and matters only to pods). Its stream server listens on 127.0.0.1 on a free port.
- Content is shared between namespaces by default: a pull into a new namespace can succeed without fetching a byte
  if another namespace holds the blobs. `content_sharing_policy = "isolated"` stops that.
- Everything the daemon writes is under `root`, `state`, `temp` and the opt plugin's `path`; the CRI plugin is
  disabled unless asked for, and the snapshotters that need kernel features or devices always are, so the daemon
  starts in seconds in a network namespace with only loopback.
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
from .processes import NotReady, running, wait_until

_START_TIMEOUT = 30.0
_STOP_TIMEOUT = 10.0
_SOCKET_PATH_LIMIT = 107
# The only snapshotter the tests use; the others want overlay, btrfs, zfs, devmapper or aufs.
SNAPSHOTTER = "native"
CRI_PLUGIN = "io.containerd.grpc.v1.cri"
# The namespace the CRI plugin keeps the kubelet's images in.
CRI_NAMESPACE = "k8s.io"
_DISABLED_PLUGINS = (
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


def config_toml(workdir: Path, socket_path: Path, *, cri: bool = False) -> str:
    disabled_plugins: Sequence[str] = _DISABLED_PLUGINS if cri else (CRI_PLUGIN, *_DISABLED_PLUGINS)
    disabled = ", ".join(f'"{plugin}"' for plugin in disabled_plugins)
    config = f"""version = 2
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
    if not cri:
        return config
    cri_config = f"""
[plugins."{CRI_PLUGIN}"]
  disable_cgroup = true
  restrict_oom_score_adj = true
  [plugins."{CRI_PLUGIN}".containerd]
    snapshotter = "{SNAPSHOTTER}"
  [plugins."{CRI_PLUGIN}".cni]
    bin_dir = "{workdir / "cni" / "bin"}"
    conf_dir = "{workdir / "cni" / "conf"}"
  [plugins."{CRI_PLUGIN}".registry]
    config_path = ""
"""
    return config + cri_config


@contextmanager
def running_containerd(
    workdir: Path,
    socket_path: Path | None = None,
    stop_timeout: float = _STOP_TIMEOUT,
    *,
    cri: bool = False,
    gateway: Gateway | None = None,
) -> Iterator[Containerd]:
    """Starts containerd with all its state under `workdir` (its socket too, unless `socket_path` says where), in a
    private mount namespace and a session of its own; when the block ends, stops it and all its process group.

    With `cri`, the CRI plugin is enabled (and must load). With a `gateway`, the daemon itself reaches registries
    through it: HTTPS_PROXY at the gateway and its CA after the system roots in SSL_CERT_FILE, in the daemon's own
    environment, as a containerd.service drop-in would set them; without one it gets no proxy at all."""
    if shutil.which("containerd") is None or shutil.which("ctr") is None:
        raise RuntimeError("containerd and ctr are not installed (Debian package containerd)")
    workdir.mkdir(parents=True, exist_ok=True)
    socket_path = socket_path or workdir / "containerd.sock"
    # The ttrpc socket's name is the longest: "<grpc address>.ttrpc".
    if len(f"{socket_path}.ttrpc") > _SOCKET_PATH_LIMIT:
        raise ValueError(f"{socket_path} is too long for a unix socket: use a shorter work directory")
    (workdir / "tmp").mkdir(exist_ok=True)
    config_path = workdir / "config.toml"
    if cri:
        for directory in ("bin", "conf"):
            (workdir / "cni" / directory).mkdir(parents=True, exist_ok=True)
    config_path.write_text(config_toml(workdir, socket_path, cri=cri))
    log_path = workdir / "containerd.log"
    # Without a gateway the daemon fetches nothing itself; without a proxy it could not even if it tried.
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["TMPDIR"] = str(workdir / "tmp")
    if gateway is not None:
        env["HTTPS_PROXY"] = gateway.proxy_url
        env["SSL_CERT_FILE"] = str(gateway.ca_bundle(workdir))
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
        if cri:
            _require_plugin(daemon, CRI_PLUGIN)
        yield daemon


def _require_plugin(daemon: Containerd, plugin: str) -> None:
    """Raises NotReady unless `ctr plugins ls` says `plugin` (type.id) loaded. containerd serves its socket only after
    every plugin has had its go, so the status is final; a plugin that failed says why in the log."""
    plugin_type, _, plugin_id = plugin.rpartition(".")
    listing = daemon.ctr("default", "plugins", "ls", timeout=30)
    # TYPE ID PLATFORMS STATUS; PLATFORMS may be empty.
    statuses = [
        fields[-1]
        for fields in (line.split() for line in listing.stdout.splitlines()[1:])
        if fields[:2] == [plugin_type, plugin_id]
    ]
    if listing.returncode != 0 or statuses != ["ok"]:
        raise NotReady(
            f"containerd's {plugin} plugin did not load ({statuses or listing.stderr}):\n{daemon.log_text()[-3000:]}"
        )


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
