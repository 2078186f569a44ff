"""One PNG chart per scenario, drawn from a results file's records (bench/results/<scenario>.png).

python -m bench.charts bench/results/<date>.json     # draws them again from a saved run
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from bench.results import Chart, Results, SchemaError, load
from bench.tables import markdown_table


def draw(chart: Chart, path: Path) -> Path:
    """Writes `chart` as a PNG at `path`. Bars are grouped by x label, one colour per series; lines are drawn over
    a logarithmic x axis when it spans more than a decade (the concurrency curve: 1 to 200)."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 4.5), dpi=100)
    try:
        if chart.kind == "bar":
            count = max(1, len(chart.series))
            width = 0.8 / count
            for number, (name, values) in enumerate(chart.series.items()):
                positions = [index + (number - (count - 1) / 2) * width for index in range(len(chart.x))]
                heights = [value if value is not None else 0.0 for value in values]
                axes.bar(positions, heights, width, label=name)
            axes.set_xticks(range(len(chart.x)), [str(label) for label in chart.x])
        else:
            xs = [float(label) for label in chart.x]
            for name, values in chart.series.items():
                points = [(x, y) for x, y in zip(xs, values, strict=True) if y is not None]
                if points:
                    axes.plot([x for x, _ in points], [y for _, y in points], marker="o", label=name)
            if xs and min(xs) > 0 and max(xs) / min(xs) > 10:
                axes.set_xscale("log")
                axes.set_xticks(xs, [f"{x:g}" for x in xs])
        if chart.log_y:
            axes.set_yscale("log")
        axes.set_title(chart.title)
        axes.set_xlabel(chart.x_label)
        axes.set_ylabel(chart.y_label)
        axes.grid(axis="y", alpha=0.3)
        if chart.series:
            axes.legend(fontsize="small")
        figure.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, format="png")
    finally:
        plt.close(figure)
    return path


def draw_all(results: Results, directory: Path) -> list[Path]:
    return [draw(scenario.chart, directory / f"{scenario.name}.png") for scenario in results.scenarios]


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    markdown = "--markdown" in arguments
    arguments = [argument for argument in arguments if argument != "--markdown"]
    if len(arguments) != 1:
        print("usage: python -m bench.charts [--markdown] bench/results/<date>.json", file=sys.stderr)
        return 2
    path = Path(arguments[0])
    try:
        results = load(path)
    except SchemaError as e:
        print(f"bench.charts: {e}", file=sys.stderr)
        return 1
    for written in draw_all(results, path.parent):
        print(written, file=sys.stderr)
    if markdown:
        for scenario in results.scenarios:
            print(f"### {scenario.title}\n\n{markdown_table(scenario.columns, scenario.rows)}\n")
            print("".join(f"- {note}\n" for note in scenario.notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
