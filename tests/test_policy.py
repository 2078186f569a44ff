"""policy.py: the policy file's parsing (every mistake named by file and key) and the decision for one request."""

import os
import tomllib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ocigate.policy import (
    POLICY_FILE,
    Policy,
    PolicyError,
    check,
    doubtful_entries,
    load_policy,
    parse_policy,
    under,
)
from ocigate.routes import Route, RouteKind, normalize_repository

COMPONENT = st.from_regex(r"[a-z0-9]{1,6}", fullmatch=True)
REPOSITORY = st.lists(COMPONENT, min_size=1, max_size=4).map("/".join)

EXAMPLE = """
[upstream."upstream.test"]
allow = ["team", "public"]
block = ["team/secret"]

[upstream."docker.io"]
block = ["library/evil"]

[user.alice]
pull = ["upstream.test/team", "docker.io/library"]
push = ["upstream.test/team/app"]

[user.bob]
pull = ["upstream.test/public"]

[user.admin]
pull = ["*"]
"""


def policy_of(tmp_path: Path, text: str) -> Policy:
    (tmp_path / POLICY_FILE).write_text(text)
    return load_policy(tmp_path)


@given(REPOSITORY, st.lists(COMPONENT, max_size=3).map("/".join))
def test_a_prefix_covers_itself_and_what_lies_under_it(prefix: str, rest: str) -> None:
    assert under(prefix, prefix)
    assert under(prefix, f"{prefix}/{rest}" if rest else prefix)
    assert under("", prefix)


@given(REPOSITORY, COMPONENT, COMPONENT)
def test_a_prefix_never_covers_a_longer_name_of_its_last_component(parent: str, last: str, extra: str) -> None:
    prefix = f"{parent}/{last}"
    assert not under(prefix, f"{parent}/{last}{extra}")
    assert not under(prefix, parent)


def test_team_app_covers_team_app_x_but_not_team_apple() -> None:
    assert under("team/app", "team/app/x")
    assert not under("team/app", "team/apple")


@given(COMPONENT)
def test_docker_hub_official_images_are_under_library(name: str) -> None:
    # Entries name repositories as the registry does (containers-registries.conf's prefixes): an official image is
    # library/<name>, what a client asks for as docker.io/<name>.
    hub = parse_policy(tomllib.loads('[user.u]\npull = ["docker.io/library"]\n'), Path(POLICY_FILE))
    assert hub.decide("u", "docker.io", normalize_repository("docker.io", name), push=False).allowed
    assert hub.decide("u", "docker.io", f"{name}/x", push=False).allowed == (name == "library")


def test_without_a_policy_file_everything_is_allowed(tmp_path: Path) -> None:
    policy = load_policy(tmp_path)
    decision = policy.decide(None, "upstream.test", "team/app", push=True)
    assert decision.allowed and decision.rule == "no policy.toml" and decision.push


def test_an_upstreams_block_list_refuses_everyone_naming_the_entry(tmp_path: Path) -> None:
    policy = policy_of(tmp_path, EXAMPLE)
    decision = policy.decide("alice", "upstream.test", "team/secret/db", push=False)
    assert not decision.allowed
    assert decision.rule == f"{tmp_path / POLICY_FILE}: upstream.\"upstream.test\".block[0] 'team/secret'"
    error = decision.error()
    assert (error.status, error.code) == (403, "DENIED")
    assert decision.rule in error.message and "'alice'" in error.message


def test_an_upstreams_allow_list_refuses_what_lies_under_none_of_it(tmp_path: Path) -> None:
    policy = policy_of(tmp_path, EXAMPLE)
    decision = policy.decide("admin", "upstream.test", "other/app", push=False)
    assert not decision.allowed and decision.rule.endswith('upstream."upstream.test".allow')


def test_users_may_pull_what_their_entries_cover_and_nothing_else(tmp_path: Path) -> None:
    policy = policy_of(tmp_path, EXAMPLE)
    alice = policy.decide("alice", "upstream.test", "team/app", push=False)
    assert alice.allowed and alice.rule.endswith("user.alice.pull[0] 'upstream.test/team'")
    bob = policy.decide("bob", "upstream.test", "team/app", push=False)
    assert not bob.allowed and bob.rule.endswith("user.bob.pull")
    assert policy.decide("bob", "upstream.test", "public/tools", push=False).allowed
    assert policy.decide("admin", "elsewhere.test", "any/thing", push=False).allowed


def test_a_push_needs_push_rights_which_include_pulling(tmp_path: Path) -> None:
    policy = policy_of(tmp_path, EXAMPLE)
    assert not policy.decide("alice", "upstream.test", "team/other", push=True).allowed
    assert policy.decide("alice", "upstream.test", "team/app/sub", push=True).allowed
    assert not policy.decide("admin", "upstream.test", "team/app", push=True).allowed
    assert policy.decide("alice", "upstream.test", "team/app", push=False).allowed


def test_with_per_user_rules_an_unknown_or_unauthenticated_user_is_refused(tmp_path: Path) -> None:
    policy = policy_of(tmp_path, EXAMPLE)
    anonymous = policy.decide(None, "upstream.test", "public/tools", push=False)
    assert not anonymous.allowed and "did not authenticate" in anonymous.why
    carol = policy.decide("carol", "upstream.test", "public/tools", push=False)
    assert not carol.allowed and "[user.carol]" in carol.why
    assert not policy.may_reach(None, "upstream.test").allowed
    assert not policy.may_reach("bob", "docker.io").allowed
    assert policy.may_reach("bob", "upstream.test").allowed


def test_the_catalog_needs_the_whole_upstream(tmp_path: Path) -> None:
    policy = policy_of(tmp_path, EXAMPLE)
    assert not policy.decide("admin", "upstream.test", None, push=False).allowed
    assert not policy.decide("alice", "other.test", None, push=False).allowed
    assert policy.decide("admin", "other.test", None, push=False).allowed


def test_the_ping_is_never_refused_and_writes_need_push(tmp_path: Path) -> None:
    policy = policy_of(tmp_path, EXAMPLE)
    assert check(policy, None, "upstream.test", Route(RouteKind.PING), "GET", "") is None
    upload = Route(RouteKind.BLOB_UPLOAD, repository="team/app")
    assert check(policy, "alice", "upstream.test", upload, "POST", "") == policy.decide(
        "alice", "upstream.test", "team/app", push=True
    )
    manifest = Route(RouteKind.MANIFEST, repository="team/lib", tag="v1")
    decision = check(policy, "alice", "upstream.test", manifest, "PUT", "")
    assert decision is not None and not decision.allowed and decision.push


def test_a_blob_mount_needs_the_right_to_pull_its_source(tmp_path: Path) -> None:
    policy = policy_of(tmp_path, EXAMPLE)
    upload = Route(RouteKind.BLOB_UPLOAD, repository="team/app")
    query = "mount=sha256:" + "a" * 64 + "&from=team%2Fsecret%2Fdb"
    decision = check(policy, "alice", "upstream.test", upload, "POST", query)
    assert decision is not None and not decision.allowed and decision.push and "block[0]" in decision.rule


@pytest.mark.parametrize(
    "sources",
    [
        "%66rom=team/secret/db",  # the key as Go's url.ParseQuery reads it
        "from=team/secret/db&from=team/app",  # a registry takes the first
        "from=team/app&from=team/secret/db",  # any source named is checked
        "fr%6Fm=team%2Fsecret%2Fdb",
    ],
)
def test_a_mount_source_however_spelled_is_checked(tmp_path: Path, sources: str) -> None:
    policy = policy_of(tmp_path, EXAMPLE)
    upload = Route(RouteKind.BLOB_UPLOAD, repository="team/app")
    decision = check(policy, "alice", "upstream.test", upload, "POST", "mount=sha256:" + "a" * 64 + "&" + sources)
    assert decision is not None and not decision.allowed and "block[0]" in decision.rule


@pytest.mark.parametrize("source", ["team/app=x", "team/app/", "Team/App", "team//app"])
def test_a_mount_source_that_is_no_repository_name_is_refused(tmp_path: Path, source: str) -> None:
    # Judged by prefix, `team/app=x` would pass as under team/app; a host reads it otherwise, or not at all.
    policy = policy_of(tmp_path, EXAMPLE)
    upload = Route(RouteKind.BLOB_UPLOAD, repository="team/app")
    query = "mount=sha256:" + "a" * 64 + "&from=" + source
    decision = check(policy, "alice", "upstream.test", upload, "POST", query)
    assert decision is not None and not decision.allowed and "no repository" in decision.why


def test_an_empty_mount_source_mounts_nothing_and_is_a_plain_upload(tmp_path: Path) -> None:
    policy = policy_of(tmp_path, EXAMPLE)
    upload = Route(RouteKind.BLOB_UPLOAD, repository="team/app")
    decision = check(policy, "alice", "upstream.test", upload, "POST", "mount=sha256:" + "a" * 64 + "&from=")
    assert decision is not None and decision.allowed


def test_a_prefix_may_end_in_one_slash_and_means_the_same(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text('[upstream."docker.io"]\nallow = ["bitnami/"]\n[user.a]\npull = ["docker.io/bitnami/"]\n')
    policy = load_policy(tmp_path)
    assert policy.decide("a", "docker.io", "bitnami/redis", push=False).allowed
    assert not policy.decide("a", "docker.io", "bitnamix/redis", push=False).allowed
    assert not policy.decide("a", "docker.io", "library/redis", push=False).allowed
    assert doubtful_entries(policy) == []


@pytest.mark.parametrize("prefix", ["bitnami//", "/", "/bitnami"])
def test_a_prefix_with_more_than_one_trailing_slash_or_a_leading_one_is_refused(tmp_path: Path, prefix: str) -> None:
    (tmp_path / "policy.toml").write_text(f'[upstream."docker.io"]\nallow = ["{prefix}"]\n')
    with pytest.raises(PolicyError, match="not a repository prefix"):
        load_policy(tmp_path)


def test_an_upload_with_a_form_body_is_refused_where_a_policy_restricts(tmp_path: Path) -> None:
    # distribution reads a mount's `from` from a form body too, which the gateway does not read.
    policy = policy_of(tmp_path, EXAMPLE)
    upload = Route(RouteKind.BLOB_UPLOAD, repository="team/app")
    for form in ("application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        decision = check(policy, "alice", "upstream.test", upload, "POST", "", form)
        assert decision is not None and not decision.allowed
    assert check(policy, "alice", "upstream.test", upload, "POST", "", "application/octet-stream").allowed


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("[user.alice]\npul = []\n", "user.alice.pul", "unknown key"),
        ("users = {}\n", "users", "unknown key"),
        ('[user.alice]\npull = "team"\n', "user.alice.pull", "expected an array of strings"),
        ("[user.alice]\npull = [1]\n", "user.alice.pull[0]", "expected a string"),
        ('[user.alice]\npull = ["/team"]\n', "user.alice.pull[0]", "names no upstream"),
        ('[user.alice]\npull = ["up.test/Team"]\n', "user.alice.pull[0]", "not a repository prefix"),
        ('[user.alice]\npull = ["bad host/x"]\n', "user.alice.pull[0]", "invalid"),
        ('[upstream."up.test"]\nblock = [""]\n', 'upstream."up.test".block[0]', "empty prefix"),
        ('[upstream."up.test"]\nallow = ["team//"]\n', 'upstream."up.test".allow[0]', "not a repository prefix"),
        ('[upstream."docker.io"]\n[upstream."index.docker.io"]\n', 'upstream."index.docker.io"', "again"),
        ("user = 3\n", "user", "expected a table"),
    ],
)
def test_a_bad_policy_is_an_error_naming_the_file_and_the_key(
    tmp_path: Path, text: str, key: str, problem: str
) -> None:
    with pytest.raises(PolicyError) as raised:
        policy_of(tmp_path, text)
    assert raised.value.path == tmp_path / POLICY_FILE and raised.value.key == key
    assert problem in raised.value.problem
    assert str(raised.value).startswith(f"{tmp_path / POLICY_FILE}: {key}: ")


def test_bad_toml_and_a_fifo_are_errors_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"policy\.toml: invalid TOML"):
        policy_of(tmp_path, "[user\n")
    (tmp_path / POLICY_FILE).unlink()
    os.mkfifo(tmp_path / POLICY_FILE)
    with pytest.raises(PolicyError, match="FIFO"):
        load_policy(tmp_path)


@pytest.mark.parametrize("spelled", ["mirror.test", "Mirror.Test", "mirror.test."])
def test_a_mirror_asked_directly_is_refused_however_its_name_is_spelled(tmp_path: Path, spelled: str) -> None:
    from ocigate.policy import around_the_rules

    policy = policy_of(tmp_path, EXAMPLE)
    refused = around_the_rules(policy, [("mirror.test", 5000)], spelled, 5000)
    assert refused is not None and not refused.allowed
    assert around_the_rules(policy, [("mirror.test", 5000)], spelled, 5001) is None


QUERY_TEXT = st.text(alphabet="abfmort=&;%2F/:0123456789", max_size=40)


@given(QUERY_TEXT, QUERY_TEXT)
def test_a_blob_upload_whose_query_holds_a_semicolon_is_refused_where_a_policy_restricts(
    before: str, after: str
) -> None:
    # Old Go registries split `mount=X;from=team/secret/db&from=team/app` on `;` too and mount from team/secret/db.
    policy = parse_policy(tomllib.loads(EXAMPLE), Path(POLICY_FILE))
    upload = Route(RouteKind.BLOB_UPLOAD, repository="team/app")
    query = f"{before};{after}"
    decision = check(policy, "alice", "upstream.test", upload, "POST", query)
    assert decision is not None and not decision.allowed and decision.push
    assert "holds a ';'" in decision.error().message
    assert check(Policy(), "alice", "upstream.test", upload, "POST", query).allowed


def test_the_semicolon_mount_that_old_registries_read_from_a_blocked_source_is_refused(tmp_path: Path) -> None:
    policy = policy_of(tmp_path, EXAMPLE)
    upload = Route(RouteKind.BLOB_UPLOAD, repository="team/app")
    query = "mount=sha256:" + "a" * 64 + ";from=team/secret/db&from=team/app"
    decision = check(policy, "alice", "upstream.test", upload, "POST", query)
    assert decision is not None and not decision.allowed
    allowed = check(policy, "alice", "upstream.test", upload, "POST", "mount=sha256:" + "a" * 64 + "&from=team/app")
    assert allowed is not None and allowed.allowed, allowed


@given(st.text(max_size=30))
def test_an_audit_line_is_one_printable_line_whatever_it_names(what: str) -> None:
    from ocigate.policy import Decision, audit_line

    line = audit_line("client 127.0.0.1:1", "GET", what, Decision(False, "rules/policy.toml: user", "why"))
    assert line.isprintable()
