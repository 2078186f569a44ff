"""`ocigate report`: a capture's flows grouped into pulls by the named reference ocigate recorded, with the hosts
asked, fallbacks, bytes, time, errors and token fetches; as text and as a self-contained page; never a secret, never
markup from the capture, never a crash on an odd record, and a clear error for a file that is no capture."""

import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mitmproxy import http, io
from mitmproxy.test import tflow, tutils

from ocigate import cli, report, scrub
from ocigate.record import METADATA_KEY
from ocigate.report import CaptureError, build, read_report, redact
from ocigate.reporthtml import as_html, waterfall

UPSTREAM = "upstream.test"
PULL = f"{UPSTREAM}/team/app:v1"
FAULTY = "http://faulty.test:5000/v2"
GOOD = "http://good.test:5000/v2"
CONFIG = "sha256:" + "c" * 64
LAYER = "sha256:" + "d" * 64
T0 = 1_700_000_000.0


def flow(
    path: str,
    record: Any = None,
    *,
    start: float = T0,
    seconds: float = 0.1,
    status: int = 200,
    content: bytes | None = b"{}",
    method: str = "GET",
    headers: dict[str, str] | None = None,
) -> http.HTTPFlow:
    request = tutils.treq(host=UPSTREAM, port=443, scheme=b"https", path=path.encode(), method=method.encode())
    response = tutils.tresp(status_code=status, content=content or b"")
    if content is None:
        response.raw_content = None
    else:
        response.headers["Content-Length"] = str(len(content))
    for name, value in (headers or {}).items():
        response.headers[name] = value
    made = tflow.tflow(req=request, resp=response)
    made.request.timestamp_start = start
    made.response.timestamp_start = start + seconds / 2
    made.response.timestamp_end = start + seconds
    if record is not None:
        made.metadata[METADATA_KEY] = record
    return made


def record(kind: str, reference: str | None, served_by: str = GOOD, **more: Any) -> dict[str, Any]:
    shown = {
        "upstream": UPSTREAM,
        "rule": "rules/upstream.test/hosts.toml",
        "route": kind,
        "method": "GET",
        "repository": "team/app" if reference else None,
        "reference": reference,
        "named_reference": PULL if reference else None,
        "attempts": [{"host": served_by, "result": "200", "fell_through": False}] if served_by != "gateway" else [],
        "served_by": served_by,
        "status": 200,
    }
    return shown | more


def fallback(result: str) -> list[dict[str, Any]]:
    return [
        {"host": FAULTY, "result": result, "fell_through": True},
        {"host": GOOD, "result": "200", "fell_through": False},
    ]


def pull_with_a_failing_mirror() -> list[http.HTTPFlow]:
    """A pull of upstream.test/team/app:v1: the faulty mirror answers 500 for the manifest and refuses the config's
    connection; the good one serves all; a ping before, a token request ocigate did not handle, and a layer."""
    return [
        flow("/v2/", record("ping", None, served_by="gateway"), start=T0, seconds=0.002),
        flow(
            "/v2/team/app/manifests/v1",
            record("manifest", "v1", attempts=fallback("500"), token="fetched"),
            start=T0 + 0.01,
            seconds=0.2,
            content=b'{"schemaVersion": 2}',
        ),
        flow("/token?scope=repository:team/app:pull", None, start=T0 + 0.005, seconds=0.01),
        flow(
            f"/v2/team/app/blobs/{CONFIG}",
            record("blob", CONFIG, attempts=fallback("connection refused"), token="cached", verified=CONFIG),
            start=T0 + 0.25,
            seconds=0.05,
            content=b"x" * 300,
        ),
        flow(
            f"/v2/team/app/blobs/{LAYER}",
            record("blob", LAYER, token="cached", verified=LAYER),
            start=T0 + 0.3,
            seconds=0.5,
            content=None,  # streamed past mitmproxy: only its Content-Length tells
            headers={"Content-Length": "2000000"},
        ),
    ]


def the_pull(built: report.Report, name: str = PULL) -> report.Pull:
    return next(p for p in built.pulls if p.name == name)


def test_blobs_and_child_manifests_belong_to_the_pull_their_named_reference_names() -> None:
    flows = pull_with_a_failing_mirror()
    flows.append(flow("/v2/other/manifests/v2", record("manifest", "v2", named_reference=f"{UPSTREAM}/other:v2")))
    built = build(flows, "capture.flows")
    assert [p.name for p in built.pulls] == [f"{UPSTREAM} (no image)", PULL, f"{UPSTREAM}/other:v2"]
    pull = the_pull(built)
    assert [(r.kind, r.reference) for r in pull.requests] == [("manifest", "v1"), ("blob", CONFIG), ("blob", LAYER)]
    assert [(o.host, o.path, o.token_request) for o in built.others] == [(UPSTREAM, "/token", True)]


def test_a_request_without_a_named_reference_is_the_pull_it_names_itself() -> None:
    by_digest = record("manifest", CONFIG, named_reference=None)
    built = build([flow(f"/v2/team/app/manifests/{CONFIG}", by_digest)], "c")
    assert [p.name for p in built.pulls] == [f"{UPSTREAM}/team/app@{CONFIG}"]


def test_the_failing_mirror_and_the_fallback_are_named_with_why() -> None:
    pull = the_pull(build(pull_with_a_failing_mirror(), "capture.flows"))
    hosts = {h.host: h for h in pull.hosts}
    assert hosts[FAULTY].served == 0
    assert dict(hosts[FAULTY].failures) == {"500": 1, "connection refused": 1}
    assert hosts[GOOD].served == 3
    assert {(f.host, f.result, f.served_by, f.count) for f in pull.fallbacks} == {
        (FAULTY, "500", GOOD, 1),
        (FAULTY, "connection refused", GOOD, 1),
    }
    text = report.as_text(build(pull_with_a_failing_mirror(), "capture.flows"))
    assert f"fallback: {FAULTY} (500) -> {GOOD}: 1 request" in text
    assert f"host {FAULTY}: asked 2, served 0, did not serve: 500 x1; connection refused x1" in text


def test_bytes_come_from_the_kept_body_or_the_content_length_of_a_streamed_one() -> None:
    pull = the_pull(build(pull_with_a_failing_mirror(), "c"))
    assert [r.size for r in pull.requests] == [len(b'{"schemaVersion": 2}'), 300, 2_000_000]
    assert pull.size == 2_000_320


def test_a_head_moves_no_bytes_whatever_its_content_length() -> None:
    head = flow("/v2/team/app/manifests/v1", record("manifest", "v1"), method="HEAD", headers={"Content-Length": "99"})
    assert the_pull(build([head], "c")).requests[0].size == 0


def test_time_comes_from_the_flow_timestamps() -> None:
    pull = the_pull(build(pull_with_a_failing_mirror(), "c"))
    assert pull.requests[0].seconds == pytest.approx(0.2)
    assert pull.seconds == pytest.approx(0.3 + 0.5 - 0.01)


def test_bytes_and_ms_the_record_gives_win_over_the_flow() -> None:
    given_record = record("blob", LAYER, bytes=1234, ms=1500)
    request = the_pull(build([flow(f"/v2/team/app/blobs/{LAYER}", given_record, seconds=0.1)], "c")).requests[0]
    assert (request.size, request.seconds) == (1234, pytest.approx(1.5))


def test_token_fetches_and_cache_hits_are_counted_once_per_host_asked() -> None:
    # The manifest's serving attempt says nothing, so its record's "fetched" counts; the faulty host fetched one too.
    manifest = record(
        "manifest",
        "v1",
        token="fetched",
        attempts=[
            {"host": FAULTY, "result": "500", "fell_through": True, "token": "fetched"},
            {"host": GOOD, "result": "200", "fell_through": False},
        ],
    )
    # The blob's serving attempt says "cached", the same as its record: counted once.
    blob = record(
        "blob",
        LAYER,
        token="cached",
        attempts=[{"host": GOOD, "result": "200", "fell_through": False, "token": "cached"}],
    )
    built = build([flow("/v2/team/app/manifests/v1", manifest), flow(f"/v2/team/app/blobs/{LAYER}", blob)], "c")
    assert the_pull(built).tokens == {"fetched": 2, "cached": 1}
    assert "tokens: 1 cached, 2 fetched" in report.as_text(built)


def test_credentials_presented_and_digest_checks_are_summed_up() -> None:
    credential = "'ci' from ocigate credentials (host good.test:5000)"
    flows = [
        flow(f"/v2/team/app/blobs/{CONFIG}", record("blob", CONFIG, credential=credential, verified=CONFIG)),
        flow(f"/v2/team/app/blobs/{LAYER}", record("blob", LAYER, credential=credential, unchecked="a redirect")),
        flow("/v2/team/app/manifests/v1", record("manifest", "v1")),
    ]
    text = report.as_text(build(flows, "c"))
    assert f"credentials: {credential} x2" in text
    assert "digests: 1 verified, 1 unchecked (a redirect)" in text


def test_a_request_no_host_could_serve_is_an_error_naming_every_host_and_no_fallback() -> None:
    failed = record(
        "blob",
        LAYER,
        served_by="gateway",
        status=503,
        error="no host for upstream.test could be reached",
        attempts=[
            {"host": FAULTY, "result": "connection refused", "fell_through": True},
            {"host": GOOD, "result": "timed out", "fell_through": True},
        ],
    )
    built = build([flow(f"/v2/team/app/blobs/{LAYER}", failed, status=503)], "c")
    pull = the_pull(built)
    assert pull.failed == pull.requests
    assert pull.fallbacks == ()
    text = report.as_text(built)
    assert (
        f"error: GET blob sha256:dddddddddddd: 503: no host for upstream.test could be reached (not served by "
        f"{FAULTY}: connection refused; {GOOD}: timed out)"
    ) in text


def test_a_flow_that_broke_off_is_an_error_with_mitmproxy_s_word() -> None:
    broken = flow(f"/v2/team/app/blobs/{LAYER}", record("blob", LAYER))
    broken.error = tflow.terr("peer closed connection")
    broken.response = None
    request = the_pull(build([broken], "c")).requests[0]
    assert request.error == "peer closed connection"
    assert request.failed


def test_the_text_lists_each_request_in_time_order_with_host_answer_size_and_time() -> None:
    text = report.as_text(build(pull_with_a_failing_mirror(), "capture.flows"))
    assert text.startswith("ocigate report of capture.flows: 2 pulls, 4 requests handled by ocigate, 1 other flow\n")
    lines = [line.strip() for line in text.splitlines()]
    manifest = next(line for line in lines if "GET manifest v1 ->" in line)
    assert manifest == f"+  0.000s   200 ms GET manifest v1 -> {GOOD} 200, 20 B (not served by {FAULTY}: 500)"
    assert f"GET blob sha256:dddddddddddd -> {GOOD} 200, 2.0 MB" in text
    assert "3 requests (2 blob, 1 manifest), 2.0 MB in 790 ms, 0 failed" in text
    assert "Flows without ocigate's record: 1 (1 token request)" in text


# --- No secret, no markup, no terminal escape.

SECRETS = ("hunter2-SECRET", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl", "dG9rZW4tdmFsdWU=")


def leaky_flows() -> list[http.HTTPFlow]:
    """A capture made without ocigate's redaction, whose record and flows hold secrets in every place the report
    takes text from."""
    leaky = record(
        "manifest",
        "v1",
        served_by=f"https://ci:{SECRETS[0]}@good.test/v2",
        error=(
            f'denied: {{"token": "{SECRETS[1]}", "refresh_token": "{SECRETS[0]}"}} Authorization: Bearer {SECRETS[2]}'
        ),
        status=401,
        attempts=[
            {"host": f"https://bob:{SECRETS[0]}@faulty.test/v2", "result": f"Basic {SECRETS[2]}", "fell_through": True}
        ],
    )
    with_header = flow(
        f"/v2/team/app/manifests/v1?access_token={SECRETS[1]}",
        leaky,
        status=401,
        headers={"Set-Cookie": f"session={SECRETS[0]}", "X-Note": SECRETS[2]},
    )
    with_header.request.headers["Authorization"] = f"Bearer {SECRETS[1]}"
    unruled = flow(f"/oauth/token?password={SECRETS[0]}&refresh_token={SECRETS[1]}", None)
    unruled.error = tflow.terr(f"https://u:{SECRETS[0]}@x.test failed: Bearer {SECRETS[2]}")
    return [with_header, unruled]


def test_no_secret_reaches_the_text_or_the_page() -> None:
    built = build(leaky_flows(), "capture.flows")
    for shown in (report.as_text(built), as_html(built)):
        for secret in SECRETS:
            assert secret not in shown
    assert "<redacted>" in report.as_text(built)


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        ("https://user:pw@host/x", "https://<redacted>@host/x"),
        ("Bearer abc.def", "Bearer <redacted>"),
        ("Bearer <redacted>", "Bearer <redacted>"),
        ('{"access_token": "abc", "expires_in": 60}', '{"access_token": "<redacted>", "expires_in": 60}'),
        ("grant_type=password&password=pw&username=u", "grant_type=password&password=<redacted>&username=u"),
        ("Cookie: a=b; c=d", "Cookie: <redacted>; c=d"),
        ("manifest unknown: 404", "manifest unknown: 404"),
    ],
)
def test_redact_keeps_the_shape_and_hides_the_value(text: str, redacted: str) -> None:
    assert redact(text) == redacted


def test_markup_from_the_capture_is_escaped_in_the_page() -> None:
    hostile = record(
        "manifest",
        "v1",
        named_reference='upstream.test/x:"><script>alert(1)</script>',
        error="<img src=http://evil.test/x onerror=alert(1)>",
        status=500,
        attempts=[{"host": '</svg><a href="http://evil.test">x</a>', "result": "<b>500</b>", "fell_through": True}],
    )
    page = as_html(build([flow("/v2/team/app/manifests/v1", hostile, status=500)], "<i>capture</i>"))
    assert "<script" not in page
    assert "<img" not in page
    assert "<a " not in page and "<b>" not in page and "<i>capture" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_the_page_loads_and_runs_nothing() -> None:
    page = as_html(build(pull_with_a_failing_mirror(), "capture.flows"))
    assert "<script" not in page.lower()
    assert not re.search(r"\s(src|href)\s*=", page, re.IGNORECASE)
    assert "@import" not in page
    assert not re.search(r"url\((?!#)", page)
    assert "default-src 'none'" in page


def test_terminal_escapes_from_the_capture_never_reach_the_text() -> None:
    hostile = record("manifest", "v1", error="\x1b]0;owned\x07\x1b[2J gone\r\nfake line")
    text = report.as_text(build([flow("/v2/team/app/manifests/v1", hostile)], "c"))
    assert "\x1b" not in text and "\x07" not in text and "\r" not in text
    assert "\\x1b]0;owned\\x07" in text
    assert "\nfake line" not in text


# --- The page.


def test_the_waterfall_has_a_lane_per_host_and_hatches_the_failed_mirror_red() -> None:
    pull = the_pull(build(pull_with_a_failing_mirror(), "c"))
    svg = waterfall(pull, 2)
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    faulty_lane = svg.index(f"{FAULTY}: served 0, did not serve 2")
    good_lane = svg.index(f"{GOOD}: served 3")
    assert faulty_lane < good_lane
    failed_bars = re.findall(r'<g class="bar failed">.*?</g>', svg)
    assert len(failed_bars) == 2
    assert all('fill="url(#failed-hatch-2)"' in bar for bar in failed_bars)
    assert any(">500</text>" in bar for bar in failed_bars)
    assert any(">connection refused</text>" in bar for bar in failed_bars)
    assert '<pattern id="failed-hatch-2"' in svg
    assert len(re.findall(r'<g class="bar served">', svg)) == 3


def test_the_waterfall_places_bars_by_time() -> None:
    pull = the_pull(build(pull_with_a_failing_mirror(), "c"))
    bars = re.findall(r'<g class="bar served">.*?<rect x="([\d.]+)" y="[\d.]+" width="([\d.]+)"', waterfall(pull))
    (x1, w1), (x2, _), (x3, w3) = [(float(x), float(w)) for x, w in bars]
    assert x1 < x2 < x3
    assert w3 > w1  # the 0.5 s layer is longer than the 0.2 s manifest
    assert x3 + w3 == pytest.approx(330 + 640, abs=0.2)  # it ends the pull


def test_the_page_has_every_pull_its_waterfall_and_the_other_flows() -> None:
    page = as_html(build(pull_with_a_failing_mirror(), "capture.flows"))
    assert page.startswith("<!DOCTYPE html>")
    assert page.count('<svg class="waterfall"') == 2
    assert f"Pull {PULL}" in page
    assert f"fallback: {FAULTY} (500) -&gt; {GOOD}: 1 request" in page
    assert "Flows without ocigate's record" in page


def test_a_huge_pull_draws_a_bounded_waterfall() -> None:
    flows = [flow(f"/v2/team/app/blobs/{LAYER}", record("blob", LAYER), start=T0 + i) for i in range(1000)]
    svg = waterfall(the_pull(build(flows, "c")))
    assert svg.count("<g class=") == 400
    assert "600 more rows left out" in svg


# --- Odd records: a note, never a crash.


def test_a_value_of_the_wrong_type_is_a_note_naming_the_flow_and_the_field() -> None:
    odd = record("manifest", "v1", status="200", attempts=[{"host": GOOD}, "x"], bytes=-1)
    built = build([flow("/v2/team/app/manifests/v1", odd)], "c")
    request = the_pull(built).requests[0]
    assert request.status is None and request.attempts == () and request.size == 2
    notes = "\n".join(built.notes)
    assert "flow 1 (GET upstream.test/v2/team/app/manifests/v1): 'status' is str, not a whole number" in notes
    assert "'bytes' is int, not a whole number of at least 0" in notes
    assert "attempt 1 is not a host, a result and whether it fell through" in notes
    assert "attempt 2 is not" in notes


def test_a_record_that_is_no_record_lists_the_flow_apart_with_a_note() -> None:
    built = build([flow("/v2/team/app/manifests/v1", ["not", "a", "record"])], "c")
    assert built.pulls == () and len(built.others) == 1
    assert "ocigate's record is list, not a record" in built.notes[0]


def test_a_capture_without_ocigate_records_says_so_and_non_http_flows_are_noted() -> None:
    built = build([flow("/v2/", None), tflow.ttcpflow()], "c")
    notes = "\n".join(built.notes)
    assert "1 flow of kind TCPFlow left out: not HTTP" in notes
    assert "no flow carries ocigate's record" in notes


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
_FIELDS = (
    "upstream",
    "route",
    "method",
    "repository",
    "reference",
    "named_reference",
    "attempts",
    "served_by",
    "status",
    "error",
    "verified",
    "unchecked",
    "token",
    "bytes",
    "ms",
)
_attempt = st.dictionaries(st.sampled_from(("host", "result", "fell_through", "token")), _json, max_size=4)
_records = (
    st.dictionaries(
        st.sampled_from(_FIELDS),
        _json | st.lists(_attempt | _json, max_size=3),
        max_size=len(_FIELDS),
    )
    | _json
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records=st.lists(_records, min_size=1, max_size=4), seconds=st.floats(allow_nan=True))
def test_any_record_gives_a_report_never_a_crash(records: list[Any], seconds: float) -> None:
    flows = [flow("/v2/team/app/manifests/v1", r, start=T0 + i) for i, r in enumerate(records)]
    flows[0].response.timestamp_end = seconds
    built = build(flows, "c")
    assert built.requests + len(built.others) == len(flows)
    assert report.as_text(built)
    assert as_html(built).endswith("</html>\n")


# --- Reading a capture file.


def write_capture(path: Path, flows: list[http.HTTPFlow]) -> Path:
    with path.open("wb") as out:
        writer = io.FlowWriter(out)
        for made in flows:
            writer.add(made)
    return path


def test_a_saved_capture_reads_as_the_same_report(tmp_path: Path) -> None:
    capture = write_capture(tmp_path / "capture.flows", pull_with_a_failing_mirror())
    assert read_report(capture) == build(pull_with_a_failing_mirror(), str(capture))


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (None, "cannot be read: No such file or directory"),
        (b"", "the file is empty, not a mitmproxy capture"),
        (b"\x00\xffnot a capture at all", "not a mitmproxy capture: Invalid data format."),
        (b'{"log": "not HAR"}', "not a mitmproxy capture: Unable to read HAR file"),
    ],
)
def test_a_file_that_is_no_capture_is_an_error_naming_it(tmp_path: Path, content: bytes | None, why: str) -> None:
    capture = tmp_path / "capture.flows"
    if content is not None:
        capture.write_bytes(content)
    with pytest.raises(CaptureError, match=re.escape(f"{capture}: {why}")):
        read_report(capture)


def test_a_directory_is_no_capture(tmp_path: Path) -> None:
    with pytest.raises(CaptureError, match=re.escape(f"{tmp_path}: ")):
        read_report(tmp_path)


def test_a_capture_cut_short_names_how_far_it_was_read(tmp_path: Path) -> None:
    capture = write_capture(tmp_path / "capture.flows", pull_with_a_failing_mirror())
    whole = capture.read_bytes()
    capture.write_bytes(whole[: len(whole) - 50])
    with pytest.raises(CaptureError, match=re.escape(f"{capture}: not a mitmproxy capture (after 4 flows)")):
        read_report(capture)


def test_the_command_prints_the_report_and_writes_the_page(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capture = write_capture(tmp_path / "capture.flows", pull_with_a_failing_mirror())
    page = tmp_path / "report.html"
    with pytest.raises(SystemExit) as exited:
        cli.main(["report", str(capture), "--html", str(page)])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert f"Pull {PULL}" in out
    assert f"ocigate report: wrote {page}" in out
    assert '<svg class="waterfall"' in page.read_text()


def test_the_command_fails_naming_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nothing.flows"
    assert report.main(["report", str(missing)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"ocigate report: {missing}: cannot be read: No such file or directory\n"


def test_the_command_fails_when_the_page_cannot_be_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capture = write_capture(tmp_path / "capture.flows", pull_with_a_failing_mirror())
    assert report.main(["report", str(capture), "--html", str(tmp_path / "no" / "such" / "page.html")]) == 1
    assert "ocigate report: cannot write" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(scrub.SECRET_FIELDS))
def test_the_report_redacts_every_field_a_capture_redacts_by_the_same_list(name: str) -> None:
    # Among them the names of docker's and containers' auth files, which captures redact too.
    assert {"auth", "registrytoken", "secret", "passwd"} <= scrub.SECRET_FIELDS
    assert report.redact(f'{{"{name}": "s3cr3t-value"}}') == f'{{"{name}": "<redacted>"}}'
    assert report.redact(f"a=1&{name}=s3cr3t-value") == f"a=1&{name}=<redacted>"
    assert scrub.form(f"a=1&{name}=s3cr3t-value") == f"a=1&{name}=<redacted>"
