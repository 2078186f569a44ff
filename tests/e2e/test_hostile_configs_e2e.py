"""The hostile-config matrix: rules and credential files as a careless or hostile box might have them — a FIFO, a
symlink loop, broken TOML, a certificate file that is not one, options out of range — given to the real `ocigate`
command.

A rule that cannot be read stops the gateway at once, naming the file (never a hang, never a gateway that treats the
registry as unruled and contacts it directly). A credentials file that cannot be read is named in a log line and the
gateway answers on, without it and without freezing: the mirror (a registry that wants Basic credentials) refuses
the anonymous request, and the client hears an OCI error at once, each time. The run ends with one line,
`hostile configs: N configs tried, N handled`.
"""

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import tally
from tests.support.gateway import gateway_arguments, running_gateway
from tests.support.images import OCI_MANIFEST
from tests.support.registry import free_port, running_registry, write_htpasswd
from tests.support.through import get_through

UPSTREAM = "upstream.test"
HOSTILE_CONFIGS = tally.Matrix("hostile configs", "configs")
# A gateway that refuses its configuration exits at once; one that hangs on it is stopped after this.
REFUSAL_TIMEOUT = 30.0
RULE = '[host."http://mirror.test:5000"]\n  capabilities = ["pull", "resolve"]\n'


@dataclass(frozen=True)
class Config:
    """What a case does to the gateway's directory (its rules under `rules/`, its credential files beside them), the
    options it adds, and what the gateway must say: `refused` (it stops, naming `names`) or it answers, logging
    `names`."""

    arrange: Callable[[Path], None]
    names: str
    refused: bool
    options: tuple[str, ...] = ()


def rule(text: str = RULE) -> Callable[[Path], None]:
    def arrange(workdir: Path) -> None:
        (workdir / "rules" / UPSTREAM).mkdir(parents=True, exist_ok=True)
        (workdir / "rules" / UPSTREAM / "hosts.toml").write_text(text)

    return arrange


def then(*steps: Callable[[Path], None]) -> Callable[[Path], None]:
    def arrange(workdir: Path) -> None:
        for step in steps:
            step(workdir)

    return arrange


def fifo(relative: str) -> Callable[[Path], None]:
    def arrange(workdir: Path) -> None:
        path = workdir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        os.mkfifo(path)

    return arrange


def loop(relative: str) -> Callable[[Path], None]:
    def arrange(workdir: Path) -> None:
        path = workdir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(path.name)  # a link to itself

    return arrange


def directory(relative: str) -> Callable[[Path], None]:
    return lambda workdir: (workdir / relative).mkdir(parents=True, exist_ok=True)


CONFIGS = {
    "hosts.toml is a FIFO": Config(
        then(directory(f"rules/{UPSTREAM}"), fifo(f"rules/{UPSTREAM}/hosts.toml")),
        f"{UPSTREAM}/hosts.toml",
        refused=True,
    ),
    "the registry's directory is a symlink loop": Config(
        then(directory("rules"), loop(f"rules/{UPSTREAM}")), f"rules/{UPSTREAM}", refused=True
    ),
    "the _default directory is a symlink loop": Config(
        then(rule(), loop("rules/_default")), "rules/_default", refused=True
    ),
    "hosts.toml is not TOML": Config(rule('[host."http://mirror.test:5000"\n'), "hosts.toml", refused=True),
    "an unknown capability": Config(
        rule('[host."http://mirror.test:5000"]\n  capabilities = ["pul"]\n'), "pul", refused=True
    ),
    "a ca that is a FIFO": Config(
        then(rule(RULE + '  ca = "ca.pem"\n'), fifo(f"rules/{UPSTREAM}/ca.pem")), "ca.pem", refused=True
    ),
    "a ca that does not exist": Config(rule(RULE + '  ca = "nowhere.pem"\n'), "nowhere.pem", refused=True),
    "a ca that is not a certificate": Config(
        then(rule(RULE + '  ca = "junk.pem"\n'), lambda w: (w / "rules" / UPSTREAM / "junk.pem").write_text("junk")),
        "junk.pem",
        refused=True,
    ),
    "a server with a port out of range": Config(
        rule('server = "https://upstream.test:99999"\n' + RULE), "hosts.toml: server: not a valid URL", refused=True
    ),
    "a read timeout of 0": Config(rule(), "ocigate_read_timeout", refused=True, options=("ocigate_read_timeout=0",)),
    "an unknown credential source": Config(
        rule(), "ocigate_credential_sources", refused=True, options=("ocigate_credential_sources=keychain",)
    ),
    "a host map entry without an address": Config(
        rule(), "ocigate_map_hosts", refused=True, options=("ocigate_map_hosts=nothing",)
    ),
    "ocigate's credentials file is a FIFO": Config(
        then(rule(), fifo("ocigate-credentials.json")), "ocigate-credentials.json", refused=False
    ),
    "docker's config.json is a FIFO": Config(
        then(rule(), fifo("docker-config/config.json")), "config.json", refused=False
    ),
    "containers' auth.json is a directory": Config(
        then(rule(), directory("containers-auth.json")), "containers-auth.json", refused=False
    ),
    "ocigate's credentials file is a symlink loop": Config(
        then(rule(), loop("ocigate-credentials.json")), "ocigate-credentials.json", refused=False
    ),
}


@pytest.fixture(scope="module")
def mirror(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    workdir = tmp_path_factory.mktemp("configs-registry")
    htpasswd = write_htpasswd(workdir / "htpasswd", {"alice": "a-password-no-file-gave"})
    with running_registry(workdir / "registry", htpasswd=htpasswd) as registry:
        yield f"127.0.0.1:{registry.port}"


def refused(workdir: Path, options: tuple[str, ...], host_map: dict[str, str]) -> tuple[bool, str]:
    """Runs the ocigate command on the case's configuration: whether it stopped by itself, and what it printed."""
    command = [
        sys.executable,
        "-m",
        "ocigate.cli",
        "--listen-host",
        "127.0.0.1",
        "--listen-port",
        str(free_port()),
        "--set",
        f"confdir={workdir / 'mitmproxy-conf'}",
        *gateway_arguments(workdir, workdir / "rules", host_map, options),
    ]
    environment = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    try:
        result = subprocess.run(command, capture_output=True, timeout=REFUSAL_TIMEOUT, env=environment)
    except subprocess.TimeoutExpired as e:
        return (
            False,
            f"still running after {REFUSAL_TIMEOUT} s: {(e.stdout or b'')[-500:]!r} {(e.stderr or b'')[-500:]!r}",
        )
    output = (result.stdout + result.stderr).decode(errors="replace")
    return result.returncode != 0, output


@pytest.mark.parametrize("case", list(CONFIGS))
def test_a_hostile_config_is_refused_naming_it_or_served_around_without_a_freeze(
    mirror: str, tmp_path: Path, case: str
) -> None:
    config = CONFIGS[case]
    workdir = tmp_path / "gateway"
    workdir.mkdir()
    config.arrange(workdir)
    host_map = {"mirror.test:5000": mirror}
    if config.refused:
        stopped, output = refused(workdir, config.options, host_map)
        handled = stopped and config.names in output
        detail = output[-2000:]
    else:
        with running_gateway(workdir, workdir / "rules", host_map, config.options) as gateway:
            fetched = get_through(gateway, UPSTREAM, "/v2/team/app/manifests/v1", [("Accept", OCI_MANIFEST)])
            again = get_through(gateway, UPSTREAM, "/v2/team/app/manifests/v1", [("Accept", OCI_MANIFEST)])
            log = gateway.log_text()
        answered = all(f.status == 401 and b'"UNAUTHORIZED"' in f.body for f in (fetched, again))
        handled = answered and config.names in log
        detail = f"answered: {answered}\n{log[-2000:]}"
    tally.record(HOSTILE_CONFIGS, handled=handled)
    assert handled, detail
