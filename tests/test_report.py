"""``evomerge report``: the Table 1 run on a micro pool: rows, columns, files, reuse, checks."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from evomerge.cli import main as cli_main
from evomerge.errors import ConfigError
from evomerge.report import Targets, load_report_recipe, run_report, target_checks


@pytest.fixture
def report_recipe(tmp_path: Path, micro_search) -> Path:
    held_out = micro_search.pop("evaluate")
    search = micro_search | {
        "search": {"steps": 1, "popsize": 3, "grid": {"weights": [0.5, 1.0], "densities": [1.0]}},
        "write_model": True,  # the report turns it off for its searches
    }
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(search))
    report = {
        "name": "micro-table1", "search": "search.yaml",
        "methods": {"ties": {"normalize": False}, "tsvm": {}},
        "eval": {"sets": [f"unsafe:{held_out['unsafe']}", f"benign:{held_out['benign']}",
                          f"domain.math:{held_out['domain']['math']}"],
                 "judge": {"name": "refusal_strings"}, "max_new_tokens": 4},
    }
    path = tmp_path / "report.yaml"
    path.write_text(yaml.safe_dump(report))
    return path


def test_micro_table1_rows_columns_files_and_reuse(report_recipe, tmp_path, capsys):
    out = tmp_path / "rep"
    assert cli_main(["report", str(report_recipe), "--out", str(out)]) == 0
    table = pd.read_csv(out / "table1.csv")
    assert list(zip(table["method"], table["search"])) == [
        ("-", "pool"), ("-", "pool"), ("-", "base"),
        ("ties", "grid"), ("ties", "domain-only"), ("ties", "safety-aware"), ("ties", "safety-aware+select"),
        ("tsvm", "grid"), ("tsvm", "domain-only"), ("tsvm", "safety-aware"), ("tsvm", "safety-aware+select"),
        ("-", "lm-cocktail"), ("-", "lm-cocktail+safety")]
    assert list(table.columns[:6]) == ["method", "search", "model", "alignment", "over_refusal", "acc_math"]
    assert table["alignment"].between(0, 100).all() and table["acc_math"].between(0, 100).all()
    assert table.loc[3, "candidates"] == 4  # the grid of 2 weights x 2 experts x 1 density
    for name in ("report.md", "table1.md", "pareto.png", "targets.csv", "report_recipe.yaml"):
        assert (out / name).exists(), name
    assert not any(out.glob("searches/*/model"))  # no model folders written per search
    md = (out / "report.md").read_text()
    assert "| TIES" in md and "| TSVM" in md and "![alignment vs domain accuracy](pareto.png)" in md
    printed = capsys.readouterr().out
    assert "targets (safety-aware search)" in printed
    checks = pd.read_csv(out / "targets.csv")
    assert checks["method"].tolist() == ["TIES", "TIES", "TSVM", "TSVM"]
    assert checks["search"].tolist() == ["safety-aware", "safety-aware+select"] * 2
    # "+select" continued a copy of the safety-aware search: same candidates, its own choice
    for method in ("ties", "tsvm"):
        same = [pd.read_parquet(out / "searches" / f"{method}-{row}" / "candidates.parquet")
                for row in ("safety-aware", "safety-aware+select")]
        pd.testing.assert_frame_equal(same[0].drop(columns=["build_s", "score_s"]),
                                      same[1].drop(columns=["build_s", "score_s"]))
        assert (out / "searches" / f"{method}-safety-aware+select" / "selection.csv").exists()
    # a rerun reuses every finished search and evaluation: same table, no new candidates
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("searches/*/candidates.parquet")}
    again = run_report(load_report_recipe(report_recipe), out)
    pd.testing.assert_frame_equal(again.table.reset_index(drop=True), table, check_dtype=False)
    assert stamps == {p: p.stat().st_mtime_ns for p in out.glob("searches/*/candidates.parquet")}


def test_target_checks_by_hand():
    table = pd.DataFrame([
        {"method": "-", "search": "pool", "model": "safe", "alignment": 96.0, "acc_geo": 50.0},
        {"method": "-", "search": "pool", "model": "geo", "alignment": 20.0, "acc_geo": 100.0},
        {"method": "ties", "search": "domain-only", "model": "d", "alignment": 30.0, "acc_geo": 100.0},
        {"method": "ties", "search": "safety-aware", "model": "s", "alignment": 95.0, "acc_geo": 97.0},
    ])
    check = target_checks(table, ["geo"], Targets()).iloc[0]
    assert check["alignment_bar"] == 94.0 and check["accuracy_bar"] == 98.0
    assert bool(check["alignment_ok"]) and not bool(check["accuracy_ok"])
    assert check["domain_only_gap"] == 65.0 and bool(check["gap_ok"])


def test_bad_report_recipes_are_named(report_recipe, tmp_path):
    with pytest.raises(ConfigError, match="nonsense"):
        load_report_recipe(report_recipe, ["methods={nonsense: {}}"])
    with pytest.raises(ConfigError, match="rows"):
        load_report_recipe(report_recipe, ["rows=[grid,grid]"])
    with pytest.raises(ConfigError, match="search recipe 'missing.yaml' not found"):
        load_report_recipe(report_recipe, ["search=missing.yaml"])
    assert cli_main(["report", str(report_recipe), "methods={ties: {bogus: 1}}"]) == 2
    with pytest.raises(ConfigError, match="fitness.lambda"):  # a bad cell stops the report before any search
        run_report(load_report_recipe(report_recipe, ["overrides=[fitness.lambda=3]"]), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_constrained_select_row_continues_the_constrained_search(report_recipe, tmp_path):
    """``constrained+select`` is the constrained search with its result chosen by held-in
    behaviour: a copy of that run (same candidates), its own selection, both in targets.csv."""
    out = tmp_path / "rep"
    recipe = load_report_recipe(report_recipe, ["rows=[domain-only,constrained,constrained+select]",
                                                "methods={ties: {normalize: false}}"])
    result = run_report(recipe, out)
    assert list(result.table["search"]) == ["pool", "pool", "base", "domain-only", "constrained", "constrained+select"]
    same = [pd.read_parquet(out / "searches" / f"ties-{row}" / "candidates.parquet").drop(columns=["build_s", "score_s"])
            for row in ("constrained", "constrained+select")]
    pd.testing.assert_frame_equal(same[0], same[1])
    assert (out / "searches" / "ties-constrained+select" / "selection.csv").exists()
    assert not (out / "searches" / "ties-constrained" / "selection.csv").exists()
    checks = pd.read_csv(out / "targets.csv")
    assert checks["search"].tolist() == ["constrained", "constrained+select"]
    assert checks["domain_only_gap"].notna().all()
