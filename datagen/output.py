"""Writing datagen outputs: parquet + JSONL side by side, atomically, plus a report."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from evomerge.io_utils import atomic_write_text
from evomerge.runfolder import dumps_report


def write_table(rows: list[dict[str, Any]], folder: Path, stem: str) -> None:
    """``stem.parquet`` and ``stem.jsonl``; each appears whole or not at all."""
    import pandas as pd

    folder.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows)
    tmp = folder / f".{stem}.parquet.tmp-{os.getpid()}"
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, folder / f"{stem}.parquet")
    atomic_write_text(folder / f"{stem}.jsonl", "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))


def write_report(folder: Path, stem: str, title: str, report: dict[str, Any], tables: dict[str, Any]) -> None:
    """``stem.json`` (every number) and ``stem.md`` (the same, readable)."""
    atomic_write_text(folder / f"{stem}.json", dumps_report(report))  # strict JSON: NaN becomes null
    lines = [f"# {title}", ""]
    for key, value in report.items():
        if not isinstance(value, (dict, list)):
            lines.append(f"- {key.replace('_', ' ')}: {value:.4g}" if isinstance(value, float) else
                         f"- {key.replace('_', ' ')}: {value}")
    for caption, frame in tables.items():
        lines += ["", f"## {caption}", "", frame.to_markdown(index=False, floatfmt=".3f")]
    atomic_write_text(folder / f"{stem}.md", "\n".join(lines) + "\n")
