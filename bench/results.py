"""What one run of the benchmark found, as typed records, and their JSON file (bench/results/<date>.json).

The file is the record of a run: the machine it ran on, the settings, and per scenario its table (the figures as
numbers, so that they can be compared later) and the chart drawn from it. `load` checks a file against this schema
and names what is wrong, so a chart is never drawn from a file it would misread.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.tables import Cell

SCHEMA = 1
CHART_KINDS = ("bar", "line")


class SchemaError(ValueError):
    """A results file that is not what this module writes."""


@dataclass(frozen=True)
class Machine:
    cores: int
    cpu_model: str
    python: str
    mitmproxy: str
    kernel: str


@dataclass(frozen=True)
class Chart:
    """A bar chart (x: category labels) or a line chart (x: numbers); one series per way, a value per x (None: not
    measured)."""

    kind: str
    title: str
    x_label: str
    y_label: str
    x: list[str | float]
    series: dict[str, list[float | None]]
    log_y: bool = False  # for figures that span decades (a timeout's seconds beside milliseconds)


@dataclass(frozen=True)
class Scenario:
    name: str  # also the chart's file name: <name>.png
    title: str
    columns: list[str]
    rows: list[list[Cell]]
    chart: Chart
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Results:
    date: str  # YYYY-MM-DD, the file's name
    machine: Machine
    settings: dict[str, Any]
    scenarios: list[Scenario]
    schema: int = SCHEMA


def this_machine() -> Machine:
    import mitmproxy.version

    return Machine(
        cores=os.cpu_count() or 0,
        cpu_model=_cpu_model(),
        python=platform.python_version(),
        mitmproxy=mitmproxy.version.VERSION,
        kernel=platform.release(),
    )


def _cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or "unknown"
    for line in lines:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def dump(results: Results) -> str:
    return json.dumps(asdict(results), indent=1) + "\n"


def save(results: Results, directory: Path) -> Path:
    """Writes `<date>.json`, or `<date>-2.json` and on when a run of that day is there already: no run is written
    over (a run of one scenario included)."""
    directory.mkdir(parents=True, exist_ok=True)
    text = dump(results)  # before a file is made: an error leaves none behind
    path, number = directory / f"{results.date}.json", 1
    while True:
        try:
            with path.open("x") as file:  # exclusive: a file there is never replaced
                file.write(text)
            return path
        except FileExistsError:
            number += 1
            path = directory / f"{results.date}-{number}.json"


def load(path: Path) -> Results:
    try:
        document = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SchemaError(f"{path}: {e}") from e
    try:
        return parse(document)
    except SchemaError as e:
        raise SchemaError(f"{path}: {e}") from e


def parse(document: Any) -> Results:
    """The records of a results document, or SchemaError naming the first thing that is wrong."""
    top = _object(document, "the document")
    if top.get("schema") != SCHEMA:
        raise SchemaError(f"schema is {top.get('schema')!r}, this benchmark writes {SCHEMA}")
    machine = _object(top.get("machine"), "machine")
    scenarios = _list(top.get("scenarios"), "scenarios")
    return Results(
        date=_string(top.get("date"), "date"),
        machine=Machine(
            cores=_integer(machine.get("cores"), "machine.cores"),
            cpu_model=_string(machine.get("cpu_model"), "machine.cpu_model"),
            python=_string(machine.get("python"), "machine.python"),
            mitmproxy=_string(machine.get("mitmproxy"), "machine.mitmproxy"),
            kernel=_string(machine.get("kernel"), "machine.kernel"),
        ),
        settings=_object(top.get("settings"), "settings"),
        scenarios=[_scenario(item, f"scenarios[{number}]") for number, item in enumerate(scenarios)],
    )


def _scenario(value: Any, where: str) -> Scenario:
    item = _object(value, where)
    name = _string(item.get("name"), f"{where}.name")
    where = f"scenario {name!r}"
    columns = [_string(column, f"{where} columns") for column in _list(item.get("columns"), f"{where}.columns")]
    rows = []
    for number, row in enumerate(_list(item.get("rows"), f"{where}.rows")):
        cells = _list(row, f"{where} row {number}")
        if len(cells) != len(columns):
            raise SchemaError(f"{where} row {number} has {len(cells)} cells for {len(columns)} columns")
        for cell in cells:
            if cell is not None and not isinstance(cell, str | int | float):
                raise SchemaError(f"{where} row {number}: {cell!r} is not a string, number or null")
        rows.append(cells)
    return Scenario(
        name=name,
        title=_string(item.get("title"), f"{where}.title"),
        columns=columns,
        rows=rows,
        chart=_chart(item.get("chart"), f"{where} chart"),
        notes=[_string(note, f"{where} notes") for note in _list(item.get("notes"), f"{where}.notes")],
    )


def _chart(value: Any, where: str) -> Chart:
    chart = _object(value, where)
    kind = chart.get("kind")
    if kind not in CHART_KINDS:
        raise SchemaError(f"{where}: kind {kind!r} is not one of {', '.join(CHART_KINDS)}")
    x = _list(chart.get("x"), f"{where}.x")
    for label in x:
        if not isinstance(label, str | int | float) or isinstance(label, bool):
            raise SchemaError(f"{where}: x value {label!r} is not a label or a number")
        if kind == "line" and isinstance(label, str):
            raise SchemaError(f"{where}: a line chart's x values are numbers, not {label!r}")
    series = _object(chart.get("series"), f"{where}.series")
    for name, values in series.items():
        points = _list(values, f"{where} series {name!r}")
        if len(points) != len(x):
            raise SchemaError(f"{where} series {name!r} has {len(points)} values for {len(x)} x values")
        for point in points:
            if point is not None and (not isinstance(point, int | float) or isinstance(point, bool)):
                raise SchemaError(f"{where} series {name!r}: {point!r} is not a number or null")
    return Chart(
        kind=kind,
        title=_string(chart.get("title"), f"{where}.title"),
        x_label=_string(chart.get("x_label"), f"{where}.x_label"),
        y_label=_string(chart.get("y_label"), f"{where}.y_label"),
        x=list(x),
        series={name: list(values) for name, values in series.items()},
        log_y=_boolean(chart.get("log_y", False), f"{where}.log_y"),
    )


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SchemaError(f"{where} is not an object")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise SchemaError(f"{where} is not a list")
    return value


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise SchemaError(f"{where} is not a string")
    return value


def _boolean(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise SchemaError(f"{where} is not true or false")
    return value


def _integer(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise SchemaError(f"{where} is not an integer")
    return value
