"""Counts of what the hostile matrices tried and what ocigate handled, printed once at the end of the run
(conftest's pytest_terminal_summary): `hostile hosts: N hostile answers tried, N handled`."""

from collections import Counter
from dataclasses import dataclass


@dataclass(frozen=True)
class Matrix:
    name: str  # "hostile hosts"
    what: str  # "hostile answers"


_tried: Counter[Matrix] = Counter()
_handled: Counter[Matrix] = Counter()


def record(matrix: Matrix, *, handled: bool) -> None:
    _tried[matrix] += 1
    if handled:
        _handled[matrix] += 1


def summary_lines() -> list[str]:
    return [f"{m.name}: {_tried[m]} {m.what} tried, {_handled[m]} handled" for m in sorted(_tried, key=str)]
