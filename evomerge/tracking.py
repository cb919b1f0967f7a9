"""Experiment tracking: ``report_to`` (the transformers Trainer's word for it).

    report_to: [tensorboard, mlflow, wandb]      # in a search recipe, or --report-to on the CLI

Each tracker is an optional extra (``pip install 'evomerge[tensorboard]'`` etc.) and logs
the same things: every generation's fitness terms (step = generation), the best genome
and the held-out results of a search, every row of a report, every grid point of an
ablation. Where they write, by default inside the run folder so nothing needs a server:

- ``tensorboard``: ``<folder>/tensorboard/`` (``tensorboard --logdir <folder>/tensorboard``);
- ``mlflow``: ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<folder>/mlflow.db`` with artifacts
  in ``<folder>/mlflow-artifacts/`` (``mlflow ui --backend-store-uri sqlite:///<folder>/mlflow.db``);
- ``wandb``: the ``WANDB_*`` settings (project ``evomerge``); ``WANDB_MODE=offline`` writes
  ``<folder>/wandb/`` for ``wandb sync`` later.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError
from evomerge.registry import Registry

log = logging.getLogger(__name__)

TRACKERS = Registry("experiment tracker (report_to)")
INSTALL = {"tensorboard": "pip install 'evomerge[tensorboard]'", "mlflow": "pip install 'evomerge[mlflow]'",
           "wandb": "pip install 'evomerge[wandb]'"}


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    """Finite numeric values only: trackers reject NaN/None, and an absent term is not a 0."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            continue
        out[str(k)] = float(v)
    return out


def _flat(data: Any) -> dict[str, Any]:
    """Tracker parameters: flattened, lists and other non-scalars as JSON text."""
    from evomerge.io_utils import flatten

    return {k: v if isinstance(v, (int, float, str, bool)) or v is None else json.dumps(v) for k, v in flatten(data).items()}


def _import(module: str, name: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"report_to '{name}' needs its extra: {INSTALL[name]} ({exc})") from None


@TRACKERS.register("tensorboard")
class TensorBoardTracker:
    def __init__(self, folder: Path, run_name: str, params: dict[str, Any]) -> None:
        _import("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder / "tensorboard"))
        self.writer.add_text("params", "\n".join(f"    {k}: {v}" for k, v in _flat(params).items()), 0)

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        for k, v in _numbers(metrics).items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def log_text(self, name: str, text: str) -> None:
        self.writer.add_text(name, "    " + text.replace("\n", "\n    "), 0)  # indented: shown as code
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


@TRACKERS.register("mlflow")
class MlflowTracker:
    def __init__(self, folder: Path, run_name: str, params: dict[str, Any]) -> None:
        mlflow = _import("mlflow", "mlflow")
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{folder.resolve() / 'mlflow.db'}"
        self.client = mlflow.tracking.MlflowClient(uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "evomerge")
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            location = None if os.environ.get("MLFLOW_TRACKING_URI") else (folder.resolve() / "mlflow-artifacts").as_uri()
            experiment_id = self.client.create_experiment(name, artifact_location=location)
        else:
            experiment_id = experiment.experiment_id
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        for k, v in _flat(params).items():
            self.client.log_param(self.run_id, k[:250], str(v)[:6000])

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        for k, v in _numbers(metrics).items():
            self.client.log_metric(self.run_id, k.replace("[", "(").replace("]", ")").replace("|", "-"), v, step=step)

    def log_text(self, name: str, text: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


@TRACKERS.register("wandb")
class WandbTracker:
    def __init__(self, folder: Path, run_name: str, params: dict[str, Any]) -> None:
        wandb = _import("wandb", "wandb")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "evomerge"), name=run_name, dir=str(folder),
                              config=_flat(params), reinit="create_new")

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log(_numbers(metrics), step=step)

    def log_text(self, name: str, text: str) -> None:
        self.run.summary[name] = text

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """Every tracker in ``report_to`` behind one call; none at all is fine (``[]``)."""

    def __init__(self, trackers: Sequence[Any] = ()) -> None:
        self.trackers = list(trackers)

    def log_metrics(self, metrics: dict[str, Any], step: int = 0) -> None:
        for t in self.trackers:
            t.log_metrics(metrics, step)

    def log_text(self, name: str, text: str) -> None:
        for t in self.trackers:
            t.log_text(name, text)

    def log_table(self, prefix: str, rows: Sequence[dict[str, Any]], key: str, step: int = 0) -> None:
        """Rows (a report, a held-out check) as ``prefix/<row key>/<column>`` metrics."""
        for row in rows:
            self.log_metrics({f"{prefix}/{row[key]}/{k}": v for k, v in row.items() if k != key}, step)

    def close(self) -> None:
        for t in self.trackers:
            t.close()

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def check_report_to(names: Sequence[str]) -> list[str]:
    names = list(dict.fromkeys(names))
    for name in names:
        TRACKERS.lookup(name)
    return names


def open_trackers(report_to: Sequence[str], folder: str | Path, run_name: str,
                  params: dict[str, Any] | None = None) -> Trackers:
    """The trackers named in ``report_to``, writing beside ``folder``'s other outputs."""
    folder = Path(folder)
    opened = []
    try:
        for name in check_report_to(report_to):
            opened.append(TRACKERS.lookup(name)(folder, run_name, params or {}))
    except BaseException:
        Trackers(opened).close()
        raise
    return Trackers(opened)
