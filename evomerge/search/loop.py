"""``run_search``: propose, build, score, record, checkpoint; then report and write the best.

    >>> from evomerge.search import load_search_recipe, run_search
    >>> result = run_search(load_search_recipe("recipes/demo.yaml", ["search.steps=3"]))
    >>> result.best_genome, result.best["fitness"]
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from evomerge.errors import ConfigError, EvomergeError, check_interrupt
from evomerge.io_utils import atomic_write_text
from evomerge.merge import Genome
from evomerge.search.backends import EvaluationBackend, make_backend
from evomerge.search.evaluator import CandidateEvaluator, Scored
from evomerge.search.modes import MODES
from evomerge.search.proposers import Proposer, make_proposer
from evomerge.search.recipe import SearchRecipe
from evomerge.search.run import RunDir, SearchState
from evomerge.search.space import GenomeSpace

log = logging.getLogger(__name__)
TERMS = ("ce_domain", "ce_safety", "ce_benign")


@dataclass
class SearchResult:
    run_dir: Path
    best_genome: Genome
    best: dict[str, Any]  # the best candidate's row
    state: SearchState
    backend: EvaluationBackend
    space: GenomeSpace
    prepare_s: float  # time spent preparing the merge cache before the search
    heldout: Any = None  # pandas DataFrame of the held-out check, when the recipe asks for one
    columns: dict[str, list[Any]] | None = None  # the mode's derived columns (front, feasible), row-aligned

    @property
    def evaluator(self) -> CandidateEvaluator:
        """An evaluator in this process (built on first use with a parallel backend)."""
        return self.backend.driver_evaluator()


def _method_for(recipe: SearchRecipe) -> tuple[str, dict[str, Any] | None]:
    """The merge method of the recipe, unless the mode merges with its own (LM-Cocktail is
    a weighted average of the models whatever the recipe's method)."""
    forced = MODES[recipe.search.mode].method
    if forced is not None:
        return forced, {}
    return recipe.merge.method, None


def run_search(
    recipe: SearchRecipe,
    run_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    force: bool = False,
    runs_root: str | os.PathLike[str] = "runs",
    progress: bool = True,
    write_outputs: bool = True,
    strict: bool | None = None,
) -> SearchResult:
    """Run (or resume) a search and return its best candidate.

    ``run_dir`` defaults to ``runs_root/<name>-<timestamp>``; with ``resume`` and no
    ``run_dir`` the newest run of this recipe under ``runs_root`` is continued.
    ``write_outputs=False`` skips the post-search work (report, model, held-out check).
    Before the first generation the contamination guard compares the evaluation prompts
    with the search data (``recipe.contamination``); ``strict`` (default: the recipe's
    ``contamination.strict``) refuses to start on a finding instead of warning.
    """
    if run_dir is None:
        root = Path(runs_root)
        if resume:
            latest = RunDir.latest(root, recipe)
            if latest is None:
                raise ConfigError(f"--resume: no run of '{recipe.name}' under {root}/; pass --run-dir")
            run_dir = latest
        else:
            run_dir = root / RunDir.new_id(recipe)
            suffix = 2
            while run_dir.exists():  # two runs started within the same second
                run_dir = root / f"{RunDir.new_id(recipe)}-{suffix}"
                suffix += 1
    contamination = None
    if recipe.contamination.check:
        from evomerge.contamination import guard_search

        contamination = guard_search(recipe, strict)  # before the folder exists: a refusal writes nothing
    run = RunDir(run_dir)
    state = run.open(recipe, resume, force)  # takes the folder's lock, held until the end
    try:
        if contamination is not None:
            from evomerge.runfolder import dumps_report

            atomic_write_text(run / "contamination.json", dumps_report(contamination.as_dict()))
        return _run_locked(recipe, run, state, progress, write_outputs)
    except BaseException:
        run.discard_if_empty()  # a failure before the first generation leaves nothing behind
        raise
    finally:
        run.close()


def data_fingerprints(recipe: SearchRecipe) -> dict[str, str]:
    """Data set -> sha256 of what the fitness reads (see :func:`evomerge.search.data.fingerprint`)."""
    from evomerge.search.data import fingerprint

    d = recipe.data
    sources = {"safety": d.safety, "benign": d.benign} | {f"domain.{k}": v for k, v in d.domain.items()}
    return {key: fingerprint(src) for key, src in sources.items() if src is not None}


def _check_data(recipe: SearchRecipe, run: RunDir, state: SearchState, current: dict[str, str]) -> None:
    changed = sorted(k for k in set(state.data) | set(current) if state.data.get(k) != current.get(k))
    if changed:
        where = {"safety": recipe.data.safety, "benign": recipe.data.benign,
                 **{f"domain.{k}": v for k, v in recipe.data.domain.items()}}
        names = ", ".join(f"data.{k} ({where.get(k, '?')})" for k in changed)
        raise ConfigError(
            f"--resume: {names} changed since {run.path} began (sha256 differs from its checkpoint); "
            "resuming would mix scores on different data. Restore the file(s), or start over with --force"
        )


def _run_locked(recipe: SearchRecipe, run: RunDir, state: SearchState | None, progress: bool,
                write_outputs: bool) -> SearchResult:
    from evomerge.tracking import open_trackers

    params = recipe.model_dump(by_alias=True, mode="json")
    with open_trackers(recipe.report_to, run.path, run.path.name, params) as trackers:
        result = _search(recipe, run, state, progress, write_outputs, trackers)
        trackers.log_metrics({f"best/{k}": v for k, v in result.best.items() if k != "genome"}, result.state.generation)
        trackers.log_text("best_genome.yaml", (run / "best_genome.yaml").read_text())
        if result.heldout is not None:
            trackers.log_table("heldout", result.heldout.to_dict("records"), "model", result.state.generation)
        return result


def _search(recipe: SearchRecipe, run: RunDir, state: SearchState | None, progress: bool, write_outputs: bool,
            trackers) -> SearchResult:
    fingerprints = data_fingerprints(recipe)
    if state is not None:
        _check_data(recipe, run, state, fingerprints)
    method, options = _method_for(recipe)
    backend = make_backend(recipe, method, options)
    try:
        space = GenomeSpace.from_recipe(recipe, backend.num_layers, method)
        resumed = state is not None
        if state is None:
            state = SearchState(mode=recipe.search.mode, data=fingerprints)
        if MODES[recipe.search.mode].reference and not state.reference:
            from evomerge.search.reference import measure_reference

            state.reference = measure_reference(recipe, backend.driver_evaluator())  # once: kept in the checkpoint
        proposer = make_proposer(space, recipe, state.reference or None)
        if resumed:
            log.info("resuming %s after generation %d (%d candidates)", run.path, state.generation,
                     len(state.candidates))
            replay(proposer, state, space, run)
        state.finished = False
        _loop(recipe, run, state, proposer, backend, space, progress, trackers)
    finally:
        backend.close()  # workers' caches and models are freed before the finish steps

    best_i, records = proposer.choose(state.candidates, backend.driver_evaluator, list(space.expert_names))
    if records is not None:
        import pandas as pd

        atomic_write_text(run / "selection.csv", pd.DataFrame(records).to_csv(index=False))
    best = state.candidates[best_i]
    _check_best_is_finite(best, state)
    best_genome = Genome.from_values(**_genome_fields(best), expert_names=list(space.expert_names))
    result = SearchResult(run.path, best_genome, best, state, backend, space, backend.prepare_s,
                          columns=proposer.columns(state.candidates))
    atomic_write_text(run / "best_genome.yaml", yaml.safe_dump(
        {"genome": best_genome.to_dict(list(space.expert_names)), "method": method,
         "candidate": best["index"], "fitness": best["fitness"], "groups": space.group_names()}, sort_keys=False))
    if write_outputs:
        from evomerge.search.finish import finish_run

        finish_run(result, recipe, method, options)
    return result


def _check_best_is_finite(best: dict[str, Any], state: SearchState) -> None:
    """A best candidate whose loss is NaN/Inf is no result: refuse instead of writing it."""
    if math.isfinite(best["fitness"]):
        return
    n_bad = sum(not math.isfinite(r["fitness"]) for r in state.candidates)
    raise EvomergeError(
        f"no usable candidate: {n_bad} of {len(state.candidates)} candidates have a non-finite loss, including "
        f"the best (#{best['index']}); check the pool's weights and the data. The run's tables are kept; "
        "no best genome or model was written"
    )


def _scored_from_row(row: dict[str, Any]) -> Scored:
    terms = {k: v for k, v in row.items() if k.startswith("ce_") or k == "n_nonfinite"}
    return Scored(row["fitness"], terms, row["build_s"], row["score_s"])


def replay(proposer: Proposer, state: SearchState, space: GenomeSpace, run: RunDir) -> None:
    """Bring a fresh proposer to where the checkpointed run left it: for every recorded
    generation, the same calls as the loop made (stop check, ask, tell) with the recorded
    scores. Every proposer is deterministic given its seed and what it was told, so this
    reproduces its state exactly; a genome or a told value that differs from the record
    means the checkpoint does not belong to this recipe (or evomerge version) and is refused."""
    by_generation: dict[int, list[dict[str, Any]]] = {}
    for row in state.candidates:
        by_generation.setdefault(int(row["generation"]), []).append(row)
    names = list(space.expert_names)
    for g in range(state.generation):
        rows = by_generation.get(g, [])
        done = sum(len(by_generation.get(k, [])) for k in range(g))
        proposer.stop(g, done)  # the loop checks before every generation (pycma's stop() touches its state)
        genomes = proposer.ask()
        recorded = [r["genome"] for r in rows]
        if [json.dumps(x.to_dict(names)) for x in genomes] != recorded:
            raise ConfigError(
                f"{run / 'checkpoint.json'}: generation {g} does not replay to the recorded genomes; the checkpoint "
                "was written by another evomerge version or edited. Start over with --force"
            )
        told = proposer.tell(genomes, [_scored_from_row(r) for r in rows])
        if [float(v) for v in told] != [float(r["fitness"]) for r in rows]:
            raise ConfigError(
                f"{run / 'checkpoint.json'}: generation {g} replays to other fitness values than recorded; the "
                "checkpoint was written by another evomerge version or edited. Start over with --force"
            )


def _genome_fields(row: dict[str, Any]) -> dict[str, Any]:
    data = json.loads(row["genome"])
    return {"weights": data["weights"], "densities": data.get("densities"), "scale": data.get("scale", 1.0),
            "modules": bool(data.get("modules", False))}


def _loop(recipe, run: RunDir, state: SearchState, proposer: Proposer, backend: EvaluationBackend, space: GenomeSpace,
          show_progress: bool, trackers=None) -> None:
    from evomerge import progress

    say = progress.log if show_progress else (lambda _line: None)
    planned = proposer.planned_evals()
    started = time.perf_counter() - state.elapsed_s
    # a bar of candidates on a terminal; elsewhere the generation lines are the steps
    with progress.task(f"{recipe.name} [{recipe.search.mode}] candidates", total=planned,
                       completed=len(state.candidates), plain_every=math.inf, show=show_progress) as bar:
        while True:
            reason = proposer.stop(state.generation, len(state.candidates))
            if reason:
                state.stop_reason = reason
                break
            gen_started = time.perf_counter()
            genomes = proposer.ask()
            if not genomes:
                state.stop_reason = "proposer has nothing left"
                break
            # the whole generation at once, so a parallel backend can spread it
            scored = backend.evaluate_many(genomes, on_result=lambda _pos: bar.advance())
            roles = [proposer.role_of(pos) for pos in range(len(genomes))]
            values = proposer.tell(genomes, scored)  # the values the mode minimised
            rows = [_row(len(state.candidates) + pos, state.generation, space, genome, s, value, role)
                    for pos, (genome, s, value, role) in enumerate(zip(genomes, scored, values, roles))]
            state.candidates.extend(rows)
            state.generation += 1
            gen = _generation_row(state, rows, proposer.sigma, time.perf_counter() - gen_started)
            state.generations.append(gen)
            state.elapsed_s = time.perf_counter() - started
            run.save_checkpoint(state)
            run.write_tables(state, proposer.columns(state.candidates))
            if trackers is not None:  # after the checkpoint: a tracker never holds a generation the run lacks
                trackers.log_metrics({f"search/{k}": v for k, v in gen.items() if k != "generation"},
                                     gen["generation"])
            say(_generation_line(gen))
            check_interrupt()  # between generations: the checkpoint above is whole
    state.finished = True
    state.elapsed_s = time.perf_counter() - started
    run.save_checkpoint(state)
    run.write_tables(state, proposer.columns(state.candidates))
    say(f"stopped: {state.stop_reason}")


def _row(index: int, generation: int, space: GenomeSpace, genome: Genome, s: Scored, value: float,
         role: str) -> dict[str, Any]:
    x = space.from_genome(genome)
    row: dict[str, Any] = {"index": index, "generation": generation, "role": role,
                           "fitness": value, "status": "ok" if math.isfinite(value) else "nonfinite"}
    row.update(s.terms)
    row.update(dict(zip(space.columns(), x)))
    row["genome"] = json.dumps(genome.to_dict(list(space.expert_names)))
    row["build_s"] = s.build_s
    row["score_s"] = s.score_s
    return row


def _finite_mean(values: list[float]) -> float:
    """Mean of the finite values; NaN when the term is absent (every value NaN, e.g. no
    benign set), +inf when it was measured but never finite."""
    ok = [v for v in values if math.isfinite(v)]
    if ok:
        return sum(ok) / len(ok)
    return math.nan if all(math.isnan(v) for v in values) else math.inf


def _generation_row(state: SearchState, rows: list[dict[str, Any]], sigma: float, seconds: float) -> dict[str, Any]:
    best = min(rows, key=lambda r: r["fitness"])
    so_far = min(r["fitness"] for r in state.candidates)
    out = {"generation": state.generation - 1, "evals": len(state.candidates), "best_fitness": best["fitness"],
           "mean_fitness": _finite_mean([r["fitness"] for r in rows]), "best_so_far": so_far}
    for term in TERMS:
        out[f"best_{term}"] = best[term]
        out[f"mean_{term}"] = _finite_mean([r[term] for r in rows])
    out["sigma"] = sigma
    out["seconds"] = seconds
    out["build_s"] = sum(r["build_s"] for r in rows)
    out["score_s"] = sum(r["score_s"] for r in rows)
    return out


def _generation_line(g: dict[str, Any]) -> str:
    terms = " ".join(f"{t[3:]}={g[f'best_{t}']:.4f}" for t in TERMS if math.isfinite(g[f"best_{t}"]))
    return (f"gen {g['generation']:>3}  evals {g['evals']:>4}  best {g['best_fitness']:.4f}  "
            f"mean {g['mean_fitness']:.4f}  ({terms})  {g['seconds']:.1f}s")
