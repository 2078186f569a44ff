"""A private dockerd (Debian's docker.io 20.10) for end-to-end tests, behind the test gateway, and its CLI.

Facts about dockerd 20.10 this module relies on:

- The daemon pulls and pushes; the CLI only asks it to. So HTTPS_PROXY and the trust in the gateway's CA belong in
  the daemon's environment and configuration at start; the CLI gets neither, which proves it.
- The daemon trusts a registry's CA from `/etc/docker/certs.d/<registry>/*.crt` (added to the system roots), and
  writes `/etc/docker/key.json` and `/run/docker/plugins` whatever its flags say. It runs in a private mount namespace
  where a temp directory is bind-mounted on /etc/docker and a tmpfs covers /run, so neither the machine's
  configuration leaks in nor anything leaks out; everything else is under flags pointing into the work directory.
- With `--bridge=none --iptables=false --ip6tables=false` it needs no network but loopback, and with the vfs storage
  driver no kernel overlay support. Images live in dockerd's own store, but dockerd will not start without a
  containerd, so it gets a private one (tests/support/containerd.py's, in its own mount namespace too).
- dockerd keeps every manifest it fetched in that containerd's content store (namespace `moby`) and reads a manifest
  it is asked for by digest from there instead of the registry. Removing the image only drops the lease; the
  content stays until containerd's garbage collector gets to it, so `Dockerd.remove_all_images` deletes it too.
- A failed layer download or upload is tried 5 times, pausing 5, 10, 15 and 20 s: 50 s before a failure shows.
  Downloads get one attempt (`--max-download-attempts 1`: local registries need no second); 20.10 has no such
  flag for uploads, so `Dockerd.push_once` stops the push at the daemon's first "Upload failed, retrying".
- A pull with `--platform` from an index records `<repo>@<index digest>` on the image it pulled, but only if that
  digest names no other image yet: pulling a second platform leaves the first one's record (and logs
  "Image ID for digest ... changed ..., cannot update").
- Only the Debian CLI (`/usr/bin/docker`, API 1.41) is used: a newer CLI negotiates down, but need not.
"""

import json
import os
import re
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .containerd import Containerd, running_containerd
from .gateway import Gateway
from .processes import running, stop, wait_until

DOCKER_CLI = Path("/usr/bin/docker")  # docker.io's own, the same version as the daemon
DOCKERD = Path("/usr/sbin/dockerd")
_START_TIMEOUT = 30.0
_STOP_TIMEOUT = 15.0
# The containerd namespace dockerd keeps its content in.
_MOBY = "moby"

# Run by `unshare --mount`: the mounts only this process tree sees, then the daemon in place of the shell (so the
# PID Popen knows is the daemon's). $1 is the directory that stands in for /etc/docker; the rest is the command.
_PRIVATE_MOUNTS_THEN_EXEC = (
    'etc_docker=$1; shift; mount --bind "$etc_docker" /etc/docker'
    ' && mount -t tmpfs -o mode=0755 tmpfs /run && exec "$@"'
)


# dockerd's log line for a failed layer upload it is about to retry.
_UPLOAD_RETRY = re.compile(r'Upload failed, retrying: [^"\n]*')


@dataclass(frozen=True)
class PushAttempt:
    returncode: int | None  # None: stopped at the first failed upload
    stdout: str
    stderr: str
    first_failure: str | None  # dockerd's log line for it

    @property
    def succeeded(self) -> bool:
        return self.returncode == 0


@dataclass
class Dockerd:
    workdir: Path
    socket_path: Path
    etc_docker: Path
    log_path: Path
    containerd: Containerd

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def docker(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Runs the CLI against this daemon, with no proxy and no CA of its own; the caller asserts on the result."""
        return subprocess.run(
            self._cli(*args), env=self._cli_env(), capture_output=True, text=True, timeout=timeout, check=False
        )

    def push_once(self, reference: str, output_dir: Path, timeout: float = 120) -> PushAttempt:
        """`docker push`, given up at the daemon's first failed upload.

        dockerd 20.10 retries a failed layer upload 4 more times, pausing 5, 10, 15 and 20 s, and has no setting for
        it (it has --max-download-attempts only): a push that cannot arrive would take 50 s to say so. Its log says
        "Upload failed, retrying: <why>" at the first failure; then the CLI is stopped, which cancels the push."""
        output_dir.mkdir(parents=True, exist_ok=True)
        stdout_path, stderr_path = output_dir / "push.stdout", output_dir / "push.stderr"
        log_offset = len(self.log_text())
        first_failure = None
        with stdout_path.open("w") as stdout, stderr_path.open("w") as stderr:
            process = subprocess.Popen(
                self._cli("push", reference), env=self._cli_env(), stdout=stdout, stderr=stderr, text=True
            )
        try:
            deadline = time.monotonic() + timeout
            while process.poll() is None:
                found = _UPLOAD_RETRY.search(self.log_text()[log_offset:])
                if found:
                    first_failure = found.group(0)
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(f"docker push {reference} did not end within {timeout} s")
                time.sleep(0.1)
        finally:
            stop(process, _STOP_TIMEOUT)
        return PushAttempt(
            returncode=None if first_failure else process.returncode,
            stdout=stdout_path.read_text(errors="replace"),
            stderr=stderr_path.read_text(errors="replace"),
            first_failure=first_failure,
        )

    def _cli(self, *args: str) -> list[str]:
        return [str(DOCKER_CLI), "--host", f"unix://{self.socket_path}", *args]

    def _cli_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy") and not k.startswith("DOCKER_")}
        cli_home = self.workdir / "cli-home"
        env.update(HOME=str(cli_home), DOCKER_CONFIG=str(cli_home / ".docker"))
        return env

    def inspect_image(self, reference: str) -> dict[str, Any] | None:
        """`docker image inspect` of one image, or None when the daemon has no such image."""
        result = self.docker("image", "inspect", reference)
        if result.returncode != 0:
            if "No such image" in result.stderr:
                return None
            raise AssertionError(f"docker image inspect {reference} failed:\n{result.stderr}")
        (image,) = json.loads(result.stdout)
        return image

    def remove_all_images(self) -> None:
        """Every image and every name for it, so that the next pull has to fetch everything it ends up with."""
        listed = self.docker("image", "ls", "--all", "--quiet", "--no-trunc")
        if listed.returncode != 0:
            raise AssertionError(f"docker image ls failed:\n{listed.stderr}")
        image_ids = sorted(set(listed.stdout.split()))
        if image_ids:
            removed = self.docker("image", "rm", "--force", *image_ids)
            if removed.returncode != 0:
                raise AssertionError(f"docker image rm failed:\n{removed.stderr}")
        cached = self.containerd.ctr(_MOBY, "content", "ls", "--quiet")
        if cached.returncode != 0:
            raise AssertionError(f"ctr content ls in dockerd's containerd failed:\n{cached.stderr}")
        if digests := cached.stdout.split():
            deleted = self.containerd.ctr(_MOBY, "content", "rm", *digests)
            if deleted.returncode != 0:
                raise AssertionError(f"ctr content rm in dockerd's containerd failed:\n{deleted.stderr}")


@contextmanager
def running_dockerd(workdir: Path, gateway: Gateway, registries: Sequence[str]) -> Iterator[Dockerd]:
    """Starts a private containerd and a dockerd that reaches registries through `gateway` and trusts its CA for
    `registries`; both are stopped by PID when the block ends, whatever happened in it."""
    for binary in (DOCKER_CLI, DOCKERD):
        if not binary.exists():
            raise RuntimeError(f"{binary} is missing (Debian package docker.io)")
    if not Path("/etc/docker").is_dir():
        # The bind mount needs a mount point, and the tests must not create one in the real /etc.
        raise RuntimeError("/etc/docker does not exist (Debian package docker.io ships it)")
    workdir.mkdir(parents=True, exist_ok=True)
    socket_path = workdir / "docker.sock"
    # A short name: the containerd socket's is the longest of the daemons' unix socket paths (running_containerd
    # checks it).
    containerd_socket = workdir / "containerd" / "c.sock"
    etc_docker = workdir / "etc-docker"
    with running_containerd(workdir / "containerd", containerd_socket, stop_timeout=_STOP_TIMEOUT) as containerd:
        daemon = Dockerd(workdir, socket_path, etc_docker, workdir / "dockerd.log", containerd)
        etc_docker.mkdir(exist_ok=True)
        for registry in registries:
            trust_gateway(daemon, gateway, registry)
        # An empty configuration file of its own, so that nothing is read from a default location.
        (etc_docker / "daemon.json").write_text("{}\n")
        command = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            _PRIVATE_MOUNTS_THEN_EXEC,
            "sh",
            str(etc_docker),
            str(DOCKERD),
            "--host",
            f"unix://{socket_path}",
            "--containerd",
            str(containerd_socket),
            "--data-root",
            str(workdir / "data"),
            "--exec-root",
            str(workdir / "exec"),
            "--pidfile",
            str(workdir / "dockerd.pid"),
            "--config-file",
            str(etc_docker / "daemon.json"),
            "--storage-driver",
            "vfs",
            "--bridge",
            "none",
            "--iptables=false",
            "--ip6tables=false",
            "--max-download-attempts",
            "1",
        ]
        env = _environment_without_proxies_or_bundles()
        # The one proxy setting the daemon needs. Loopback registries (the push control) are never proxied by Go.
        env["HTTPS_PROXY"] = gateway.proxy_url
        with running(command, daemon.log_path, env=env, stop_timeout=_STOP_TIMEOUT, group=True) as process:
            wait_until(
                lambda: _answers_ping(socket_path),
                _START_TIMEOUT,
                lambda why: f"dockerd did not answer on {socket_path}: {why}:\n{daemon.log_text()[-3000:]}",
                process=process,
            )
            yield daemon


def trust_gateway(daemon: Dockerd, gateway: Gateway, registry: str) -> None:
    """The gateway's CA as the CA of `registry` in the daemon's private /etc/docker."""
    cert_dir = daemon.etc_docker / "certs.d" / registry
    cert_dir.mkdir(parents=True, exist_ok=True)
    (cert_dir / "ca.crt").write_bytes(gateway.ca_path.read_bytes())


def _environment_without_proxies_or_bundles() -> dict[str, str]:
    """The environment without the proxy and CA bundle variables this machine exports (the daemon must trust the
    gateway through certs.d only) and without anything that points docker at another daemon or configuration."""
    dropped = {"SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"}
    return {
        k: v
        for k, v in os.environ.items()
        if not k.lower().endswith("_proxy") and k not in dropped and not k.startswith("DOCKER_")
    }


def _answers_ping(socket_path: Path) -> bool:
    """dockerd's API answers `GET /_ping` with 200 once the daemon has finished starting."""
    if not socket_path.exists():
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(2)
            probe.connect(str(socket_path))
            probe.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            status_line = probe.recv(64)
    except OSError:
        return False
    return status_line.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200"))
