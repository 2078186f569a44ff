"""A gateway started on a rules tree that routes nothing (the shipped rules/ holds examples only) says so at start-up
and names the example to copy."""

import logging
import shutil
from pathlib import Path

import pytest
from mitmproxy.test import taddons

from ocigate.configuration import Configuration, Shared, unrouted_hint
from ocigate.hoststoml import load_rules

SHIPPED_RULES = Path(__file__).resolve().parent.parent / "rules"


def tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def examples(root: Path) -> list[Path]:
    return sorted(root.glob("*/hosts.toml.example"))


def test_a_tree_of_examples_names_a_registrys_own_example_before_default_and_where_to_copy_it(tmp_path: Path) -> None:
    root = tree(
        tmp_path / "rules",
        {
            "_default/hosts.toml.example": '[host."https://mirror.example"]\n',
            "docker.io/hosts.toml.example": '[host."https://mirror.example"]\n',
        },
    )
    hint = unrouted_hint(load_rules(root), examples(root))
    assert hint is not None
    assert f"{root} routes no registry" in hint
    assert f"examples: {root}/_default/hosts.toml.example, {root}/docker.io/hosts.toml.example\n" in hint
    assert f"cp {root}/docker.io/hosts.toml.example {root}/docker.io/hosts.toml" in hint


def test_only_default_example_is_the_one_named(tmp_path: Path) -> None:
    root = tree(tmp_path / "rules", {"_default/hosts.toml.example": '[host."https://mirror.example"]\n'})
    hint = unrouted_hint(load_rules(root), examples(root))
    assert hint is not None and f"cp {root}/_default/hosts.toml.example {root}/_default/hosts.toml" in hint


def test_an_empty_tree_says_where_a_rule_goes(tmp_path: Path) -> None:
    root = tmp_path / "rules"
    root.mkdir()
    hint = unrouted_hint(load_rules(root), [])
    assert hint is not None
    assert f"{root} routes no registry" in hint and f"write {root}/<registry>/hosts.toml" in hint


@pytest.mark.parametrize("directory", ["docker.io", "_default"])
def test_a_tree_that_routes_a_registry_has_no_hint(tmp_path: Path, directory: str) -> None:
    root = tree(
        tmp_path / "rules",
        {
            f"{directory}/hosts.toml": '[host."https://mirror.example"]\n',
            "quay.io/hosts.toml.example": '[host."https://mirror.example"]\n',
        },
    )
    assert unrouted_hint(load_rules(root), examples(root)) is None


def test_a_directory_that_changes_nothing_routes_nothing(tmp_path: Path) -> None:
    root = tree(tmp_path / "rules", {"docker.io/hosts.toml": ""})
    assert unrouted_hint(load_rules(root), []) is not None


async def test_started_on_the_shipped_rules_it_names_the_docker_io_example(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rules = shutil.copytree(SHIPPED_RULES, tmp_path / "rules")
    assert not list(rules.glob("*/hosts.toml")), "the shipped rules/ is meant to hold examples only"
    configuration = Configuration(Shared())
    with taddons.context(configuration) as tctx:
        tctx.configure(configuration, ocigate_rules=str(rules), ocigate_credential_sources=[])
        with caplog.at_level(logging.INFO, logger="ocigate"):
            configuration.running()
    started = caplog.text
    assert f"{rules} routes no registry" in started
    assert f"cp {rules}/docker.io/hosts.toml.example {rules}/docker.io/hosts.toml" in started


async def test_started_on_rules_that_route_a_registry_it_gives_no_hint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rules = tree(tmp_path / "rules", {"docker.io/hosts.toml": '[host."https://mirror.example"]\n'})
    configuration = Configuration(Shared())
    with taddons.context(configuration) as tctx:
        tctx.configure(configuration, ocigate_rules=str(rules), ocigate_credential_sources=[])
        with caplog.at_level(logging.INFO, logger="ocigate"):
            configuration.running()
    assert "gateway on" in caplog.text and "routes no registry" not in caplog.text
