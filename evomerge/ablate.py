"""``evomerge ablate``: a grid of searches over recipe fields, driven by an optuna study.

    >>> from evomerge.ablate import Factor, run_ablation
    >>> result = run_ablation("recipes/demo.yaml", [Factor.parse("lambda=0,0.5,1")], "runs/abl-lambda")
    >>> result.factor_tables["lambda"]

Each grid point is one ordinary search run folder (``<folder>/runs/<point>/``), evaluated
on held-out prompts (``evomerge.evaluation``). The grid is an optuna study with the grid
sampler, stored by default in SQLite inside the ablation folder, so a stopped ablation
picks up where it stopped: finished points are skipped and the interrupted one resumes
its search from its last generation. ``storage`` (an optuna URL such as
``postgresql://...``, or ``journal:PATH`` for a journal file on a shared disk) lets
workers on several machines run one study together.

Factors are named as in the recipe (``fitness.lambda``, ``search.steps``,
``merge.options.weight_mode``) or by the short names in ``ALIASES`` (``lambda``, ``n``,
``steps``, ``mu``, ``weight_mode``, ``order``, ``beta``, ``safety_data``...).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from evomerge.errors import ConfigError
from evomerge.evaluation import EvalConfig, JudgeConfig, evaluator_for, format_table
from evomerge.io_utils import atomic_save_figure, atomic_write_text
from evomerge.refs import is_zoo_ref
from evomerge.runfolder import FolderLock

log = logging.getLogger(__name__)

ALIASES = {
    "lambda": "fitness.lambda",
    "mu": "fitness.mu",
    "n": "fitness.n_samples",
    "n_samples": "fitness.n_samples",
    "steps": "search.steps",
    "seed": "seed",
    "method": "merge.method",
    "mode": "search.mode",
    "weight_mode": "merge.options.weight_mode",
    "order": "merge.options.order",
    "beta": "merge.options.beta",
    "safety_data": "data.safety",
}
METRICS = ("alignment", "over_refusal", "refuses_unsafe", "fitness", "ce_domain", "ce_safety", "ce_benign")


@dataclass(frozen=True)
class Factor:
    """One ablated field: its name as given, the recipe path it sets, its values."""

    name: str
    path: str
    values: tuple[Any, ...]

    @classmethod
    def parse(cls, text: str) -> Factor:
        """``name=v1,v2,...``; values are read as YAML scalars (``0.5``, ``true``, ``inverse``)."""
        name, sep, rest = text.partition("=")
        name = name.strip()
        if not sep or not name or not rest.strip():
            raise ConfigError(f"--over '{text}': expected NAME=V1,V2,... (for example lambda=0,0.5,1)")
        values = tuple(_scalar(v.strip(), text) for v in rest.split(","))
        if any(v == "" for v in values):
            raise ConfigError(f"--over '{text}': an empty value")
        if len(set(map(repr, values))) != len(values):
            raise ConfigError(f"--over '{text}': a value is listed twice")
        return cls(name, ALIASES.get(name, name), values)


def _scalar(text: str, where: str) -> Any:
    value = yaml.safe_load(text) if text else ""
    if value is not None and not isinstance(value, (bool, int, float, str)):
        raise ConfigError(f"--over '{where}': value '{text}' is not a scalar")
    return value


def _point_name(params: dict[str, Any]) -> str:
    """A readable, filesystem-safe folder name for one grid point."""
    text = "_".join(f"{k}={v}" for k, v in params.items())
    safe = re.sub(r"[^A-Za-z0-9_.=+-]+", "-", text)
    if len(safe) > 120:
        safe = safe[:100] + "-" + hashlib.sha256(text.encode()).hexdigest()[:12]
    return safe


def eval_config_for(search_recipe, judge: JudgeConfig | None = None, extra_sets: list[str] | None = None) -> EvalConfig:
    """Held-out evaluation from the search recipe's ``evaluate`` section (its unsafe,
    benign and domain sets), judged by the zoo guard for a zoo pool."""
    spec = search_recipe.evaluate
    sets = [f"unsafe:{spec.unsafe}"] if spec.unsafe else []
    sets += [f"benign:{spec.benign}"] if spec.benign else []
    sets += [f"domain.{k}:{v}" for k, v in spec.domain.items()]
    sets += list(extra_sets or [])
    if not sets:
        raise ConfigError("the search recipe's 'evaluate' section names no held-out set; give --prompts")
    zoo = any(is_zoo_ref(r) for r in [search_recipe.pool.base, *search_recipe.pool.experts.values()])
    fields: dict[str, Any] = {"sets": sets, "limit": spec.limit, "seed": search_recipe.seed,
                              "device": search_recipe.fitness.device}
    if judge is not None:
        fields["judge"] = judge
    return EvalConfig.for_zoo(**fields) if zoo else EvalConfig(**fields)


@dataclass
class AblationResult:
    folder: Path
    table: Any  # one row per grid point: factor values + metrics
    factor_tables: dict[str, Any] = field(default_factory=dict)  # factor -> mean over the other factors
    markdown: str = ""


def _storage(url: str | None, folder: Path) -> tuple[Any, bool]:
    """(optuna storage, whether this process owns it). The default SQLite file is owned:
    a RUNNING trial found there on start was left by a killed run."""
    import optuna
    from optuna.storages import RetryFailedTrialCallback

    if url is None:
        return optuna.storages.RDBStorage(f"sqlite:///{folder / 'study.db'}"), True
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(url[len("journal:"):])), False
    # shared database: workers send heartbeats; a dead worker's trial is retried by another
    return optuna.storages.RDBStorage(url, heartbeat_interval=60, grace_period=180,
                                      failed_trial_callback=RetryFailedTrialCallback(max_retry=3)), False


def _grid_params(factors: list[Factor]) -> list[dict[str, Any]]:
    import itertools

    return [dict(zip([f.name for f in factors], combo)) for combo in itertools.product(*(f.values for f in factors))]


def _states_by_point(study, factors: list[Factor]) -> dict[str, set[Any]]:
    """Every grid point's trial states (a trial without its parameters yet counts by grid id)."""
    out: dict[str, set[Any]] = {_point_name(p): set() for p in _grid_params(factors)}
    grids = getattr(study.sampler, "_all_grids", None)
    names = getattr(study.sampler, "_param_names", None)
    for t in study.get_trials(deepcopy=False):
        params = t.params
        if len(params) < len(factors):
            params = dict(t.system_attrs.get("fixed_params") or {})
            if len(params) < len(factors) and grids is not None and "grid_id" in t.system_attrs:
                params = dict(zip(names, grids[t.system_attrs["grid_id"]]))
        if all(f.name in params for f in factors):
            out.setdefault(_point_name({f.name: params[f.name] for f in factors}), set()).add(t.state)
    return out


def _requeue(study, factors: list[Factor], owned: bool) -> int:
    """Queue grid points again whose trials all failed; in a study this process owns, a
    trial still RUNNING was left by a killed run: it is marked failed and queued too."""
    from optuna.trial import TrialState

    if owned:
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    states = _states_by_point(study, factors)
    queued = 0
    for params in _grid_params(factors):
        seen = states[_point_name(params)]
        if TrialState.FAIL in seen and not seen & {TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING}:
            study.enqueue_trial(params)
            queued += 1
    return queued


def run_ablation(recipe_path: str | Path, factors: list[Factor], folder: str | Path,
                 overrides: list[str] | None = None, storage: str | None = None,
                 eval_config: EvalConfig | None = None, study_name: str | None = None,
                 strict: bool | None = None, report_to: list[str] | tuple[str, ...] = ()) -> AblationResult:
    """Run (or resume) every grid point; then write the tables and figures.

    Before anything runs, the contamination guard checks every grid point's search data
    against the held-out sets (warning, or refusing with ``strict``). ``report_to``:
    experiment trackers that get every finished grid point (step = its row)."""
    import optuna

    from evomerge.report import NO_HELDOUT_CHECK, search_and_evaluate
    from evomerge.search import load_search_recipe
    from evomerge.search.evaluator import sharing_preparation
    from evomerge.tracking import check_report_to

    report_to = check_report_to(report_to)  # a misspelt tracker fails before the grid runs
    if not factors:
        raise ConfigError("no factor to ablate: give at least one --over NAME=V1,V2")
    names = [f.name for f in factors]
    if len(set(names)) != len(names) or len({f.path for f in factors}) != len(factors):
        raise ConfigError(f"a factor is given twice: {', '.join(names)}")
    folder = Path(folder)
    overrides = list(overrides or [])
    base = load_search_recipe(recipe_path, overrides)
    variants = [base]
    for f in factors:  # every grid value must make a valid recipe: fail before running anything
        for v in f.values:
            variants.append(load_search_recipe(recipe_path, [*overrides, f"{f.path}={_yaml(v)}"]))
    config = eval_config or eval_config_for(base)
    from evomerge.contamination import guard_search

    checked = set()
    for variant in variants:  # each distinct set of search data once
        key = (variant.data.model_dump_json(), tuple(variant.contamination.also))
        if key not in checked:
            checked.add(key)
            guard_search(variant, strict, sets=config.sets)
    spec = {"recipe": str(recipe_path), "overrides": overrides, "factors": [
        {"name": f.name, "path": f.path, "values": list(f.values)} for f in factors], "eval": config.model_dump()}
    # only once every grid point is known to be valid. With the default SQLite study this
    # process is the folder's one writer; workers sharing --storage each lock only the grid
    # points they run (every run folder is locked by its search)
    lock = FolderLock(folder, "ablation folder") if storage is None else contextlib.nullcontext()
    with lock:
        folder.mkdir(parents=True, exist_ok=True)
        spec_path = folder / "ablation.yaml"
        if spec_path.exists() and yaml.safe_load(spec_path.read_text()) != json.loads(json.dumps(spec)):
            raise ConfigError(f"{folder} holds a different ablation (see {spec_path}); use another folder")
        atomic_write_text(spec_path, yaml.safe_dump(json.loads(json.dumps(spec)), sort_keys=False))

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        store, owned = _storage(storage, folder)
        grid = {f.name: list(f.values) for f in factors}
        study = optuna.create_study(study_name=study_name or "ablation", storage=store,
                                    sampler=optuna.samplers.GridSampler(grid, seed=0), load_if_exists=True)
        evaluator = evaluator_for([base.pool.base, *base.pool.experts.values()], config)
        total = math.prod(len(f.values) for f in factors)

        bar: list = []  # the progress task, once it is open

        def objective(trial) -> float:
            params = {f.name: trial.suggest_categorical(f.name, list(f.values)) for f in factors}
            point = _point_name(params)
            done = sum(t.state.is_finished() for t in study.get_trials(deepcopy=False))
            log.debug("ablation: grid point %s (%d of %d finished)", point, done, total)
            bar[0].note(point)
            search = load_search_recipe(recipe_path, [*overrides, *(f"{f.path}={_yaml(params[f.name])}" for f in factors),
                                                      f"name={point}", *NO_HELDOUT_CHECK])
            out = search_and_evaluate(search, folder / "runs" / point, evaluator, point)
            for key, value in out.items():
                trial.set_user_attr(key, value)
            trial.set_user_attr("run_dir", str(folder / "runs" / point))
            alignment = float(out.get("alignment", float("nan")))
            bar[0].advance(note=f"{point}: alignment {alignment:.1f}")
            return alignment

        from optuna.trial import TrialState

        from evomerge import progress

        started = time.perf_counter()
        finished = sum(TrialState.COMPLETE in s for s in _states_by_point(study, factors).values())
        with sharing_preparation(), progress.task(f"ablation {folder.name}", total=total, completed=finished) as points:
            bar.append(points)
            while True:
                retried = _requeue(study, factors, owned)
                if retried:
                    log.info("ablation: %d interrupted or failed grid point(s) queued again", retried)
                states = _states_by_point(study, factors).values()
                if all(TrialState.COMPLETE in s for s in states):
                    break
                if not any(not s & {TrialState.COMPLETE, TrialState.RUNNING} for s in states):
                    log.info("ablation: the remaining grid points are running in other workers")
                    break
                study.optimize(objective, n_trials=1)
        log.info("ablation: grid finished in %.1f s", time.perf_counter() - started)
        result = write_ablation_report(study, factors, folder, config)
        if report_to and not result.table.empty:
            from evomerge.tracking import open_trackers

            with open_trackers(report_to, folder, folder.name, spec) as trackers:
                for step, row in enumerate(result.table.to_dict("records")):
                    trackers.log_metrics({f"ablation/{k}": v for k, v in row.items()}, step)
                    trackers.log_text(f"point_{step}", json.dumps({f.name: row[f.name] for f in factors}, default=str))
                trackers.log_text("report.md", result.markdown)
        return result


def _yaml(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _rank(factor: Factor, value: Any) -> int:
    """A value's position in the factor's list (``1`` and ``1.0`` are the same value: a
    pandas column of mixed ints and floats holds floats; ``None`` comes back as NaN)."""
    if isinstance(value, float) and value != value:  # pandas shows a null grid value as NaN
        value = None
    for i, v in enumerate(factor.values):
        if v == value or repr(v) == repr(value):
            return i
    raise KeyError(f"{factor.name}: value {value!r} is not in the grid")


def ablation_table(study, factors: list[Factor]):
    """One row per finished grid point (the newest trial of each), factor values first."""
    import pandas as pd
    from optuna.trial import TrialState

    latest: dict[str, Any] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        latest[_point_name({f.name: t.params[f.name] for f in factors})] = t
    rows = []
    for t in latest.values():
        attrs = dict(t.user_attrs)
        rows.append({**{f.name: t.params[f.name] for f in factors},
                     **{k: v for k, v in attrs.items() if k not in ("model", "ref", "run_dir")},
                     "run_dir": attrs.get("run_dir")})
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    by_name = {f.name: f for f in factors}
    table = table.sort_values([f.name for f in factors],
                              key=lambda col: col.map(lambda v: _rank(by_name[col.name], v))).reset_index(drop=True)
    metrics = [c for c in table.columns if c in METRICS or c.startswith(("acc_", "alignment_"))]
    first = [f.name for f in factors] + ["alignment", "over_refusal"] + sorted(c for c in metrics if c.startswith("acc_"))
    return table[[c for c in first if c in table] + [c for c in table.columns if c not in first]]


def factor_tables(table, factors: list[Factor]) -> dict[str, Any]:
    """Per factor: each of its values against the metrics, averaged over the other factors
    (the seed paper's Tables 3(b) and 4 are of this shape)."""
    if table.empty:
        return {}
    metrics = [c for c in table.columns if (c in METRICS or c.startswith("acc_")) and c in table]
    out = {}
    for f in factors:
        grouped = table.groupby(f.name, sort=False, dropna=False)[metrics].mean(numeric_only=True).reset_index()
        out[f.name] = grouped.sort_values(f.name, key=lambda col, f=f: col.map(lambda v: _rank(f, v))).reset_index(  # noqa: B023  (called in this iteration)
            drop=True)
    return out


def factor_figure(frame, factor: Factor, path: Path) -> bool:
    """Alignment and domain accuracy against one numeric factor (the seed paper's Fig. 3)."""
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in factor.values) or frame.empty:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    ax.plot(frame[factor.name], frame["alignment"], marker="o", label="alignment")
    for column in [c for c in frame.columns if c.startswith("acc_")]:
        ax.plot(frame[factor.name], frame[column], marker="s", label=column.replace("acc_", "accuracy: "))
    if "over_refusal" in frame:
        ax.plot(frame[factor.name], frame["over_refusal"], marker="^", ls="--", lw=1, label="over-refusal")
    ax.set_xlabel(factor.name if factor.name == factor.path else f"{factor.name} ({factor.path})")
    ax.set_ylabel("percent")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_save_figure(fig, path)
    return True


def write_ablation_report(study, factors: list[Factor], folder: Path, config: EvalConfig) -> AblationResult:
    table = ablation_table(study, factors)
    per_factor = factor_tables(table, factors)
    total = math.prod(len(f.values) for f in factors)
    lines = [f"# Ablation over {', '.join(f'{f.name} ({f.path})' for f in factors)}", "",
             f"{len(table)} of {total} grid points finished. Held-out sets: {', '.join(config.sets)}; judge "
             f"{config.judge.name}{f' ({config.judge.model})' if config.judge.model else ''}. Percentages; "
             "fitness terms are the search's own (held-in data).", ""]
    for f in factors:
        if f.name not in per_factor:
            continue
        frame = per_factor[f.name]
        atomic_write_text(folder / f"factor_{f.name}.csv", frame.to_csv(index=False))
        others = [g.name for g in factors if g is not f]
        lines += [f"## {f.name}", ""]
        if others:
            lines += [f"Each row is the mean over {', '.join(others)}.", ""]
        lines += [format_table(frame, 2), ""]
        if factor_figure(frame, f, folder / f"fig_{f.name}.png"):
            lines += [f"![alignment and accuracy against {f.name}](fig_{f.name}.png)", ""]
    if not table.empty:
        atomic_write_text(folder / "ablation.csv", table.to_csv(index=False))
        lines += ["## Every grid point", "", format_table(table.drop(columns=["run_dir"]), 2), ""]
    markdown = "\n".join(lines)
    atomic_write_text(folder / "report.md", markdown + "\n")
    return AblationResult(folder, table, per_factor, markdown)
