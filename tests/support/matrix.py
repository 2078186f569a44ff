"""The client matrix in the README, from the results of the last test run that ran every cell of it.

Every end-to-end test that is a cell of the matrix carries `@pytest.mark.matrix(client, cell)`. A run that has executed
every such test (not a `-k` subset) keeps its results outside the checkout (`RESULTS`, in pytest's cache directory)
and fails when the README's table says otherwise; `./run.sh matrix` (this module as a program) writes the table from
those results. So the README shows the last run, not what someone typed, and a test run never rewrites it.
"""

import json
import re
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
# pytest's own cache directory: ignored by git, left by every run.
RESULTS = ROOT / ".pytest_cache" / "ocigate-client-matrix.json"

CLIENTS = ("docker", "ctr", "podman", "skopeo", "oras-py")
CELLS = ("pull by tag", "pull by digest", "multi-platform index", "push")
BEGIN = "<!-- client matrix: begin (written by ./run.sh matrix, see tests/support/matrix.py) -->"
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


def table_rows(text: str) -> list[str]:
    """The table's rows in the README's block (or in a rendered table), without the footer that says when it ran."""
    pattern = re.compile(re.escape(BEGIN) + r"(.*?)" + re.escape(END), re.S)
    found = pattern.search(text)
    block = found.group(1) if found else text
    return [line for line in block.splitlines() if line.startswith("|")]


def save_results(results: Mapping[tuple[str, str], CellResult], footer: str, path: Path = RESULTS) -> None:
    cells = [{"client": client, "cell": cell, **asdict(result)} for (client, cell), result in results.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"footer": footer, "cells": cells}, indent=1))


def load_results(path: Path = RESULTS) -> tuple[dict[tuple[str, str], CellResult], str]:
    data = json.loads(path.read_text())
    cells = {(c["client"], c["cell"]): CellResult(c["outcome"], c["reason"]) for c in data["cells"]}
    return cells, data["footer"]


def main() -> int:
    """Writes the README's table from the last full run's results (./run.sh matrix)."""
    if not RESULTS.exists():
        print(f"no results of a full test run in {RESULTS}: run ./run.sh test first", file=sys.stderr)
        return 1
    results, footer = load_results()
    text = README.read_text()
    updated = replace_block(text, render_table(results, footer))
    if updated != text:
        README.write_text(updated)
    print(f"README.md's client matrix is the run of {footer.removeprefix('Last run: ').rstrip('.')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
