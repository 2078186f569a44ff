"""The policy in the gateway (mitmproxy's test harness): a refused request gets 403 DENIED naming the rule, no host
hears of it and no credential is looked up; refusals and pushes are audit lines and in the flow's record."""

import asyncio
import json
import logging
import socket
from pathlib import Path

import pytest
from mitmproxy import connection, exceptions
from mitmproxy.addons.proxyauth import ProxyAuth
from mitmproxy.proxy import server_hooks
from mitmproxy.test import taddons, tflow

from ocigate.addon import METADATA_KEY
from ocigate.configuration import Configuration, Shared
from ocigate.credentials import CredentialChain
from ocigate.destinations import Local, LocalAddresses, local_networks
from ocigate.dialing import Dialing
from ocigate.policy import POLICY_FILE
from tests.support.http_host import http_host
from tests.support.registry import free_port
from tests.test_addon import flow_to, gateway, write_rules

POLICY = """
[user.alice]
pull = ["upstream.test/team"]
push = ["upstream.test/team/app"]

[user.bob]
pull = ["upstream.test/public"]
"""


def as_user(flow, user: str | None):
    if user is not None:
        # What mitmproxy's proxyauth keeps for an authenticated client: (user, password).
        flow.metadata["proxyauth"] = (user, "proxy-password")
    return flow


def ruled(tmp_path: Path, port: int) -> Path:
    rules = write_rules(tmp_path, "upstream.test", f'[host."http://mirror.test:{port}"]\n')
    (rules / POLICY_FILE).write_text(POLICY)
    return rules


@pytest.fixture
def no_credential_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    async def refuse(*args: object) -> None:
        raise AssertionError("a credential was looked up")

    monkeypatch.setattr(CredentialChain, "lookup", refuse)


@pytest.mark.usefixtures("no_credential_lookup")
@pytest.mark.parametrize("user", ["bob", "carol", None])
async def test_a_refused_pull_is_403_denied_naming_the_rule_and_no_host_hears_of_it(
    tmp_path: Path, user: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        http_host(lambda h: (200, b"{}")) as (port, seen),
        gateway(ruled(tmp_path, port), ["mirror.test=127.0.0.1"]) as (
            gw,
            _,
        ),
    ):
        flow = as_user(flow_to("upstream.test", "/v2/team/app/manifests/v1"), user)
        with caplog.at_level(logging.INFO):
            await gw.requestheaders(flow)
    assert flow.response.status_code == 403 and seen == []
    error = json.loads(flow.response.content)["errors"][0]
    assert error["code"] == "DENIED" and f"{tmp_path / POLICY_FILE}: user" in error["message"]
    record = flow.metadata[METADATA_KEY]
    assert record["policy"].startswith("refused by ") and record["error"] == error["message"]
    assert (record["route"], record["repository"], record["reference"]) == ("manifest", "team/app", "v1")
    assert "policy refused by" in flow.comment
    audits = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ocigate audit:")]
    assert len(audits) == 1 and "GET upstream.test/team/app:v1 manifest: refused by" in audits[0]
    assert "proxy-password" not in audits[0]
    who = f"proxy user {user!r}" if user else "client "
    assert audits[0].startswith(f"ocigate audit: {who}")


async def test_an_allowed_pull_goes_to_the_host_without_an_audit_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        http_host(lambda h: (200, b"{}")) as (port, seen),
        gateway(ruled(tmp_path, port), ["mirror.test=127.0.0.1"]) as (
            gw,
            _,
        ),
    ):
        flow = as_user(flow_to("upstream.test", "/v2/team/app/manifests/v1"), "alice")
        with caplog.at_level(logging.INFO):
            await gw.requestheaders(flow)
    assert flow.response.status_code == 200 and len(seen) == 1
    assert "policy" not in flow.metadata[METADATA_KEY]
    assert not [r for r in caplog.records if r.getMessage().startswith("ocigate audit:")]


async def test_a_push_is_an_audit_line_and_in_the_record_and_needs_push_rights(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        http_host(lambda h: (202, b"")) as (port, _),
        gateway(ruled(tmp_path, port), ["mirror.test=127.0.0.1"]) as (
            gw,
            _,
        ),
    ):
        allowed = as_user(flow_to("upstream.test", "/v2/team/app/blobs/uploads/", method="POST"), "alice")
        refused = as_user(flow_to("upstream.test", "/v2/team/lib/blobs/uploads/", method="POST"), "alice")
        with caplog.at_level(logging.INFO):
            await gw.requestheaders(allowed)
            await gw.requestheaders(refused)
    # The allowed push is streamed to the host (re-pointed, not answered); the other never leaves.
    assert allowed.response is None and allowed.request.host == "mirror.test"
    assert allowed.metadata[METADATA_KEY]["policy"].startswith("allowed by ")
    assert refused.response.status_code == 403 and "user.alice.push" in refused.response.text
    audits = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ocigate audit:")]
    assert len(audits) == 2
    assert "POST upstream.test/team/app blob_upload: allowed by" in audits[0]
    assert "user.alice.push[0] 'upstream.test/team/app'" in audits[0]
    assert "POST upstream.test/team/lib blob_upload: refused by" in audits[1]


async def test_the_ping_is_answered_to_anyone_and_other_paths_only_to_users_of_the_upstream(tmp_path: Path) -> None:
    with gateway(ruled(tmp_path, 9)) as (gw, _):
        ping = flow_to("upstream.test", "/v2/")
        await gw.requestheaders(ping)
        token = flow_to("upstream.test", "/v2/token?scope=x")
        await gw.requestheaders(token)
        known = as_user(flow_to("upstream.test", "/v2/token?scope=x"), "bob")
        await gw.requestheaders(known)
    assert ping.response.status_code == 200
    assert token.response.status_code == 403 and "did not authenticate" in token.response.text
    # Passes untouched to the registry, as without a policy.
    assert known.response is None and known.request.host == "upstream.test"


def test_a_bad_policy_refuses_configuration_naming_the_option_the_file_and_the_key(tmp_path: Path) -> None:
    rules = ruled(tmp_path, 9)
    (rules / POLICY_FILE).write_text('[user.alice]\npull = ["upstream.test/Team"]\n')
    with (
        pytest.raises(exceptions.OptionsError, match=r"ocigate_rules: .*policy\.toml: user\.alice\.pull\[0\]"),
        gateway(rules),
    ):
        pass


async def test_a_client_asking_a_mirror_directly_is_refused_where_a_policy_restricts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with http_host(lambda h: (200, b"{}")) as (port, seen):
        rules = ruled(tmp_path, port)
        with gateway(rules, ["mirror.test=127.0.0.1"]) as (gw, _):
            connect = as_user(flow_to("mirror.test", "/", method="CONNECT", port=port), "alice")
            with caplog.at_level(logging.INFO):
                gw.http_connect(connect)
            plain = as_user(flow_to("mirror.test", "/v2/team/secret/manifests/v1", port=port), "alice")
            plain.request.scheme = "http"
            await gw.requestheaders(plain)
            elsewhere = flow_to("other.test", "/", method="CONNECT")
            gw.http_connect(elsewhere)
            upstream = flow_to("upstream.test", "/", method="CONNECT")
            gw.http_connect(upstream)
        (rules / POLICY_FILE).unlink()
        with gateway(rules, ["mirror.test=127.0.0.1"]) as (gw, _):
            open_gateway = flow_to("mirror.test", "/", method="CONNECT", port=port)
            gw.http_connect(open_gateway)
    for refused in (connect, plain):
        assert refused.response is not None and refused.response.status_code == 403
        assert "a mirror of the rules" in json.loads(refused.response.content)["errors"][0]["message"]
    assert seen == []
    assert elsewhere.response is None and upstream.response is None and open_gateway.response is None
    assert any(r.getMessage().startswith("ocigate audit: proxy user 'alice'") for r in caplog.records)


def _connection_to(host: str, port: int) -> server_hooks.ServerConnectionHookData:
    return server_hooks.ServerConnectionHookData(connection.Server(address=(host, port)), tflow.tclient_conn())


async def test_a_connection_dialling_a_mirror_by_its_address_or_another_name_is_refused_and_audited(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    rules = ruled(tmp_path, port)
    # The ruled upstream dials the mirror's address too: its requests are decided by name, one by one.
    host_map = ["mirror.test=127.0.0.1", "alias.test=127.0.0.1", f"upstream.test:443=127.0.0.1:{port}"]
    with gateway(rules, host_map) as (gw, _):
        dialing = Dialing(gw.shared)
        by_address, by_alias = _connection_to("127.0.0.1", port), _connection_to("alias.test", port)
        other_port, other_loopback = _connection_to("127.0.0.1", free_port()), _connection_to("127.0.0.2", port)
        upstream = _connection_to("upstream.test", 443)
        repointed = _connection_to("mirror.test", port)
        gw.shared.repointed[repointed.client.id] = {("mirror.test", port): next(gw.shared.rules.rules()).hosts[0]}
        with caplog.at_level(logging.INFO):
            for data in (by_address, by_alias, other_loopback, other_port, upstream, repointed):
                await dialing.server_connect(data)
        (rules / POLICY_FILE).unlink()
    with gateway(rules, host_map) as (gw, _):
        open_gateway = _connection_to("127.0.0.1", port)
        await Dialing(gw.shared).server_connect(open_gateway)
    for refused, asked in ((by_address, "127.0.0.1"), (by_alias, "alias.test"), (other_loopback, "127.0.0.2")):
        assert refused.server.error is not None
        assert f"{asked}:{port} dials mirror.test:{port}, a mirror of the rules" in refused.server.error
    for allowed in (other_port, upstream, repointed, open_gateway):
        assert allowed.server.error is None
    audits = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ocigate audit:")]
    assert len(audits) == 3
    peer = by_address.client.peername
    assert audits[0].startswith(f"ocigate audit: client {peer[0]}:{peer[1]} connection to 127.0.0.1:{port}: refused")
    assert f"mirror.test:{port}" in audits[0]


async def test_an_audit_line_quotes_the_clients_path_and_stays_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    forged = "/v2/token\nocigate audit: proxy user 'alice' GET upstream.test/team/app: allowed\x1b[2K"
    with gateway(ruled(tmp_path, 9)) as (gw, _), caplog.at_level(logging.INFO):
        flow = as_user(flow_to("upstream.test", forged), "carol")
        await gw.requestheaders(flow)
    assert flow.response is not None and flow.response.status_code == 403
    (audit,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ocigate audit:")]
    assert "\n" not in audit and "\x1b" not in audit
    assert f"upstream.test {forged!r}: refused by" in audit


@pytest.mark.parametrize(
    ("proxyauth", "policy", "warned"), [("any", POLICY, True), ("any", "", False), ("", POLICY, False)]
)
async def test_proxyauth_any_with_per_user_rules_is_warned_of_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, proxyauth: str, policy: str, warned: bool
) -> None:
    rules = write_rules(tmp_path, "upstream.test", '[host."http://mirror.test:5000"]\n')
    (rules / POLICY_FILE).write_text(policy)
    shared = Shared()
    configuration = Configuration(shared)
    with taddons.context(ProxyAuth(), configuration) as tctx, caplog.at_level(logging.INFO):
        tctx.options.update(proxyauth=proxyauth)
        tctx.configure(configuration, ocigate_rules=str(rules), ocigate_credential_sources=[])
        configuration.running()
        await configuration.done()
    warnings = [r.getMessage() for r in caplog.records if "proxyauth=any accepts any user name" in r.getMessage()]
    assert len(warnings) == (1 if warned else 0)
    if warned:
        assert str(rules / POLICY_FILE) in warnings[0]


async def test_a_name_is_checked_by_the_address_it_is_dialled_at(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A name of the client's that the resolver answers with a harmless address, then (rebound) with a mirror's: the
    connection is dialled at the address checked, so the second answer never reaches the dialler; asked again, the
    name is refused."""
    port = free_port()
    answers = ["10.0.0.7", "127.0.0.1"]
    resolved: list[str] = []

    async def getaddrinfo(host: str, port: int, **kwargs: object) -> list:
        resolved.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answers.pop(0), port))]

    with gateway(ruled(tmp_path, port), ["mirror.test=127.0.0.1"]) as (gw, tctx):
        tctx.options.update(ocigate_dns=True, ocigate_allow_destinations=[])
        monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", getaddrinfo)
        dialing = Dialing(gw.shared)
        checked, rebound = _connection_to("rebind.example", port), _connection_to("rebind.example", port)
        await dialing.server_connect(checked)
        await dialing.server_connect(rebound)
        (tmp_path / POLICY_FILE).unlink()
        tctx.options.update(ocigate_rules=str(tmp_path))  # read again: no policy
        unguarded = _connection_to("rebind.example", port)
        await dialing.server_connect(unguarded)
    # Dialled by the address it was checked at: what the resolver answers next is not asked.
    assert checked.server.error is None and checked.server.address == ("10.0.0.7", port)
    assert rebound.server.error is not None and f"dials mirror.test:{port}" in rebound.server.error
    # Without a policy a name is left to mitmproxy to resolve, as before.
    assert unguarded.server.error is None and unguarded.server.address == ("rebind.example", port)
    assert resolved == ["rebind.example", "rebind.example"]


async def test_another_local_address_of_a_mirror_on_the_gateways_host_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A mirror the rules name at a loopback address answers at every one of them, and 0.0.0.0 or :: dials the local
    host: with no allow-list to stop them, all are refused; another port of the local host and another host are
    not, and the gateway's own re-pointed connection to the mirror never is."""
    port, other_port = free_port(), free_port()
    rules = ruled(tmp_path, port)
    with gateway(rules, ["mirror.test=127.0.0.1"]) as (gw, tctx):
        tctx.options.update(ocigate_allow_destinations=[])
        dialing = Dialing(gw.shared)
        mirror_elsewhere = [("127.0.0.2", port), ("::1", port), ("::ffff:127.0.0.1", port)]
        local_host = [("0.0.0.0", other_port), ("::", port), ("::ffff:0.0.0.0", other_port)]
        refused = [_connection_to(host, p) for host, p in (*mirror_elsewhere, *local_host)]
        allowed = [_connection_to("127.0.0.2", other_port), _connection_to("10.0.0.7", port)]
        repointed = _connection_to("mirror.test", port)
        gw.shared.repointed[repointed.client.id] = {("mirror.test", port): next(gw.shared.rules.rules()).hosts[0]}
        with caplog.at_level(logging.INFO):
            for data in (*refused, *allowed, repointed):
                await dialing.server_connect(data)
    for data in refused:
        assert data.server.error is not None and "ocigate refused the connection" in data.server.error
    for data in refused[:3]:
        assert f"dials mirror.test:{port}, a mirror of the rules" in data.server.error
    for data in refused[3:]:
        assert "the gateway's own host" in data.server.error
    for data in (*allowed, repointed):
        assert data.server.error is None
    audits = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ocigate audit:")]
    assert len(audits) == len(refused)


async def test_a_mirror_at_one_of_the_gateways_own_addresses_is_refused_at_loopback_and_its_other_addresses(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A mirror named at 10.123.0.1, here the gateway's own host's address, listening on every address, answers at
    127.0.0.1 and the host's other addresses too: refused there; another host of its network is not."""
    port = free_port()
    rules = ruled(tmp_path, port)
    own = Local(local_networks("|-- 10.123.0.1\n   /32 host LOCAL\n|-- 10.123.0.9\n   /32 host LOCAL\n", ""))
    with gateway(rules, ["mirror.test=10.123.0.1"]) as (gw, tctx):
        tctx.options.update(ocigate_allow_destinations=[])
        dialing = Dialing(gw.shared, LocalAddresses(lambda: own))
        refused = [_connection_to(host, port) for host in ("127.0.0.1", "::1", "10.123.0.9", "10.123.0.1")]
        allowed = [_connection_to("10.123.0.2", port), _connection_to("127.0.0.1", free_port())]
        with caplog.at_level(logging.INFO):
            for data in (*refused, *allowed):
                await dialing.server_connect(data)
    for data in refused:
        assert data.server.error is not None and f"dials mirror.test:{port}, a mirror of the rules" in data.server.error
    for data in allowed:
        assert data.server.error is None
    audits = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ocigate audit:")]
    assert len(audits) == len(refused)


async def test_while_the_gateways_own_addresses_are_unknown_any_address_at_a_mirrors_port_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    rules = ruled(tmp_path, port)
    unknown = Local(known=False, why="cannot read the box's own addresses from /proc/net/fib_trie: gone")
    with gateway(rules, ["mirror.test=10.0.0.7"]) as (gw, tctx):
        tctx.options.update(ocigate_allow_destinations=[])
        dialing = Dialing(gw.shared, LocalAddresses(lambda: unknown))
        anywhere, other_port = _connection_to("192.0.2.9", port), _connection_to("192.0.2.9", free_port())
        again = _connection_to("127.0.0.1", port)
        with caplog.at_level(logging.INFO):
            for data in (anywhere, other_port, again):
                await dialing.server_connect(data)
    assert anywhere.server.error is not None and again.server.error is not None
    assert other_port.server.error is None
    # Said once, not at every connection.
    warned = [r.getMessage() for r in caplog.records if "cannot read the box's own addresses" in r.getMessage()]
    assert len(warned) == 1 and "is refused" in warned[0]


def _resolver(answers: dict[str, str], barrier: asyncio.Barrier | None = None):
    """A getaddrinfo that answers `answers` (name: address) and fails for other names; with `barrier`, each lookup
    waits for the barrier's other parties, which only lookups made together reach."""
    asked: list[str] = []

    async def getaddrinfo(host: str, port: int, **kwargs: object) -> list:
        asked.append(host)
        if barrier is not None:
            await barrier.wait()
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answers[host], port))]

    return getaddrinfo, asked


async def test_while_a_mirrors_address_is_unknown_guarded_connections_are_refused_and_audited(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    rules = write_rules(tmp_path, "upstream.test", '[host."http://mirror.example:5000"]\n')
    (rules / POLICY_FILE).write_text(POLICY)
    answers: dict[str, str] = {}
    getaddrinfo, asked = _resolver(answers)
    with gateway(rules) as (gw, tctx):
        tctx.options.update(ocigate_dns=True, ocigate_allow_destinations=[])
        monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", getaddrinfo)
        dialing = Dialing(gw.shared)
        while_unknown = _connection_to("10.0.0.7", 443)
        with caplog.at_level(logging.INFO):
            await dialing.server_connect(while_unknown)
        answers["mirror.example"] = "10.9.9.9"  # the resolver answers again
        once_known = _connection_to("10.0.0.7", 443)
        await dialing.server_connect(once_known)
    assert while_unknown.server.error is not None
    assert "mirror.example:5000, a mirror of the rules whose address is unknown" in while_unknown.server.error
    (audit,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ocigate audit:")]
    assert "connection to 10.0.0.7:443: refused" in audit and "whose address is unknown" in audit
    # The failure was not remembered: asked again, and answered.
    assert once_known.server.error is None and asked == ["mirror.example", "mirror.example"]


async def test_the_mirrors_are_resolved_together(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hosts = '[host."http://one.example:5000"]\n[host."http://two.example:5000"]\n'
    rules = write_rules(tmp_path, "upstream.test", hosts)
    (rules / POLICY_FILE).write_text(POLICY)
    # Each lookup waits for the other: one after the other, the first would wait for ever (failing at the guard).
    getaddrinfo, asked = _resolver({"one.example": "10.9.9.1", "two.example": "10.9.9.2"}, asyncio.Barrier(2))
    with gateway(rules) as (gw, tctx):
        tctx.options.update(ocigate_dns=True, ocigate_allow_destinations=[])
        monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", getaddrinfo)
        to_two = _connection_to("10.9.9.2", 5000)
        await asyncio.wait_for(Dialing(gw.shared).server_connect(to_two), 30)
    assert sorted(asked) == ["one.example", "two.example"]
    assert to_two.server.error is not None and "dials two.example:5000, a mirror of the rules" in to_two.server.error
