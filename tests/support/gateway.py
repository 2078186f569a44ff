"""The test gateway: the real `ocigate` command in its own process, guarded so it only ever dials loopback.

Test registries live under made-up `.test` names that only this gateway's host map knows; with name resolution off
and only 127.0.0.0/8 allowed, a name that slips through a failing test is refused instead of sent to a resolver.
"""

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .processes import running, wait_until
from .registry import free_port

_START_TIMEOUT = 30.0
_STOP_TIMEOUT = 10.0

# The gateway as mitmproxy loads it as a script (`entry_point` of running_gateway), where a script's hooks run.
MITMDUMP_SCRIPT = (
    str(Path(sys.executable).parent / "mitmdump"),
    "-s",
    str(Path(__file__).resolve().parents[2] / "addons" / "gateway.py"),
)


@dataclass
class Gateway:
    """A mitmproxy process on loopback: the gateway, or (in bench/) a plain mitmdump."""

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
        cert_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.ca_path, cert_dir / "gateway-ca.crt")
        return cert_dir


@contextmanager
def running_gateway(
    workdir: Path,
    rules: Path,
    host_map: Mapping[str, str] = {},
    options: Sequence[str] = (),
    entry_point: Sequence[str] = (sys.executable, "-m", "ocigate.cli"),
    env: Mapping[str, str] = {},
    workers: int = 1,
) -> Iterator[Gateway]:
    """Starts the gateway on a free loopback port and stops it afterwards. `entry_point` is how it is started: the
    `ocigate` command by default, or `mitmdump -s addons/gateway.py`, or `./run.sh`. Its credential files are in
    `workdir` (none exist until a test writes them), never the machine's own. `env` is added to its environment.
    With `workers` above 1 it is `ocigate --workers N` (its process is the workers' parent), yielded once the first
    worker listens: `wait_for_workers` waits for all of them."""
    arguments = [
        *(["--workers", str(workers)] if workers > 1 else []),
        *gateway_arguments(workdir, rules, host_map, options),
    ]
    with running_mitmproxy(workdir, entry_point, arguments, name="ocigate", log_name="gateway.log", env=env) as gateway:
        yield gateway


def gateway_arguments(
    workdir: Path, rules: Path, host_map: Mapping[str, str] = {}, options: Sequence[str] = ()
) -> list[str]:
    """The gateway's options as the tests start it: guarded to dial loopback only, credentials from `workdir` only."""
    arguments = [
        "--set",
        f"ocigate_credentials={workdir / 'ocigate-credentials.json'}",
        "--set",
        f"ocigate_docker_config={workdir / 'docker-config'}",
        "--set",
        f"ocigate_containers_auth={workdir / 'containers-auth.json'}",
        "--set",
        f"ocigate_rules={rules}",
        "--set",
        "ocigate_dns=false",
        "--set",
        "ocigate_allow_destinations=127.0.0.0/8",
        "--set",
        "termlog_verbosity=info",
    ]
    for name, address in host_map.items():
        arguments += ["--set", f"ocigate_map_hosts={name}={address}"]
    for option in options:
        arguments += ["--set", option]
    return arguments


@contextmanager
def running_mitmproxy(
    workdir: Path,
    entry_point: Sequence[str],
    arguments: Sequence[str],
    *,
    name: str,
    log_name: str,
    env: Mapping[str, str] = {},
) -> Iterator[Gateway]:
    """Starts `entry_point` (mitmproxy's mitmdump, or something that runs it, such as `ocigate`) listening on a free
    loopback port with its confdir (and CA) in `workdir`, followed by `arguments`; waits until it listens and has
    written its CA, and stops it when the block ends, whatever happened in it. Its output goes to `workdir/log_name`;
    `name` is what an error calls it."""
    workdir.mkdir(parents=True, exist_ok=True)
    confdir = workdir / "mitmproxy-conf"
    log_path = workdir / log_name
    port = free_port()
    command = [
        *entry_point,
        "--listen-host",
        "127.0.0.1",
        "--listen-port",
        str(port),
        "--set",
        f"confdir={confdir}",
        *arguments,
    ]
    environment = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")} | dict(env)
    with running(command, log_path, env=environment, stop_timeout=_STOP_TIMEOUT) as process:
        proxy = Gateway(port, confdir, log_path, process)
        wait_until(
            lambda: _listening(proxy),
            _START_TIMEOUT,
            lambda why: f"{name} did not listen on {proxy.proxy_url}: {why}:\n{proxy.log_text()[-3000:]}",
            process=process,
            interval=0.1,
        )
        yield proxy


def wait_for_workers(gateway: Gateway, count: int, restarted: Collection[int] = ()) -> None:
    """Waits until each of the `count` workers of `ocigate --workers` has said that it listens, and those
    `restarted` (started again once) have said it again."""

    def listening() -> bool:
        log = gateway.log_text()
        # The parent's line, not only the workers' own: a worker's "listening" is logged a moment before it tells
        # the parent, and one killed between the two ends the gateway as a worker that could not start.
        told = f"ocigate: all {count} workers listen" in log
        return told and all(_listened(log, index) >= (2 if index in restarted else 1) for index in range(count))

    wait_until(
        listening,
        _START_TIMEOUT,
        lambda why: f"the workers did not all listen: {why}:\n{gateway.log_text()[-3000:]}",
        process=gateway.process,
        interval=0.1,
    )


def _listened(log: str, index: int) -> int:
    return sum(1 for line in log.splitlines() if line.startswith(f"[w{index}] ") and "proxy listening at" in line)


def _listening(proxy: Gateway) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=0.5):
            return proxy.ca_path.exists()
    except OSError:
        return False
