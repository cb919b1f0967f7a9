"""A run folder: what a search writes, and the checkpoint it resumes from.

    runs/<id>/
      recipe.yaml          the resolved recipe (overrides applied)
      checkpoint.json      every candidate and generation so far, data fingerprints (atomic)
      candidates.parquet   one row per candidate: genome, every fitness term, build/score time
      generations.csv      one row per generation
      best_genome.yaml     the best genome so far (``evomerge merge --genome`` reads it)
      report.md, fitness.png, summary.json, heldout.csv, model/ (the best merge)
      .evomerge.lock       held (flock) by the one process writing the folder

The checkpoint is the single source of truth: it is replaced atomically after every
generation, and the tables are rewritten from it, so a kill at any moment loses at most
the generation in flight, which a resume then recomputes identically.

Why JSON and no optimiser state: unpickling a file from a run folder would let whoever
wrote that folder run code. The proposers are deterministic given the recipe's seed and
the fitness values they were told, so a resume rebuilds the optimiser by replaying the
recorded generations (ask, check the genomes match the record, tell the recorded
fitness): the same state to the last bit, from data that cannot execute anything.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from evomerge.errors import ConfigError
from evomerge.io_utils import atomic_write_text, flatten
from evomerge.runfolder import FolderLock, check_folder, clear_folder, dumps_state, folder_entries, loads_state
from evomerge.search.recipe import SearchRecipe, recipe_from_dict

CHECKPOINT = "checkpoint.json"
LEGACY_CHECKPOINT = "checkpoint.pkl"  # evomerge <= 0.1 pickled the optimiser; never loaded
CHECKPOINT_FORMAT = "evomerge-search-checkpoint"
CHECKPOINT_VERSION = 2
# fields that may change when a run is resumed: how long it runs, what happens after, and
# who evaluates (every backend gives the same results)
RESUMABLE_CHANGES = ("search.steps", "search.max_evals", "search.workers", "search.select", "search.select_max",
                     "search.select_max_new_tokens", "search.constraint.alignment_slack", "write_model", "evaluate")


class RunExistsError(ConfigError):
    """The run folder exists and neither --resume nor --force was given."""


@dataclass
class SearchState:
    """Everything needed to continue a search exactly where it stopped (the optimiser
    itself is rebuilt by replaying ``candidates``; see the module docstring)."""

    mode: str
    generation: int = 0  # completed generations
    candidates: list[dict[str, Any]] = field(default_factory=list)
    generations: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False
    stop_reason: str = ""
    elapsed_s: float = 0.0
    data: dict[str, str] = field(default_factory=dict)  # data set -> sha256 of its file(s)
    # the safety bar of constrained / pareto, measured once before the first generation
    # (evomerge.search.reference); empty for the other modes
    reference: dict[str, Any] = field(default_factory=dict)
    version: int = CHECKPOINT_VERSION


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def recipe_differences(old: SearchRecipe, new: SearchRecipe) -> list[str]:
    """Dotted names of the fields that differ and may not change on resume."""
    a = flatten(old.model_dump(by_alias=True, mode="json"))
    b = flatten(new.model_dump(by_alias=True, mode="json"))
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return [k for k in changed if not any(k == p or k.startswith(p + ".") for p in RESUMABLE_CHANGES)]


class RunDir:
    """A run folder; creation refuses to reuse a folder unless told how, and one process
    at a time writes it (:class:`~evomerge.runfolder.FolderLock`, held until :meth:`close`)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.lock = FolderLock(self.path, "run folder")

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @staticmethod
    def new_id(recipe: SearchRecipe) -> str:
        return f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"

    @staticmethod
    def latest(root: Path, recipe: SearchRecipe) -> Path | None:
        """The newest run of this recipe under ``root`` (for ``--resume`` without ``--run-dir``)."""
        stamp = re.compile(rf"{re.escape(recipe.name)}-\d{{8}}-\d{{6}}(-\d+)?")
        runs = [p for p in root.glob(f"{recipe.name}-*") if stamp.fullmatch(p.name) and (p / "recipe.yaml").exists()]
        # newest first by timestamp, then by same-second suffix
        return max(runs, key=lambda p: (p.name[len(recipe.name) + 1 :][:15], int(p.name[len(recipe.name) + 17 :] or 1)),
                   default=None)

    def has_checkpoint(self) -> bool:
        return (self / CHECKPOINT).exists()

    def holds_run(self) -> bool:
        """Anything computed here? A folder holding only ``recipe.yaml`` is a search that
        failed before its first generation (bad data, bad device): nothing to keep."""
        return bool(set(folder_entries(self.path)) - {"recipe.yaml", "contamination.json"})

    def open(self, recipe: SearchRecipe, resume: bool, force: bool) -> SearchState | None:
        """Lock and prepare the folder; return the checkpoint to resume from, if any."""
        if resume and force:
            raise ConfigError("--resume and --force contradict each other: pick one")
        check_folder(self.path, "run folder")
        self.lock.acquire()
        try:
            return self._open_locked(recipe, resume, force)
        except BaseException:
            self.close()
            raise

    def _open_locked(self, recipe: SearchRecipe, resume: bool, force: bool) -> SearchState | None:
        had_recipe = (self / "recipe.yaml").exists()
        exists = self.holds_run()
        if exists and not (resume or force):
            raise RunExistsError(
                f"{self.path} already holds a run; pass --resume to continue it or --force to start over"
            )
        if force:
            clear_folder(self.path)
        elif resume and (self / LEGACY_CHECKPOINT).exists():
            raise ConfigError(
                f"{self / LEGACY_CHECKPOINT}: a pickled checkpoint from an older evomerge; it is not loaded "
                "because unpickling can run code. Start over with --force (or a new --run-dir)"
            )
        if resume and not (exists or had_recipe):
            raise ConfigError(f"--resume: {self.path} holds no run to resume")
        state = None
        if resume and self.has_checkpoint():
            saved = self.saved_recipe()
            diffs = recipe_differences(saved, recipe)
            if diffs:
                raise ConfigError(
                    f"--resume: the recipe differs from the run's recipe.yaml in {', '.join(diffs)}; "
                    "only search.steps, search.max_evals, search.workers.*, write_model, evaluate.* and contamination.* may change"
                )
            state = self.load_checkpoint()
        atomic_write_text(self / "recipe.yaml", recipe.to_yaml())
        return state

    def close(self) -> None:
        self.lock.release()

    def discard_if_empty(self) -> None:
        """After a failure: a folder with nothing computed in it is removed (a rerun of the
        fixed command then starts cleanly); one with a checkpoint is kept for --resume."""
        if self.lock.held and not self.has_checkpoint() and not self.holds_run():
            clear_folder(self.path)  # recipe.yaml; the folder itself goes on release if we made it

    def saved_recipe(self) -> SearchRecipe:
        path = self / "recipe.yaml"
        if not path.exists():
            raise ConfigError(f"{self.path}: no recipe.yaml; not a run folder")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from None
        return recipe_from_dict(data, str(path))

    def load_checkpoint(self) -> SearchState | None:
        """Read the JSON checkpoint; it is data only (see the module docstring)."""
        path = self / CHECKPOINT
        if not path.exists():
            return None  # killed before the first generation finished: start from scratch
        try:
            data = loads_state(path.read_text())
            if data.get("format") != CHECKPOINT_FORMAT:
                raise ValueError("not an evomerge search checkpoint")
            if data.get("version") != CHECKPOINT_VERSION:
                raise ConfigError(f"{path}: written by another evomerge version; start a new run")
            fields = {k: data[k] for k in ("mode", "generation", "candidates", "generations", "finished",
                                           "stop_reason", "elapsed_s", "data")}
            state = SearchState(**fields, reference=data.get("reference") or {})
            if not isinstance(state.candidates, list) or not isinstance(state.generation, int):
                raise ValueError("bad field types")
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - any malformed content means the file is unusable
            raise ConfigError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc}); "
                              "start over with --force") from None
        return state

    def save_checkpoint(self, state: SearchState) -> None:
        data = {"format": CHECKPOINT_FORMAT, **asdict(state)}
        _atomic_write_bytes(self / CHECKPOINT, dumps_state(data).encode())

    def write_tables(self, state: SearchState, columns: dict[str, list[Any]] | None = None) -> None:
        """Rewrite candidates.parquet and generations.csv from the checkpoint (atomically);
        ``columns``: more columns derived from the candidates (the proposer's front flags)."""
        import pandas as pd

        frame = pd.DataFrame(state.candidates)
        for name, values in (columns or {}).items():
            frame[name] = values
        tmp = self / f".candidates.parquet.tmp-{os.getpid()}"
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, self / "candidates.parquet")
        atomic_write_text(self / "generations.csv", pd.DataFrame(state.generations).to_csv(index=False))
