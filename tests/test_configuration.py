"""The addon that owns ocigate's options: the settings and the services built from them, replaced whole when an option
that makes them changes, and left in force when a value is refused."""

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from mitmproxy import connection, exceptions
from mitmproxy.proxy import server_hooks
from mitmproxy.test import taddons, tflow

from ocigate.configuration import Configuration, Shared
from ocigate.dialing import Dialing
from ocigate.hosttls import HostTLS
from tests.test_addon import write_rules

MIRROR = "https://mirror.test/v2"


@contextmanager
def configured(tmp_path: Path) -> Iterator[tuple[Shared, Dialing, Configuration, taddons.context]]:
    rules = write_rules(tmp_path / "rules", "upstream.test", '[host."https://mirror.test"]\n')
    shared = Shared()
    dialing, configuration = Dialing(shared), Configuration(shared)
    with taddons.context(dialing, configuration) as tctx:
        tctx.configure(
            configuration,
            ocigate_rules=str(rules),
            ocigate_map_hosts=["mirror.test=127.0.0.2"],
            ocigate_credential_sources=[],
            ocigate_cooldown=30,
        )
        yield shared, dialing, configuration, tctx


async def dialled(dialing: Dialing, host: str) -> tuple[str, int] | None:
    server = connection.Server(address=(host, 443))
    await dialing.server_connect(server_hooks.ServerConnectionHookData(server, tflow.tclient_conn()))
    return server.address


async def test_a_changed_cooldown_swaps_in_new_services_that_keep_what_was_learned(tmp_path: Path) -> None:
    with configured(tmp_path) as (shared, _, configuration, tctx):
        before = shared.services
        shared.health.unreachable(MIRROR, "connection refused")
        tctx.configure(configuration, ocigate_cooldown=5)
        assert shared.services is not before
        assert shared.settings.cooldown == 5 and shared.health.cooldown == 5
        assert before.health.cooldown == 30
        assert shared.broker.hostclient is shared.hostclient and shared.asker.health is shared.health
        # What the gateway learned of hosts, pulls and tokens outlives an option that says nothing of them.
        assert shared.health.skipped(MIRROR)
        assert shared.contexts is before.contexts and shared.broker.tokens is before.broker.tokens
        assert shared.rules is before.rules


async def test_changed_credentials_or_rules_forget_the_tokens_and_a_rules_change_reads_them_again(
    tmp_path: Path,
) -> None:
    with configured(tmp_path) as (shared, _, configuration, tctx):
        before = shared.services
        tctx.configure(configuration, ocigate_credential_sources=["ocigate"])
        assert shared.broker.tokens is not before.broker.tokens and shared.rules is before.rules
        again = shared.services
        tctx.configure(configuration, ocigate_rules=tctx.options.ocigate_rules)
        assert shared.rules is not again.rules and shared.broker.tokens is not again.broker.tokens
        assert shared.contexts is before.contexts


async def test_an_option_beside_the_rules_does_not_read_them_again(tmp_path: Path) -> None:
    with configured(tmp_path) as (shared, _, configuration, tctx):
        (Path(tctx.options.ocigate_rules) / "upstream.test" / "hosts.toml").write_text("capabilities = 1\n")
        tctx.configure(configuration, ocigate_read_timeout=61)
        assert shared.upstream_rule("upstream.test", 443, "https") is not None


async def test_dialing_follows_the_host_map_of_the_settings_in_force(tmp_path: Path) -> None:
    with configured(tmp_path) as (_, dialing, configuration, tctx):
        assert await dialled(dialing, "mirror.test") == ("127.0.0.2", 443)
        tctx.configure(configuration, ocigate_map_hosts=["mirror.test=127.0.0.3"])
        assert await dialled(dialing, "mirror.test") == ("127.0.0.3", 443)


async def test_a_refused_value_leaves_the_settings_and_services_in_force(tmp_path: Path) -> None:
    with configured(tmp_path) as (shared, dialing, configuration, tctx):
        services, settings = shared.services, shared.settings
        shared.health.unreachable(MIRROR, "connection refused")
        with pytest.raises(exceptions.OptionsError, match=r"^ocigate_cooldown "):
            tctx.configure(configuration, ocigate_cooldown=-1)
        with pytest.raises(exceptions.OptionsError, match=r"^ocigate_map_hosts "):
            tctx.configure(configuration, ocigate_map_hosts=["mirror.test"])
        assert tctx.options.ocigate_cooldown == 30
        assert shared.services is services and shared.settings == settings
        assert shared.health.skipped(MIRROR)
        assert await dialled(dialing, "mirror.test") == ("127.0.0.2", 443)


async def test_broken_rules_set_later_leave_the_rules_in_force(tmp_path: Path) -> None:
    with configured(tmp_path) as (shared, _, configuration, tctx):
        broken = write_rules(tmp_path / "broken", "upstream.test", '[host."https://mirror.test"]\ncapabilities = 1\n')
        with pytest.raises(exceptions.OptionsError, match=r"^ocigate_rules: "):
            tctx.configure(configuration, ocigate_rules=str(broken))
        assert shared.upstream_rule("upstream.test", 443, "https") is not None
        assert shared.settings.rules == tmp_path / "rules"


async def test_what_only_the_gateway_reads_keeps_the_services_and_what_they_learned(tmp_path: Path) -> None:
    with configured(tmp_path) as (shared, _, configuration, tctx):
        services = shared.services
        shared.health.unreachable(MIRROR, "connection refused")
        tctx.configure(configuration, ocigate_named_ref_headers=["X-Ref"], ocigate_intercept_unruled=True)
        tctx.configure(configuration, ocigate_cooldown=30)  # set again, to what it was
        assert shared.settings.named_ref_headers == ("X-Ref",) and shared.settings.intercept_unruled
        assert shared.services is services and shared.health.skipped(MIRROR)


async def test_setting_the_rules_again_reads_them_again(tmp_path: Path) -> None:
    with configured(tmp_path) as (shared, _, configuration, tctx):
        write_rules(tmp_path / "rules", "other.test", '[host."https://mirror.test"]\n')
        assert shared.upstream_rule("other.test", 443, "https") is None
        tctx.configure(configuration, ocigate_rules=str(tmp_path / "rules"))
        assert shared.upstream_rule("other.test", 443, "https") is not None


async def test_the_host_client_replaced_closes_its_clients_once_the_requests_under_way_are_done(
    tmp_path: Path,
) -> None:
    with configured(tmp_path) as (shared, _, configuration, tctx):
        old = shared.hostclient
        under_way = old.clients.hold(shared.rules.lookup("upstream.test").hosts[0], HostTLS())
        tctx.configure(configuration, ocigate_connect_timeout=5)
        assert shared.hostclient is not old and shared.hostclient.connect_timeout == 5
        await asyncio.sleep(0)
        assert not under_way.is_closed
        old.clients.release(under_way)
        await asyncio.sleep(0)
        assert under_way.is_closed


async def test_when_the_gateway_stops_a_replaced_host_client_still_in_use_closes_too(tmp_path: Path) -> None:
    with configured(tmp_path) as (shared, _, configuration, tctx):
        old = shared.hostclient
        under_way = old.clients.hold(shared.rules.lookup("upstream.test").hosts[0], HostTLS())
        tctx.configure(configuration, ocigate_connect_timeout=5)
        current = shared.hostclient.clients.hold(shared.rules.lookup("upstream.test").hosts[0], HostTLS())
        await shared.aclose()
    assert under_way.is_closed and current.is_closed


async def test_a_policy_read_again_is_swapped_in_with_everything_else_kept(tmp_path: Path) -> None:
    from ocigate.policy import Policy

    with configured(tmp_path) as (shared, _, configuration, _):
        before = shared.services
        new = Policy(source=tmp_path / "policy.toml", users={})
        configuration._policy_changed(Policy(), new)  # another policy was in force meanwhile: nothing changes
        assert shared.services is before
        configuration._policy_changed(before.policy, new)
        assert shared.services.policy is new
        assert (shared.rules, shared.health, shared.broker) == (before.rules, before.health, before.broker)
