"""``run_datagen``: build one kind of data into a folder the search recipe points at.

    runs/<name>/safety.parquet, safety.jsonl        kept (prompt, refusal) pairs + provenance
    runs/<name>/safety-judged.parquet               every (prompt, model, answer, judgement)
    runs/<name>/safety-report.md / .json            counts, discard rates, per-model refusal rates
    runs/<name>/domain-<d>.parquet, .jsonl          self-questioned (question, answer) pairs
    runs/<name>/domain-report.md / .json

A folder built from the same recipe section is reused (``up to date``); a different one
is refused unless ``force``: data never changes under a search silently.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import yaml

from datagen.recipe import DatagenRecipe
from evomerge.errors import ConfigError
from evomerge.io_utils import atomic_write_text
from evomerge.runfolder import FolderLock

log = logging.getLogger(__name__)
KINDS = ("safety", "domain")


def _stamp(recipe: DatagenRecipe, kind: str) -> str:
    """The parts of the recipe that decide this kind's output."""
    keep = {"seed", "backend", kind} | ({"pool"} if kind == "safety" else set())
    return yaml.safe_dump(recipe.model_dump(mode="json", include=keep), sort_keys=True)


def run_datagen(recipe: DatagenRecipe, kind: str, out: str | os.PathLike[str] | None = None,
                force: bool = False) -> tuple[Path, dict[str, Any], bool]:
    """Build ``kind`` ("safety" | "domain") into ``out`` (default ``runs/<name>``).

    Returns (folder, report, rebuilt); ``rebuilt`` is False when the folder was up to date.
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown datagen kind '{kind}' (safety or domain)")
    if getattr(recipe, kind) is None:
        raise ConfigError(f"the recipe has no '{kind}' section")
    folder = Path(out) if out is not None else Path("runs") / recipe.name
    with FolderLock(folder, "datagen folder"):  # one writer per folder
        return _build(recipe, kind, folder, force)


def _build(recipe: DatagenRecipe, kind: str, folder: Path, force: bool) -> tuple[Path, dict[str, Any], bool]:
    import pandas as pd

    from datagen.output import write_report, write_table

    stamp_file = folder / f"{kind}-recipe.yaml"
    stamp = _stamp(recipe, kind)
    if stamp_file.exists():
        if stamp_file.read_text() == stamp and not force:
            import json

            log.info("datagen %s: %s is up to date", kind, folder)
            return folder, json.loads((folder / f"{kind}-report.json").read_text()), False
        if not force:
            raise ConfigError(f"{folder} holds {kind} data built from another recipe; pass --force to rebuild it")
    if stamp_file.exists():
        stamp_file.unlink()  # the old data is no longer vouched for while it is rebuilt
    if kind == "safety":
        from datagen.safety import build_safety_data

        kept, judged, report = build_safety_data(recipe)
        if not kept:
            raise ConfigError("datagen safety: no pool model refused any prompt; nothing to keep")
        write_table(kept, folder, "safety")
        write_table(judged, folder, "safety-judged")
        write_report(folder, "safety-report", f"Safety data: {recipe.name}", report,
                     {"Per model (fractions of prompts)": pd.DataFrame(report["per_model"])})
    else:
        from datagen.domain import build_domain_data

        data, report = build_domain_data(recipe)
        for d, rows in data.items():
            if not rows:
                raise ConfigError(f"datagen domain: no question kept for '{d}'")
            write_table(rows, folder, f"domain-{d}")
        table = pd.DataFrame([{"domain": d, **r} for d, r in report.items()])
        write_report(folder, "domain-report", f"Domain data: {recipe.name}", {"domains": list(report)} | report,
                     {"Per domain": table})
    atomic_write_text(stamp_file, stamp)
    return folder, report, True
