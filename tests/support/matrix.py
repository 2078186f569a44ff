"""The client matrix in the README, written from the results of the test run that just ended.

Every end-to-end test that is a cell of the matrix carries `@pytest.mark.matrix(client, cell)`. When a run has
executed every such test (not a `-k` subset), the table between the README's matrix markers is rewritten from what
happened, so the README shows the last run, not what someone typed.
"""

import re
from collections.abc import Mapping
from dataclasses import dataclass

CLIENTS = ("docker", "ctr", "podman", "skopeo", "oras-py")
CELLS = ("pull by tag", "pull by digest", "multi-platform index", "push")
BEGIN = "<!-- client matrix: begin (written by the test run, see tests/support/matrix.py) -->"
END = "<!-- client matrix: end -->"


@dataclass(frozen=True)
class CellResult:
    outcome: str  # "passed", "failed", "xfailed", "xpassed", "skipped"
    reason: str = ""


def render_table(results: Mapping[tuple[str, str], CellResult], footer: str) -> str:
    lines = ["| client | " + " | ".join(CELLS) + " |", "|---" * (len(CELLS) + 1) + "|"]
    for client in CLIENTS:
        lines.append(f"| {client} | " + " | ".join(_cell(results.get((client, cell))) for cell in CELLS) + " |")
    return "\n".join([*lines, "", footer])


def _cell(result: CellResult | None) -> str:
    if result is None:
        return "—"
    if result.outcome == "passed":
        return "yes"
    if result.outcome == "xfailed":
        return f"not yet ({result.reason})"
    return f"**{result.outcome.upper()}**"


def replace_block(readme: str, table: str) -> str:
    """The README with its matrix block replaced; unchanged when the markers are missing."""
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    return pattern.sub(lambda _: f"{BEGIN}\n{table}\n{END}", readme, count=1)
