"""Plain-text tables for the benchmark's output: one header line and aligned columns, numbers right-aligned."""

from __future__ import annotations

from collections.abc import Sequence

Cell = str | int | float | None


def format_cell(cell: Cell) -> str:
    """None is "-"; a float gets two decimals below 100 and one above, so ratios and milliseconds stay readable."""
    if cell is None:
        return "-"
    if isinstance(cell, bool):
        return "yes" if cell else "no"
    if isinstance(cell, float):
        return f"{cell:.2f}" if abs(cell) < 100 else f"{cell:.1f}"
    return str(cell)


def format_table(columns: Sequence[str], rows: Sequence[Sequence[Cell]]) -> str:
    """The table as lines: the first column left-aligned (it names the row), every other one right-aligned."""
    for number, row in enumerate(rows):
        if len(row) != len(columns):
            raise ValueError(f"row {number} has {len(row)} cells for {len(columns)} columns")
    texts = [[format_cell(cell) for cell in row] for row in rows]
    widths = [max([len(column), *(len(row[index]) for row in texts)]) for index, column in enumerate(columns)]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    return "\n".join([line(list(columns)), *(line(row) for row in texts)])


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Cell]]) -> str:
    """The same table in Markdown (docs/benchmarks.md), figures right-aligned."""
    alignments = [":---", *(["---:"] * (len(columns) - 1))]
    lines = [columns, alignments, *([format_cell(cell) for cell in row] for row in rows)]
    return "\n".join("| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |" for line in lines)
