"""deploy/: every file parses, says what docs/deploy.md promises, and names only ports, paths and options the code
has, so that the files cannot drift from it. (tests/e2e/test_deploy_e2e.py starts a gateway the way they do.)"""

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from mitmproxy.options import Options
from mitmproxy.tools.dump import DumpMaster

from ocigate.addon import make_addons
from ocigate.credentials import KubernetesSecrets
from ocigate.hoststoml import HOSTS_FILE, load_rules
from ocigate.probes import LIVENESS_PATH, LIVENESS_TIMEOUT, READINESS_PATH

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
SYSTEMD = DEPLOY / "systemd"
UNIT = SYSTEMD / "ocigate.service"
ENV_FILE = SYSTEMD / "ocigate.env"
SYSUSERS = SYSTEMD / "ocigate.sysusers"
BOX_DROP_INS = {
    "docker": SYSTEMD / "docker.service.d/http-proxy.conf",
    "containerd": SYSTEMD / "containerd.service.d/http-proxy.conf",
}
NODE_DROP_IN = DEPLOY / "kubernetes/node/containerd.service.d/http-proxy.conf"
MANIFESTS = DEPLOY / "kubernetes/ocigate.yaml"
CONTAINERFILE = DEPLOY / "Containerfile"
CHECKED = {UNIT, ENV_FILE, SYSUSERS, *BOX_DROP_INS.values(), NODE_DROP_IN, MANIFESTS, CONTAINERFILE}

Unit = dict[str, list[tuple[str, str]]]


def test_every_file_in_deploy_is_checked_here() -> None:
    assert {p for p in DEPLOY.rglob("*") if p.is_file()} == CHECKED


# --- reading the files -------------------------------------------------------------------------------------------


def unit_file(path: Path) -> Unit:
    """A systemd unit or drop-in: each section's settings in order (a key may repeat), continued lines joined."""
    sections: Unit = {}
    current: list[tuple[str, str]] | None = None
    logical = re.sub(r"\\\n", " ", path.read_text())
    for number, raw in enumerate(logical.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
        else:
            key, equals, value = line.partition("=")
            assert equals and current is not None, f"{path}:{number}: not a setting: {raw!r}"
            current.append((key.strip(), value.strip()))
    return sections


def values(unit: Unit, section: str, key: str) -> list[str]:
    return [value for k, value in unit.get(section, []) if k == key]


def value(unit: Unit, section: str, key: str) -> str:
    (found,) = values(unit, section, key)
    return found


def environment(unit: Unit) -> dict[str, str]:
    """Its Environment= settings, as systemd reads them (one NAME=VALUE each, here never quoted)."""
    return dict(setting.partition("=")[::2] for setting in values(unit, "Service", "Environment"))


def env_file(path: Path) -> dict[str, str]:
    pairs = [line.partition("=") for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return {name: found for name, _, found in pairs}


def unit_defaults() -> dict[str, str]:
    return environment(unit_file(UNIT))


def exec_start(variables: dict[str, str]) -> list[str]:
    """The unit's ExecStart as systemd runs it with `variables`: ${VAR} one word, $VAR split at whitespace."""
    words: list[str] = []
    for word in value(unit_file(UNIT), "Service", "ExecStart").split():
        if re.fullmatch(r"\$\w+", word):
            words += variables[word[1:]].split()
        else:
            words.append(re.sub(r"\$\{(\w+)\}", lambda m: variables[m.group(1)], word))
    return words


def manifests() -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all(MANIFESTS.read_text()) if document]


def one(kind: str) -> dict[str, Any]:
    (found,) = [m for m in manifests() if m["kind"] == kind]
    return found


def gateway_container() -> dict[str, Any]:
    (container,) = one("Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def settings_of(arguments: list[str]) -> dict[str, str]:
    """The options an ocigate command line sets: --set NAME=VALUE, and its own --rules and mitmdump's listen flags."""
    flags = {"--rules": "ocigate_rules", "--listen-host": "listen_host", "--listen-port": "listen_port"}
    found: dict[str, str] = {}
    words = iter(arguments)
    for word in words:
        if word == "--set":
            name, _, setting = next(words).partition("=")
            found[name] = setting
        elif word in flags:
            found[flags[word]] = next(words)
    return found


def container_file() -> list[tuple[str, str]]:
    """The Containerfile's instructions, continued lines joined: (INSTRUCTION, arguments)."""
    logical = re.sub(r"\\\n", " ", CONTAINERFILE.read_text())
    lines = [line.strip() for line in logical.splitlines()]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines if line and line[0] != "#"]


def instruction(name: str) -> list[str]:
    return [arguments for found, arguments in container_file() if found == name]


def exec_form(arguments: str) -> list[str]:
    """A JSON-array instruction's words."""
    return yaml.safe_load(arguments)  # JSON is YAML


def container_cmd() -> list[str]:
    (cmd,) = instruction("CMD")
    return exec_form(cmd)


def healthcheck_command() -> list[str]:
    """The HEALTHCHECK's command: what follows its options and CMD."""
    (check,) = instruction("HEALTHCHECK")
    return exec_form(check.partition(" CMD ")[2])


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


# --- the options the files set exist, and agree with each other --------------------------------------------------


async def option_names() -> set[str]:
    """Every option the ocigate command knows: mitmdump's (its addons') and ocigate's (on an event loop, which
    mitmproxy's master needs)."""
    master = DumpMaster(Options(), with_termlog=False, with_dumper=False)
    master.addons.add(*make_addons())
    return set(master.options.keys())


def deployed_settings() -> Iterator[tuple[str, dict[str, str]]]:
    defaults = unit_defaults()
    yield str(UNIT), settings_of(exec_start(defaults | {"OCIGATE_EXTRA_ARGS": ""}))
    yield str(ENV_FILE), settings_of(exec_start(defaults | env_file(ENV_FILE)))
    yield str(MANIFESTS), settings_of(gateway_container()["args"])
    yield str(CONTAINERFILE), settings_of(container_cmd())


async def test_every_option_the_files_set_or_name_exists() -> None:
    known = await option_names()
    for where, settings in deployed_settings():
        assert set(settings) - known == set(), where
    for path in CHECKED:
        named = set(re.findall(r"\bocigate_[a-z_]+", path.read_text()))
        assert named - known == set(), path


def test_the_unit_and_its_environment_file_name_the_same_settings_with_the_same_defaults() -> None:
    defaults, documented = unit_defaults(), env_file(ENV_FILE)
    assert documented.keys() == defaults.keys()
    # Every setting is used, and nothing is used that has no default.
    used = set(re.findall(r"\$\{?(\w+)", value(unit_file(UNIT), "Service", "ExecStart")))
    assert used == defaults.keys()
    differing = {k for k in defaults if defaults[k] != documented[k]}
    # The environment file's example of where the gateway may connect is the one setting it fills in.
    assert differing == {"OCIGATE_DESTINATIONS"}
    assert settings_of(documented["OCIGATE_DESTINATIONS"].split()).keys() == {"ocigate_allow_destinations"}


def test_the_unit_runs_the_installed_command_hardened_as_a_user_of_its_own() -> None:
    unit = unit_file(UNIT)
    command = exec_start(unit_defaults())
    assert Path(command[0]).name == "ocigate"
    settings = settings_of(command)
    assert settings["ocigate_rules"] == "/etc/ocigate/certs.d"
    assert command[command.index("--workers") + 1] == "1"  # one process unless the environment file says more
    assert settings["proxyauth"].startswith("@")  # an htpasswd file: the box is not open to anyone by default
    assert settings["ocigate_credentials"].startswith(settings["confdir"])  # in the state directory
    assert settings["confdir"] == "/var/lib/" + value(unit, "Service", "StateDirectory")
    user = value(unit, "Service", "User")
    assert user not in ("root", "0") and f"u {user} " in SYSUSERS.read_text()
    for setting, expected in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("CapabilityBoundingSet", ""),
        ("EnvironmentFile", "-/etc/ocigate/ocigate.env"),
        # The parent of `ocigate --workers N` is sent SIGTERM alone and passes it on; SIGKILL after the timeout is
        # for every process left.
        ("KillMode", "mixed"),
    ]:
        assert value(unit, "Service", setting) == expected, setting
    assert value(unit, "Install", "WantedBy") == "multi-user.target"
    # A stop may drain (ocigate_drain) before it stops: systemd's kill comes only after the drain.
    timeout = re.fullmatch(r"(\d+)s", value(unit, "Service", "TimeoutStopSec"))
    assert timeout, value(unit, "Service", "TimeoutStopSec")
    for where, variables in [("unit", unit_defaults()), ("env file", unit_defaults() | env_file(ENV_FILE))]:
        assert int(settings_of(exec_start(variables))["ocigate_drain"]) < int(timeout.group(1)), where
    # The metrics with the probes stay on this machine unless the file says otherwise.
    assert settings["ocigate_metrics"].startswith("127.0.0.1:")


@pytest.mark.parametrize("path", [*BOX_DROP_INS.values(), NODE_DROP_IN], ids=lambda p: str(p.relative_to(DEPLOY)))
def test_a_clients_drop_in_points_it_at_the_gateway(path: Path) -> None:
    unit = unit_file(path)
    assert unit.keys() == {"Service"}
    env = environment(unit)
    assert env.keys() == {"HTTPS_PROXY", "NO_PROXY"}
    assert {"localhost", "127.0.0.0/8"} <= set(env["NO_PROXY"].split(","))
    if path == NODE_DROP_IN:
        service = one("Service")["spec"]
        (port,) = service["ports"]
        assert env["HTTPS_PROXY"] == f"http://{service['clusterIP']}:{port['port']}"
        # A node pulls the gateway's own image before the gateway runs.
        registry = gateway_container()["image"].partition("/")[0]
        assert registry in env["NO_PROXY"].split(",")
    else:
        assert port_of(env["HTTPS_PROXY"]) == int(unit_defaults()["OCIGATE_LISTEN_PORT"])


SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="no systemd-analyze on this machine (Debian package systemd)")
def test_systemd_analyze_verifies_the_units(tmp_path: Path) -> None:
    """systemd-analyze verify needs no running systemd. It checks that ExecStart's program exists, which this machine
    need not have installed at /opt/ocigate: the copy it reads runs one that exists instead, all else unchanged."""
    assert SYSTEMD_ANALYZE is not None
    units = tmp_path / "units"
    units.mkdir()
    program = exec_start(unit_defaults())[0]
    (units / UNIT.name).write_text(UNIT.read_text().replace(program, shutil.which("true") or "/bin/true"))
    names = [UNIT.name]
    for service, drop_in in BOX_DROP_INS.items():
        # A stand-in for the daemon's own unit, so that the drop-in is read as systemd reads it.
        (units / f"{service}.service").write_text(f"[Service]\nExecStart={shutil.which('true') or '/bin/true'}\n")
        (units / f"{service}.service.d").mkdir()
        shutil.copy(drop_in, units / f"{service}.service.d" / drop_in.name)
        names.append(f"{service}.service")
    node = tmp_path / "node"
    (node / "containerd.service.d").mkdir(parents=True)
    shutil.copy(units / "containerd.service", node)
    shutil.copy(NODE_DROP_IN, node / "containerd.service.d")
    for directory, verified in [(units, names), (node, ["containerd.service"])]:
        env = os.environ | {"SYSTEMD_UNIT_PATH": f"{directory}:", "SYSTEMD_LOG_COLOR": "0"}
        result = subprocess.run(
            [SYSTEMD_ANALYZE, "verify", "--man=no", *(str(directory / n) for n in verified)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        # Unknown keys and bad values are only warnings: any output is a finding.
        assert (result.returncode, result.stdout + result.stderr) == (0, ""), directory


# --- the container build file ------------------------------------------------------------------------------------


def test_the_containerfile_builds_from_a_pinned_base_and_runs_as_a_user_with_a_healthcheck() -> None:
    (base,) = instruction("FROM")
    image, _, digest = base.partition("@")
    tag = image.rpartition("/")[2].partition(":")[2]
    assert digest.startswith("sha256:") or (re.match(r"\d+\.\d+", tag) and "slim" in tag), base
    (user,) = instruction("USER")
    uid = user.partition(":")[0]
    assert uid.isdigit() and int(uid) != 0  # numeric, so runAsNonRoot can check it
    assert exec_form(instruction("ENTRYPOINT")[0]) == ["ocigate"]
    settings = settings_of(container_cmd())
    exposed = {int(port) for arguments in instruction("EXPOSE") for port in arguments.split()}
    assert exposed == {int(settings["listen_port"]), port_of(settings["ocigate_metrics"])}
    command = " ".join(healthcheck_command())
    assert f"127.0.0.1:{port_of(settings['ocigate_metrics'])}{LIVENESS_PATH}" in command
    (check,) = instruction("HEALTHCHECK")
    timeout = re.search(r"--timeout=(\d+)s", check)
    assert timeout and int(timeout.group(1)) > LIVENESS_TIMEOUT
    # The package is installed from the checkout, and nothing secret is baked in.
    assert any(re.match(r"pip install .* \.( |$)", arguments) for arguments in instruction("RUN"))
    for name in ("ENV", "ARG"):
        for arguments in instruction(name):
            assert not re.search(r"(?i)pass|token|secret|auth", arguments), arguments
    copied = " ".join(instruction("COPY") + instruction("ADD"))
    assert not re.search(r"(?i)credential|\.docker|htpasswd|mitmproxy-ca", copied)


# --- the Kubernetes manifests ------------------------------------------------------------------------------------


def test_the_manifests_are_a_namespace_rules_a_deployment_and_a_service() -> None:
    found = manifests()
    assert sorted(m["kind"] for m in found) == ["ConfigMap", "Deployment", "Namespace", "NetworkPolicy", "Service"]
    namespace = one("Namespace")["metadata"]["name"]
    assert all(m["metadata"].get("namespace") == namespace for m in found if m["kind"] != "Namespace")


def volumes_by_mount() -> dict[str, dict[str, Any]]:
    """Each volume the container mounts, by where it mounts it."""
    volumes = {v["name"]: v for v in one("Deployment")["spec"]["template"]["spec"]["volumes"]}
    return {mount["mountPath"]: volumes[mount["name"]] for mount in gateway_container()["volumeMounts"]}


def test_the_gateway_reads_rules_credentials_and_ca_where_the_volumes_are_mounted(tmp_path: Path) -> None:
    settings = settings_of(gateway_container()["args"])
    mounted = volumes_by_mount()
    # The rules: every key of the ConfigMap, each as <registry>/hosts.toml, which ocigate reads as rules.
    rules = mounted[settings["ocigate_rules"]]["configMap"]
    config_map = one("ConfigMap")
    assert rules["name"] == config_map["metadata"]["name"]
    assert {item["key"] for item in rules["items"]} == config_map["data"].keys()
    for item in rules["items"]:
        registry, file = item["path"].split("/")
        assert (file, item["key"]) == (HOSTS_FILE, f"{registry}.{HOSTS_FILE}")
        (tmp_path / registry).mkdir()
        (tmp_path / item["path"]).write_text(config_map["data"][item["key"]])
    loaded = load_rules(tmp_path)
    assert all(loaded.lookup(item["path"].split("/")[0]) for item in rules["items"])
    # Credentials: kubernetes.io/dockerconfigjson secrets as DIR/<name>/.dockerconfigjson, the only source.
    assert settings["ocigate_credential_sources"] == "kubernetes"
    secrets = mounted[settings["ocigate_kubernetes_secrets"]]["projected"]["sources"]
    for source in secrets:
        (item,) = source["secret"]["items"]
        assert item == {"key": KubernetesSecrets.FILE_NAME, "path": f"{source['secret']['name']}/.dockerconfigjson"}
    # The CA: mitmproxy's confdir holds mitmproxy-ca.pem, and the dhparam file it would otherwise write there.
    ca = mounted[settings["confdir"]]["secret"]
    assert ca["items"] == [{"key": name, "path": name} for name in ("mitmproxy-ca.pem", "mitmproxy-dhparam.pem")]
    # The root file system is read-only: every path the gateway writes (tempfiles) is a volume.
    assert "emptyDir" in mounted["/tmp"]
    assert all(mount.get("readOnly") for mount in gateway_container()["volumeMounts"] if mount["mountPath"] != "/tmp")


def test_the_probes_ask_the_health_endpoint_on_the_metrics_port() -> None:
    container = gateway_container()
    settings = settings_of(container["args"])
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"proxy": int(settings["listen_port"]), "metrics": port_of(settings["ocigate_metrics"])}
    # Probes come from the kubelet to the pod's address: the metrics server listens beyond loopback.
    assert settings["ocigate_metrics"].startswith("0.0.0.0:")
    for probe, path in [("readinessProbe", READINESS_PATH), ("livenessProbe", LIVENESS_PATH)]:
        get = container[probe]["httpGet"]
        assert (get["path"], ports[get["port"]]) == (path, ports["metrics"]), probe
        assert container[probe]["timeoutSeconds"] > LIVENESS_TIMEOUT, probe
    assert {"cpu", "memory"} <= container["resources"]["requests"].keys()
    # On SIGTERM the gateway drains: long enough for the readiness probe to fail (Kubernetes' default threshold is
    # 3), and over before the kubelet's SIGKILL.
    drain = int(settings["ocigate_drain"])
    readiness = container["readinessProbe"]
    assert drain > readiness["periodSeconds"] * readiness.get("failureThreshold", 3)
    assert one("Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > drain
    assert "memory" in container["resources"]["limits"]


def test_the_gateway_runs_as_the_images_user_unprivileged_on_a_read_only_root() -> None:
    pod = one("Deployment")["spec"]["template"]["spec"]["securityContext"]
    (user,) = instruction("USER")
    assert pod["runAsNonRoot"] is True and str(pod["runAsUser"]) == user.partition(":")[0]
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    container = gateway_container()["securityContext"]
    assert container["readOnlyRootFilesystem"] is True and container["allowPrivilegeEscalation"] is False
    assert container["capabilities"]["drop"] == ["ALL"]


def test_the_service_sends_each_client_to_one_replica_on_the_proxy_port() -> None:
    service, deployment = one("Service")["spec"], one("Deployment")["spec"]
    assert service["selector"].items() <= deployment["template"]["metadata"]["labels"].items()
    assert deployment["selector"]["matchLabels"] == service["selector"]
    (port,) = service["ports"]
    ports = {p["name"]: p["containerPort"] for p in gateway_container()["ports"]}
    assert ports[port["targetPort"]] == int(settings_of(gateway_container()["args"])["listen_port"])
    assert service["sessionAffinity"] == "ClientIP"
    # The metrics port is not in the Service: only the kubelet and a scraper reach it, at the pod's address.
    assert "metrics" not in {p.get("targetPort") for p in service["ports"]}


def test_only_the_nodes_reach_the_gateway_and_it_reaches_only_the_mirrors_networks() -> None:
    policy = one("NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"] == one("Deployment")["spec"]["selector"]["matchLabels"]
    (rule,) = policy["spec"]["ingress"]
    assert all("ipBlock" in peer for peer in rule["from"])
    ports = {p["containerPort"] for p in gateway_container()["ports"]}
    assert {port["port"] for port in rule["ports"]} == ports
    # Without a limit the gateway would be a forward proxy to anything the pod network reaches.
    assert settings_of(gateway_container()["args"])["ocigate_allow_destinations"]
