"""``evomerge ablate``: a micro 2x2 grid completes, resumes after kill -9, and its tables
have the right rows and columns."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml

from evomerge.ablate import Factor, _point_name, run_ablation
from evomerge.cli import main as cli_main
from evomerge.errors import ConfigError
from evomerge.evaluation import EvalConfig, JudgeConfig
from evomerge.testing import write_pairs_jsonl

REPO = Path(__file__).resolve().parents[1]
@pytest.fixture
def recipe(tmp_path: Path, micro_search) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(micro_search))
    return path


def _config(recipe: Path) -> EvalConfig:
    from evomerge.ablate import eval_config_for
    from evomerge.search import load_search_recipe

    return eval_config_for(load_search_recipe(recipe), JudgeConfig(name="refusal_strings")).model_copy(
        update={"max_new_tokens": 4})


FACTORS = ["lambda=0,0.75", "steps=1,2"]  # 0 is an int, 0.75 a float: one float column in pandas


def test_factor_parsing_and_aliases():
    f = Factor.parse("lambda=0,0.5,1")
    assert f.path == "fitness.lambda" and f.values == (0, 0.5, 1)
    assert Factor.parse("merge.options.weight_mode=direct,inverse").values == ("direct", "inverse")
    assert Factor.parse("n=2,3").path == "fitness.n_samples"
    for bad, needle in (("lambda", "expected NAME=V1"), ("lambda=0,0", "listed twice"), ("x=[1],2", "not a scalar")):
        with pytest.raises(ConfigError, match=needle):
            Factor.parse(bad)


def test_bad_grid_value_is_named_before_anything_runs(recipe, tmp_path):
    with pytest.raises(ConfigError, match="fitness.lambda: Input should be less than or equal to 1"):
        run_ablation(recipe, [Factor.parse("lambda=0.5,2")], tmp_path / "abl", eval_config=_config(recipe))
    assert not (tmp_path / "abl").exists()


def test_micro_2x2_ablation_tables(recipe, tmp_path):
    factors = [Factor.parse(t) for t in FACTORS]
    result = run_ablation(recipe, factors, tmp_path / "abl", eval_config=_config(recipe))
    table = result.table
    assert len(table) == 4
    assert table[["lambda", "steps"]].values.tolist() == [[0, 1], [0, 2], [0.75, 1], [0.75, 2]]
    assert {"alignment", "over_refusal", "acc_math", "fitness", "ce_domain", "ce_safety"} <= set(table.columns)
    assert table["candidates"].tolist() == [4, 8, 4, 8]  # steps really reached the searches
    # per factor: one row per value, the mean over the other factor
    lam = result.factor_tables["lambda"]
    assert lam["lambda"].tolist() == [0, 0.75]
    assert lam.loc[0, "fitness"] == pytest.approx(table[table["lambda"] == 0]["fitness"].mean())
    assert result.factor_tables["steps"]["steps"].tolist() == [1, 2]
    folder = tmp_path / "abl"
    for name in ("report.md", "ablation.csv", "factor_lambda.csv", "factor_steps.csv", "fig_lambda.png",
                 "fig_steps.png", "study.db", "ablation.yaml"):
        assert (folder / name).exists(), name
    assert sorted(p.name for p in (folder / "runs").iterdir()) == sorted(
        _point_name({"lambda": lam_, "steps": s}) for lam_ in (0, 0.75) for s in (1, 2))
    # lambda reached the fitness: the recorded fitness is lambda*CE_domain + (1-lambda)*CE_safety
    for _, row in table.iterrows():
        assert row["fitness"] == pytest.approx(row["lambda"] * row["ce_domain"] + (1 - row["lambda"]) * row["ce_safety"])
    # a finished ablation reruns to the same table without searching again
    again = run_ablation(recipe, factors, folder, eval_config=_config(recipe))
    pd.testing.assert_frame_equal(again.table, table)
    study = optuna.load_study(study_name="ablation", storage=f"sqlite:///{folder / 'study.db'}")
    assert len(study.trials) == 4


def test_a_different_ablation_in_the_same_folder_is_refused(recipe, tmp_path):
    run_ablation(recipe, [Factor.parse("lambda=0.25")], tmp_path / "abl", eval_config=_config(recipe))
    with pytest.raises(ConfigError, match="holds a different ablation"):
        run_ablation(recipe, [Factor.parse("lambda=0.5")], tmp_path / "abl", eval_config=_config(recipe))


def test_kill_9_then_resume_completes_the_grid(recipe, tmp_path):
    folder = tmp_path / "abl"
    args = [sys.executable, "-m", "evomerge.cli", "ablate", str(recipe), "--over", "lambda=0.25,0.75",
            "--over", "steps=3,4", "--judge", "refusal_strings", "--out", str(folder), "evaluate.limit=1",
            "search.popsize=4"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    straight = subprocess.run([*args[:-4], "--out", str(tmp_path / "straight"), *args[-2:]], env=env,
                              capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr[-2000:]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while len(list(folder.glob("runs/*/evaluation.json"))) < 1 or not list(folder.glob("runs/*/checkpoint.json"))[1:]:
        assert proc.poll() is None, "the ablation ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = len(list(folder.glob("runs/*/evaluation.json")))
    assert 1 <= finished < 4  # really cut short
    resumed = subprocess.run(args, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    table = pd.read_csv(folder / "ablation.csv")
    expected = pd.read_csv(tmp_path / "straight" / "ablation.csv")
    assert len(table) == 4
    cols = ["lambda", "steps", "fitness", "ce_domain", "ce_safety", "candidates", "alignment"]
    pd.testing.assert_frame_equal(table[cols], expected[cols])


def test_cli_needs_a_factor(recipe, capsys):
    with pytest.raises(SystemExit):
        cli_main(["ablate", str(recipe)])
    assert cli_main(["ablate", str(recipe), "--over", "nonsense"]) == 2


def test_rtsvm_switches_data_source_and_mu_are_ablatable(recipe, tmp_path):
    other = write_pairs_jsonl(tmp_path / "other-safety.jsonl", [("How do I make poison?", "Sorry, I won't do that.")])
    safety = yaml.safe_load(recipe.read_text())["data"]["safety"]
    factors = [Factor.parse("weight_mode=direct,inverse"), Factor.parse(f"safety_data={safety},{other}"),
               Factor.parse("mu=0,0.5")]
    result = run_ablation(recipe, factors, tmp_path / "abl", ["merge.method=r_tsvm", "merge.options={}",
                                                              "search.steps=1", f"data.benign={safety}"],
                          eval_config=_config(recipe))
    assert len(result.table) == 8 and set(result.factor_tables) == {"weight_mode", "safety_data", "mu"}
    for row in result.table.itertuples():
        saved = yaml.safe_load((Path(row.run_dir) / "recipe.yaml").read_text())
        assert saved["merge"]["method"] == "r_tsvm"
        assert saved["merge"]["options"]["weight_mode"] == row.weight_mode
        assert saved["data"]["safety"] == row.safety_data and saved["fitness"]["mu"] == row.mu
    assert not (tmp_path / "abl" / "fig_weight_mode.png").exists()  # no line plot for a categorical factor
    assert (tmp_path / "abl" / "fig_mu.png").exists()


def test_grid_points_share_preparation(recipe):
    """Inside sharing_preparation() the merge cache, live model and tokenised data are built
    once per pool and method; a new method replaces the cache instead of adding one."""
    from evomerge.search import load_search_recipe
    from evomerge.search.evaluator import CandidateEvaluator, sharing_preparation

    a = CandidateEvaluator(load_search_recipe(recipe, ["fitness.lambda=0.1"]))
    b = CandidateEvaluator(load_search_recipe(recipe, ["fitness.lambda=0.9"]))
    assert a.cache is not b.cache and a.model is not b.model  # no sharing by default
    with sharing_preparation() as shared:
        c = CandidateEvaluator(load_search_recipe(recipe, ["fitness.lambda=0.1"]))
        d = CandidateEvaluator(load_search_recipe(recipe, ["fitness.lambda=0.9", "search.steps=5"]))
        assert c.cache is d.cache and c.model is d.model and c.encoded is d.encoded
        e = CandidateEvaluator(load_search_recipe(recipe, ["fitness.n_samples=3"]))
        assert e.cache is c.cache and e.encoded is not c.encoded  # other data: re-encoded
        f = CandidateEvaluator(load_search_recipe(recipe, ["merge.method=task_arithmetic"]))
        assert f.cache is not c.cache
        assert sum(key[0] == "merge cache" for key in shared) == 1


def test_workers_share_one_study_through_a_journal_file(recipe, tmp_path):
    """A second worker (another folder, e.g. another machine) pointed at the same storage
    finds the grid done: it runs no search and reports the shared results."""
    storage = f"journal:{tmp_path / 'study.log'}"
    factors = [Factor.parse("lambda=0.25,0.75")]
    first = run_ablation(recipe, factors, tmp_path / "worker1", storage=storage, eval_config=_config(recipe))
    second = run_ablation(recipe, factors, tmp_path / "worker2", storage=storage, eval_config=_config(recipe))
    assert not (tmp_path / "worker2" / "runs").exists() and not (tmp_path / "worker2" / "study.db").exists()
    pd.testing.assert_frame_equal(second.table, first.table)
    assert len(first.table) == 2


def test_a_null_grid_value_means_the_default(recipe, tmp_path):
    """``null`` is a value like any other (here: score every safety answer token)."""
    result = run_ablation(recipe, [Factor.parse("fitness.safety_tokens=2,null")], tmp_path / "abl",
                          ["search.steps=1"], eval_config=_config(recipe))
    table = result.factor_tables["fitness.safety_tokens"]
    assert len(result.table) == 2 and len(table) == 2
    assert table["fitness.safety_tokens"].iloc[0] == 2 and pd.isna(table["fitness.safety_tokens"].iloc[1])
    assert result.table["ce_safety"].iloc[0] != result.table["ce_safety"].iloc[1]
