import json
import math
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ocigate import hoststoml as rules
from ocigate.hoststoml import CAPABILITIES, Host, RulesError, load_rules
from tests.support.within import returns_within

DATA = Path(__file__).parent / "data" / "certs.d"
SHIPPED_RULES = Path(__file__).parents[1] / "rules"
ALL = CAPABILITIES
PULL = frozenset({"pull"})
PULL_RESOLVE = frozenset({"pull", "resolve"})
PULL_RESOLVE_PUSH = frozenset({"pull", "resolve", "push"})
ETC = Path("/etc/certs")


def write_hosts(root: Path, directory: str, text: str) -> Path:
    path = root / directory / "hosts.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def parse_hosts_toml(text: str, *, upstream: str, path: Path) -> tuple[Host, ...]:
    """The hosts for `upstream` that load_rules reads from a hosts.toml with this text at `path`, in containerd's
    order, the server last; without a file on disk."""
    return rules._parse_hosts_file(text, path).hosts_for(upstream)


def hosts_for(text: str, upstream: str = "registry.example") -> tuple[Host, ...]:
    return parse_hosts_toml(text, upstream=upstream, path=Path("/rules/registry.example/hosts.toml"))


@contextmanager
def extra_keys(*names: str) -> Iterator[None]:
    """Lets the top level and host tables carry keys hosts.toml does not have, to show how the text around them is
    read."""
    extra = frozenset(names)
    with (
        mock.patch.object(rules, "_ROOT_KEYS", rules._ROOT_KEYS | extra),
        mock.patch.object(rules, "_MIRROR_KEYS", rules._MIRROR_KEYS | extra),
    ):
        yield


def urls(hosts: tuple[Host, ...]) -> list[str]:
    return [host.url for host in hosts]


# containerd's documented examples (docs/hosts.md) and its own parser test (hosts_test.go)


def test_docs_simple_docker_io_config_tries_registry_1_then_docker_io() -> None:
    rule = load_rules(DATA / "docs" / "simple").lookup("docker.io")
    assert rule is not None and rule.source == DATA / "docs" / "simple" / "docker.io" / "hosts.toml"
    assert rule.hosts == (
        Host("https", "registry-1.docker.io", 443, "/v2", PULL_RESOLVE),
        Host("https", "docker.io", 443, "/v2", ALL, is_server=True),
    )


def test_docs_local_mirror_resolves_ca_relative_to_the_hosts_toml() -> None:
    root = DATA / "docs" / "local-mirror"
    assert load_rules(root).lookup("docker.io").hosts == (
        Host("https", "public-mirror.example.com", 443, "/v2", PULL),
        Host("https", "docker-mirror.internal", 443, "/v2", PULL_RESOLVE, ca=(root / "docker.io/docker-mirror.crt",)),
        Host("https", "registry-1.docker.io", 443, "/v2", ALL, is_server=True),
    )


def test_docs_default_mirror_serves_every_registry_before_the_registry_itself() -> None:
    rule_set = load_rules(DATA / "docs" / "default-mirror")
    mirror = Host("https", "registry.example.com", 443, "/v2", PULL_RESOLVE)
    assert rule_set.lookup("quay.io").hosts == (mirror, Host("https", "quay.io", 443, "/v2", ALL, is_server=True))
    assert rule_set.lookup("docker.io").hosts == (
        mirror,
        Host("https", "registry-1.docker.io", 443, "/v2", ALL, is_server=True),
    )


def test_docs_default_server_replaces_every_registry() -> None:
    rule_set = load_rules(DATA / "docs" / "default-mirror-only")
    for upstream in ("quay.io", "docker.io", "registry.example:5000"):
        assert rule_set.lookup(upstream).hosts == (
            Host("https", "registry.example.com", 443, "/v2", ALL, is_server=True),
        )


def test_docs_bypass_tls_keeps_the_http_mirror_with_skip_verify() -> None:
    assert load_rules(DATA / "docs" / "bypass-tls").lookup("docker.io").hosts == (
        Host("http", "192.168.31.250", 5000, "/v2", PULL_RESOLVE_PUSH, skip_verify=True),
        Host("https", "registry-1.docker.io", 443, "/v2", ALL, is_server=True),
    )


def test_docs_host_fields_example_parses_every_field_in_file_order() -> None:
    assert load_rules(DATA / "docs" / "host-fields").lookup("registry.example").hosts == (
        Host(
            "https",
            "mirror.registry",
            443,
            "/v2",
            PULL,
            ca=(ETC / "mirror.pem",),
            headers=(("x-custom-2", "value1"), ("x-custom-2", "value2")),
        ),
        Host("https", "mirror-bak.registry", 443, "/us/v2", PULL, skip_verify=True),
        Host("http", "mirror.registry", 80, "/v2", PULL),
        Host(
            "https",
            "test-1.registry",
            443,
            "/v2",
            PULL_RESOLVE_PUSH,
            ca=(ETC / "test-1-ca.pem", ETC / "special.pem"),
            client=((ETC / "client.cert", ETC / "client.key"), (ETC / "client.pem", None)),
        ),
        Host("https", "test-2.registry", 443, "/v2", ALL, client=((ETC / "client.pem", None),)),
        Host(
            "https",
            "test-3.registry",
            443,
            "/v2",
            ALL,
            client=((ETC / "client-1.pem", None), (ETC / "client-2.pem", None)),
        ),
        Host("https", "non-compliant-mirror.registry", 443, "/v2/upstream", PULL, override_path=True),
        Host("https", "registry.example", 443, "/v2", ALL, is_server=True),
    )


def test_containerd_parse_host_file_test_document_gives_containerds_expected_hosts() -> None:
    # The expectations of TestParseHostFile, hosts_test.go:130-226.
    client_1_2 = ((ETC / "client-1.pem", None), (ETC / "client-2.pem", None))
    assert load_rules(DATA / "containerd-hosts-test").lookup("test.registry").hosts == (
        Host(
            "https",
            "mirror.registry",
            443,
            "/v2",
            PULL,
            ca=(ETC / "mirror.pem",),
            headers=(("x-custom-2", "value1"), ("x-custom-2", "value2")),
        ),
        Host("https", "mirror-bak.registry", 443, "/us/v2", PULL, skip_verify=True),
        Host("http", "mirror.registry", 80, "/v2", PULL),
        Host(
            "https",
            "test-1.registry",
            443,
            "/v2",
            ALL,
            ca=(ETC / "test-1-ca.pem", ETC / "special.pem"),
            client=((ETC / "client.cert", ETC / "client.key"), (ETC / "client.pem", None)),
        ),
        Host("https", "test-2.registry", 443, "/v2", ALL, client=((ETC / "client.pem", None),)),
        Host("https", "test-3.registry", 443, "/v2", ALL, client=client_1_2),
        Host("https", "no-referrers.registry", 443, "/v2", PULL_RESOLVE_PUSH, client=client_1_2),
        Host("https", "noncompliantmirror.registry", 443, "/v2/namespaceprefix", PULL, override_path=True),
        Host("https", "noprefixnoncompliant.registry", 443, "", ALL, override_path=True),
        Host("https", "onlyheader.registry", 443, "/v2", ALL, headers=(("x-custom-1", "justaheader"),)),
        Host("https", "dial-timeout.registry", 443, "/v2", ALL, dial_timeout=3.0),
        Host(
            "https",
            "test-default.registry",
            443,
            "/v2",
            ALL,
            ca=(Path("/etc/path/default"),),
            headers=(("x-custom-1", "custom header"),),
            is_server=True,
        ),
    )


# Directory lookup


def test_lookup_order_is_host_port_underscore_then_host_colon_port_then_host_then_default(tmp_path: Path) -> None:
    directories = ["registry.example_5000_", "registry.example:5000", "registry.example", "_default"]
    for directory in directories:
        write_hosts(tmp_path, directory, f'server = "https://{directory.strip("_").replace(":", "-")}.test"\n')
    for directory in directories:
        rule = load_rules(tmp_path).lookup("registry.example:5000")
        assert rule is not None and rule.source == tmp_path / directory / "hosts.toml"
        shutil.rmtree(tmp_path / directory)
    assert load_rules(tmp_path).lookup("registry.example:5000") is None


def test_lookup_without_port_uses_only_the_host_directory_then_default(tmp_path: Path) -> None:
    write_hosts(tmp_path, "registry.example_5000_", 'server = "https://port.test"\n')
    write_hosts(tmp_path, "registry.example:5000", 'server = "https://port.test"\n')
    assert load_rules(tmp_path).lookup("registry.example") is None
    write_hosts(tmp_path, "_default", 'server = "https://default.test"\n')
    assert urls(load_rules(tmp_path).lookup("registry.example").hosts) == ["https://default.test/v2"]
    write_hosts(tmp_path, "registry.example", 'server = "https://host.test"\n')
    assert urls(load_rules(tmp_path).lookup("registry.example").hosts) == ["https://host.test/v2"]


def test_port_less_directory_serves_the_host_on_any_port_as_that_upstream(tmp_path: Path) -> None:
    write_hosts(tmp_path, "registry.example", '[host."https://mirror.example"]\n')
    rule = load_rules(tmp_path).lookup("registry.example:5000")
    assert rule.upstream == "registry.example:5000"
    assert urls(rule.hosts) == ["https://mirror.example/v2", "https://registry.example:5000/v2"]


def test_lookup_of_an_ipv6_upstream_with_port_finds_its_directories(tmp_path: Path) -> None:
    write_hosts(tmp_path, "[::1]_5000_", '[host."https://mirror.example"]\n')
    assert urls(load_rules(tmp_path).lookup("[::1]:5000").hosts) == [
        "https://mirror.example/v2",
        "http://[::1]:5000/v2",
    ]


def test_lookup_refuses_a_string_that_is_not_a_registry(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a registry"):
        load_rules(tmp_path).lookup("registry.example/library")


def test_lookup_reads_nothing_from_disk_after_loading(tmp_path: Path) -> None:
    write_hosts(tmp_path, "registry.example", '[host."https://mirror.example"]\n')
    rule_set = load_rules(tmp_path)
    shutil.rmtree(tmp_path / "registry.example")
    assert urls(rule_set.lookup("registry.example").hosts)[0] == "https://mirror.example/v2"


def test_rules_gives_one_rule_per_directory_for_the_registry_it_names(tmp_path: Path) -> None:
    write_hosts(tmp_path, "registry.example_5000_", "")
    (tmp_path / "registry.example_5000_" / "ca.crt").write_text("")
    write_hosts(tmp_path, "_default", '[host."https://mirror.example"]\n')
    write_hosts(tmp_path, "inactive.example", "# configures nothing\n")
    by_upstream = {rule.upstream: rule for rule in load_rules(tmp_path).rules()}
    assert set(by_upstream) == {"registry.example:5000", "_default"}
    assert urls(by_upstream["registry.example:5000"].hosts) == ["https://registry.example:5000/v2"]
    assert urls(by_upstream["_default"].hosts)[0] == "https://mirror.example/v2"


# Defaults, and each field


@pytest.mark.parametrize(
    ("upstream", "url", "skip_verify"),
    [
        ("docker.io", "https://registry-1.docker.io/v2", False),
        ("registry.example", "https://registry.example/v2", False),
        ("registry.example:5000", "https://registry.example:5000/v2", False),
        # containerd's localhost rules, hosts.go:105-122
        ("localhost", "https://localhost/v2", True),
        ("localhost:443", "https://localhost/v2", True),
        ("localhost:5000", "http://localhost:5000/v2", True),
        ("localhost:80", "http://localhost/v2", False),
        ("127.0.0.1:5000", "http://127.0.0.1:5000/v2", True),
        ("[::1]:5000", "http://[::1]:5000/v2", True),
        ("10.0.0.1:5000", "https://10.0.0.1:5000/v2", False),
    ],
)
def test_without_server_the_upstream_itself_is_the_last_host(upstream: str, url: str, skip_verify: bool) -> None:
    (host,) = hosts_for("# no server\n", upstream)
    assert (host.url, host.skip_verify, host.capabilities, host.is_server) == (url, skip_verify, ALL, True)


def test_top_level_settings_apply_to_the_upstream_entry_without_server() -> None:
    (host,) = hosts_for('ca = "ca.pem"\ndial_timeout = "2s"\nskip_verify = true\n[header]\nx-a = "b"\n', "docker.io")
    assert host == Host(
        "https",
        "registry-1.docker.io",
        443,
        "/v2",
        ALL,
        ca=(Path("/rules/registry.example/ca.pem"),),
        skip_verify=True,
        headers=(("x-a", "b"),),
        dial_timeout=2.0,
        is_server=True,
    )


def test_server_comes_after_every_host_table_even_when_written_first() -> None:
    hosts = hosts_for('server = "https://upstream.example"\n[host."https://a.example"]\n[host."https://b.example"]\n')
    assert urls(hosts) == ["https://a.example/v2", "https://b.example/v2", "https://upstream.example/v2"]
    assert [host.is_server for host in hosts] == [False, False, True]


def test_host_table_defaults() -> None:
    assert hosts_for('[host."https://mirror.example"]\n')[0] == Host("https", "mirror.example", 443, "/v2", ALL)


def test_empty_capabilities_list_means_every_capability_as_in_containerd() -> None:
    assert hosts_for('[host."https://m.example"]\ncapabilities = []\n')[0].capabilities == ALL


def test_capability_names_are_case_insensitive_as_in_containerd() -> None:
    assert hosts_for('[host."https://m.example"]\ncapabilities = ["PULL", "Resolve"]\n')[0].capabilities == (
        PULL_RESOLVE
    )


def test_url_without_scheme_is_https() -> None:
    hosts = hosts_for('server = "upstream.example"\n[host."mirror.example:5000"]\n')
    assert urls(hosts) == ["https://mirror.example:5000/v2", "https://upstream.example/v2"]


def test_host_names_are_lowercased_and_ipv6_is_bracketed_only_in_netloc() -> None:
    hosts = hosts_for('[host."https://Mirror.Example"]\n[host."http://[2001:DB8::1]:5000"]\n')
    assert (hosts[0].host, hosts[0].netloc) == ("mirror.example", "mirror.example")
    assert (hosts[1].host, hosts[1].port, hosts[1].netloc) == ("2001:db8::1", 5000, "[2001:db8::1]:5000")


@pytest.mark.parametrize(
    ("scheme", "port", "netloc"),
    [
        ("https", 443, "m.example"),
        ("https", 80, "m.example:80"),
        ("http", 80, "m.example"),
        ("http", 443, "m.example:443"),
    ],
)
def test_netloc_and_url_omit_only_the_schemes_default_port(scheme: str, port: int, netloc: str) -> None:
    host = Host(scheme, "m.example", port, "/v2", ALL)
    assert (host.netloc, host.url) == (netloc, f"{scheme}://{netloc}/v2")


@pytest.mark.parametrize(
    ("url", "override_path", "path"),
    [
        ("https://m.example", False, "/v2"),
        ("https://m.example/", False, "/v2"),
        ("https://m.example/us", False, "/us/v2"),
        ("https://m.example/us/", False, "/us/v2"),
        ("https://m.example/v2", False, "/v2"),
        ("https://m.example/mirror/v2", False, "/mirror/v2"),
        ("https://m.example/a/../b//c", False, "/b/c/v2"),
        ("https://m.example/v2/upstream", True, "/v2/upstream"),
        ("https://m.example/api/", True, "/api"),
        ("https://m.example", True, ""),
        ("https://m.example/", True, ""),
    ],
)
def test_v2_is_appended_to_the_path_unless_override_path(url: str, override_path: bool, path: str) -> None:
    text = f'[host."{url}"]\noverride_path = {str(override_path).lower()}\n'
    (mirror, _) = hosts_for(text)
    assert (mirror.path, mirror.override_path) == (path, override_path)


def test_ca_and_client_paths_resolve_against_the_hosts_toml_directory(tmp_path: Path) -> None:
    write_hosts(
        tmp_path,
        "registry.example",
        '[host."https://m.example"]\n'
        'ca = ["ca.pem", "/abs/ca.pem", "../shared/ca.pem"]\n'
        'client = ["both.pem", ["pair.cert", "pair.key"], ["../shared/c.pem", ""]]\n',
    )
    (mirror, _) = load_rules(tmp_path).lookup("registry.example").hosts
    directory = tmp_path / "registry.example"
    assert mirror.ca == (directory / "ca.pem", Path("/abs/ca.pem"), tmp_path / "shared" / "ca.pem")
    assert mirror.client == (
        (directory / "both.pem", None),
        (directory / "pair.cert", directory / "pair.key"),
        (tmp_path / "shared" / "c.pem", None),
    )


def test_single_string_ca_and_client() -> None:
    (mirror, _) = hosts_for('[host."https://m.example"]\nca = "/x/ca.pem"\nclient = "/x/c.pem"\n')
    assert (mirror.ca, mirror.client) == ((Path("/x/ca.pem"),), ((Path("/x/c.pem"), None),))


def test_headers_keep_file_order_and_an_array_gives_repeated_pairs() -> None:
    text = '[host."https://m.example".header]\nx-b = "1"\nX-A = ["2", "3"]\nx-c = []\nx-d = "4"\n'
    assert hosts_for(text)[0].headers == (("x-b", "1"), ("X-A", "2"), ("X-A", "3"), ("x-d", "4"))


@pytest.mark.parametrize(
    ("duration", "seconds"),
    [
        ("500ms", 0.5),
        ("3s", 3.0),
        ("1m30s", 90.0),
        ("1.5h", 5400.0),
        ("250us", 0.00025),
        ("1µs", 1e-6),
        ("+2s", 2.0),
        (".5s", 0.5),
        ("5.s", 5.0),
        ("1h0m0.5s", 3600.5),
        ("100ns", 1e-7),
    ],
)
def test_dial_timeout_reads_go_durations(duration: str, seconds: float) -> None:
    assert hosts_for(f'[host."https://m.example"]\ndial_timeout = "{duration}"\n')[0].dial_timeout == pytest.approx(
        seconds
    )


def test_skip_verify_and_override_path_read_booleans() -> None:
    (mirror, _) = hosts_for('[host."https://m.example/x"]\nskip_verify = true\noverride_path = true\n')
    assert (mirror.skip_verify, mirror.override_path, mirror.path) == (True, True, "/x")


# Host order: containerd lists hosts by their table headers (getSortedHosts, hosts.go:551-585)


def test_host_whose_tables_another_host_splits_is_listed_twice_like_containerd() -> None:
    text = '[host."https://a.example"]\n[host."https://b.example"]\n[host."https://a.example".header]\nx = "y"\n'
    assert urls(hosts_for(text)) == [
        "https://a.example/v2",
        "https://b.example/v2",
        "https://a.example/v2",
        "https://registry.example/v2",
    ]


def test_host_sub_table_right_after_its_host_adds_nothing() -> None:
    text = '[host."https://a.example"]\n[header]\nx = "y"\n[host."https://a.example".header]\nx = "z"\n'
    assert urls(hosts_for(text)) == ["https://a.example/v2", "https://registry.example/v2"]


def test_host_declared_only_by_its_header_sub_table_is_listed_there() -> None:
    text = '[host."https://b.example".header]\nx = "y"\n[host."https://a.example"]\n'
    assert urls(hosts_for(text))[:2] == ["https://b.example/v2", "https://a.example/v2"]


def test_host_order_ignores_header_lookalikes_in_strings_comments_and_arrays() -> None:
    text = (
        '# [host."https://comment.example"]\n'
        '[ host . "https://a.example" ]  # spaced header\n'
        'note = """\n[host."https://string.example"]\n"""\n'
        "lines = [\n['[host.\"https://array.example\"]'],\n]\n"
        '[host."https://b]example.test"]\n'
        "note = '''\n[host.\"https://literal.example\"]'''\n"
        '[host."https://c.example"]\n'
        'note = "\\"[host.\\"https://escaped.example\\"]"\n'
    )
    with extra_keys("note", "lines"):
        # The "]" inside the quoted key does not end the header: the host is listed, then its URL refused.
        with pytest.raises(RulesError, match="not a valid URL"):
            hosts_for(text)
        assert urls(hosts_for(text.replace("b]example", "b.example"))) == [
            "https://a.example/v2",
            "https://b.example.test/v2",
            "https://c.example/v2",
            "https://registry.example/v2",
        ]


# Docker certificate files (containerd's loadCertFiles, hosts.go:622-650)


def test_directory_without_hosts_toml_uses_docker_certificate_files(tmp_path: Path) -> None:
    directory = tmp_path / "registry.example:5000"
    (directory / "sub.crt").mkdir(parents=True)
    for name in ("b.crt", "a.crt", "client.cert", "client.key", "solo.cert", "notes.txt"):
        (directory / name).write_text("")
    rule = load_rules(tmp_path).lookup("registry.example:5000")
    assert rule.source is None
    assert rule.hosts == (
        Host(
            "https",
            "registry.example",
            5000,
            "/v2",
            ALL,
            ca=(directory / "a.crt", directory / "b.crt"),
            client=((directory / "client.cert", directory / "client.key"), (directory / "solo.cert", None)),
            is_server=True,
        ),
    )


def test_empty_hosts_toml_is_read_like_a_missing_one(tmp_path: Path) -> None:
    write_hosts(tmp_path, "registry.example", "")
    (tmp_path / "registry.example" / "ca.crt").write_text("")
    rule = load_rules(tmp_path).lookup("registry.example")
    assert rule.source is None and rule.hosts[0].ca == (tmp_path / "registry.example" / "ca.crt",)


def test_hosts_toml_with_only_comments_hides_the_cert_files_and_configures_nothing(tmp_path: Path) -> None:
    # Unlike an empty file, it is read as a hosts.toml, so containerd ignores ca.crt: the registry goes to itself
    # with default TLS, which for ocigate is no rule at all.
    write_hosts(tmp_path, "registry.example", "# nothing\n")
    (tmp_path / "registry.example" / "ca.crt").write_text("")
    assert load_rules(tmp_path).lookup("registry.example") is None


# Broken files: every one names the file and the key

BROKEN = DATA / "broken"
BROKEN_KINDS: dict[str, tuple[str | None, str]] = {
    "toml-syntax": (None, "invalid TOML: Expected ']' at the end of a table declaration (at line 2, column 26)"),
    "unknown-top-level-key": ("sever", "unknown key (expected one of authentication, ca, capabilities, client, "),
    "unknown-host-key": ('host."https://m.example".capabilites', "unknown key"),
    "upper-case-key": ('host."https://m.example".Capabilities', "keys are lower case here: write 'capabilities'"),
    "nested-host": ('host."https://m.example"."https://n.example"', "unknown key"),
    "capabilities-not-array": ('host."https://m.example".capabilities', "expected an array of capability names"),
    "capabilities-not-strings": ('host."https://m.example".capabilities', "item that is the number 1"),
    "unknown-capability": (
        'host."https://m.example".capabilities',
        "unknown capability 'pul' (expected pull, resolve, push, referrers)",
    ),
    "capabilities-without-server": ("capabilities", "has no effect without `server`"),
    "override-path-without-server": ("override_path", "has no effect without `server`"),
    "skip-verify-not-bool": ('host."https://m.example".skip_verify', "expected true or false, got the string 'true'"),
    "override-path-not-bool": ('host."https://m.example".override_path', "expected true or false, got the number 1"),
    "header-not-table": ('host."https://m.example".header', "expected a table of header names"),
    "header-value-number": ('host."https://m.example".header.x-a', "expected a string or an array of strings"),
    "header-value-array-of-numbers": ('host."https://m.example".header.x-a', "item that is the number 2"),
    "header-name-invalid": ('host."https://m.example".header."x a"', "expected an HTTP header name"),
    "header-value-line-break": ('host."https://m.example".header.x-a', "line break"),
    "dial-timeout-not-duration": ('host."https://m.example".dial_timeout', "expected a positive duration like"),
    "dial-timeout-number": ('host."https://m.example".dial_timeout', "got the number 3"),
    "dial-timeout-negative": ('host."https://m.example".dial_timeout', "got '-1s'"),
    "dial-timeout-zero": ('host."https://m.example".dial_timeout', "got '0s'"),
    "ca-number": ('host."https://m.example".ca', "expected a path or an array of paths"),
    "ca-array-of-numbers": ('host."https://m.example".ca', "item that is the number 5"),
    "ca-empty-path": ('host."https://m.example".ca', "expected a file path, got an empty string"),
    "client-table": ('host."https://m.example".client', "pairs, got a table"),
    "client-pair-of-one": ('host."https://m.example".client', "found an item that is an array"),
    "client-pair-of-three": ('host."https://m.example".client', "found an item that is an array"),
    "url-scheme": ('host."ftp://m.example"', "unsupported URL scheme 'ftp' (expected http or https)"),
    "url-query": ('host."https://m.example/v2?ns=docker.io"', "query or fragment"),
    "url-fragment": ('host."https://m.example/#mirror"', "query or fragment"),
    "url-port-out-of-range": ('host."https://m.example:99999"', "not a valid URL: Port out of range"),
    "url-port-not-number": ('host."https://m.example:https"', "not a valid URL"),
    "url-port-zero": ('host."https://m.example:0"', "invalid port 0"),
    "url-port-empty": ('host."https://m.example:"', "empty port"),
    "url-credentials": ('host."https://user:secret@m.example"', "credentials"),
    "url-empty": ('host.""', "got an empty string"),
    "url-no-host": ('host."https:///v2"', "no host name"),
    "url-space": ('host."https://m example"', "whitespace"),
    "url-bad-ipv6": ('host."https://[::g]:5000"', "not a valid URL"),
    "server-not-string": ("server", "expected a URL string like https://mirror.example, got the number 443"),
    "server-empty": ("server", "as if `server` were absent"),
    "server-scheme": ("server", "unsupported URL scheme 'oci'"),
    "host-not-table": ("host", 'expected tables like [host."https://mirror.example"], got the string'),
    "host-entry-not-table": ('host."https://m.example"', 'expected a [host."https://m.example"] table'),
    "host-dotted-keys": ('host."https://m.example"', "containerd never uses such a host"),
    "host-inline-table": ('host."https://m.example"', "containerd never uses such a host"),
    "host-array-of-tables": ('host."https://m.example"', "got an array"),
}


def test_every_broken_example_has_an_expectation() -> None:
    assert sorted(path.name for path in BROKEN.iterdir()) == sorted(BROKEN_KINDS)


@pytest.mark.parametrize("kind", sorted(BROKEN_KINDS))
def test_broken_file_is_refused_naming_the_file_and_the_key(kind: str) -> None:
    key, problem = BROKEN_KINDS[kind]
    path = BROKEN / kind / "hosts.toml"
    with pytest.raises(RulesError) as raised:
        parse_hosts_toml(path.read_text(), upstream="registry.example", path=path)
    error = raised.value
    assert (error.path, error.key) == (path, key)
    assert problem in error.problem
    assert str(error).startswith(f"{path}: {key}: " if key else f"{path}: ")


def test_load_rules_refuses_a_tree_with_one_broken_file_among_good_ones(tmp_path: Path) -> None:
    for example in ("simple", "host-fields", "default-mirror"):
        shutil.copytree(DATA / "docs" / example, tmp_path, dirs_exist_ok=True)
    load_rules(tmp_path)
    shutil.copytree(BROKEN / "unknown-capability", tmp_path / "quay.io")
    with pytest.raises(RulesError) as raised:
        load_rules(tmp_path)
    assert raised.value.path == tmp_path / "quay.io" / "hosts.toml"
    assert str(raised.value) == (
        f'{tmp_path}/quay.io/hosts.toml: host."https://m.example".capabilities: '
        "unknown capability 'pul' (expected pull, resolve, push, referrers)"
    )


def test_non_utf8_hosts_toml_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "registry.example" / "hosts.toml"
    path.parent.mkdir()
    path.write_bytes(b'server = "https://\xff.example"\n')
    with pytest.raises(RulesError, match=r"hosts.toml: not UTF-8 text \(bad byte at offset 18\)"):
        load_rules(tmp_path)


def test_deeply_nested_toml_is_refused() -> None:
    with pytest.raises(RulesError, match="invalid TOML"):
        hosts_for("x = " + "[" * 10000)


def test_missing_rules_root_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RulesError, match="rules directory does not exist") as raised:
        load_rules(tmp_path / "missing")
    assert raised.value.path == tmp_path / "missing"


def test_rules_root_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "rules").write_text("")
    with pytest.raises(RulesError, match="rules directory is not a directory"):
        load_rules(tmp_path / "rules")


def test_hosts_toml_directly_under_the_root_is_refused(tmp_path: Path) -> None:
    (tmp_path / "hosts.toml").write_text('server = "https://m.example"\n')
    with pytest.raises(RulesError, match="never read here") as raised:
        load_rules(tmp_path)
    assert raised.value.path == tmp_path / "hosts.toml"


def test_directory_whose_name_is_no_registry_is_refused(tmp_path: Path) -> None:
    write_hosts(tmp_path, "docker.io ", 'server = "https://m.example"\n')
    with pytest.raises(RulesError, match="directory name is not a registry"):
        load_rules(tmp_path)


def test_files_beside_registry_directories_are_ignored(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("# rules\n")
    assert load_rules(tmp_path).lookup("README.md") is None


# Files that cannot be read as they are: an error naming them, never a bypass and never a wait (containerd's
# HostDirFromRoot and loadHostDir fail on what they cannot stat or read, other than what does not exist).


@pytest.mark.parametrize("name", ["registry.example", "registry.example_5000_", "registry.example:5000", "_default"])
def test_a_registry_directory_that_is_a_symlink_loop_is_refused_naming_it(tmp_path: Path, name: str) -> None:
    (tmp_path / name).symlink_to(name)
    with pytest.raises(RulesError) as raised:
        load_rules(tmp_path)
    assert raised.value.path == tmp_path / name
    assert str(raised.value) == f"{tmp_path / name}: cannot be resolved: Too many levels of symbolic links"


def test_a_rules_root_that_is_a_symlink_loop_is_refused_naming_it(tmp_path: Path) -> None:
    (tmp_path / "rules").symlink_to("rules")
    with pytest.raises(RulesError, match="cannot be resolved: Too many levels of symbolic links") as raised:
        load_rules(tmp_path / "rules")
    assert raised.value.path == tmp_path / "rules"


def test_a_dangling_link_is_no_registry_directory_as_for_containerd(tmp_path: Path) -> None:
    (tmp_path / "registry.example").symlink_to("gone")
    assert load_rules(tmp_path).lookup("registry.example") is None


@pytest.mark.parametrize("thing", ["fifo", "directory", "symlink-loop"])
def test_a_hosts_toml_that_is_no_readable_regular_file_is_refused_without_blocking(tmp_path: Path, thing: str) -> None:
    hosts_file = tmp_path / "registry.example" / "hosts.toml"
    hosts_file.parent.mkdir()
    if thing == "fifo":
        os.mkfifo(hosts_file)
        problem = "not a regular file but a FIFO"
    elif thing == "directory":
        hosts_file.mkdir()
        problem = "not a regular file but a directory"
    else:
        hosts_file.symlink_to("hosts.toml")
        problem = "cannot read: Too many levels of symbolic links"
    # In a thread of its own: a read that blocks must fail the test, not hang the run.
    with pytest.raises(RulesError) as raised:
        returns_within(5, lambda: load_rules(tmp_path))
    assert raised.value.path == hosts_file
    assert str(raised.value) == f"{hosts_file}: {problem}"


# The shipped example tree


def activated_examples(tmp_path: Path) -> Path:
    """The shipped tree with every hosts.toml.example copied to the hosts.toml it documents."""
    tree = tmp_path / "rules"
    shutil.copytree(SHIPPED_RULES, tree)
    for example in tree.glob("*/hosts.toml.example"):
        shutil.copy(example, example.with_name("hosts.toml"))
    return tree


def test_shipped_docker_io_example_sends_docker_io_to_two_mirrors_then_registry_1(tmp_path: Path) -> None:
    rule = load_rules(activated_examples(tmp_path)).lookup("docker.io")
    assert urls(rule.hosts) == [
        "https://mirror-a.example/v2",
        "https://mirror-b.example/v2",
        "https://registry-1.docker.io/v2",
    ]
    assert [host.capabilities for host in rule.hosts] == [PULL_RESOLVE, PULL, ALL]


def test_shipped_default_example_puts_a_shared_mirror_before_every_registry(tmp_path: Path) -> None:
    rule = load_rules(activated_examples(tmp_path)).lookup("quay.io")
    assert urls(rule.hosts) == ["https://mirror-all.example/v2", "https://quay.io/v2"]


def test_the_default_examples_air_gap_line_uncommented_contacts_only_the_mirror(tmp_path: Path) -> None:
    tree = activated_examples(tmp_path)
    default = tree / "_default" / "hosts.toml"
    default.write_text(default.read_text().replace("# offline = true", "offline = true"))
    rule = load_rules(tree).lookup("quay.io")
    assert urls(rule.hosts) == ["https://mirror-all.example/v2"]


def test_shipped_tree_as_is_gives_no_registry_a_rule() -> None:
    # Examples only: out of the box every registry passes through the gateway untouched.
    rule_set = load_rules(SHIPPED_RULES)
    for upstream in ("docker.io", "quay.io", "localhost:5000"):
        assert rule_set.lookup(upstream) is None
    assert list(rule_set.rules()) == []


def test_a_directory_that_configures_nothing_is_no_rule(tmp_path: Path) -> None:
    (tmp_path / "registry.example").mkdir()
    write_hosts(tmp_path, "_default", "# only a comment\n")
    rule_set = load_rules(tmp_path)
    assert rule_set.lookup("registry.example") is None
    assert rule_set.lookup("other.example") is None


def test_a_directory_with_only_a_ca_file_is_a_rule(tmp_path: Path) -> None:
    (tmp_path / "registry.example").mkdir()
    (tmp_path / "registry.example" / "ca.crt").write_text("")
    rule = load_rules(tmp_path).lookup("registry.example")
    assert rule is not None and rule.hosts[-1].ca == (tmp_path / "registry.example" / "ca.crt",)


# Property tests


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_arbitrary_text_is_parsed_or_refused_with_rules_error(text: str) -> None:
    try:
        hosts = hosts_for(text)
    except RulesError:
        return
    assert hosts[-1].is_server


KEYS = sorted(rules._ROOT_KEYS)
toml_keys = st.sampled_from(KEYS) | st.text(max_size=8)
url_like = st.sampled_from(
    [
        "https://m.example",
        "http://[::1]:5000/v2",
        "m.example:99999",
        "",
        "ftp://x",
        "https://m.example?x",
        "https://",
        "HTTPS://M.EXAMPLE/",
        "https://[::1",
        "https://m.example:-1",
        "//m.example",
        "http:m.example",
        "https://a@b",
    ]
)
toml_scalars = (
    st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats()
    | st.text(max_size=12)
    | url_like
    | st.sampled_from(["3s", "-1s", "0", "1h2m", "5x", "1e3s", "1.s", ".s", "9999999999999h", "pull", "PUSH"])
)
toml_values = st.recursive(
    toml_scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(toml_keys, children, max_size=3),
    max_leaves=12,
)


def toml_key(key: str) -> str:
    return json.dumps(key, ensure_ascii=False)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    if isinstance(value, int | str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


def toml_document(table: dict[str, Any], inline_tables: bool, prefix: tuple[str, ...] = ()) -> str:
    """A TOML document for `table`: tables become [headers] unless inline_tables."""
    lines = ["[" + ".".join(map(toml_key, prefix)) + "]"] if prefix else []
    nested = {}
    for key, value in table.items():
        if isinstance(value, dict) and not inline_tables:
            nested[key] = value
        else:
            lines.append(f"{toml_key(key)} = {toml_value(value)}")
    text = "\n".join(lines) + "\n"
    return text + "".join(toml_document(value, inline_tables, (*prefix, key)) for key, value in nested.items())


host_tables = st.dictionaries(url_like | st.text(max_size=10), st.dictionaries(toml_keys, toml_values, max_size=4))


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(toml_keys, toml_values, max_size=5), host_tables, st.booleans())
def test_generated_toml_documents_are_parsed_or_refused_with_rules_error(
    top_level: dict[str, Any], hosts: dict[str, Any], inline_tables: bool
) -> None:
    document = {**top_level, "host": hosts}
    try:
        parsed = hosts_for(toml_document(document, inline_tables))
    except RulesError:
        return
    assert parsed[-1].is_server


labels = st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True)


# TOML that holds text looking like a [host."..."] header without being one; "note" is let in by extra_keys.
HEADER_LOOKALIKES = [
    '# [host."https://fake.example"]',
    'note = """\n[host."https://fake.example"]\n"""',
    'note = """x\\"""\n[host.\\"https://fake.example\\"]"""',
    "note = '''\n[host.\"https://fake.example\"]'''",
    'note = """""x"""""',
    "note = ''''x'''''",
    'note = [\n["[host.\\"https://fake.example\\"]"],\n  # ]\n]',
    'note = {a = "[host.\\"https://fake.example\\"]", b = [1, {c = "]"}]}',
    'note = "]#["',
    "note = ']\\'",
    "note = 1979-05-27T07:32:00Z",
    'note = """\\\n   [host."https://fake.example"] \\\n"""',
]


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(labels, st.sampled_from(HEADER_LOOKALIKES), st.booleans()), max_size=5, unique_by=lambda h: h[0]
    ),
    st.sampled_from(HEADER_LOOKALIKES),
)
def test_hosts_are_listed_in_header_order_whatever_their_tables_contain(
    hosts: list[tuple[str, str, bool]], top_level_noise: str
) -> None:
    lines = [top_level_noise]
    for name, noise, header_table in hosts:
        lines += [f'[ host."https://{name}.example" ]', noise]
        if header_table:
            lines += [f'[host."https://{name}.example".header]', f'x-{name} = "]"']
    with extra_keys("note"):
        parsed = hosts_for("\n".join(lines) + "\n")
    assert urls(parsed) == [f"https://{name}.example/v2" for name, _, _ in hosts] + ["https://registry.example/v2"]


segments = st.from_regex(r"[a-z0-9_-]{1,6}", fullmatch=True)
file_paths = st.builds(
    lambda absolute, parts: ("/" if absolute else "") + "/".join(parts),
    st.booleans(),
    st.lists(segments, min_size=1, max_size=3),
)
# RFC 9110 field values: visible characters, spaces only between them.
header_values = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=10).map(str.strip)
DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


@st.composite
def host_configs(draw: st.DrawFn, *, with_url: bool = True) -> dict[str, Any]:
    config: dict[str, Any] = {}
    if with_url:
        config["scheme"] = draw(st.sampled_from(["https", "http", ""]))
        config["name"] = ".".join(draw(st.lists(labels, min_size=1, max_size=3)))
        config["port"] = draw(st.none() | st.integers(1, 65535))
        config["segments"] = draw(st.lists(segments, max_size=3))
    config["capabilities"] = draw(st.none() | st.lists(st.sampled_from(sorted(CAPABILITIES)), min_size=1, max_size=4))
    config["ca"] = draw(st.none() | file_paths | st.lists(file_paths, max_size=3))
    pair = st.tuples(file_paths, file_paths | st.just(""))
    config["client"] = draw(st.none() | file_paths | st.lists(file_paths | pair, max_size=3))
    config["skip_verify"] = draw(st.none() | st.booleans())
    config["override_path"] = draw(st.none() | st.booleans()) if with_url else None
    config["headers"] = draw(
        st.lists(
            st.tuples(st.from_regex(r"[A-Za-z0-9-]{1,10}", fullmatch=True), header_values | st.lists(header_values)),
            max_size=3,
            unique_by=lambda header: header[0],
        )
    )
    config["dial_timeout"] = draw(st.none() | st.tuples(st.integers(1, 10**6), st.sampled_from(sorted(DURATION_UNITS))))
    return config


def config_url(config: dict[str, Any]) -> str:
    scheme = f"{config['scheme']}://" if config["scheme"] else ""
    port = f":{config['port']}" if config["port"] else ""
    path = "".join(f"/{segment}" for segment in config["segments"])
    return f"{scheme}{config['name']}{port}{path}"


def config_lines(config: dict[str, Any]) -> list[str]:
    lines = []
    if config["capabilities"] is not None:
        lines.append(f"capabilities = {json.dumps(config['capabilities'])}")
    for key in ("ca", "client", "skip_verify", "override_path"):
        if config[key] is not None:
            lines.append(f"{key} = {toml_value(config[key])}")
    if config["dial_timeout"]:
        amount, unit = config["dial_timeout"]
        lines.append(f'dial_timeout = "{amount}{unit}"')
    return lines


def header_lines(config: dict[str, Any]) -> list[str]:
    return [f"{name} = {toml_value(value)}" for name, value in config["headers"]]


def expected_host(config: dict[str, Any], scheme: str, name: str, port: int | None, path: str, is_server: bool) -> Host:
    directory = Path("/rules/registry.example")

    def file(path: str) -> Path:
        return directory / path

    ca = [config["ca"]] if isinstance(config["ca"], str) else config["ca"] or []
    clients = [config["client"]] if isinstance(config["client"], str) else config["client"] or []
    pairs = [(file(c), None) if isinstance(c, str) else (file(c[0]), file(c[1]) if c[1] else None) for c in clients]
    headers = []
    for header, value in config["headers"]:
        headers += [(header, item) for item in ([value] if isinstance(value, str) else value)]
    amount_unit = config["dial_timeout"]
    return Host(
        scheme=scheme,
        host=name,
        port=port or (443 if scheme == "https" else 80),
        path=path,
        capabilities=frozenset(config["capabilities"] or CAPABILITIES),
        ca=tuple(file(path) for path in ca),
        client=tuple(pairs),
        skip_verify=bool(config["skip_verify"]),
        headers=tuple(headers),
        override_path=bool(config["override_path"]),
        dial_timeout=amount_unit[0] * DURATION_UNITS[amount_unit[1]] if amount_unit else None,
        is_server=is_server,
    )


def expected_url_host(config: dict[str, Any], is_server: bool) -> Host:
    path = "".join(f"/{segment}" for segment in config["segments"])
    if not config["override_path"] and not path.endswith("/v2"):
        path += "/v2"
    return expected_host(config, config["scheme"] or "https", config["name"], config["port"], path, is_server)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(host_configs(), max_size=4, unique_by=config_url), st.none() | host_configs(), host_configs(with_url=False)
)
def test_generated_host_configs_round_trip(
    mirrors: list[dict[str, Any]], server: dict[str, Any] | None, upstream_settings: dict[str, Any]
) -> None:
    top_level = server or {**upstream_settings, "capabilities": None}
    lines = [f'server = "{config_url(server)}"'] if server else []
    lines += [*config_lines(top_level), "[header]", *header_lines(top_level)]
    for mirror in mirrors:
        url = json.dumps(config_url(mirror))
        lines += [f"[host.{url}]", *config_lines(mirror), f"[host.{url}.header]", *header_lines(mirror)]
    expected_mirrors = tuple(expected_url_host(mirror, False) for mirror in mirrors)
    if server:
        expected_server = expected_url_host(server, True)
    else:
        expected_server = expected_host(top_level, "https", "registry.example", None, "/v2", True)
    assert hosts_for("\n".join(lines) + "\n") == (*expected_mirrors, expected_server)


# ocigate's own key: who authenticates to the registry's own host


def test_authentication_is_the_gateways_unless_the_rule_says_client(tmp_path: Path) -> None:
    write_hosts(tmp_path, "gateway.test", 'server = "https://gateway.test"\n[host."https://m.test"]\n')
    write_hosts(tmp_path, "client.test", 'authentication = "client"\n[host."https://m.test"]\n')
    write_hosts(tmp_path, "explicit.test", 'authentication = "gateway"\n[host."https://m.test"]\n')
    rules = load_rules(tmp_path)
    assert not rules.lookup("gateway.test").client_authenticates
    assert rules.lookup("client.test").client_authenticates
    assert not rules.lookup("explicit.test").client_authenticates


def test_a_directory_saying_only_who_authenticates_is_a_rule(tmp_path: Path) -> None:
    # ocigate injecting its credentials for a registry it does not re-route is a rule of its own.
    write_hosts(tmp_path, "registry.example", 'authentication = "gateway"\n')
    rule = load_rules(tmp_path).lookup("registry.example")
    assert rule is not None and urls(rule.hosts) == ["https://registry.example/v2"]


@pytest.mark.parametrize("value", ['"Client"', '"none"', "true", "1", '["client"]'])
def test_authentication_other_than_gateway_or_client_is_refused_naming_the_key(tmp_path: Path, value: str) -> None:
    path = write_hosts(tmp_path, "registry.example", f"authentication = {value}\n")
    with pytest.raises(RulesError) as raised:
        load_rules(tmp_path)
    assert raised.value.path == path and raised.value.key == "authentication"
    assert 'expected "gateway" or "client"' in raised.value.problem


def test_authentication_is_a_rule_setting_not_a_host_setting(tmp_path: Path) -> None:
    write_hosts(tmp_path, "registry.example", '[host."https://m.test"]\nauthentication = "client"\n')
    with pytest.raises(RulesError, match="unknown key"):
        load_rules(tmp_path)


# ocigate's `offline` and containers-registries.conf's `pull_from_mirror`


def test_offline_contacts_only_the_mirrors_whatever_server_says(tmp_path: Path) -> None:
    write_hosts(tmp_path, "a.example", 'offline = true\nserver = "https://a.example"\n[host."https://m.test"]\n')
    write_hosts(tmp_path, "b.example", 'offline = true\n[host."https://m.test"]\n[host."https://n.test"]\n')
    rules = load_rules(tmp_path)
    assert urls(rules.lookup("a.example").hosts) == ["https://m.test/v2"]
    assert urls(rules.lookup("b.example").hosts) == ["https://m.test/v2", "https://n.test/v2"]


def test_offline_without_a_mirror_is_refused(tmp_path: Path) -> None:
    path = write_hosts(tmp_path, "a.example", 'offline = true\nserver = "https://a.example"\n')
    with pytest.raises(RulesError) as raised:
        load_rules(tmp_path)
    assert (raised.value.path, raised.value.key) == (path, "offline")
    assert "no host could ever be contacted" in raised.value.problem


def test_pull_from_mirror_is_read_per_mirror_and_defaults_to_all(tmp_path: Path) -> None:
    write_hosts(
        tmp_path,
        "a.example",
        '[host."https://d.test"]\npull_from_mirror = "digest-only"\n'
        '[host."https://t.test"]\npull_from_mirror = "tag-only"\n[host."https://all.test"]\n',
    )
    hosts = load_rules(tmp_path).lookup("a.example").hosts
    assert [h.pull_from_mirror for h in hosts] == ["digest-only", "tag-only", "all", "all"]


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[host."https://d.test"]\npull_from_mirror = "digest"\n', 'host."https://d.test".pull_from_mirror'),
        ('pull_from_mirror = "all"\n[host."https://d.test"]\n', "pull_from_mirror"),
    ],
)
def test_pull_from_mirror_other_than_its_values_or_outside_a_mirror_is_refused(
    tmp_path: Path, text: str, key: str
) -> None:
    write_hosts(tmp_path, "a.example", text)
    with pytest.raises(RulesError) as raised:
        load_rules(tmp_path)
    assert raised.value.key == key


def test_a_mirrors_repository_prefix_is_read_and_checked(tmp_path: Path) -> None:
    write_hosts(tmp_path, "docker.io", '[host."https://harbor.test"]\nrepository_prefix = "/dockerhub-proxy/"\n')
    assert load_rules(tmp_path).lookup("docker.io").hosts[0].repository_prefix == "dockerhub-proxy"
    write_hosts(tmp_path, "docker.io", '[host."https://harbor.test"]\nrepository_prefix = "Not Valid"\n')
    with pytest.raises(RulesError) as raised:
        load_rules(tmp_path)
    assert raised.value.key == 'host."https://harbor.test".repository_prefix'
    assert "not a repository path" in raised.value.problem


@pytest.mark.parametrize("value", [" s3cret-a", "s3cret-b ", "s3cret-c\x01", "s3cret-d\x7f"])
def test_a_header_value_http_does_not_allow_is_refused_without_showing_it(tmp_path: Path, value: str) -> None:
    escaped = "".join(c if " " <= c < "\x7f" else f"\\u{ord(c):04x}" for c in value)  # TOML's escapes
    write_hosts(tmp_path, "registry.example", f'[header]\nAuthorization = "{escaped}"\n')
    with pytest.raises(RulesError) as raised:
        load_rules(tmp_path)
    assert raised.value.key == "header.Authorization"
    assert "characters HTTP does not allow" in raised.value.problem and value.strip() not in str(raised.value)


def test_a_tree_mounted_from_a_kubernetes_config_map_is_read_past_its_hidden_entries(tmp_path: Path) -> None:
    # What the kubelet writes for a ConfigMap volume: the files under a timestamped directory, `..data` linking to
    # it, and each key's path linking through `..data`.
    stamped = tmp_path / "..2026_12_02_11_00_00.000000001"
    (stamped / "upstream.test").mkdir(parents=True)
    (stamped / "upstream.test" / "hosts.toml").write_text('[host."https://mirror.test"]\n')
    (tmp_path / "..data").symlink_to(stamped.name)
    (tmp_path / "upstream.test").symlink_to("..data/upstream.test")
    assert urls(rules.load_rules(tmp_path).lookup("upstream.test").hosts)[0] == "https://mirror.test/v2"
    assert rules.check_rules(tmp_path)[1] == []
