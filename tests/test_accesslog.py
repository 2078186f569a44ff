"""The access log: a flow record as one JSON line, and the thread that writes the lines."""

import json
import logging
import os
import sys
import threading
from pathlib import Path

import pytest

from ocigate.accesslog import CUT_MARK, PIPE_BUF, REPORT_EVERY, AccessLog, entry, fit_pipe, line, reference
from ocigate.attempts import Outcome
from ocigate.hoststoml import Rule
from ocigate.record import GATEWAY, FlowRecord

DIGEST = "sha256:" + "a" * 64
MIRROR_A, MIRROR_B = "http://mirror-a.test:5000/v2", "http://mirror-b.test:5000/v2"


def served_manifest() -> FlowRecord:
    return FlowRecord(
        upstream="upstream.test",
        rule="rules/upstream.test/hosts.toml",
        route="manifest",
        method="GET",
        repository="team/app",
        reference="v1",
        named_reference="upstream.test/team/app:v1",
        attempts=[
            Outcome(MIRROR_A, "connection refused", True, unreachable=True),
            Outcome(MIRROR_B, "200", False, 200, credential="'alice' from ocigate", token="fetched"),
        ],
        served_by=MIRROR_B,
        status=200,
        ns="upstream.test",
        credential="'alice' from ocigate",
        token="fetched",
        client="127.0.0.1:40000",
        proxy_user="builder",
        bytes_sent=512,
        duration=0.0424,
    )


def test_the_reference_is_the_tag_or_the_digest_asked_for() -> None:
    record = served_manifest()
    assert reference(record) == "upstream.test/team/app:v1"
    record.reference = DIGEST
    assert reference(record) == f"upstream.test/team/app@{DIGEST}"
    record.reference = None
    assert reference(record) == "upstream.test/team/app"
    record.repository = None
    assert reference(record) is None


def test_an_entry_says_who_asked_what_which_hosts_were_tried_who_served_and_how_much() -> None:
    assert entry(served_manifest(), started=1_700_000_000.25) == {
        "time": "2023-11-14T22:13:20.250Z",
        "worker": None,
        "client": "127.0.0.1:40000",
        "proxy_user": "builder",
        "upstream": "upstream.test",
        "reference": "upstream.test/team/app:v1",
        "named_reference": "upstream.test/team/app:v1",
        "method": "GET",
        "kind": "manifest",
        "hosts": [
            {"host": MIRROR_A, "result": "connection refused", "skipped": True, "reason": "unreachable"},
            {"host": MIRROR_B, "result": "200", "skipped": False, "reason": None},
        ],
        "served_by": MIRROR_B,
        "ns": "upstream.test",
        "status": 200,
        "bytes": 512,
        "ms": 42,
        "credential": "'alice' from ocigate",
        "token": "fetched",
        "verified": None,
        "unchecked": None,
        "error": None,
        "policy": None,
    }


def test_an_entry_of_a_refused_request_has_every_key_with_nothing_known() -> None:
    rule = Rule("upstream.test", Path("rules/upstream.test/hosts.toml"), ())
    record = FlowRecord.refused("upstream.test", rule, "GET")
    record.error = "not a distribution API path"
    shown = entry(record, started=0)
    assert shown.keys() == entry(served_manifest(), started=0).keys()
    assert (shown["kind"], shown["served_by"], shown["bytes"], shown["ms"]) == ("invalid", GATEWAY, None, None)
    assert shown["error"] == "not a distribution API path"


def test_an_entry_names_the_worker_of_ocigate_workers_that_served_it() -> None:
    assert entry(served_manifest(), started=0, worker=1)["worker"] == 1
    assert json.loads(line(served_manifest(), started=0, worker=0))["worker"] == 0


def test_a_line_is_one_line_of_json_whatever_a_value_holds() -> None:
    record = served_manifest()
    record.error = "a host said\r\nX-Injected: yes"
    text = line(record, started=0)
    assert text.endswith("\n") and text.count("\n") == 1 and "\r" not in text
    assert json.loads(text)["error"] == "a host said\r\nX-Injected: yes"


def test_the_log_writes_every_line_in_order_by_a_thread_of_its_own(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    path.write_text("kept\n")
    log = AccessLog.open(path)
    writers = set()
    original = log._write_line

    def noting(data: bytes) -> None:
        writers.add(threading.current_thread().name)
        original(data)

    log._write_line = noting  # type: ignore[method-assign]
    for n in range(1000):
        log.write(f"{n}\n")
    log.close()
    assert path.read_text().splitlines() == ["kept", *(str(n) for n in range(1000))]
    assert writers == {"ocigate-access-log"}


def test_a_line_is_in_the_file_before_the_log_is_closed(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog.open(path)
    try:
        log.write("first\n")
        for _ in range(200):
            if path.read_text() == "first\n":
                break
            threading.Event().wait(0.01)
        assert path.read_text() == "first\n"
    finally:
        log.close()


def test_standard_error_is_written_to_but_not_closed(capfd: pytest.CaptureFixture[str]) -> None:
    log = AccessLog.open("-")
    log.write("to stderr\n")
    log.close()
    assert capfd.readouterr().err == "to stderr\n"
    assert not sys.stderr.closed


def test_each_line_is_one_write_to_a_file_opened_for_appending(tmp_path: Path) -> None:
    """The workers of `ocigate --workers N` append to one file: a line written in pieces could mix with another's."""
    path = tmp_path / "access.log"
    log = AccessLog.open(path)
    other = AccessLog.open(path)  # another worker's
    writes: list[bytes] = []
    original = os.write

    def noting(fd: int, data: bytes) -> int:
        writes.append(bytes(data))
        return original(fd, data)

    long = "x" * 100_000
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "write", noting)
        log.write(f"{long}\n")
        log.close()
        other.write("short\n")
        other.close()
    assert writes == [f"{long}\n".encode(), b"short\n"]
    # Opened before the first line was written, the other log still appends after it (O_APPEND).
    assert path.read_text() == f"{long}\nshort\n"


def test_a_file_that_cannot_be_opened_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        AccessLog.open(tmp_path / "no-such-directory" / "access.log")


def test_a_writer_that_falls_behind_drops_lines_counts_them_and_says_so_once_per_interval(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    now = [0.0]
    path = tmp_path / "access.log"
    log = AccessLog(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), path=path, capacity=2, clock=lambda: now[0])
    writing, disk = threading.Event(), threading.Event()
    original = log._write_line

    def slow(data: bytes) -> None:
        writing.set()
        disk.wait()
        original(data)

    log._write_line = slow  # type: ignore[method-assign]
    caplog.set_level(logging.WARNING, logger="ocigate")
    assert log.write("0\n")
    writing.wait()  # the writer holds line 0, waiting for the disk: two more lines may wait
    assert log.write("1\n") and log.write("2\n")
    assert not log.write("3\n")  # dropped, never waited for: said at once
    now[0] = 10.0
    assert not log.write("4\n") and not log.write("5\n")  # within the interval: counted only
    now[0] = 10.0 + REPORT_EVERY
    assert not log.write("6\n")  # the interval is over: said, all three
    assert not log.write("7\n")
    disk.set()
    log.close()  # what is left is said as the log closes
    assert (tmp_path / "access.log").read_text() == "0\n1\n2\n"
    said = [r.getMessage() for r in caplog.records if "access log" in r.getMessage()]
    assert said == [
        f"ocigate: access log: {n} lines dropped: it was written more slowly than requests ended" for n in (1, 3, 1)
    ]


def _written(path: Path, text: str) -> None:
    """Waits until the writer thread has written `text` to `path` (each line as soon as it can)."""
    for _ in range(500):
        if path.exists() and path.read_text() == text:
            return
        threading.Event().wait(0.01)
    raise AssertionError(f"{path} never held {text!r}")


def _writer_waiting(log: AccessLog) -> None:
    """Waits until the writer thread waits for a line: it checks for a moved file once each time it wakes, so a line
    handed to it before it waits again goes with the lines it is writing (to the file it has open)."""
    for _ in range(500):
        if log._lines.not_empty._waiters:  # threading.Condition's waiting threads
            return
        threading.Event().wait(0.01)
    raise AssertionError("the access log's writer never waited for a line")


@pytest.mark.parametrize("rotate", ["moved", "removed"])
def test_a_log_file_moved_or_removed_by_logrotate_is_opened_again_at_its_path(tmp_path: Path, rotate: str) -> None:
    path = tmp_path / "access.log"
    log = AccessLog.open(path)
    try:
        log.write("before\n")
        _written(path, "before\n")
        _writer_waiting(log)
        if rotate == "moved":
            path.rename(tmp_path / "access.log.1")
        else:
            path.unlink()
        log.write("after\n")
        _written(path, "after\n")
    finally:
        log.close()
    assert path.read_text() == "after\n"
    if rotate == "moved":
        assert (tmp_path / "access.log.1").read_text() == "before\n"


def long_line() -> str:
    record = served_manifest()
    record.repository = "team/" + "r" * 3000
    record.error = 'a host said "' + "e\n" * 3000 + '"'
    return line(record, 1_700_000_000.0, worker=1)


def test_a_line_longer_than_pipe_buf_is_cut_to_fit_and_stays_json_naming_what_was_cut() -> None:
    text = long_line()
    assert len(text.encode()) > PIPE_BUF
    fitted = fit_pipe(text)
    assert len(fitted.encode()) <= PIPE_BUF and fitted.endswith("}\n") and fitted.count("\n") == 1
    fields = json.loads(fitted)
    whole = json.loads(text)
    assert set(fields["cut"]) <= {"error", "reference"}  # the longest values, nothing else
    assert "error" in fields["cut"] and fields["error"].endswith(CUT_MARK)
    assert whole["error"].startswith(fields["error"].removesuffix(CUT_MARK))
    uncut = {name: value for name, value in whole.items() if name not in fields["cut"]}
    assert uncut == {name: fields[name] for name in uncut}  # the rest as it was
    assert fit_pipe("short\n") == "short\n"


def test_a_line_to_standard_error_is_one_write_of_at_most_pipe_buf_and_a_file_keeps_it_whole(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    text = long_line()
    writes: list[bytes] = []
    original = os.write

    def noting(fd: int, data: bytes) -> int:
        writes.append(bytes(data))
        return original(fd, data)

    path = tmp_path / "access.log"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "write", noting)
        for log in (AccessLog.open("-"), AccessLog.open(path)):
            log.write(text)
            log.close()
    assert len(writes) == 2 and len(writes[0]) <= PIPE_BUF and writes[1] == text.encode()
    assert json.loads(capfd.readouterr().err)["cut"]
    assert path.read_text() == text


def test_a_line_cut_to_fit_keeps_its_short_fields_and_cuts_the_largest_value_first() -> None:
    record = served_manifest()
    record.attempts = [Outcome(f"http://mirror-{n}.test:5000/v2", "x" * 200, True) for n in range(30)]
    text = line(record, 1_700_000_000.0, worker=1)
    assert len(text.encode()) > PIPE_BUF
    fields = json.loads(fit_pipe(text))
    assert fields["cut"] == ["hosts"] and fields["hosts"] == []
    assert (fields["time"], fields["upstream"], fields["reference"]) == (
        "2023-11-14T22:13:20.000Z",
        "upstream.test",
        "upstream.test/team/app:v1",
    )


def test_a_line_cut_to_fit_is_at_most_pipe_buf_with_its_newline_whatever_its_values() -> None:
    for length in range(4000, 4200, 7):
        record = served_manifest()
        record.error = "a" * length
        fitted = fit_pipe(line(record, 0.0))
        assert len(fitted.encode()) <= PIPE_BUF, length
