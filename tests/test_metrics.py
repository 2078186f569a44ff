"""The metrics: why a host was passed over, in a fixed set of reasons; a flow record turned into observations whose
labels only the rules name; the registry they are counted in, and the server that serves it."""

import socket
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ocigate.attempts import Asker, Outcome
from ocigate.health import HostHealth
from ocigate.hoststoml import load_rules
from ocigate.metrics import OTHER, Metrics, MetricsServer, Names, Observations, Reason, observations, reason
from ocigate.probes import LIVENESS_PATH, READINESS_PATH, Verdict
from ocigate.record import GATEWAY, FlowRecord
from ocigate.settings import MetricsAddress
from tests.test_addon import write_rules

DIGEST = "sha256:" + "c" * 64
MIRROR_A, MIRROR_B = "http://mirror-a.test:5000/v2", "http://mirror-b.test:5000/v2"
NAMES = Names(frozenset({"upstream.test"}), frozenset({MIRROR_A, MIRROR_B}))


def fine() -> Verdict:
    return Verdict(True, "fine")


def passed_over_by_health(health: HostHealth, digest: str | None = DIGEST) -> Outcome:
    """The outcome attempts.Asker gives a host it does not ask for what health knows of it."""
    attempt = SimpleNamespace(host=SimpleNamespace(url=MIRROR_A))
    outcome = Asker(None, health).not_now(attempt, digest)  # type: ignore[arg-type]
    assert outcome is not None
    return outcome


def test_a_host_passed_over_for_what_it_did_lately_is_cooling_down_however_health_words_it() -> None:
    down = HostHealth(cooldown=30)
    down.unreachable(MIRROR_A, "connection refused")
    failed = HostHealth(cooldown=30)
    failed.failed(MIRROR_A, DIGEST, "answered 500")
    sent_bad = HostHealth(cooldown=30)
    sent_bad.bad_content(MIRROR_A, DIGEST, "12 bytes that hash to sha256:00")
    for health in (down, failed, sent_bad):
        assert reason(passed_over_by_health(health)) is Reason.COOLDOWN


@pytest.mark.parametrize(
    ("outcome", "expected"),
    [
        (Outcome(MIRROR_A, "connection refused", True, unreachable=True), Reason.UNREACHABLE),
        (Outcome(MIRROR_A, "probe: answer not complete within 60 s", True, unreachable=True), Reason.UNREACHABLE),
        (Outcome(MIRROR_A, "404", True, 404), Reason.NOT_FOUND),
        (Outcome(MIRROR_A, "probe: 404", True, 404), Reason.NOT_FOUND),
        (Outcome(MIRROR_A, "503", True, 503), Reason.STATUS),
        (Outcome(MIRROR_A, "429", True, 429), Reason.STATUS),
        (Outcome(MIRROR_A, "401 unauthorized with the credential from ocigate", True, 401, True), Reason.AUTH),
        (Outcome(MIRROR_A, "401", True, 401), Reason.AUTH),
        (Outcome(MIRROR_A, "token endpoint refused", True, auth_failure=True), Reason.AUTH),
        (Outcome(MIRROR_A, "200 but bytes hash to sha256:00, not sha256:11", True, 200), Reason.VERIFICATION),
        (Outcome(MIRROR_A, "sent 3 bytes that hash to sha256:00", True, 200), Reason.VERIFICATION),
        (Outcome(MIRROR_A, "answered 206 the client did not ask for", True, 206), Reason.VERIFICATION),
        (Outcome(MIRROR_A, "destination 10.0.0.1 is not allowed", True), Reason.OTHER),
    ],
)
def test_every_outcome_has_one_of_a_few_reasons(outcome: Outcome, expected: Reason) -> None:
    assert reason(outcome) is expected


def served_blob(**changes: object) -> FlowRecord:
    record = FlowRecord(
        upstream="upstream.test",
        rule="rules/upstream.test/hosts.toml",
        route="blob",
        method="GET",
        repository="team/app",
        reference=DIGEST,
        attempts=[
            Outcome(MIRROR_A, "connection refused (skipped for 27 s)", True, unreachable=True),
            Outcome(MIRROR_B, "probe: 404", True, 404, token="cached"),
        ],
        served_by="http://mirror-c.test:5000/v2",
        status=200,
        token="fetched",
        verified=DIGEST,
        bytes_sent=1234,
        duration=0.5,
    )
    for name, value in changes.items():
        setattr(record, name, value)
    return record


def test_a_record_becomes_observations_with_only_names_the_rules_give() -> None:
    names = Names(frozenset({"upstream.test"}), frozenset({MIRROR_A, MIRROR_B, "http://mirror-c.test:5000/v2"}))
    assert observations(served_blob(), names) == Observations(
        upstream="upstream.test",
        host="http://mirror-c.test:5000/v2",
        kind="blob",
        status="200",
        bytes_sent=1234,
        seconds=0.5,
        fallbacks=((MIRROR_A, Reason.COOLDOWN), (MIRROR_B, Reason.NOT_FOUND)),
        verification_failures=(),
        tokens=((MIRROR_B, "cached"), ("http://mirror-c.test:5000/v2", "fetched")),
    )
    # An upstream or host the rules do not name (an upstream only _default routes, and its own host): "other".
    unnamed = observations(served_blob(upstream="anything.example"), NAMES)
    assert (unnamed.upstream, unnamed.host, unnamed.tokens[-1][0]) == (OTHER, OTHER, OTHER)


def test_a_served_read_whole_answer_counts_its_token_once() -> None:
    record = served_blob(
        route="manifest",
        attempts=[Outcome(MIRROR_B, "200", False, 200, token="cached")],
        served_by=MIRROR_B,
        token="cached",
    )
    assert observations(record, NAMES).tokens == ((MIRROR_B, "cached"),)


def test_a_blob_cut_short_and_a_manifest_that_failed_its_check_are_verification_failures() -> None:
    cut = served_blob(attempts=[], served_by=MIRROR_B, status=None, verified=None, mismatch="3 bytes that hash to x")
    assert observations(cut, NAMES).verification_failures == (MIRROR_B,)
    assert observations(cut, NAMES).status == "none"
    wrong = served_blob(
        route="manifest",
        attempts=[Outcome(MIRROR_A, "200 but bytes hash to x", True, 200), Outcome(MIRROR_B, "200", False, 200)],
        served_by=MIRROR_B,
    )
    assert observations(wrong, NAMES).verification_failures == (MIRROR_A,)


def test_names_are_those_of_the_rules(tmp_path: Path) -> None:
    rules = write_rules(tmp_path, "upstream.test", 'server = "https://upstream.test"\n[host."http://m.test:5000"]\n')
    write_rules(rules, "other.test_5000_", '[host."https://n.test"]\n')
    names = Names.of(load_rules(rules))
    assert names.upstreams == {"upstream.test", "other.test:5000"}
    assert names.hosts == {
        "http://m.test:5000/v2",
        "https://upstream.test/v2",
        "https://n.test/v2",
        "https://other.test:5000/v2",
    }
    assert names.host(GATEWAY) == GATEWAY and names.host("https://elsewhere.test/v2") == OTHER
    assert Names.of(None).upstream("upstream.test") == OTHER


def scraped(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_observations_move_the_counters_in_a_registry_of_ocigates_own() -> None:
    metrics = Metrics(lambda: {MIRROR_A: True, MIRROR_B: False}, lambda: {"tokens": 3, "pull_contexts": 7})
    for _ in range(2):
        metrics.observe(observations(served_blob(served_by=MIRROR_B), NAMES))
    seen = scraped(metrics)
    served = (("host", MIRROR_B), ("upstream", "upstream.test"))
    assert seen[("ocigate_requests_total", (*served[:1], ("kind", "blob"), ("status", "200"), served[1]))] == 2
    assert seen[("ocigate_response_bytes_total", served)] == 2468
    assert seen[("ocigate_fallbacks_total", (("host", MIRROR_A), ("reason", "cooldown"), served[1]))] == 2
    assert seen[("ocigate_fallbacks_total", (("host", MIRROR_B), ("reason", "not_found"), served[1]))] == 2
    assert seen[("ocigate_tokens_total", (("host", MIRROR_B), ("source", "cached")))] == 2
    assert seen[("ocigate_tokens_total", (("host", MIRROR_B), ("source", "fetched")))] == 2
    duration = (("kind", "blob"), ("upstream", "upstream.test"))
    assert seen[("ocigate_request_duration_seconds_count", duration)] == 2
    assert seen[("ocigate_request_duration_seconds_sum", duration)] == 1.0
    assert seen[("ocigate_host_cooling_down", (("host", MIRROR_A),))] == 1
    assert seen[("ocigate_host_cooling_down", (("host", MIRROR_B),))] == 0
    assert seen[("ocigate_cache_entries", (("cache", "tokens"),))] == 3
    assert seen[("ocigate_cache_entries", (("cache", "pull_contexts"),))] == 7
    assert b"ocigate_" not in generate_latest(REGISTRY)


def test_the_server_serves_the_registry_and_stops() -> None:
    metrics = Metrics(dict, dict)
    metrics.observe(observations(served_blob(), NAMES))
    server = MetricsServer.start(MetricsAddress("127.0.0.1", 0), metrics.registry, fine, fine)
    address = server.address
    try:
        assert address.host == "127.0.0.1" and address.port > 0
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as answer:
            assert b'ocigate_requests_total{host="other",kind="blob"' in answer.read()
    finally:
        server.stop()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", address.port), timeout=1):
        pass


def test_an_address_in_use_cannot_be_served_on() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError):
            address = MetricsAddress("127.0.0.1", taken.getsockname()[1])
            MetricsServer.start(address, Metrics(dict, dict).registry, fine, fine)


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_the_server_answers_the_probes_beside_the_metrics(host: str) -> None:
    if host == "::1" and not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    asked: list[str] = []

    def alive() -> Verdict:
        asked.append("alive")
        return Verdict(True, "alive")

    def ready() -> Verdict:
        asked.append("ready")
        return Verdict(False, "not ready: the proxy is not listening yet")

    try:
        server = MetricsServer.start(MetricsAddress(host, 0), Metrics(dict, dict).registry, alive, ready)
    except OSError as e:
        pytest.skip(f"cannot listen on {host}: {e}")
    try:
        base = f"http://{server.address}"
        assert get(base + LIVENESS_PATH) == (200, "alive\n")
        assert get(base + READINESS_PATH) == (503, "not ready: the proxy is not listening yet\n")
        status, text = get(base + "/metrics")
        assert status == 200 and "ocigate_requests" in text
    finally:
        server.stop()
    assert asked == ["alive", "ready"]  # each probe asked once, the metrics neither
