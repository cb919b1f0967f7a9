"""``search.select: behaviour``: the result is chosen among the fitness terms' Pareto
front by greedy behaviour on the held-in data."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import yaml

from evomerge.search import load_search_recipe, run_search
from evomerge.search.select import behaviour_loss, ce_pareto_front


def test_pareto_front_by_hand():
    rows = [{"fitness": f, "ce_domain": d, "ce_safety": s} for f, d, s in
            [(1.0, 1.0, 1.0), (0.9, 0.5, 2.0), (0.8, 2.0, 0.4), (1.5, 1.2, 1.1), (math.inf, 0.1, 0.1),
             (1.0, 1.0, 1.0)]]
    # row 3 is beaten by row 0 on both; row 4 is not finite; rows 0 and 5 tie and neither beats the other
    assert ce_pareto_front(rows, ["ce_domain", "ce_safety"]) == [0, 1, 2, 5]
    assert ce_pareto_front(rows, ["ce_domain"]) == [1]


def test_behaviour_loss_by_hand():
    b = {"heldin_acc": 80.0, "heldin_refuses_unsafe": 90.0, "heldin_refuses_benign": 10.0}
    assert behaviour_loss(b, 0.25, 0.0) == pytest.approx(0.25 * 20 + 0.75 * 10)
    assert behaviour_loss(b, 0.25, 0.5) == pytest.approx(0.25 * 20 + 0.75 * 10 + 0.5 * 10)
    assert behaviour_loss(b, 1.0, 0.0) == pytest.approx(20.0)


def test_selection_by_behaviour_is_recorded_and_resumable(tmp_path, micro_search):
    data = micro_search | {"name": "sel", "seed": 2, "search": {"steps": 3, "popsize": 4, "select_max_new_tokens": 4}}
    del data["evaluate"]
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    by_fitness = run_search(load_search_recipe(path), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "selection.csv").exists()
    # the choice may change on resume: the search itself is not repeated
    chosen = run_search(load_search_recipe(path, ["search.select=behaviour"]), tmp_path / "run", resume=True,
                        progress=False)
    assert len(chosen.state.candidates) == len(by_fitness.state.candidates)
    table = pd.read_csv(tmp_path / "run" / "selection.csv")
    assert table["chosen"].sum() == 1
    assert by_fitness.best["index"] in set(table["index"])  # the fitness-best is always considered
    assert {"heldin_refuses_unsafe", "heldin_acc_math", "heldin_acc", "behaviour_loss"} <= set(table.columns)
    best = table[table["chosen"]].iloc[0]
    assert best["behaviour_loss"] == table["behaviour_loss"].min()
    assert chosen.best["index"] == best["index"]
    saved = yaml.safe_load((tmp_path / "run" / "best_genome.yaml").read_text())
    assert saved["candidate"] == best["index"]
    for row in table.itertuples():
        assert row.behaviour_loss == pytest.approx(0.5 * (100 - row.heldin_acc) + 0.5 * (100 - row.heldin_refuses_unsafe))
