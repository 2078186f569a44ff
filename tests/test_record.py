"""The flow's comment and mark: what mitmweb shows of ocigate's decision for each flow, and never a secret."""

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mitmproxy.test import tflow

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
    challenged.answered(401, client_sent_credentials=False, challenged=True)
    assert challenged.expected == "challenge" and not challenged.failed()
    assert challenged.as_metadata()["expected"] == "challenge"


def challenged_401(client_sent: bool = False, **fields) -> FlowRecord:
    record = manifest_record(**fields)
    record.answered(401, client_sent_credentials=client_sent, challenged=True)
    return record


@pytest.mark.parametrize(
    "record",
    [
        pytest.param(challenged_401(served_by=MIRROR_A, client_sent=True), id="the client's own credential refused"),
        pytest.param(challenged_401(), id="ocigate's credentials refused by every host: the gateway's 401"),
        pytest.param(
            challenged_401(served_by=MIRROR_A, credential="'alice' from ocigate credentials", token="cached"),
            id="ocigate's own credential refused by the host that answered",
        ),
        pytest.param(challenged_401(served_by=MIRROR_A, token="fetched"), id="ocigate's anonymous token refused"),
        pytest.param(
            challenged_401(served_by=MIRROR_A, error=f"{MIRROR_A} answered 401"), id="an error the gateway put instead"
        ),
    ],
)
def test_a_401_that_is_no_start_of_the_clients_own_authentication_is_marked(record: FlowRecord) -> None:
    assert record.expected is None and record.failed()
    flow = tflow.tflow()
    record.publish(flow)
    assert flow.marked == FAILED_MARK and "expected" not in flow.metadata[METADATA_KEY]


def test_a_401_without_a_challenge_or_a_403_is_marked() -> None:
    unchallenged = manifest_record(served_by=MIRROR_A)
    unchallenged.answered(401, client_sent_credentials=False, challenged=False)
    forbidden = manifest_record(served_by=MIRROR_A)
    forbidden.answered(403, client_sent_credentials=False, challenged=True)
    assert all(r.expected is None and r.failed() for r in (unchallenged, forbidden))


def blob_record(method: str, status: int, attempts: list[Outcome], **fields) -> FlowRecord:
    # A HEAD is read whole: every host's 404 falls through, and the gateway passes their verdict on.
    record = FlowRecord("upstream.test", "hosts.toml", "blob", method, "team/app", DIGEST, attempts=attempts, **fields)
    record.answered(status, client_sent_credentials=False, challenged=False)
    return record


def test_the_registrys_not_found_to_a_blob_head_is_a_probe_not_a_failure() -> None:
    push_check = blob_record("HEAD", 404, [Outcome(MIRROR_A, "404", True, status=404)])  # one host: the push's
    pull_check = blob_record(
        "HEAD", 404, [Outcome(MIRROR_A, "404", True, status=404), Outcome(MIRROR_B, "404", True, status=404)]
    )
    for record in (push_check, pull_check):
        assert record.expected == "probe" and not record.failed()
        assert record.as_metadata()["expected"] == "probe"


@pytest.mark.parametrize(
    "outcome",
    [
        Outcome(MIRROR_A, "connection refused", True, unreachable=True),
        Outcome(MIRROR_A, "timed out (skipped for 27 s)", True, unreachable=True),
        Outcome(MIRROR_A, "503", True, status=503),
        Outcome(MIRROR_A, "401 unauthorized with the credential of 'alice'", True, status=401, auth_failure=True),
        Outcome(MIRROR_A, f"sent something else for {DIGEST} before (sha256:...)", True),
    ],
    ids=["refused", "cooling down", "5xx", "ocigate's credential refused", "passed over for the digest"],
)
def test_a_blob_head_404_with_a_host_that_failed_is_marked(outcome: Outcome) -> None:
    for attempts in (
        [outcome, Outcome(MIRROR_B, "404", True, status=404)],
        [Outcome(MIRROR_B, "404", True, status=404), outcome],
    ):
        record = blob_record("HEAD", 404, attempts)
        assert record.expected is None and record.failed()
        flow = tflow.tflow()
        record.publish(flow)
        assert flow.marked == FAILED_MARK and "expected" not in flow.metadata[METADATA_KEY]


def test_a_blob_head_404_no_host_said_or_the_gateway_answered_for_a_failure_is_marked() -> None:
    no_host_asked = blob_record("HEAD", 404, [])
    # The host streamed to failed mid-answer, or the policy refused: the error says why, whatever the status.
    with_error = blob_record(
        "HEAD", 404, [Outcome(MIRROR_A, "404", True, status=404)], error=f"not found on any host ({MIRROR_B}: reset)"
    )
    assert all(r.expected is None and r.failed() for r in (no_host_asked, with_error))
    assert blob_record("GET", 404, [Outcome(MIRROR_A, "404", True, status=404)]).failed()
    assert blob_record("HEAD", 500, [Outcome(MIRROR_A, "500", True, status=500)]).failed()
    head_manifest = FlowRecord(
        "upstream.test", "hosts.toml", "manifest", "HEAD", attempts=[Outcome(MIRROR_A, "404", True, status=404)]
    )
    head_manifest.answered(404, client_sent_credentials=False, challenged=False)
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
