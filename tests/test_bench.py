"""The benchmark's pure parts (bench/): its arithmetic, its tables, its results file and charts, what it reads from
/proc, its command line. The benchmark itself is run by ./run.sh bench, never by the tests."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench import charts, procs, results, suite
from bench.stats import (
    alternating,
    median,
    median_of_differences,
    median_of_ratios,
    mib_per_second,
    percentile,
    ratio,
)
from bench.tables import format_cell, format_table, markdown_table

FIXED_RESULTS = Path(__file__).parent / "data" / "bench" / "results.json"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --- stats -----------------------------------------------------------------------------------------------------------


def test_percentile_is_the_nearest_rank() -> None:
    values = [float(n) for n in range(1, 101)]  # 1..100
    assert percentile(values, 0.5) == 50
    assert percentile(values, 0.95) == 95
    assert percentile(values, 0.99) == 99
    assert percentile(values, 1.0) == 100
    assert percentile([7.0, 1.0, 3.0], 0.5) == 3  # order of measurement does not matter


@given(st.lists(st.floats(min_value=0, max_value=1e6), min_size=1), st.floats(min_value=0.01, max_value=1.0))
def test_percentile_is_a_measured_value_that_enough_values_do_not_exceed(values: list[float], share: float) -> None:
    found = percentile(values, share)
    assert found in values
    assert sum(value <= found for value in values) >= share * len(values)
    assert sum(value < found for value in values) < share * len(values)


def test_percentile_refuses_what_has_no_answer() -> None:
    with pytest.raises(ValueError, match="no values"):
        percentile([], 0.5)
    with pytest.raises(ValueError, match="share"):
        percentile([1.0], 0)
    with pytest.raises(ValueError, match="no values"):
        median([])


def test_ratio_and_throughput() -> None:
    assert ratio(3.0, 4.0) == 0.75
    assert ratio(None, 4.0) is None
    assert ratio(3.0, None) is None
    assert ratio(3.0, 0.0) is None
    assert mib_per_second(256 * 1024 * 1024, 2.0) == 128
    with pytest.raises(ValueError):
        mib_per_second(1, 0)


def test_ratios_are_taken_round_by_round_then_the_median() -> None:
    baseline = [1.0, 2.0, 3.0]
    way = [3.0, 2.5, 3.3]  # per round 3.0, 1.25, 1.1: the median is 1.25
    assert median_of_ratios(way, baseline) == 1.25
    assert median(way) / median(baseline) == 1.5  # a ratio of medians pairs round 1's way with round 2's baseline
    assert median_of_differences([3.0, 30.0, 4.0], [2.0, 28.0, 3.5]) == 1.0  # +1, +2, +0.5


def test_one_drifted_round_does_not_move_the_median_of_differences() -> None:
    assert median_of_differences([1.5, 1.6, 9.0, 1.4, 1.5], [1.0, 1.0, 1.0, 1.0, 1.0]) == 0.5


def test_paired_rounds_must_match_and_a_zero_baseline_has_no_ratio() -> None:
    with pytest.raises(ValueError, match="3 rounds paired with 2 baseline rounds"):
        median_of_ratios([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="no rounds"):
        median_of_differences([], [])
    assert median_of_ratios([1.0, 2.0], [1.0, 0.0]) is None


@given(st.lists(st.tuples(st.floats(0.01, 1e3), st.floats(0.01, 1e3)), min_size=1, max_size=30))
def test_a_ratio_round_by_round_lies_between_the_rounds_ratios(pairs: list[tuple[float, float]]) -> None:
    values, baselines = [a for a, _ in pairs], [b for _, b in pairs]
    ratios = [a / b for a, b in pairs]
    found = median_of_ratios(values, baselines)
    assert found is not None
    assert min(ratios) <= found <= max(ratios)
    assert median_of_ratios(baselines, baselines) == 1.0


def test_rounds_alternate_the_order_of_the_ways() -> None:
    ways = ["direct", "mitmproxy+tls", "ocigate"]
    orders = [alternating(ways, number) for number in range(4)]
    assert orders == [ways, ways[::-1], ways, ways[::-1]]
    # Over a pair of rounds every way holds each position once from either end: as often early as late.
    for way in ways:
        assert orders[0].index(way) + orders[1].index(way) == len(ways) - 1


# --- tables ----------------------------------------------------------------------------------------------------------


def test_cells_are_formatted_for_reading() -> None:
    assert format_cell(None) == "-"
    assert format_cell(0.789) == "0.79"
    assert format_cell(283.04) == "283.0"
    assert format_cell(50) == "50"
    assert format_cell("ocigate") == "ocigate"


def test_table_aligns_names_left_and_figures_right() -> None:
    table = format_table(["way", "MiB/s"], [["direct", 800.4], ["ocigate", 0.5]])
    assert table.splitlines() == ["way      MiB/s", "direct   800.4", "ocigate   0.50"]


def test_table_refuses_a_row_of_the_wrong_width() -> None:
    with pytest.raises(ValueError, match="row 1 has 1 cells for 2 columns"):
        format_table(["way", "MiB/s"], [["direct", 1.0], ["ocigate"]])


def test_markdown_table_for_the_docs() -> None:
    table = markdown_table(["way", "p50 ms"], [["a|b", 1.234], ["ocigate", None]])
    assert table.splitlines() == ["| way | p50 ms |", "| :--- | ---: |", "| a\\|b | 1.23 |", "| ocigate | - |"]


# --- results file ----------------------------------------------------------------------------------------------------


def test_results_file_round_trips(tmp_path: Path) -> None:
    loaded = results.load(FIXED_RESULTS)
    written = results.save(loaded, tmp_path)
    assert written.name == "2026-12-02.json"
    assert results.load(written) == loaded
    assert loaded.scenarios[1].chart.x == [1, 10, 50, 200]
    assert loaded.scenarios[0].chart.series["ocigate"] == [283.0, None]


def test_a_second_run_of_the_day_is_written_beside_the_first_never_over_it(tmp_path: Path) -> None:
    loaded = results.load(FIXED_RESULTS)
    first = results.save(loaded, tmp_path)
    kept = first.read_text()
    names = [results.save(loaded, tmp_path).name for _ in range(2)]
    assert names == ["2026-12-02-2.json", "2026-12-02-3.json"]
    assert first.read_text() == kept


def test_this_machine_is_described() -> None:
    machine = results.this_machine()
    assert machine.cores == os.cpu_count()
    assert machine.python == f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    assert machine.cpu_model and machine.mitmproxy


def _broken(change) -> dict:
    document = json.loads(FIXED_RESULTS.read_text())
    change(document)
    return document


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(schema=2), "schema is 2"),
        (lambda d: d["machine"].pop("cores"), "machine.cores is not an integer"),
        (lambda d: d["scenarios"][0]["rows"][0].pop(), "scenario 'blob' row 0 has 4 cells for 5 columns"),
        (lambda d: d["scenarios"][0]["rows"][1].__setitem__(2, [1]), "scenario 'blob' row 1: [1] is not a string"),
        (lambda d: d["scenarios"][0]["chart"].update(kind="pie"), "kind 'pie' is not one of bar, line"),
        (
            lambda d: d["scenarios"][0]["chart"]["series"]["ocigate"].append(1.0),
            "series 'ocigate' has 3 values for 2 x values",
        ),
        (lambda d: d["scenarios"][1]["chart"]["x"].__setitem__(0, "one"), "a line chart's x values are numbers"),
        (lambda d: d["scenarios"][1]["chart"].update(log_y="yes"), "log_y is not true or false"),
    ],
)
def test_a_wrong_results_document_is_named(change, message: str) -> None:
    with pytest.raises(results.SchemaError, match=message.replace("[", r"\[").replace("]", r"\]")):
        results.parse(_broken(change))


def test_the_benchmark_writes_what_it_reads() -> None:
    scenario = results.Scenario(
        "tokens",
        "5. Token requests",
        ["way", "token requests"],
        [["ocigate", 1], ["direct", None]],
        results.Chart("bar", "Tokens", "way", "requests", ["ocigate"], {"token requests": [1.0]}),
    )
    written = results.Results("2026-12-02", results.this_machine(), {"quick": True}, [scenario])
    assert results.parse(json.loads(results.dump(written))) == written


# --- charts ----------------------------------------------------------------------------------------------------------


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_a_chart_per_scenario_is_a_png_from_a_fixed_results_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fixed = tmp_path / "2026-12-02.json"
    fixed.write_bytes(FIXED_RESULTS.read_bytes())
    assert charts.main(["--markdown", str(fixed)]) == 0
    for name in ("blob", "concurrency"):
        assert _png_size(tmp_path / f"{name}.png") == (800, 450)
    printed = capsys.readouterr().out
    assert "### 1. Blob throughput\n\n| way | client | MiB/s | /mitmproxy+tls | /direct |" in printed
    assert "| ocigate | HTTP/1.1 | 283.0 | 0.79 | 0.35 |" in printed


def test_a_log_scale_chart_is_drawn(tmp_path: Path) -> None:
    chart = results.Chart("bar", "Failover", "requests", "ms", ["first", "next"], {"a": [2000.0, 3.0]}, log_y=True)
    assert _png_size(charts.draw(chart, tmp_path / "failover.png")) == (800, 450)


def test_charts_refuse_a_broken_results_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken.json"
    document = json.loads(FIXED_RESULTS.read_text())
    document.pop("date")
    broken.write_text(json.dumps(document))
    assert charts.main([str(broken)]) == 1
    assert "date is not a string" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))


# --- /proc -----------------------------------------------------------------------------------------------------------


def test_cpu_ticks_are_read_past_a_name_with_spaces_and_parentheses() -> None:
    fields = ["S", *(str(n) for n in range(4, 14)), "120", "30", *(str(n) for n in range(16, 53))]
    assert procs.cpu_ticks(f"1234 (odd ) name) {' '.join(fields)}") == 150


def test_status_fields_are_read_in_kib() -> None:
    status = "Name:\tmitmdump\nVmHWM:\t   81234 kB\nVmRSS:\t   80000 kB\n"
    assert procs.status_kib(status, "VmHWM") == 81234
    assert procs.status_kib(status, "VmSwap") is None


def test_process_tree_holds_children_and_their_memory_is_summed() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        tree = procs.process_tree(os.getpid())
        assert tree[0] == os.getpid()
        assert child.pid in tree
        alone = procs.summed_memory_mib([os.getpid()], "VmRSS")
        assert procs.summed_memory_mib(tree, "VmRSS") > alone > 0
        assert procs.cpu_seconds([os.getpid()]) > 0
    finally:
        child.kill()
        child.wait()
    assert procs.summed_memory_mib([child.pid], "VmRSS") == 0  # gone: counts nothing


# --- command line ----------------------------------------------------------------------------------------------------


def test_quick_lowers_sizes_and_a_flag_wins_over_it() -> None:
    full = suite.parse_args([])
    assert (full.blob_mib, full.rss_mib, full.concurrency, full.layer_kib) == (256, [256, 2048], [1, 10, 50, 200], 1024)
    assert full.scenarios == list(suite.SCENARIOS)
    assert (full.requests, full.manifest_rounds) == (100, 20)
    quick = suite.parse_args(["--quick", "--blob-mib", "32"])
    assert (quick.blob_mib, quick.rss_mib, quick.layer_kib) == (32, [64, 256], 256)
    assert (quick.requests, quick.manifest_rounds) == (50, 4)


def test_the_manifest_scenario_measures_another_ocigate_only_when_asked(tmp_path: Path) -> None:
    assert suite.parse_args([]).baseline_addons is None
    assert suite.parse_args(["--baseline-addons", str(tmp_path)]).baseline_addons == tmp_path


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--scenarios", "blob,speed"], "unknown scenario speed"),
        (["--concurrency", "1,x"], "not a comma-separated list of whole numbers"),
        (["--rss-mib", "0"], "every number must be at least 1"),
        (["--rounds", "0"], "--rounds must be at least 1"),
        (["--manifest-rounds", "0"], "--manifest-rounds must be at least 1"),
    ],
)
def test_bad_flags_are_named(arguments: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        suite.parse_args(arguments)
    assert message in capsys.readouterr().err


def test_a_baseline_is_named_by_its_commit_never_by_a_path_of_this_machine(tmp_path: Path) -> None:
    checkout = Path(__file__).resolve().parents[1]
    commit = subprocess.run(
        ["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    assert suite.addons_label(checkout / "addons") == f"at commit {commit.stdout.strip()}"
    outside = tmp_path / "addons"
    outside.mkdir()
    assert suite.addons_label(outside) == "addons"


def test_failover_counts_the_requests_that_asked_the_first_mirror_from_the_access_log(tmp_path: Path) -> None:
    def line(kind: str, upstream: str, *hosts: tuple[str, str | None]) -> str:
        tried = [{"host": f"http://{h}", "result": "x", "skipped": r is not None, "reason": r} for h, r in hosts]
        return json.dumps({"upstream": upstream, "kind": kind, "hosts": tried})

    first, registry = suite.FIRST_MIRROR, "registry.test:5000"
    log = tmp_path / "access.log"
    log.write_text(
        "\n".join(
            [
                line("manifest", "warm.test", (first, None), (registry, None)),  # another upstream: not counted
                line("manifest", suite.pull.UPSTREAM, (first, "unreachable"), (registry, None)),  # dialled, refused
                *[line("manifest", suite.pull.UPSTREAM, (first, "cooldown"), (registry, None))] * 5,
                line("blob", suite.pull.UPSTREAM, (first, "unreachable"), (registry, None)),  # not a manifest
                line("manifest", suite.pull.UPSTREAM, (first, "status"), (registry, None)),  # asked again: counted
                line("manifest", suite.pull.UPSTREAM, (first, None)),  # asked, and it answered: counted
            ]
        )
        + "\n"
    )
    assert suite.first_mirror_asked(log) == suite.FirstMirror(logged=8, asked=3)
    with pytest.raises(suite.BenchError, match="access log cannot be read"):
        suite.first_mirror_asked(tmp_path / "none.log")
