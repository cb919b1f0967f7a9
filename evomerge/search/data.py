"""Question/answer sets for the fitness and the held-out check.

Files are JSONL, JSON or parquet (read with pandas) or a folder saved by
``datasets.save_to_disk``. ``zoo:...`` paths resolve inside the tiny zoo
(:func:`evomerge.refs.resolve_path`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.datafiles import saved_dataset_rows, seeded_subset
from evomerge.errors import ConfigError
from evomerge.refs import ZOO_PREFIX, resolve_path  # noqa: F401  (re-exported: older imports)


@dataclass(frozen=True)
class QASet:
    """Rows of one data set; ``pairs`` are (prompt, answer), ``rows`` keep every column."""

    name: str
    source: str
    rows: tuple[dict[str, Any], ...]
    prompt_field: str = "prompt"
    answer_field: str = "answer"

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return [(r[self.prompt_field], r[self.answer_field]) for r in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def sample(self, n: int | None, seed: int) -> QASet:
        """A fixed random subset of ``n`` rows (all rows when ``n`` is None or larger).

        Why fixed: every candidate is scored on the same samples (common random numbers),
        so differences in fitness come from the genome and not from the draw.
        """
        if n is None or n >= len(self.rows):
            return self
        rows = tuple(seeded_subset(list(self.rows), n, f"{seed}:{self.name}"))
        return QASet(self.name, self.source, rows, self.prompt_field, self.answer_field)


def _read_rows(path: Path) -> list[dict[str, Any]]:
    import pandas as pd

    if path.is_dir():
        return saved_dataset_rows(path)
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".ndjson"):
            frame = pd.read_json(path, lines=True, dtype=False)
        elif suffix == ".json":
            frame = pd.read_json(path, dtype=False)
        elif suffix in (".parquet", ".pq"):
            frame = pd.read_parquet(path)
        else:
            raise ConfigError(f"{path}: unsupported data file type '{suffix}' (use .jsonl, .json, .parquet or a datasets folder)")
    except ValueError as exc:
        raise ConfigError(f"{path}: cannot be read: {exc}") from None
    return frame.to_dict(orient="records")


def load_qa_set(name: str, source: str, prompt_field: str = "prompt", answer_field: str = "answer") -> QASet:
    """Read and check one set; errors name the set, the file and the missing column or row."""
    path = Path(resolve_path(source))
    if not path.exists():
        raise ConfigError(f"data set '{name}': {source} does not exist")
    rows = _read_rows(path)
    if not rows:
        raise ConfigError(f"data set '{name}': {source} has no rows")
    for field in (prompt_field, answer_field):
        if field not in rows[0]:
            raise ConfigError(f"data set '{name}': {source} has no '{field}' column (columns: {sorted(rows[0])})")
    for i, row in enumerate(rows):
        for field in (prompt_field, answer_field):
            value = row.get(field)
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"data set '{name}': {source} row {i} has an empty or non-text '{field}'")
    return QASet(name, str(path), tuple(rows), prompt_field, answer_field)


def fingerprint(source: str) -> str:
    """sha256 of a data file, or of every file in a ``datasets`` folder (names and bytes),
    so a resumed search can tell that its data changed under it."""
    import hashlib

    path = Path(resolve_path(source))
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode() + b"\0")
        try:
            with open(file, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
        except OSError as exc:
            raise ConfigError(f"{source}: cannot be read ({exc.strerror})") from None
    return digest.hexdigest()
