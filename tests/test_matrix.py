"""The README's client matrix is rendered from results, and only its own block is replaced."""

from pathlib import Path

from tests.support.matrix import (
    BEGIN,
    CELLS,
    CLIENTS,
    END,
    CellResult,
    load_results,
    render_table,
    replace_block,
    save_results,
    table_rows,
)


def test_each_outcome_has_its_own_words_and_missing_cells_a_dash() -> None:
    # An expected failure (xfailed) is rendered "not yet (<its reason>)"; the cells and reason here are examples.
    results = {
        ("docker", "pull by tag"): CellResult("passed"),
        ("docker", "push"): CellResult("xfailed", "an example reason: a feature still to come"),
        ("ctr", "pull by tag"): CellResult("failed"),
    }
    table = render_table(results, "Last run: today.").splitlines()
    assert table[0] == "| client | " + " | ".join(CELLS) + " |"
    docker = next(line for line in table if line.startswith("| docker |"))
    assert docker == "| docker | yes | — | — | not yet (an example reason: a feature still to come) |"
    assert next(line for line in table if line.startswith("| ctr |")).startswith("| ctr | **FAILED** |")
    assert len([line for line in table if line.startswith("| ") and "client" not in line]) == len(CLIENTS)
    assert table[-1] == "Last run: today."


def test_only_the_block_between_the_markers_changes() -> None:
    readme = f"intro\n{BEGIN}\nold table\n{END}\noutro\n"
    assert replace_block(readme, "new table") == f"intro\n{BEGIN}\nnew table\n{END}\noutro\n"
    assert replace_block("no markers here\n", "new table") == "no markers here\n"


def test_a_runs_results_are_kept_and_compared_with_the_readme_without_its_date(tmp_path: Path) -> None:
    results = {("docker", "pull by tag"): CellResult("passed"), ("ctr", "push"): CellResult("xfailed", "why")}
    save_results(results, "Last run: today.", tmp_path / "results.json")
    assert load_results(tmp_path / "results.json") == (results, "Last run: today.")
    readme = replace_block(f"intro\n{BEGIN}\nold\n{END}\n", render_table(results, "Last run: long ago."))
    # The same cells on another day agree; another outcome does not.
    assert table_rows(readme) == table_rows(render_table(results, "Last run: today."))
    changed = {**results, ("docker", "pull by tag"): CellResult("failed")}
    assert table_rows(readme) != table_rows(render_table(changed, "Last run: today."))
