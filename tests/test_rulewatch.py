"""Rules that change live (rulewatch.py): what a look at the rules tree finds changed, and how each registry directory
keeps its last good rule while its file is broken. A clock far from the files' times makes every file settled, unless
a test is about a file changed just now."""

import asyncio
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from mitmproxy.test import taddons

from ocigate.configuration import Configuration, Shared
from ocigate.hoststoml import RuleSet, load_rules
from ocigate.rulewatch import (
    GONE,
    RACY_SECONDS,
    Reload,
    RulesTree,
    Seen,
    TreeScan,
    ready,
    scan_tree,
    settled,
    stamps,
    to_read,
)
from ocigate.services import with_rules
from tests.support.tls import make_ca
from tests.test_addon import flow_to, gateway

UPSTREAM = "upstream.test"
HOUR_NS = 3600 * 10**9


def later() -> int:
    """A clock an hour ahead of the files: whatever the tests wrote is settled."""
    return time.time_ns() + HOUR_NS


def write(root: Path, name: str, text: str) -> Path:
    (root / name).mkdir(parents=True, exist_ok=True)
    (root / name / "hosts.toml").write_text(text)
    return root


def mirror(host: str) -> str:
    return f'offline = true\n[host."http://{host}:5000"]\n'


def hosts(rules: RuleSet | None, upstream: str = UPSTREAM) -> list[str]:
    rule = rules.lookup(upstream) if rules else None
    return [host.url for host in rule.hosts] if rule else []


def tree(root: Path) -> RulesTree:
    """The tree of `root` as the gateway looks at it: the first look notes what each directory is, the second reads
    it and finds the rules in force."""
    watched = RulesTree(load_rules(root), clock=later)
    assert watched.look() == Reload(None) and watched.look() == Reload(None)
    return watched


def settle(watched: RulesTree) -> Reload:
    """Looks twice, as the gateway does after an edit: a directory changed since the last look is not read yet."""
    assert watched.look() == Reload(None)
    return watched.look()


# What is read again.

FILE = ("/rules/upstream.test/hosts.toml", (0o100644, 1, 7, 30, 10, 10))
NEWER = ("/rules/upstream.test/hosts.toml", (0o100644, 1, 7, 30, 20, 20))


def test_an_entry_that_appeared_changed_or_went_is_read_and_one_as_it_was_is_not() -> None:
    seen = {"same": Seen(frozenset({FILE}), frozenset(), True), "edited": Seen(frozenset({FILE}), frozenset(), True)}
    now = {"same": frozenset({FILE}), "edited": frozenset({NEWER}), "new": frozenset({FILE})}
    assert to_read(seen, now, {"same", "edited", "gone"}) == {"edited", "new", "gone"}


def test_a_changed_tls_file_makes_its_entry_read_again() -> None:
    ca = ("/certs/ca.pem", (0o100644, 1, 9, 500, 10, 10))
    edited_ca = ("/certs/ca.pem", (0o100644, 1, 9, 500, 10, 30))
    seen = {"a": Seen(frozenset({FILE}), frozenset({ca}), True)}
    assert to_read(seen, {"a": frozenset({FILE, ca})}, {"a"}) == set()
    assert to_read(seen, {"a": frozenset({FILE, edited_ca})}, {"a"}) == {"a"}


def test_an_entry_too_fresh_to_trust_is_read_again_though_it_looks_the_same() -> None:
    seen = {"a": Seen(frozenset({FILE}), frozenset(), settled=False)}
    assert to_read(seen, {"a": frozenset({FILE})}, {"a"}) == {"a"}


def test_a_stale_entry_is_read_once_two_looks_find_it_the_same_or_it_is_still_as_it_was_read() -> None:
    seen = {"fresh": Seen(frozenset({FILE}), frozenset(), settled=False)}
    now = {"fresh": frozenset({FILE}), "steady": frozenset({NEWER}), "writing": frozenset({NEWER})}
    pending = {"steady": frozenset({NEWER}), "writing": frozenset({FILE}), "gone": GONE}
    assert ready({"fresh", "steady", "writing", "gone"}, seen, now, pending) == {"fresh", "steady", "gone"}


def test_a_file_that_changes_between_every_two_looks_is_not_read(tmp_path: Path) -> None:
    root = write(tmp_path / "rules", UPSTREAM, mirror("a.test"))
    watched = tree(root)
    for host in ("b.test", "cc.test", "ddd.test"):  # a file of another size each time
        write(root, UPSTREAM, mirror(host))
        assert watched.look() == Reload(None)
    assert hosts(watched.look().rules) == ["http://ddd.test:5000/v2"]


def test_a_file_is_settled_once_its_times_are_older_than_the_racy_window() -> None:
    racy_ns = int(RACY_SECONDS * 1e9)
    stamp = ("/f", (0o100644, 1, 1, 1, 1_000, 5_000))
    assert not settled(frozenset({stamp}), 5_000 + racy_ns)
    assert settled(frozenset({stamp}), 5_001 + racy_ns)
    assert settled(frozenset({("/missing", "No such file or directory")}), 0)


def test_the_scan_lists_registry_directories_with_what_they_hold_and_skips_files_beside_them(tmp_path: Path) -> None:
    root = write(tmp_path / "rules", UPSTREAM, mirror("a.test"))
    (root / "README.md").write_text("not a rule")
    (root / "dangling").symlink_to(root / "nowhere")
    scan = scan_tree(root)
    assert set(scan.entries) == {UPSTREAM}
    assert {path for path, _ in scan.entries[UPSTREAM]} == {str(root / UPSTREAM), str(root / UPSTREAM / "hosts.toml")}
    (root / UPSTREAM / "ca.crt").write_text("")
    assert scan_tree(root).entries[UPSTREAM] != scan.entries[UPSTREAM]


def test_a_rewrite_in_place_changes_the_fingerprint(tmp_path: Path) -> None:
    path = tmp_path / "hosts.toml"
    path.write_text(mirror("a.test"))
    before = stamps([path])
    os.utime(path, ns=(1, 1))
    assert stamps([path]) != before


# Reading again, per registry directory.


def test_the_first_look_at_an_unchanged_tree_changes_nothing(tmp_path: Path) -> None:
    watched = tree(write(tmp_path / "rules", UPSTREAM, mirror("a.test")))
    rules = watched.rules
    assert watched.look().rules is None and watched.look().rules is None
    assert watched.rules is rules


def test_an_edited_hosts_toml_is_in_force_two_looks_later(tmp_path: Path) -> None:
    root = write(tmp_path / "rules", UPSTREAM, mirror("a.test"))
    watched = tree(root)
    write(root, UPSTREAM, mirror("b.test"))
    reload = settle(watched)
    assert hosts(reload.rules) == ["http://b.test:5000/v2"]
    assert reload.warnings == () and any("read again" in note and "b.test" in note for note in reload.notes)
    assert watched.look().rules is None


def test_an_added_and_a_removed_registry_directory_are_in_force_two_looks_later(tmp_path: Path) -> None:
    root = write(tmp_path / "rules", UPSTREAM, mirror("a.test"))
    watched = tree(root)
    write(root, "other.test", mirror("o.test"))
    assert hosts(settle(watched).rules, "other.test") == ["http://o.test:5000/v2"]
    (root / UPSTREAM / "hosts.toml").unlink()
    (root / UPSTREAM).rmdir()
    reload = settle(watched)
    assert reload.rules is not None and reload.rules.lookup(UPSTREAM) is None
    assert hosts(reload.rules, "other.test") == ["http://o.test:5000/v2"]


def test_a_broken_edit_keeps_the_last_good_rule_names_file_and_key_once_and_fixing_it_says_so(tmp_path: Path) -> None:
    root = write(tmp_path / "rules", UPSTREAM, mirror("a.test"))
    write(root, "other.test", mirror("o.test"))
    watched = tree(root)
    write(root, UPSTREAM, mirror("a.test") + 'capabilities = ["pul"]\n')
    write(root, "other.test", mirror("p.test"))
    broken = settle(watched)
    # The other registry's good edit is in force; the broken one's last good rule stays.
    assert hosts(broken.rules) == ["http://a.test:5000/v2"]
    assert hosts(broken.rules, "other.test") == ["http://p.test:5000/v2"]
    (warning,) = broken.warnings
    assert str(root / UPSTREAM / "hosts.toml") in warning
    assert 'host."http://a.test:5000".capabilities' in warning and "unknown capability 'pul'" in warning
    assert "its last good rule stays in force" in warning
    assert watched.look().warnings == ()
    write(root, UPSTREAM, mirror("a.test") + "capabilities = 1\n")
    (again,) = settle(watched).warnings
    assert "capabilities: expected an array" in again
    write(root, UPSTREAM, mirror("c.test"))
    fixed = settle(watched)
    assert hosts(fixed.rules) == ["http://c.test:5000/v2"] and fixed.warnings == ()
    assert f"{root / UPSTREAM}: fixed, in force again" in fixed.notes


def test_a_broken_file_read_again_while_it_is_fresh_is_named_only_once(tmp_path: Path) -> None:
    root = write(tmp_path / "rules", UPSTREAM, mirror("a.test"))
    watched = RulesTree(load_rules(root))  # the wall clock: the file just written is read at every look
    watched.look()
    write(root, UPSTREAM, "offline = 1\n")
    looks = [watched.look() for _ in range(4)]
    assert [len(look.warnings) for look in looks] == [0, 1, 0, 0]
    assert all(look.rules is None for look in looks) and hosts(watched.rules) == ["http://a.test:5000/v2"]


def test_a_new_broken_directory_has_no_rule_until_it_is_fixed(tmp_path: Path) -> None:
    root = write(tmp_path / "rules", UPSTREAM, mirror("a.test"))
    watched = tree(root)
    write(root, "new.test", "offline = yes\n")
    reload = settle(watched)
    assert reload.rules is None and watched.rules.lookup("new.test") is None
    (warning,) = reload.warnings
    assert "new.test/hosts.toml" in warning and "it has no rule" in warning
    (root / "example.test").mkdir()
    (root / "example.test" / "hosts.toml.example").write_text(mirror("e.test"))
    # A directory holding an example only: no rule, as at start (and _default, if any, no longer serves it).
    assert hosts(settle(watched).rules, "example.test") == []
    write(root, "example.test", "offline = yes\n")
    (example,) = settle(watched).warnings
    assert "example.test/hosts.toml" in example and "it has no rule" in example
    write(root, "not a registry", mirror("a.test"))
    (named,) = settle(watched).warnings
    assert "not a registry" in named and "directory name is not a registry" in named


def test_a_tls_file_that_cannot_be_loaded_keeps_the_last_good_rule_naming_the_key(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca")
    root = write(tmp_path / "rules", UPSTREAM, f'[host."https://m.test"]\nca = "{ca.cert_path}"\n')
    watched = tree(root)
    ca.cert_path.write_text("not a certificate, but a longer file than it was\n")
    reload = settle(watched)
    assert reload.rules is None
    (warning,) = reload.warnings
    assert (
        f'{root / UPSTREAM / "hosts.toml"}: host."https://m.test".ca: cannot load TLS files {ca.cert_path}' in warning
    )
    good = make_ca(tmp_path / "other-ca")
    ca.cert_path.write_bytes(good.cert_path.read_bytes())
    fixed = settle(watched)
    assert fixed.rules is not None and fixed.tls_changed
    assert f"{root / UPSTREAM}: fixed, in force again" in fixed.notes


def test_a_rules_root_that_cannot_be_listed_keeps_every_rule_and_is_named_once(tmp_path: Path) -> None:
    root = write(tmp_path / "rules", UPSTREAM, mirror("a.test"))
    gone = TreeScan({}, "cannot list the rules directory: No such file or directory")
    scans = iter([scan_tree(root), gone, gone, scan_tree(root)])
    watched = RulesTree(load_rules(root), scan=lambda _: next(scans), clock=later)
    watched.look()
    (warning,) = watched.look().warnings
    assert str(root) in warning and "stay in force" in warning
    assert watched.look().warnings == ()
    back = watched.look()
    assert back.rules is None and any("listed again" in note for note in back.notes)
    assert hosts(watched.rules) == ["http://a.test:5000/v2"]


def test_a_directory_changed_within_the_racy_window_is_read_again_at_the_next_look(tmp_path: Path) -> None:
    root = write(tmp_path / "rules", UPSTREAM, mirror("a.test"))
    # The scan always finds the same fingerprint, as when two edits of the same size fall in one tick of file times.
    frozen = scan_tree(root)
    now = [time.time_ns()]
    watched = RulesTree(load_rules(root), scan=lambda _: frozen, clock=lambda: now[0])
    watched.look()
    write(root, UPSTREAM, mirror("b.test"))
    assert hosts(watched.look().rules) == ["http://b.test:5000/v2"]
    # Once the files are older than the window, an unchanged fingerprint is trusted: nothing is read.
    now[0] += HOUR_NS
    watched.look()
    write(root, UPSTREAM, mirror("c.test"))
    assert watched.look().rules is None


# The swap into the services in force.


def test_new_rules_come_in_new_services_that_keep_health_pulls_tokens_and_credentials(tmp_path: Path) -> None:
    root = write(tmp_path / "rules", UPSTREAM, mirror("a.test"))
    shared = Shared()
    configuration = Configuration(shared)
    with taddons.context(configuration) as tctx:
        tctx.configure(configuration, ocigate_rules=str(root), ocigate_credential_sources=[])
        before = shared.services
        new = with_rules(shared.settings, before, load_rules(write(root, UPSTREAM, mirror("b.test"))))
    assert hosts(new.rules) == ["http://b.test:5000/v2"]
    assert new.hostclient is not before.hostclient and new.broker.hostclient is new.hostclient
    assert new.hostclient.hosts_by_address.keys() == {("b.test", 5000)}
    assert new.health is before.health and new.contexts is before.contexts
    assert new.broker.tokens is before.broker.tokens and new.broker.credentials is before.broker.credentials
    assert new.asker.health is new.health


async def test_the_running_gateway_swaps_in_the_edited_rules_and_stops_looking_when_done(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = write(tmp_path / "rules", UPSTREAM, mirror("a.test"))
    shared = Shared()
    configuration = Configuration(shared)
    with taddons.context(configuration) as tctx:
        tctx.configure(configuration, ocigate_rules=str(root), ocigate_credential_sources=[])
        configuration.rules_interval = 0.01
        with caplog.at_level(logging.INFO, logger="ocigate"):
            configuration.running()
            write(root, UPSTREAM, mirror("b.test"))
            await until(lambda: hosts(shared.rules) == ["http://b.test:5000/v2"])
            await configuration.done()
        watching = configuration._watching
    assert watching is None
    assert f"{root / UPSTREAM}: read again: hosts http://b.test:5000/v2" in caplog.text


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not within the deadline"
        await asyncio.sleep(0.02)


async def test_an_edited_tree_changes_the_next_requests_plan_and_a_broken_edit_keeps_the_old_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = write(tmp_path / "rules", UPSTREAM, mirror("mirror-a.test"))
    blob = f"/v2/team/app/blobs/sha256:{'b' * 64}"
    with gateway(root, ["mirror-a.test=127.0.0.1", "mirror-b.test=127.0.0.1"]) as (gw, tctx):
        configuration = tctx.master.addons.get("configuration")
        configuration.rules_interval = 0.01

        async def asked() -> str:
            flow = flow_to(UPSTREAM, blob)
            await gw.requestheaders(flow)
            return flow.request.host

        with caplog.at_level(logging.INFO, logger="ocigate"):
            configuration.running()
            assert await asked() == "mirror-a.test"
            write(root, UPSTREAM, mirror("mirror-b.test"))
            await until(lambda: "read again" in caplog.text)
            assert await asked() == "mirror-b.test"
            write(
                root, UPSTREAM, mirror("mirror-b.test") + '[host."http://mirror-c.test:5000"]\ndial_timeout = "soon"\n'
            )
            await until(lambda: "dial_timeout" in caplog.text)
            # Looked at again and again while the file is fresh: still the last good rule, and one line naming it.
            await asyncio.sleep(0.2)
            assert await asked() == "mirror-b.test"
            warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
            (warning,) = [line for line in warnings if "dial_timeout" in line]
            assert str(root / UPSTREAM / "hosts.toml") in warning
            assert 'host."http://mirror-c.test:5000".dial_timeout' in warning
            write(root, UPSTREAM, mirror("mirror-a.test"))
            await until(lambda: "fixed, in force again" in caplog.text)
            assert await asked() == "mirror-a.test"
            await configuration.done()


async def test_a_request_under_way_finishes_on_the_rules_it_started_with(tmp_path: Path) -> None:
    root = write(tmp_path / "rules", UPSTREAM, mirror("mirror-a.test"))
    blob = f"/v2/team/app/blobs/sha256:{'b' * 64}"
    with gateway(root, ["mirror-a.test=127.0.0.1", "mirror-b.test=127.0.0.1"]) as (gw, tctx):
        configuration = tctx.master.addons.get("configuration")
        configuration.rules_interval = 0.01
        configuration.running()
        under_way = flow_to(UPSTREAM, blob)
        await gw.requestheaders(under_way)
        write(root, UPSTREAM, mirror("mirror-b.test"))
        await until(lambda: gw.shared.rules.lookup(UPSTREAM).hosts[0].host == "mirror-b.test")
        # What is sent, and the TLS its connection gets, are still the first rule's host's.
        sent = gw.streams.as_sent(under_way, under_way.request)
        address = (under_way.request.host, under_way.request.port)
        connection_host = gw.shared.host_for_connection(under_way.client_conn.id, address)
        next_one = flow_to(UPSTREAM, blob)
        await gw.requestheaders(next_one)
        await configuration.done()
    assert (sent.host, under_way.request.host) == ("mirror-a.test", "mirror-a.test")
    assert connection_host is not None and connection_host.host == "mirror-a.test"
    assert gw.streams.flows.get(under_way) is not None  # its stream state, plan included, is the first rule's
    assert next_one.request.host == "mirror-b.test"


def test_an_edited_policy_is_in_force_after_two_looks_and_a_broken_one_keeps_the_last_good_named_once(
    tmp_path: Path,
) -> None:
    from ocigate.policy import load_policy
    from ocigate.rulewatch import PolicyFile

    (tmp_path / "policy.toml").write_text('[user.alice]\npull = ["upstream.test"]\n')
    watched = PolicyFile(tmp_path, load_policy(tmp_path))
    assert watched.look() == (None, [])
    (tmp_path / "policy.toml").write_text('[user.bob]\npull = ["upstream.test/team"]\n')
    assert watched.look() == (None, [])  # changed: read once the next look finds it the same
    new, notes = watched.look()
    assert new is not None and new.decide("bob", "upstream.test", "team/app", push=False).allowed
    assert not new.decide("alice", "upstream.test", "team/app", push=False).allowed
    (tmp_path / "policy.toml").write_text("[user.bob]\npul = []\n")
    watched.look()
    new, warnings = watched.look()
    assert new is None and len(warnings) == 1 and "user.bob.pul" in warnings[0] and "stays" in warnings[0]
    assert watched.look() == (None, [])  # named once
    assert watched.policy.decide("bob", "upstream.test", "team/app", push=False).allowed  # the last good
    (tmp_path / "policy.toml").write_text('[user.carol]\npull = ["upstream.test"]\n')
    watched.look()
    new, notes = watched.look()
    assert new is not None and notes == [f"{tmp_path / 'policy.toml'}: fixed, in force again"]


async def test_edits_made_right_after_the_rules_were_read_are_picked_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watchers start from the tree as the rules and policy were read, not as their first look finds it: a
    policy edit and a new CA file written before that look are read all the same."""
    from ocigate import configuration as configuration_module

    ca = make_ca(tmp_path / "ca")
    root = write(tmp_path / "rules", UPSTREAM, f'[host."https://m.test"]\nca = "{ca.cert_path}"\n')
    (root / "policy.toml").write_text('[user.alice]\npull = ["upstream.test"]\n')
    forgotten: list[bool] = []
    monkeypatch.setattr(configuration_module, "forget_contexts", lambda: forgotten.append(True))
    shared = Shared()
    configuration = Configuration(shared)
    with taddons.context(configuration) as tctx:
        tctx.configure(configuration, ocigate_rules=str(root), ocigate_credential_sources=[])
        configuration.rules_interval = 0.01
        # Edited after the rules were read and before the watchers' first look.
        (root / "policy.toml").write_text('[user.bob]\npull = ["upstream.test/team"]\n')
        ca.cert_path.write_bytes(make_ca(tmp_path / "other-ca").cert_path.read_bytes() + b"\n")
        with caplog.at_level(logging.INFO, logger="ocigate"):
            configuration.running()
            await until(lambda: shared.services.policy.users is not None and "bob" in shared.services.policy.users)
            await until(lambda: bool(forgotten))
            await configuration.done()
    assert f"{root / 'policy.toml'}: read again" in caplog.text
    assert f"{root / UPSTREAM}: read again" in caplog.text


async def test_an_error_putting_new_rules_in_force_is_logged_naming_the_tree_and_the_watcher_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from ocigate.rulewatch import Watched, keep_rules_live

    root = write(tmp_path / "rules", UPSTREAM, mirror("a.test"))
    in_force = [load_rules(root)]
    swapped: list[RuleSet] = []

    def swap(looked_at: RuleSet, reload: Reload) -> None:
        assert reload.rules is not None
        if not swapped:
            swapped.append(reload.rules)
            raise RuntimeError("a swap that fails")
        swapped.append(reload.rules)
        in_force[0] = reload.rules

    with caplog.at_level(logging.INFO, logger="ocigate"):
        watching = asyncio.get_running_loop().create_task(
            keep_rules_live(lambda: Watched(in_force[0], None, False), swap, 0.01)
        )
        write(root, UPSTREAM, mirror("b.test"))
        await until(lambda: hosts(in_force[0]) == ["http://b.test:5000/v2"])
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)
    assert len(swapped) >= 2
    assert f"internal error putting in force what {root} holds now" in caplog.text
    assert "a swap that fails" in caplog.text
