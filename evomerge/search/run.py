"""A run folder: what a search writes, and the checkpoint it resumes from.

    runs/<id>/
      recipe.yaml          the resolved recipe (overrides applied)
      checkpoint.pkl       optimiser state, random states, every candidate so far (atomic)
      candidates.parquet   one row per candidate: genome, every fitness term, build/score time
      generations.csv      one row per generation
      best_genome.yaml     the best genome so far (``evomerge merge --genome`` reads it)
      report.md, fitness.png, summary.json, heldout.csv, model/ (the best merge)

The checkpoint is the single source of truth: it is replaced atomically after every
generation, and the tables are rewritten from it, so a kill at any moment loses at most
the generation in flight, which a resume then recomputes identically.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from evomerge.errors import ConfigError
from evomerge.io_utils import atomic_write_text
from evomerge.search.recipe import SearchRecipe, recipe_from_dict

CHECKPOINT = "checkpoint.pkl"
CHECKPOINT_VERSION = 1
# fields that may change when a run is resumed: how long it runs, what happens after, and
# who evaluates (every backend gives the same results)
RESUMABLE_CHANGES = ("search.steps", "search.max_evals", "search.workers", "search.select", "search.select_max",
                     "search.select_max_new_tokens", "write_model", "evaluate")


class RunExistsError(ConfigError):
    """The run folder exists and neither --resume nor --force was given."""


@dataclass
class SearchState:
    """Everything needed to continue a search exactly where it stopped."""

    mode: str
    generation: int = 0  # completed generations
    proposer: Any = None  # pickled by value (pycma's CMAEvolutionStrategy pickles)
    numpy_state: Any = None
    candidates: list[dict[str, Any]] = field(default_factory=list)
    generations: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False
    stop_reason: str = ""
    elapsed_s: float = 0.0
    version: int = CHECKPOINT_VERSION


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: data}


def recipe_differences(old: SearchRecipe, new: SearchRecipe) -> list[str]:
    """Dotted names of the fields that differ and may not change on resume."""
    a = _flatten(old.model_dump(by_alias=True, mode="json"))
    b = _flatten(new.model_dump(by_alias=True, mode="json"))
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return [k for k in changed if not any(k == p or k.startswith(p + ".") for p in RESUMABLE_CHANGES)]


class RunDir:
    """A run folder; creation refuses to reuse a folder unless told how."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

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

    def open(self, recipe: SearchRecipe, resume: bool, force: bool) -> SearchState | None:
        """Prepare the folder; return the checkpoint to resume from, if any."""
        if resume and force:
            raise ConfigError("--resume and --force contradict each other: pick one")
        exists = self.path.exists() and any(self.path.iterdir())
        if exists and not (resume or force):
            raise RunExistsError(
                f"{self.path} already holds a run; pass --resume to continue it or --force to start over"
            )
        if exists and force:
            shutil.rmtree(self.path)
        if resume and not exists:
            raise ConfigError(f"--resume: {self.path} holds no run to resume")
        self.path.mkdir(parents=True, exist_ok=True)
        if resume:
            saved = self.saved_recipe()
            diffs = recipe_differences(saved, recipe)
            if diffs:
                raise ConfigError(
                    f"--resume: the recipe differs from the run's recipe.yaml in {', '.join(diffs)}; "
                    "only search.steps, search.max_evals, search.workers.*, write_model and evaluate.* may change"
                )
        atomic_write_text(self / "recipe.yaml", recipe.to_yaml())
        return self.load_checkpoint() if resume else None

    def saved_recipe(self) -> SearchRecipe:
        path = self / "recipe.yaml"
        if not path.exists():
            raise ConfigError(f"{self.path}: no recipe.yaml; not a run folder")
        return recipe_from_dict(yaml.safe_load(path.read_text()), str(path))

    def load_checkpoint(self) -> SearchState | None:
        path = self / CHECKPOINT
        if not path.exists():
            return None  # killed before the first generation finished: start from scratch
        try:
            state = pickle.loads(path.read_bytes())
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means the file is unusable
            raise ConfigError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc})") from None
        if not isinstance(state, SearchState) or state.version != CHECKPOINT_VERSION:
            raise ConfigError(f"{path}: written by another evomerge version; start a new run")
        return state

    def save_checkpoint(self, state: SearchState) -> None:
        buffer = io.BytesIO()
        pickle.dump(state, buffer, protocol=pickle.HIGHEST_PROTOCOL)
        _atomic_write_bytes(self / CHECKPOINT, buffer.getvalue())

    def write_tables(self, state: SearchState) -> None:
        """Rewrite candidates.parquet and generations.csv from the checkpoint (atomically)."""
        import pandas as pd

        frame = pd.DataFrame(state.candidates)
        tmp = self / f".candidates.parquet.tmp-{os.getpid()}"
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, self / "candidates.parquet")
        atomic_write_text(self / "generations.csv", pd.DataFrame(state.generations).to_csv(index=False))
