"""Prompt sources for datagen: a recipe's ``source`` (a file, a folder, a packaged set).

The readers themselves live in :mod:`evomerge.datafiles` (re-exported here).
"""

from __future__ import annotations

from typing import Any

from evomerge.datafiles import (  # noqa: F401  (re-exported: older imports)
    HUB_SETS,
    PACKAGED,
    file_rows,
    hub_rows,
    local_datasets_dir,
    packaged_rows,
    seeded_subset,
)
from evomerge.errors import ConfigError


def load_prompts(spec: Any, seed: int) -> list[dict[str, Any]]:
    """Prompts from a :class:`datagen.recipe.SourceSpec`: rows with ``prompt`` and ``category``."""
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
    return seeded_subset(rows, spec.limit, seed)
