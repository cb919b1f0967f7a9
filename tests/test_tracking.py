"""report_to: every generation's fitness terms, the best genome and the held-out check
reach TensorBoard and MLflow (local stores, no server), and wandb in offline mode."""

from __future__ import annotations

import pytest

from evomerge.cli import main as cli_main
from evomerge.errors import ConfigError
from evomerge.search import recipe_from_dict, run_search
from evomerge.tracking import open_trackers


def _search(micro_search, tmp_path, report_to):
    data = dict(micro_search, report_to=report_to, search={"steps": 2, "popsize": 2},
                contamination={"check": False})
    return run_search(recipe_from_dict(data), tmp_path / "run", progress=False)


def test_tensorboard_gets_generations_best_and_heldout(micro_search, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = _search(micro_search, tmp_path, ["tensorboard"])
    events = EventAccumulator(str(result.run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    best = events.Scalars("search/best_fitness")
    assert [e.step for e in best] == [0, 1]
    assert [e.value for e in best] == pytest.approx([g["best_fitness"] for g in result.state.generations])
    assert {"search/best_ce_domain", "search/best_ce_safety", "best/fitness", "heldout/best merge/refuses_unsafe"} <= set(tags)
    assert events.Scalars("best/fitness")[0].value == pytest.approx(result.best["fitness"])
    assert "best_genome.yaml/text_summary" in events.Tags()["tensors"]


def test_mlflow_local_store(micro_search, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = _search(micro_search, tmp_path, ["mlflow"])
    client = mlflow.tracking.MlflowClient(f"sqlite:///{result.run_dir.resolve() / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("evomerge").experiment_id])
    history = client.get_metric_history(run.info.run_id, "search/best_fitness")
    assert [m.step for m in history] == [0, 1]
    assert run.data.params["fitness.lambda"] == "0.5" and run.info.status == "FINISHED"
    assert "heldout/best merge/acc_math" in run.data.metrics
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "best_genome.yaml" in artifacts


def test_wandb_offline(micro_search, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    with open_trackers(["wandb"], tmp_path, "t", {"a": {"b": 1}}) as trackers:
        trackers.log_metrics({"x": 1.0, "skipped": float("nan")}, 0)
        run = trackers.trackers[0].run
        assert run.config["a.b"] == 1
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))


def test_unknown_tracker_is_named(micro_search, tmp_path, capsys):
    import yaml

    with pytest.raises(ConfigError, match="unknown experiment tracker \\(report_to\\) 'tensorbored'"):
        recipe_from_dict(dict(micro_search, report_to=["tensorbored"]))
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(micro_search))
    assert cli_main(["search", str(path), "--run-dir", str(tmp_path / "run"), "--report-to", "tensorbored"]) == 2
    assert "report_to: unknown experiment tracker (report_to) 'tensorbored'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
