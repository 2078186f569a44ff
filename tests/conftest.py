"""What the whole run shares: the check that no gateway wrote a secret, the client matrix's results, the hostile
matrices' counts. The end-to-end tests' own fixtures are in tests/e2e/conftest.py."""

import platform
import time
from collections.abc import Iterator

import mitmproxy.version
import pytest

from tests.support import matrix, secrets, tally


@pytest.fixture(scope="session", autouse=True)
def no_secret_in_any_gateway_output(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """After the whole run: no gateway wrote a password, a token or a credential a test gave it (this fails the
    last test's teardown)."""
    yield
    leaks = secrets.leaks_in(tmp_path_factory.getbasetemp())
    assert not leaks, "secrets in gateway output:\n" + "\n".join(leaks)


# The README's client matrix, from this run's results (tests/support/matrix.py).
_matrix_results: dict[tuple[str, str], matrix.CellResult] = {}
_matrix_expected: set[tuple[str, str]] = set()


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    _matrix_expected.update(_matrix_cell(item) for item in items if _matrix_cell(item))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    cell = report.user_properties and dict(report.user_properties).get("matrix")
    if not cell or (report.when != "call" and not (report.when == "setup" and report.outcome != "passed")):
        return
    outcome = report.outcome
    reason = ""
    if hasattr(report, "wasxfail"):
        outcome = "xfailed" if report.skipped else "xpassed"
        reason = report.wasxfail
    _matrix_results[cell] = matrix.CellResult(outcome, reason)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    cell = _matrix_cell(item)
    if cell:
        item.user_properties.append(("matrix", cell))


_matrix_disagreement: list[str] = []


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # Only a run of every client's every cell speaks for the whole matrix: not one file, not a -k subset.
    if {client for client, _ in _matrix_expected} != set(matrix.CLIENTS) or set(_matrix_results) != _matrix_expected:
        return
    footer = f"Last run: {time.strftime('%Y-%m-%d', time.gmtime())}, Python {platform.python_version()}, " + (
        f"mitmproxy {mitmproxy.version.VERSION}."
    )
    matrix.save_results(_matrix_results, footer)
    # The README is not written by a test run (it would leave the checkout changed): it must already say this.
    rows = matrix.table_rows(matrix.render_table(_matrix_results, footer))
    if matrix.table_rows(matrix.README.read_text()) != rows:
        _matrix_disagreement.extend(rows)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _matrix_cell(item: pytest.Item) -> tuple[str, str] | None:
    marker = item.get_closest_marker("matrix")
    return (marker.args[0], marker.args[1]) if marker else None


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for line in tally.summary_lines():
        terminalreporter.write_line(line)
    if _matrix_disagreement:
        terminalreporter.write_line(
            "FAILED: the README's client matrix disagrees with this run; ./run.sh matrix writes this run's:", red=True
        )
        for row in _matrix_disagreement:
            terminalreporter.write_line(row)
