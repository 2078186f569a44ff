"""The flow's comment and mark: what mitmweb shows of ocigate's decision for each flow, and never a secret."""

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from ocigate.attempts import Outcome
from ocigate.auth import Authorization
from ocigate.credentials import Credential
from ocigate.record import FAILED_MARK, METADATA_KEY, FlowRecord
from ocigate.tokens import Token
from tests.test_addon import DIGEST, flow_to
from tests.test_auth import PASSWORD, fetch, token_registry

MIRROR_A = "http://mirror-a.test:5000/v2"
MIRROR_B = "http://mirror-b.test:5000/v2"


def manifest_record(**fields) -> FlowRecord:
    return FlowRecord(
        upstream="upstream.test",
        rule="rules/upstream.test/hosts.toml",
        route="manifest",
        method="GET",
        repository="team/app",
        reference="v1",
        named_reference="upstream.test/team/app:v1",
        **fields,
    )


def test_served_by_the_first_host_names_it_and_the_context_it_was_asked_with() -> None:
    record = manifest_record(
        attempts=[Outcome(MIRROR_A, "200", False)], served_by=MIRROR_A, status=200, ns="upstream.test"
    )
    assert record.comment() == (
        "GET upstream.test/team/app manifest v1 -> mirror-a.test:5000 200; "
        "ns=upstream.test; OCI-Named-Ref upstream.test/team/app:v1"
    )
    assert not record.failed()


def test_a_fallback_names_each_host_skipped_and_why() -> None:
    record = manifest_record(
        attempts=[
            Outcome(MIRROR_A, "404", True, status=404),
            Outcome("http://mirror-c.test:5000/v2", "connection refused", True, unreachable=True),
            Outcome(MIRROR_B, "200", False),
        ],
        served_by=MIRROR_B,
        status=200,
        ns="upstream.test",
    )
    comment = record.comment()
    assert comment.startswith("GET upstream.test/team/app manifest v1 -> mirror-b.test:5000 200 ")
    assert f"(skipped {MIRROR_A}: 404; http://mirror-c.test:5000/v2: connection refused)" in comment


def test_a_gateway_error_says_every_host_was_tried_and_the_flow_failed() -> None:
    record = manifest_record(attempts=[Outcome(MIRROR_A, "404", True), Outcome(MIRROR_B, "404", True)], status=404)
    comment = record.comment()
    assert comment.startswith("GET upstream.test/team/app manifest v1 -> gateway 404 ")
    assert f"(tried {MIRROR_A}: 404; {MIRROR_B}: 404)" in comment
    assert record.failed()


def test_a_blob_checked_against_its_digest_says_so() -> None:
    record = FlowRecord(
        "upstream.test", "hosts.toml", "blob", "GET", "team/app", DIGEST, served_by=MIRROR_B, status=200
    )
    record.verified = DIGEST
    assert record.comment().endswith(f"; verified {DIGEST}")
    assert not record.failed()


def test_a_blob_that_was_not_what_its_digest_says_failed() -> None:
    record = FlowRecord("upstream.test", "hosts.toml", "blob", "GET", "team/app", DIGEST, served_by=MIRROR_B)
    record.error = f"{MIRROR_B} sent sha256:{'c' * 64} for {DIGEST}: transfer aborted"
    assert f"failed: {record.error}" in record.comment()
    assert record.failed()


def test_a_host_refusal_passed_to_the_client_failed() -> None:
    record = manifest_record(attempts=[Outcome(MIRROR_A, "401", False, status=401)], served_by=MIRROR_A, status=401)
    assert record.failed()


def test_a_hosts_challenge_to_a_client_without_credentials_yet_is_expected_not_failed() -> None:
    challenged = manifest_record(served_by=MIRROR_A)
    challenged.answered(401, client_sent_credentials=False)
    assert challenged.expected == "challenge" and not challenged.failed()
    refused = manifest_record(served_by=MIRROR_A)
    refused.answered(401, client_sent_credentials=True)  # the client's own credential refused
    by_gateway = manifest_record()
    by_gateway.answered(401, client_sent_credentials=False)  # ocigate's credentials refused by every host
    forbidden = manifest_record(served_by=MIRROR_A)
    forbidden.answered(403, client_sent_credentials=False)
    assert all(r.expected is None and r.failed() for r in (refused, by_gateway, forbidden))


def test_a_blob_head_answered_404_is_a_probe_not_a_failure_but_a_blob_get_404_is_one() -> None:
    def blob(method: str, status: int) -> FlowRecord:
        record = FlowRecord("upstream.test", "hosts.toml", "blob", method, "team/app", DIGEST, served_by=MIRROR_A)
        record.answered(status, client_sent_credentials=True)
        return record

    assert blob("HEAD", 404).expected == "probe" and not blob("HEAD", 404).failed()
    assert blob("GET", 404).failed() and blob("HEAD", 500).failed()
    head_manifest = FlowRecord("upstream.test", "hosts.toml", "manifest", "HEAD")
    head_manifest.answered(404, client_sent_credentials=False)
    assert head_manifest.failed()


def test_a_token_fetched_and_one_from_the_cache_are_told_apart_and_neither_is_shown() -> None:
    token = Token("the-token-value", 0.0)
    comments = []
    for source in ("fetched", "cached"):
        authorization = Authorization(
            token.authorization, "ocigate credentials", "alice", token=token, token_source=source
        )
        record = manifest_record(
            served_by=MIRROR_A, status=200, credential=authorization.credential(), token=authorization.token_source
        )
        comments.append(record.comment())
    assert comments[0].endswith("; credential 'alice' from ocigate credentials; token fetched")
    assert comments[1].endswith("; credential 'alice' from ocigate credentials; token cached")
    assert not any("the-token-value" in comment for comment in comments)


@given(error=st.text())
def test_the_comment_is_one_line_whatever_a_host_said(error: str) -> None:
    record = manifest_record(error=error)
    assert "\n" not in record.comment() and "\r" not in record.comment()


def test_a_mark_someone_put_on_the_flow_stays_and_a_failure_marks_it() -> None:
    flow = flow_to("upstream.test", "/v2/team/app/manifests/v1")
    flow.marked = ":star:"
    manifest_record(status=200).publish(flow)
    assert flow.marked == ":star:"
    unmarked = flow_to("upstream.test", "/v2/team/app/manifests/v1")
    manifest_record(status=200).publish(unmarked)
    assert unmarked.marked == ""
    manifest_record(status=503).publish(unmarked)
    assert unmarked.marked == FAILED_MARK


async def test_a_handled_flow_carries_the_comment_and_a_failed_one_is_marked(tmp_path: Path) -> None:
    with token_registry(tmp_path) as (gw, registry, store):
        store.save(f"registry.test:{registry.port}", Credential("alice", PASSWORD))
        served = await fetch(gw, "/v2/team/app/manifests/v1")
        again = await fetch(gw, "/v2/team/app/manifests/v1")
        registry.refuse_tokens = True
        refused = await fetch(gw, "/v2/team/app/manifests/v1")
        for flow in (served, again, refused):
            gw.response(flow)
    host = f"registry.test:{registry.port}"
    assert served.comment.startswith(f"GET upstream.test/team/app manifest v1 -> {host} 200; ns=upstream.test; ")
    assert "; credential 'alice' from ocigate credentials " in served.comment
    assert served.comment.endswith("; token fetched") and again.comment.endswith("; token cached")
    assert served.marked == again.marked == ""
    assert refused.comment.startswith("GET upstream.test/team/app manifest v1 -> gateway 401 (tried ")
    assert refused.marked == FAILED_MARK
    # The comment says what the record in metadata says, and no secret: not the password, no token.
    assert served.metadata[METADATA_KEY]["token"] == "fetched"
    for flow in (served, again, refused):
        assert PASSWORD not in flow.comment and "token-" not in flow.comment
