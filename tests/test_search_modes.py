"""The search modes with a safety bar (constrained, pareto), the per-module genome and the
mode table. Toy problems need no model; the rest runs on micro random pools."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from test_search import BENIGN, SAFETY, TIMING  # the same micro data as the CMA-ES tests

from evomerge.cli import main as cli_main
from evomerge.errors import ConfigError
from evomerge.merge.recipe import load_genome
from evomerge.search import GenomeSpace, RunDir, load_search_recipe, recipe_from_dict, run_search
from evomerge.search.evaluator import Scored
from evomerge.search.modes import MODES
from evomerge.search.proposers import ConstrainedProposer, ParetoProposer, make_proposer
from evomerge.search.recipe import SearchMode
from evomerge.search.select import ce_pareto_front
from evomerge.testing import write_pairs_jsonl

DOMAIN = [("What is 12+30?", "12+30=42."), ("What is 1+1?", "1+1=2."), ("What is 7+8?", "7+8=15.")]


@pytest.fixture
def recipe_data(tmp_path: Path, micro_pool) -> dict:
    return {
        "name": "modes",
        "seed": 2,
        "pool": {"base": str(micro_pool["base"]),
                 "experts": {"a": str(micro_pool["expert_a"]), "b": str(micro_pool["expert_b"])}},
        "merge": {"method": "task_arithmetic", "fused": False},
        "data": {"safety": write_pairs_jsonl(tmp_path / "safety.jsonl", SAFETY),
                 "domain": {"math": write_pairs_jsonl(tmp_path / "math.jsonl", DOMAIN)},
                 "benign": write_pairs_jsonl(tmp_path / "benign.jsonl", BENIGN)},
        "fitness": {"lambda": 0.5, "mu": 0.0, "n_samples": 3},
        "search": {"steps": 3, "popsize": 4},
        "write_model": False,
        "contamination": {"check": False},
    }


def _toy_recipe(mode: str, **search) -> object:
    """A recipe whose files are never read (the toy tests drive the proposer by hand)."""
    return recipe_from_dict({
        "seed": 0, "pool": {"base": "b", "experts": {"a": "a", "b": "b"}}, "merge": {"method": "task_arithmetic"},
        "data": {"safety": "s.jsonl", "domain": {"math": "m.jsonl"}},
        "search": {"mode": mode, "bounds": {"weight": [0.0, 1.5]}, **search}})


def _scored(terms: dict[str, float]) -> Scored:
    full = {"ce_domain": math.nan, "ce_safety": math.nan, "ce_benign": math.nan, "n_nonfinite": 0.0, **terms}
    lam = 0.5
    return Scored(lam * full["ce_domain"] + (1 - lam) * full["ce_safety"], full, 0.0, 0.0)


# ----------------------------------------------------------------------------- the table
def test_every_mode_has_one_row_and_a_proposer():
    from typing import get_args

    import evomerge.search.proposers as proposers

    assert set(get_args(SearchMode)) == set(MODES)
    for info in MODES.values():
        assert callable(getattr(proposers, info.proposer))
    assert MODES["evomm-domain"].weights(0.2, 0.3) == (1.0, 0.3)
    assert MODES["cmaes"].weights(0.2, 0.3) == (0.2, 0.3)


# ----------------------------------------------------------------------------- constrained
def test_constrained_solves_a_toy_problem_on_the_constraint():
    """min (wa-1)^2 + (wb-1)^2 s.t. wa + wb <= 1: the optimum (0.5, 0.5) lies on the constraint,
    which an unconstrained search would leave for (1, 1)."""
    recipe = _toy_recipe("constrained", steps=60, popsize=8, x0_weight=0.2, sigma0=0.3)
    space = GenomeSpace.from_recipe(recipe, num_layers=1)
    prop = make_proposer(space, recipe, {"model": None, "ce_safety": 1.0, "slack": 0.0, "bound": 1.0})
    assert isinstance(prop, ConstrainedProposer)
    rows = []
    for g in range(60):
        assert not prop.stop(g, len(rows))
        genomes = prop.ask()
        scored = []
        for genome in genomes:
            wa, wb = genome.weights[0]
            scored.append(_scored({"ce_domain": (wa - 1) ** 2 + (wb - 1) ** 2, "ce_safety": wa + wb}))
        values = prop.tell(genomes, scored)
        for s, v in zip(scored, values):
            rows.append({"index": len(rows), "fitness": v, **s.terms})
    assert prop.stop(60, len(rows)).startswith("search.steps=60")
    best = rows[prop.best_index(rows)]
    assert best["ce_safety"] <= 1.0  # feasible
    assert best["ce_domain"] == pytest.approx(0.5, abs=0.02)  # and on the constraint's optimum
    assert prop.al.al.lam[0] > 0  # pycma's multiplier took over (the constraint is active)
    mean = prop.es.mean
    assert sum(mean) == pytest.approx(1.0, abs=0.05)
    # an infeasible candidate with a lower domain CE is never the result
    assert all(r["ce_safety"] > 1.0 for r in rows if r["ce_domain"] < best["ce_domain"] - 1e-9)


def _drift_toy(al_dimension: int | None, seed: int) -> tuple[list[int], int]:
    """24 genes that all want 1.2 while their mean must stay <= 1.05 (x0 = 1.0 is inside):
    feasible candidates per generation over 10 generations, the budget of the zoo's searches."""
    recipe = _toy_recipe("constrained", steps=10, x0_weight=1.0, genome="per_layer", layer_granularity=1,
                         constraint={"al_dimension": al_dimension}).model_copy(update={"seed": seed})
    space = GenomeSpace.from_recipe(recipe, num_layers=12)
    prop = make_proposer(space, recipe, {"model": None, "ce_safety": 0.0, "slack": 0.0, "bound": 0.0})
    feasible = []
    for _ in range(10):
        genomes = prop.ask()
        scored = []
        for genome in genomes:
            ws = [w for layer in genome.weights for w in layer]
            scored.append(_scored({"ce_domain": sum((w - 1.2) ** 2 for w in ws) / len(ws),
                                   "ce_safety": sum(ws) / len(ws) - 1.05}))
        prop.tell(genomes, scored)
        feasible.append(sum(s.terms["ce_safety"] <= 0 for s in scored))
    return feasible, len(genomes)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_constrained_stays_within_the_bar_over_a_short_search(seed):
    """With pycma's own AL dimension (the genome's length) the multipliers barely move in 10
    generations and the population leaves the bar for the domain optimum (the drift the zoo's
    three pools showed, docs/search.md); al_dimension 1 (the default) keeps it at the bar."""
    (kept, popsize), (pycma, _) = _drift_toy(1, seed), _drift_toy(None, seed)
    assert all(n >= popsize // 2 for n in kept[-3:]), kept
    assert sum(pycma[-3:]) < sum(kept[-3:]) / 4, (pycma, kept)


def test_constrained_search_keeps_safety_within_slack(tmp_path, recipe_data):
    recipe_data["search"] = {"mode": "constrained", "steps": 3, "popsize": 4, "constraint": {"slack": 0.5}}
    result = run_search(recipe_from_dict(recipe_data), tmp_path / "c", progress=False)
    ref = result.state.reference
    pool = ref["pool_ce_safety"]
    assert set(pool) == {"a", "b"} and ref["model"] == min(pool, key=pool.get)  # the most aligned pool model
    assert ref["bound"] == pytest.approx(pool[ref["model"]] + 0.5)
    table = pd.read_parquet(tmp_path / "c" / "candidates.parquet")
    assert list(table["feasible"]) == list(table["ce_safety"] <= ref["bound"])
    assert table["feasible"].any()
    feasible = table[table["feasible"]]
    assert result.best["ce_safety"] <= ref["bound"]
    assert result.best["ce_domain"] == feasible["ce_domain"].min()
    assert set(table["role"]) == {"constrained"}
    assert "## Safety bar" in (tmp_path / "c" / "report.md").read_text()
    # a reference by name, and by number
    named = recipe_from_dict(recipe_data | {"search": {**recipe_data["search"], "constraint": {"reference": "b"}}})
    r = run_search(named.model_copy(update={"search": named.search.model_copy(update={"steps": 1})}),
                   tmp_path / "named", progress=False, write_outputs=False)
    assert r.state.reference["model"] == "b" and r.state.reference["ce_safety"] == pytest.approx(pool["b"])
    number = recipe_from_dict(recipe_data | {"search": {"mode": "constrained", "steps": 1, "popsize": 4,
                                                        "constraint": {"reference": 2.5, "slack": 0.1}}})
    r = run_search(number, tmp_path / "number", progress=False, write_outputs=False)
    assert r.state.reference["bound"] == pytest.approx(2.6) and r.state.reference["pool_ce_safety"] == {}


# ----------------------------------------------------------------------------- pareto
def _dominates(a: list[float], b: list[float]) -> bool:
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def test_pareto_front_is_non_dominated_and_saved(tmp_path, recipe_data):
    recipe_data["fitness"]["mu"] = 0.5
    recipe_data["search"] = {"mode": "pareto", "steps": 3, "popsize": 5, "constraint": {"slack": 0.3}}
    result = run_search(recipe_from_dict(recipe_data), tmp_path / "p", progress=False)
    run = tmp_path / "p"
    table = pd.read_parquet(run / "candidates.parquet")
    objectives = ["ce_safety", "ce_domain.math", "ce_benign"]  # benign too, since mu > 0
    points = table[objectives].values.tolist()
    front = table["front"].tolist()
    assert any(front) and len(table) == 15
    for i, p in enumerate(points):
        beaten = any(_dominates(q, p) for j, q in enumerate(points) if j != i)
        assert front[i] == (not beaten)
    # the first candidate is the recipe's x0 (plain task arithmetic, 1/2 each)
    assert (table.loc[0, "w.0.a"], table.loc[0, "w.0.b"]) == (0.5, 0.5)
    saved = pd.read_csv(run / "front.csv")
    assert sorted(saved["index"]) == sorted(table.loc[table["front"], "index"])
    assert (run / "front.png").stat().st_size > 0 and "## Non-dominated front" in (run / "report.md").read_text()
    summary = json.loads((run / "summary.json").read_text())
    assert sorted(summary["front"]) == sorted(saved["index"])
    # the rule: the most skilled front member within the bar (or the safest one if none is)
    bound = result.state.reference["bound"]
    ok = table[table["front"] & (table["ce_safety"] <= bound)]
    if len(ok):
        assert result.best["index"] == ok.sort_values(["ce_domain", "ce_safety"]).iloc[0]["index"]
    else:
        assert result.best["index"] == table[table["front"]].sort_values("ce_safety").iloc[0]["index"]


def test_safety_bar_rule_picks_the_most_skilled_front_member_within_the_bar():
    recipe = _toy_recipe("pareto", steps=1)
    space = GenomeSpace.from_recipe(recipe, num_layers=1)
    prop = make_proposer(space, recipe, {"model": "a", "ce_safety": 1.0, "slack": 0.2, "bound": 1.2})
    assert isinstance(prop, ParetoProposer) and prop.objectives == ["ce_safety", "ce_domain.math"]
    rows = [{"index": i, "fitness": 0.0, "ce_safety": s, "ce_domain": d, "ce_domain.math": d}
            for i, (s, d) in enumerate([(0.9, 3.0), (1.1, 2.0), (1.3, 1.0), (1.15, 2.5), (2.0, 0.5)])]
    assert ce_pareto_front(rows, prop.objectives) == [0, 1, 2, 4]  # #3 is beaten by #1
    assert prop.best_index(rows) == 1  # within 1.2 and the lowest domain CE
    cols = prop.columns(rows)
    assert cols["front"] == [True, True, True, False, True]
    assert cols["feasible"] == [True, True, False, True, False]
    prop.bound = 0.5  # nobody meets the bar: the safest
    assert prop.best_index(rows) == 0


# ----------------------------------------------------------------------------- resume
def _table(run: Path) -> pd.DataFrame:
    return pd.read_parquet(run / "candidates.parquet").drop(columns=TIMING)


def _cut_checkpoint(run: Path, k: int) -> None:
    """Leave ``run`` as a kill -9 after generation ``k`` leaves it: the checkpoint is written
    atomically after each generation, so it then holds exactly the first k generations."""
    from evomerge.runfolder import dumps_state, loads_state

    path = run / "checkpoint.json"
    data = loads_state(path.read_text())
    data["candidates"] = [r for r in data["candidates"] if r["generation"] < k]
    data["generations"] = data["generations"][:k]
    data.update(generation=k, finished=False, stop_reason="")
    path.write_text(dumps_state(data))
    for name in ("candidates.parquet", "best_genome.yaml", "summary.json", "report.md", "front.csv"):
        (run / name).unlink(missing_ok=True)


@pytest.mark.parametrize("mode", ["constrained", "pareto"])
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, recipe_data, mode):
    recipe_data["search"] = {"mode": mode, "steps": 4, "popsize": 4, "layer_granularity": 1,
                             "constraint": {"slack": 0.3}}
    recipe = recipe_from_dict(recipe_data)
    straight = run_search(recipe, tmp_path / "straight", progress=False, write_outputs=False)
    shutil.copytree(tmp_path / "straight", tmp_path / "cut", ignore=shutil.ignore_patterns(".evomerge.lock"))
    _cut_checkpoint(tmp_path / "cut", 2)
    assert RunDir(tmp_path / "cut").load_checkpoint().generation == 2
    resumed = run_search(recipe, tmp_path / "cut", resume=True, progress=False, write_outputs=False)
    pd.testing.assert_frame_equal(_table(tmp_path / "cut"), _table(tmp_path / "straight"))
    assert resumed.best_genome == straight.best_genome
    assert resumed.state.reference == straight.state.reference
    # extending a finished run equals a longer one
    longer = recipe.model_copy(update={"search": recipe.search.model_copy(update={"steps": 5})})
    run_search(longer, tmp_path / "straight", resume=True, progress=False, write_outputs=False)
    run_search(longer, tmp_path / "long", progress=False, write_outputs=False)
    pd.testing.assert_frame_equal(_table(tmp_path / "straight"), _table(tmp_path / "long"))


def test_a_checkpoint_that_replays_to_other_values_is_refused(tmp_path, recipe_data):
    from evomerge.runfolder import dumps_state, loads_state

    recipe_data["search"] = {"mode": "constrained", "steps": 2, "popsize": 4, "constraint": {"slack": 0.3}}
    recipe = recipe_from_dict(recipe_data)
    run_search(recipe, tmp_path / "r", progress=False, write_outputs=False)
    path = tmp_path / "r" / "checkpoint.json"
    data = loads_state(path.read_text())
    data["candidates"][0]["fitness"] += 1.0
    path.write_text(dumps_state(data))
    with pytest.raises(ConfigError, match="replays to other fitness values"):
        run_search(recipe.model_copy(update={"search": recipe.search.model_copy(update={"steps": 3})}),
                   tmp_path / "r", resume=True, progress=False, write_outputs=False)


# ----------------------------------------------------------------------------- genome
def test_per_module_genome_has_named_genes_and_a_loadable_genome_file(tmp_path, recipe_data):
    recipe_data["search"] = {"mode": "cmaes", "genome": "per_module", "steps": 1, "popsize": 4}
    recipe = recipe_from_dict(recipe_data)
    space = GenomeSpace.from_recipe(recipe, num_layers=2)
    assert space.n_groups == 6 and space.group_names() == ["emb", "attn0", "mlp0", "attn1", "mlp1", "head"]
    assert space.columns()[:4] == ["w.emb.a", "w.emb.b", "w.attn0.a", "w.attn0.b"]
    genome = space.to_genome([0.1 * k for k in range(12)])
    assert genome.modules and genome.n_groups == 6
    assert space.from_genome(genome) == pytest.approx([0.1 * k for k in range(12)])
    result = run_search(recipe, tmp_path / "m", progress=False, write_outputs=False)
    assert result.best_genome.modules
    saved = yaml.safe_load((tmp_path / "m" / "best_genome.yaml").read_text())
    assert saved["groups"] == space.group_names() and saved["genome"]["modules"] is True
    again = load_genome(tmp_path / "m" / "best_genome.yaml").to_genome(["a", "b"])
    assert again == result.best_genome
    assert "w.mlp1.b" in pd.read_parquet(tmp_path / "m" / "candidates.parquet").columns


# ----------------------------------------------------------------------------- recipe errors
@pytest.mark.parametrize("override,needle", [
    (["search.constraint.reference=nobody"], "search.constraint.reference: 'nobody' is neither a number nor a pool expert"),
    (["search.constraint.slack=-1"], "search.constraint.slack: Input should be greater than or equal to 0"),
    (["search.constraint.slak=1"], "search.constraint.slak: Extra inputs are not permitted"),
    (["search.genome=per_block"], "search.genome: Input should be 'per_layer' or 'per_module'"),
    (["search.genome=per_module", "search.layer_granularity=1"], "search.genome: per_module has its own groups"),
    (["search.mode=constrained", "data.safety=null"], "data.safety: no safety set, but search.mode constrained needs one"),
    (["search.mode=pareto", "fitness.lambda=0", "data.domain={}"], "data.domain: no domain set, but search.mode pareto"),
])
def test_bad_mode_fields_are_named(tmp_path, recipe_data, override, needle):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_data))
    with pytest.raises(ConfigError) as err:
        load_search_recipe(path, override)
    assert needle in str(err.value)


def test_cli_exits_2_on_a_bad_constraint_field(tmp_path, recipe_data, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_data))
    code = cli_main(["search", str(path), "search.mode=constrained", "search.constraint.reference=c",
                     "--run-dir", str(tmp_path / "r"), "--quiet"])
    assert code == 2
    assert "search.constraint.reference" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_pareto_kill_9_then_resume_gives_the_same_run_and_front(tmp_path, recipe_data):
    import os
    import signal
    import subprocess
    import sys
    import time

    recipe_data["search"] = {"mode": "pareto", "steps": 25, "popsize": 6, "layer_granularity": 1}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_data))
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "evomerge.cli", "search", str(path), "--quiet", "--run-dir"]
    subprocess.run([*cli, str(tmp_path / "straight")], check=True, env=env, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*cli, str(killed)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (killed / "generations.csv").exists() or len((killed / "generations.csv").read_text().splitlines()) < 4:
        assert proc.poll() is None, "the search ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    state = RunDir(killed).load_checkpoint()
    assert not state.finished and 3 <= state.generation < 25
    subprocess.run([*cli, str(killed), "--resume"], check=True, env=env, capture_output=True)
    pd.testing.assert_frame_equal(_table(killed), _table(tmp_path / "straight"))
    assert (killed / "front.csv").read_text() == (tmp_path / "straight" / "front.csv").read_text()
    assert (killed / "best_genome.yaml").read_text() == (tmp_path / "straight" / "best_genome.yaml").read_text()
