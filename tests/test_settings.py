"""ocigate's options parsed into Settings: the defaults, paths expanded, and every bad value refused naming its
option."""

import re
import string
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mitmproxy import exceptions
from mitmproxy.addonmanager import Loader
from mitmproxy.optmanager import OptManager
from mitmproxy.test import taddons

from ocigate.destinations import Destinations
from ocigate.settings import CREDENTIAL_SOURCES, STDERR, MetricsAddress, Settings, declare


def options(**values: object) -> OptManager:
    """mitmproxy's options with ocigate's declared beside them, and `values` set."""
    with taddons.context() as tctx:
        declare(Loader(tctx.master))
        tctx.options.update(**values)
        return tctx.options


def test_the_defaults_parse() -> None:
    assert Settings.parse(options()) == Settings(
        rules=None,
        named_ref_headers=("OCI-Named-Ref",),
        connect_timeout=30,
        read_timeout=60,
        cooldown=30,
        intercept_unruled=False,
        destinations=Destinations(),
        credential_sources=CREDENTIAL_SOURCES,
        credentials=Path.home() / ".ocigate" / "credentials.json",
        docker_config=None,
        containers_auth=None,
        kubernetes_secrets=None,
        credential_helper_timeout=10,
        upstream_trusted_ca=None,
        ssl_insecure=False,
    )


def test_paths_are_expanded_and_the_host_map_parsed() -> None:
    settings = Settings.parse(
        options(
            ocigate_rules="~/rules",
            ocigate_docker_config="~/docker",
            ocigate_containers_auth="/etc/containers/auth.json",
            ocigate_kubernetes_secrets="~/secrets",
            ssl_verify_upstream_trusted_ca="~/roots.pem",
            ocigate_map_hosts=["mirror.test:5000=127.0.0.1:4321"],
            ocigate_allow_destinations=["127.0.0.0/8"],
            ocigate_dns=False,
            ssl_insecure=True,
        )
    )
    home = Path.home()
    assert (settings.rules, settings.docker_config, settings.kubernetes_secrets) == (
        home / "rules",
        home / "docker",
        home / "secrets",
    )
    assert settings.containers_auth == Path("/etc/containers/auth.json")
    assert settings.upstream_trusted_ca == home / "roots.pem"
    assert settings.destinations == Destinations.from_options(
        ["mirror.test:5000=127.0.0.1:4321"], ["127.0.0.0/8"], dns=False
    )
    assert settings.ssl_insecure


def test_credential_sources_are_asked_once_each_in_the_order_first_named() -> None:
    settings = Settings.parse(options(ocigate_credential_sources=["docker", "ocigate", "docker"]))
    assert settings.credential_sources == ("docker", "ocigate")


def test_no_credential_source_is_anonymous_only() -> None:
    assert Settings.parse(options(ocigate_credential_sources=[])).credential_sources == ()
    # As `--set ocigate_credential_sources=` sets it (the README's way to say none).
    assert Settings.parse(options(ocigate_credential_sources=[""])).credential_sources == ()


def test_a_cooldown_of_0_is_no_cooldown() -> None:
    assert Settings.parse(options(ocigate_cooldown=0)).cooldown == 0


def test_no_drain_unless_asked() -> None:
    assert Settings.parse(options()).drain == 0
    assert Settings.parse(options(ocigate_drain=15)).drain == 15


def test_the_workers_affinity_is_by_connection_unless_by_client() -> None:
    assert Settings.parse(options()).worker_affinity == "connection"
    assert Settings.parse(options(ocigate_worker_affinity="client")).worker_affinity == "client"
    with pytest.raises(
        exceptions.OptionsError, match=r"^ocigate_worker_affinity: 'cpu' is not one of connection, client$"
    ):
        Settings.parse(options(ocigate_worker_affinity="cpu"))


def test_the_access_log_is_a_file_or_standard_error_or_none() -> None:
    assert Settings.parse(options(ocigate_access_log="~/access.log")).access_log == Path.home() / "access.log"
    assert Settings.parse(options(ocigate_access_log="-")).access_log == STDERR
    assert Settings.parse(options()).access_log is None


@pytest.mark.parametrize(
    ("value", "address"),
    [
        ("9090", MetricsAddress("127.0.0.1", 9090)),
        ("0", MetricsAddress("127.0.0.1", 0)),
        ("0.0.0.0:9090", MetricsAddress("0.0.0.0", 9090)),
        ("gateway.internal:9090", MetricsAddress("gateway.internal", 9090)),
        ("[::1]:9090", MetricsAddress("::1", 9090)),
        ("", None),
    ],
)
def test_metrics_listen_on_loopback_unless_a_host_is_written_out(value: str, address: MetricsAddress | None) -> None:
    assert Settings.parse(options(ocigate_metrics=value)).metrics == address


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (":9090", "is not HOST:PORT or PORT"),
        ("::1:9090", "is not HOST:PORT or PORT"),
        ("127.0.0.1", "is not HOST:PORT or PORT"),
        ("127.0.0.1:http", "has no port number"),
        ("127.0.0.1:65536", "has no port number"),
        ("99999", "has no port number"),
        ("a b:9090", "is not HOST:PORT or PORT"),
    ],
)
def test_a_metrics_address_that_is_not_one_is_refused_naming_the_option(value: str, message: str) -> None:
    with pytest.raises(exceptions.OptionsError, match=re.escape(f"ocigate_metrics: {value!r} {message}")):
        Settings.parse(options(ocigate_metrics=value))


def test_an_ipv6_metrics_address_is_shown_with_brackets() -> None:
    assert str(MetricsAddress("::1", 9090)) == "[::1]:9090"
    assert str(MetricsAddress("127.0.0.1", 9090)) == "127.0.0.1:9090"


BAD_VALUES = {
    "ocigate_connect_timeout": (0, "ocigate_connect_timeout must be a positive number of seconds"),
    "ocigate_read_timeout": (-1, "ocigate_read_timeout must be a positive number of seconds"),
    "ocigate_cooldown": (-1, "ocigate_cooldown must be 0 or a positive number of seconds"),
    "ocigate_credential_helper_timeout": (
        0,
        "ocigate_credential_helper_timeout must be a positive number of seconds",
    ),
    "ocigate_credential_sources": (
        ["ocigate", "vault"],
        "ocigate_credential_sources: unknown source 'vault' (expected ocigate, docker, containers, kubernetes)",
    ),
    "ocigate_named_ref_headers": (["OCI Named Ref"], "ocigate_named_ref_headers: 'OCI Named Ref' is not a header name"),
    "ocigate_map_hosts": (
        ["mirror.test"],
        "ocigate_map_hosts entry 'mirror.test': expected NAME[:PORT]=ADDRESS[:PORT]",
    ),
    "ocigate_allow_destinations": (["10.0.0.0/33"], "ocigate_allow_destinations entry '10.0.0.0/33': "),
    "ocigate_metrics": (":9090", "ocigate_metrics: ':9090' is not HOST:PORT or PORT"),
    "ocigate_drain": (-1, "ocigate_drain must be 0 or a positive number of seconds"),
}


@pytest.mark.parametrize("name", list(BAD_VALUES))
def test_a_bad_value_is_an_options_error_naming_its_option(name: str) -> None:
    value, message = BAD_VALUES[name]
    with pytest.raises(exceptions.OptionsError) as raised:
        Settings.parse(options(**{name: value}))
    assert str(raised.value).startswith(message)


HEADER_NAME_CHARACTERS = string.ascii_letters + string.digits + "-_"


@given(st.text(HEADER_NAME_CHARACTERS, min_size=1), st.text(HEADER_NAME_CHARACTERS, min_size=1))
def test_header_names_of_letters_digits_dashes_and_underscores_are_taken_as_given(first: str, second: str) -> None:
    settings = Settings.parse(options(ocigate_named_ref_headers=[first, second]))
    assert settings.named_ref_headers == (first, second)


@given(
    st.text(HEADER_NAME_CHARACTERS),
    st.sampled_from(" \t\r\n\x00:;,=/()\"'@[]{}?"),
    st.text(HEADER_NAME_CHARACTERS),
)
def test_a_header_name_with_anything_else_in_it_is_refused(before: str, other: str, after: str) -> None:
    with pytest.raises(exceptions.OptionsError, match=r"^ocigate_named_ref_headers: .* is not a header name$"):
        Settings.parse(options(ocigate_named_ref_headers=["OCI-Named-Ref", before + other + after]))


def test_an_empty_header_name_is_refused() -> None:
    with pytest.raises(exceptions.OptionsError) as raised:
        Settings.parse(options(ocigate_named_ref_headers=[""]))
    assert str(raised.value) == "ocigate_named_ref_headers: '' is not a header name"


def test_settings_are_frozen() -> None:
    settings = Settings.parse(options())
    with pytest.raises(AttributeError):
        settings.cooldown = 0  # type: ignore[misc]
