"""The test gateway: the real `ocigate` command in its own process, guarded so it only ever dials loopback.

Test registries live under made-up `.test` names that only this gateway's host map knows; with name resolution off
and only 127.0.0.0/8 allowed, a name that slips through a failing test is refused instead of sent to a resolver.
"""

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .registry import free_port


@dataclass
class Gateway:
    port: int
    confdir: Path
    log_path: Path
    process: subprocess.Popen

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ca_path(self) -> Path:
        return self.confdir / "mitmproxy-ca-cert.pem"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def ca_bundle(self, directory: Path) -> Path:
        """The system roots followed by the gateway's CA, for clients that take one bundle file."""
        bundle = directory / "bundle-with-gateway-ca.pem"
        system = Path("/etc/ssl/certs/ca-certificates.crt")
        bundle.write_bytes((system.read_bytes() if system.exists() else b"") + self.ca_path.read_bytes())
        return bundle

    def cert_dir(self, directory: Path) -> Path:
        """A directory holding only the gateway's CA as *.crt (containers/image's --cert-dir)."""
        cert_dir = directory / "gateway-certs"
        cert_dir.mkdir(exist_ok=True)
        shutil.copy(self.ca_path, cert_dir / "gateway-ca.crt")
        return cert_dir


@contextmanager
def running_gateway(
    workdir: Path,
    rules: Path,
    host_map: Mapping[str, str] = {},
    options: Sequence[str] = (),
    entry_point: Sequence[str] = (sys.executable, "-m", "ocigate.cli"),
) -> Iterator[Gateway]:
    """Starts the gateway on a free loopback port and stops it afterwards. `entry_point` is how it is started: the
    `ocigate` command by default, or `mitmdump -s addons/gateway.py`, or `./run.sh`."""
    workdir.mkdir(parents=True, exist_ok=True)
    confdir = workdir / "mitmproxy-conf"
    log_path = workdir / "gateway.log"
    port = free_port()
    command = [
        *entry_point,
        "--listen-host",
        "127.0.0.1",
        "--listen-port",
        str(port),
        "--set",
        f"ocigate_rules={rules}",
        "--set",
        f"confdir={confdir}",
        "--set",
        "ocigate_dns=false",
        "--set",
        "ocigate_allow_destinations=127.0.0.0/8",
        "--set",
        "termlog_verbosity=info",
    ]
    for name, address in host_map.items():
        command += ["--set", f"ocigate_map_hosts={name}={address}"]
    for option in options:
        command += ["--set", option]
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    gateway = Gateway(port, confdir, log_path, process)
    try:
        _wait_listening(gateway)
        yield gateway
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _wait_listening(gateway: Gateway, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gateway.process.poll() is not None:
            raise RuntimeError(f"ocigate exited with {gateway.process.returncode}:\n{gateway.log_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", gateway.port), timeout=0.5):
                if gateway.ca_path.exists():
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"ocigate did not listen within {timeout} s:\n{gateway.log_text()[-3000:]}")
