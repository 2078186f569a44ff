"""A gateway started as deploy/ starts it answers its health endpoint: the `ocigate` command with the arguments of the
Kubernetes Deployment and of the systemd unit (their paths moved to a temp dir, their ports to free ones on
loopback), probed where the Deployment's probes and the Containerfile's HEALTHCHECK probe it."""

import http.client
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from tests.support.gateway import gateway_arguments, running_mitmproxy
from tests.support.registry import free_port, write_htpasswd
from tests.test_deploy import (
    exec_start,
    gateway_container,
    healthcheck_command,
    one,
    port_of,
    settings_of,
    unit_defaults,
)

ENTRY_POINT = (sys.executable, "-m", "ocigate.cli")


def probe(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


# What the test gateway sets itself (tests.support.gateway: its own rules, confdir and credentials file, in the temp
# dir), which mitmproxy refuses to be given twice.
GIVEN = frozenset({"confdir", "ocigate_rules", "ocigate_credentials"})


def moved(arguments: Sequence[str], places: Mapping[str, str]) -> list[str]:
    """`arguments` without the listen flags (the test picks the proxy's port) and the options in GIVEN, each of
    `places` replaced."""
    out: list[str] = []
    words = iter(arguments)
    for word in words:
        if word in ("--listen-host", "--listen-port", "--rules"):
            next(words)
            continue
        if word == "--set":
            setting = next(words)
            if setting.partition("=")[0] not in GIVEN:
                out += [word, setting]
            continue
        out.append(word)
    return [_replaced(word, places) for word in out]


def _replaced(word: str, places: Mapping[str, str]) -> str:
    for old, new in places.items():
        word = word.replace(old, new)
    return word


def write_config_map_rules(directory: Path) -> Path:
    config_map = one("ConfigMap")
    (volume,) = [v for v in one("Deployment")["spec"]["template"]["spec"]["volumes"] if "configMap" in v]
    for item in volume["configMap"]["items"]:
        (directory / item["path"]).parent.mkdir(parents=True)
        (directory / item["path"]).write_text(config_map["data"][item["key"]])
    return directory


def test_the_kubernetes_deployments_gateway_answers_its_probes_and_the_containers_healthcheck(tmp_path: Path) -> None:
    container = gateway_container()
    settings = settings_of(container["args"])
    workdir, metrics_port = tmp_path / "gateway", free_port()
    rules = write_config_map_rules(tmp_path / "rules")
    (tmp_path / "pull-secrets").mkdir()
    places = {
        settings["ocigate_kubernetes_secrets"]: str(tmp_path / "pull-secrets"),
        settings["ocigate_metrics"]: f"127.0.0.1:{metrics_port}",
    }
    arguments = [*gateway_arguments(workdir, rules), *moved(container["args"], places)]
    with running_mitmproxy(workdir, ENTRY_POINT, arguments, name="ocigate", log_name="gateway.log") as gateway:
        for probe_name in ("readinessProbe", "livenessProbe"):
            path = container[probe_name]["httpGet"]["path"]
            status, text = probe(metrics_port, path)
            assert status == 200, (probe_name, text, gateway.log_text()[-2000:])
        # The image's HEALTHCHECK, run as the container runs it (python is the gateway's own here).
        command = [sys.executable if word == "python" else word for word in healthcheck_command()]
        metrics_in_image = port_of(settings["ocigate_metrics"])
        command = [word.replace(f":{metrics_in_image}/", f":{metrics_port}/") for word in command]
        checked = subprocess.run(command, capture_output=True, text=True, timeout=30)
        assert checked.returncode == 0, checked.stderr
        log = gateway.log_text()
    assert "Traceback" not in log
    # Once the gateway is gone, the HEALTHCHECK fails.
    assert subprocess.run(command, capture_output=True, timeout=30).returncode != 0


def test_the_systemd_units_gateway_starts_with_its_settings_and_answers_its_probes(tmp_path: Path) -> None:
    defaults = unit_defaults()
    workdir, metrics_port = tmp_path / "gateway", free_port()
    rules = write_config_map_rules(tmp_path / "rules")
    htpasswd = write_htpasswd(tmp_path / "htpasswd", {"puller": "a-proxy-password-of-the-deploy-test"})
    variables = defaults | {
        "OCIGATE_PROXYAUTH": f"@{htpasswd}",
        "OCIGATE_METRICS": f"127.0.0.1:{metrics_port}",
    }
    command = exec_start(variables)
    arguments = [*gateway_arguments(workdir, rules), *moved(command[1:], {})]
    with running_mitmproxy(workdir, ENTRY_POINT, arguments, name="ocigate", log_name="gateway.log") as gateway:
        assert probe(metrics_port, "/readyz") == (200, "ready\n"), gateway.log_text()[-2000:]
        assert probe(metrics_port, "/healthz") == (200, "alive\n")
        # proxyauth is in force: a client without the proxy password is refused.
        proxy = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
        try:
            proxy.request("GET", "http://upstream.test/v2/")
            refused = proxy.getresponse().status
        finally:
            proxy.close()
    assert refused == 407
