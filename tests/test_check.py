"""`ocigate check`: every problem of the rules tree and of the credentials sources, by file and key, not only the
first; a summary line per registry when there is none. The command is run as it is installed."""

import base64
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from ocigate.credentials import DockerConfig, OcigateStore
from ocigate.hoststoml import RulesError, check_rules, load_rules
from tests.test_hoststoml import SHIPPED_RULES, activated_examples, write_hosts

OCIGATE = str(Path(sys.executable).parent / "ocigate")
PASSWORD = "planted-Secret-4711"

BROKEN_MIRRORS = """\
capabilites = ["pull"]
[host."https://m.example"]
  capabilities = ["pul"]
  dial_timeout = "3"
  bogus = 1
[host."ftp://bad.example"]
  capabilities = ["pull"]
"""


def run(*args: str, home: Path, path: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOME": str(home), "PATH": f"{path}:{os.environ['PATH']}" if path else os.environ["PATH"]}
    for name in ("DOCKER_CONFIG", "REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME"):
        env.pop(name, None)
    return subprocess.run([OCIGATE, *args], capture_output=True, text=True, env=env, timeout=60, check=False)


def test_check_rules_lists_every_problem_of_a_file_and_of_every_file(tmp_path: Path) -> None:
    write_hosts(tmp_path, "a.example", BROKEN_MIRRORS)
    write_hosts(tmp_path, "b.example", "x = [")
    rule_set, problems = check_rules(tmp_path)
    assert rule_set is not None and list(rule_set.rules()) == []
    a = tmp_path / "a.example" / "hosts.toml"
    assert [(p.path, p.key) for p in problems] == [
        (a, "capabilites"),
        (a, 'host."https://m.example".bogus'),
        (a, 'host."https://m.example".capabilities'),
        (a, 'host."https://m.example".dial_timeout'),
        (a, 'host."ftp://bad.example"'),
        (tmp_path / "b.example" / "hosts.toml", None),
    ]
    # load_rules still stops at the first, the same one.
    with pytest.raises(RulesError) as first:
        load_rules(tmp_path)
    assert str(first.value) == str(problems[0])


def test_a_key_set_aside_reports_nothing_that_only_follows_from_setting_it_aside(tmp_path: Path) -> None:
    # The only mirror of an offline rule is broken: "offline without a mirror" is no problem of its own; a broken
    # server does not make the capabilities that need it a problem.
    write_hosts(tmp_path, "a.example", 'offline = true\n[host."ftp://m.example"]\n')
    write_hosts(tmp_path, "b.example", 'server = "ftp://s.example"\ncapabilities = ["pull"]\n')
    _, problems = check_rules(tmp_path)
    assert [(p.path.parent.name, p.key) for p in problems] == [
        ("a.example", 'host."ftp://m.example"'),
        ("b.example", "server"),
    ]


def test_check_rules_reads_the_shipped_tree_and_its_activated_examples_without_problem(tmp_path: Path) -> None:
    assert check_rules(SHIPPED_RULES)[1] == []
    rule_set, problems = check_rules(activated_examples(tmp_path))
    assert problems == []
    assert rule_set is not None and rule_set.lookup("docker.io") is not None


def test_check_rules_names_a_tree_that_is_not_there(tmp_path: Path) -> None:
    rule_set, problems = check_rules(tmp_path / "missing")
    assert rule_set is None and [p.problem for p in problems] == ["rules directory does not exist"]


def test_credential_sources_list_every_problem_by_file_and_key_and_no_value(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    helper = tmp_path / "bin" / "docker-credential-present"
    helper.write_text("#!/bin/sh\nexit 1\n")
    helper.chmod(helper.stat().st_mode | stat.S_IXUSR)
    config = {
        "auths": {"bad.example": {"auth": PASSWORD}, "good.example": {"username": "u", "password": PASSWORD}},
        "credHelpers": {"one.example": "absent", "two.example": "present"},
        "credsStore": "gone",
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    os.environ["PATH"], old = f"{tmp_path / 'bin'}:{os.environ['PATH']}", os.environ["PATH"]
    try:
        problems = DockerConfig(tmp_path).problems()
    finally:
        os.environ["PATH"] = old
    assert [(p.key, p.problem) for p in problems] == [
        ("auths['bad.example']", "'auth' is not base64 of username:password"),
        ("credHelpers['one.example']", "docker-credential-absent is not on PATH"),
        ("credsStore", "docker-credential-gone is not on PATH"),
    ]
    store = tmp_path / "credentials.json"
    store.write_text(json.dumps([{"host": "m.example", "username": "u"}]))
    assert [str(p) for p in OcigateStore(store).problems()] == [
        f"{store}: is malformed (entry 0 (m.example) has no password, identity_token or registry_token)"
    ]
    assert PASSWORD not in repr(problems)


def test_the_command_passes_the_activated_examples_with_a_line_per_registry(tmp_path: Path) -> None:
    result = run("check", "--rules", str(activated_examples(tmp_path)), home=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    docker = next(line for line in lines if line.startswith("docker.io: "))
    assert docker.endswith(
        "docker.io/hosts.toml: https://mirror-a.example/v2 [pull, resolve] -> https://mirror-b.example/v2 [pull] "
        "-> https://registry-1.docker.io/v2 [pull, resolve, push, referrers]; online, gateway authenticates"
    )
    assert any(line.startswith("_default: ") and "the registry itself" in line for line in lines)
    assert f"credentials: ocigate credentials {tmp_path}/.ocigate/credentials.json" in lines


def test_the_command_on_the_shipped_tree_says_no_registry_has_a_rule(tmp_path: Path) -> None:
    result = run("check", "--rules", str(SHIPPED_RULES), home=tmp_path)
    assert result.returncode == 0
    assert "no registry has a rule" in result.stdout


def test_the_command_on_a_broken_tree_lists_every_problem_and_no_secret(tmp_path: Path) -> None:
    tree = activated_examples(tmp_path)
    write_hosts(tree, "a.example", BROKEN_MIRRORS)
    write_hosts(tree, "c.example", '[host."https://m.example"]\n  ca = "missing-ca.pem"\n')
    docker = tmp_path / "docker"
    docker.mkdir()
    auth = base64.b64encode(f"user:{PASSWORD}".encode()).decode()
    (docker / "config.json").write_text(json.dumps({"auths": {"x.example": {"auth": auth + "!"}}}))
    store = tmp_path / "store.json"
    store.write_text(f'[{{"host": "m.example", "password": "{PASSWORD}", "oops": 1}}]')
    result = run(
        "check",
        "--rules",
        str(tree),
        "--set",
        f"ocigate_docker_config={docker}",
        "--set",
        f"ocigate_credentials={store}",
        home=tmp_path,
    )
    assert result.returncode == 1
    out = result.stdout
    assert out.startswith("8 problems:\n"), out
    assert f"{tree}/a.example/hosts.toml: capabilites: unknown key" in out
    assert f'{tree}/a.example/hosts.toml: host."ftp://bad.example": unsupported URL scheme' in out
    assert "dial_timeout" in out and "bogus" in out
    assert f"{tree}/c.example/hosts.toml: " in out and "missing-ca.pem" in out
    assert f"{docker}/config.json: auths['x.example']: 'auth' is not base64" in out
    assert f"{store}: is malformed (entry 0 has unknown field 'oops')" in out
    assert PASSWORD not in out + result.stderr


def test_the_command_refuses_an_unknown_option(tmp_path: Path) -> None:
    result = run("check", "--set", "ocigate_credential_sources=nowhere", home=tmp_path)
    assert result.returncode == 2
    assert "ocigate_credential_sources: unknown source 'nowhere'" in result.stderr


def test_a_broken_policy_file_is_a_problem_check_names(tmp_path: Path) -> None:
    tree = activated_examples(tmp_path)
    (tree / "policy.toml").write_text("[user.alice]\npul = []\n")
    result = run("check", "--rules", str(tree), home=tmp_path)
    assert result.returncode == 1
    assert f"{tree / 'policy.toml'}: user.alice.pul: unknown key" in result.stdout + result.stderr


def test_a_docker_hub_prefix_of_one_component_is_warned_of_and_is_no_problem(tmp_path: Path) -> None:
    tree = activated_examples(tmp_path)
    (tree / "policy.toml").write_text(
        '[upstream."docker.io"]\nallow = ["library", "bitnami", "bitnami/"]\n'
        'block = ["nginx", "library/redis", "bitnami/redis"]\n'
        '[user.alice]\npull = ["index.docker.io/alpine", "docker.io/library", "quay.io/team", "docker.io/alpine/"]\n'
    )
    result = run("check", "--rules", str(tree), home=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning: ")]
    policy = tree / "policy.toml"
    assert warnings == [
        f"warning: {policy}: upstream.\"docker.io\".allow[1]: 'bitnami' matches Docker Hub's bitnami/... repositories, "
        "not the official image library/bitnami (write 'bitnami/' if the namespace is meant)",
        f"warning: {policy}: upstream.\"docker.io\".block[0]: 'nginx' matches Docker Hub's nginx/... repositories, "
        "not the official image library/nginx (write 'nginx/' if the namespace is meant)",
        f"warning: {policy}: user.alice.pull[0]: 'index.docker.io/alpine' matches Docker Hub's alpine/... "
        "repositories, not the official image library/alpine (write 'alpine/' if the namespace is meant)",
    ]
    # No advice to write library/: which names are official images is Docker Hub's to say. An entry written with
    # a trailing slash ('bitnami/', 'docker.io/alpine/') says the namespace is meant, and is not warned of.
    assert "write 'library/" not in result.stdout
