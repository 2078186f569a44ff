"""podman 4.3 (rootful, vfs) run hermetically through the test gateway.

Each `Podman` is a podman installation in one directory: its configuration, storage, state, locks and blob-info
cache live there, and it reads no configuration of the machine's.

- storage.conf (CONTAINERS_STORAGE_CONF, and --root/--runroot/--storage-driver): vfs, graphroot and runroot;
- containers.conf (CONTAINERS_CONF: then no other containers.conf is read): the engine's tmp, static, volume,
  image-copy and network-config directories, file locks instead of the machine-wide /dev/shm/libpod_lock, no event
  log;
- an empty registries.conf (CONTAINERS_REGISTRIES_CONF), an accept-anything policy.json and an empty auth file
  (REGISTRY_AUTH_FILE: podman 4.3 fails without one);
- HTTPS_PROXY is the gateway and `--cert-dir` holds only the gateway's CA.

Rootful podman also uses fixed paths whatever its flags say: containers/image keeps its blob-info cache in
/var/lib/containers/cache (neither --root nor the graphroot moves it), netavark creates /run/containers/networks on
every command, and with CONTAINERS_REGISTRIES_CONF set /etc/containers/registries.conf.d is still read. The cache
matters beyond tidiness: it remembers which repositories hold which blobs, so a push would try cross-repository
mounts learnt in an earlier test. So podman runs in a private mount namespace (`unshare --mount`, private
propagation: nothing is seen outside it, and it ends with podman) in which directories of its own are bind-mounted
on /etc/containers, /var/lib/containers and /run. The runroot is given by its path inside that namespace,
/run/containers/storage (podman's own default), because podman 4.3 refuses a runroot longer than 50 characters.
"""

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .clients import client_env
from .gateway import Gateway

# The machine's directories podman would use, each replaced by one of this directory's in podman's mount namespace.
SYSTEM_CONFIG_DIR = Path("/etc/containers")
SYSTEM_STATE_DIR = Path("/var/lib/containers")
SYSTEM_RUN_DIR = Path("/run")
RUNROOT_SEEN_BY_PODMAN = SYSTEM_RUN_DIR / "containers" / "storage"


def _toml_string(value: Path | str) -> str:
    # A JSON string is a valid TOML basic string.
    return json.dumps(str(value))


@dataclass
class Podman:
    gateway: Gateway
    root: Path  # everything of this podman's lives under it

    def __post_init__(self) -> None:
        self.home = self.root / "home"
        self.etc_containers = self.root / "etc-containers"
        self.var_lib_containers = self.root / "var-lib-containers"
        self.run_dir = self.root / "run"
        self.graphroot = self.root / "storage"
        self.tmp_dir = self.root / "tmp"
        # Where each private directory is mounted for podman.
        self.private_mounts: dict[Path, Path] = {
            self.etc_containers: SYSTEM_CONFIG_DIR,
            self.var_lib_containers: SYSTEM_STATE_DIR,
            self.run_dir: SYSTEM_RUN_DIR,
        }
        for directory in (self.home, self.graphroot, self.tmp_dir, *self.private_mounts):
            directory.mkdir(parents=True, exist_ok=True)
        self.cert_dir = self.gateway.cert_dir(self.root)

        self.storage_conf = self.etc_containers / "storage.conf"
        self.storage_conf.write_text(
            "[storage]\n"
            'driver = "vfs"\n'
            f"graphroot = {_toml_string(self.graphroot)}\n"
            f"runroot = {_toml_string(RUNROOT_SEEN_BY_PODMAN)}\n"
        )
        self.containers_conf = self.etc_containers / "containers.conf"
        self.containers_conf.write_text(
            "[engine]\n"
            f"tmp_dir = {_toml_string(self.tmp_dir)}\n"
            f"static_dir = {_toml_string(self.root / 'libpod')}\n"
            f"volume_path = {_toml_string(self.root / 'volumes')}\n"
            f"image_copy_tmp_dir = {_toml_string(self.tmp_dir)}\n"
            # shm locks would be /dev/shm/libpod_lock, shared by every rootful podman on the machine.
            'lock_type = "file"\n'
            'events_logger = "none"\n'
            'cgroup_manager = "cgroupfs"\n'
            "\n[network]\n"
            f"network_config_dir = {_toml_string(self.root / 'networks')}\n"
        )
        self.registries_conf = self.etc_containers / "registries.conf"
        self.registries_conf.write_text("")
        (self.etc_containers / "policy.json").write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))

    def env(self) -> dict[str, str]:
        env = client_env(self.gateway, self.home)
        env.update(
            CONTAINERS_STORAGE_CONF=str(self.storage_conf),
            CONTAINERS_CONF=str(self.containers_conf),
            CONTAINERS_REGISTRIES_CONF=str(self.registries_conf),
            # containers/image stages blobs in TMPDIR (/var/tmp by default) on their way into storage.
            TMPDIR=str(self.tmp_dir),
        )
        return env

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Runs `podman <args>` in its private mount namespace; the caller asserts on the result."""
        # A bind mount needs its mount point. /etc/containers comes with podman and /run is always there;
        # /var/lib/containers is what any rootful podman or skopeo run creates, and stays empty here.
        SYSTEM_STATE_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
        # `sh -c SCRIPT NAME SOURCE... PODMAN_ARGS...`: the sources are $1.., the mount points fixed paths.
        # --no-mtab: util-linux would otherwise record the mounts in the machine's /run/mount/utab.
        mounts = " && ".join(
            f'mount --no-mtab --bind "${number}" {mount_point}'
            for number, mount_point in enumerate(self.private_mounts.values(), start=1)
        )
        script = f'{mounts} && shift {len(self.private_mounts)} && exec podman "$@"'
        command = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            script,
            "podman-in-private-mounts",
            *(str(source) for source in self.private_mounts),
            "--root",
            str(self.graphroot),
            "--runroot",
            str(RUNROOT_SEEN_BY_PODMAN),
            "--tmpdir",
            str(self.tmp_dir),
            "--storage-driver",
            "vfs",
            *args,
        ]
        return subprocess.run(command, env=self.env(), capture_output=True, timeout=timeout, check=False)

    def pull(self, reference: str, *flags: str) -> subprocess.CompletedProcess:
        """`podman pull` through the gateway, trusting its CA."""
        return self.run("pull", "--cert-dir", str(self.cert_dir), *flags, reference)

    def push(self, source: str, destination: str, *flags: str) -> subprocess.CompletedProcess:
        """`podman push SOURCE DESTINATION` through the gateway, trusting its CA."""
        return self.run("push", "--cert-dir", str(self.cert_dir), *flags, source, destination)

    def inspect(self, reference: str) -> dict[str, Any]:
        """`podman image inspect` of one image, parsed."""
        result = self.run("image", "inspect", reference)
        if result.returncode != 0:
            raise AssertionError(f"podman image inspect {reference} failed:\n{result.stderr.decode()}")
        [image] = json.loads(result.stdout)
        return image

    def inspect_format(self, reference: str, template: str) -> str:
        """`podman image inspect --format TEMPLATE`, stripped."""
        result = self.run("image", "inspect", "--format", template, reference)
        if result.returncode != 0:
            raise AssertionError(f"podman image inspect {reference} failed:\n{result.stderr.decode()}")
        return result.stdout.decode().strip()
