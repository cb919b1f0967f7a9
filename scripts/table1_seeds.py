"""Table 1 rows over zoo seeds: mean and spread of each row across several report runs.

    PYTHONPATH=. .venv/bin/python scripts/table1_seeds.py seed0=runs/table1-zoo seed1=DIR1 seed2=DIR2 --out runs/table1-seeds

Each argument is ``label=FOLDER``, a folder written by ``evomerge report`` (its
``table1.csv``), typically the same recipe run on zoo builds of other seeds
(``EVOMERGE_ZOO=FOLDER evomerge report ...``, docs/zoo.md). Rows are matched by method,
search and (for pool rows) model; the table gives, for alignment, over-refusal and each
domain accuracy, ``mean +- half the range`` and the per-run values, so a claim can be
read against the spread between seeds. Writes ``seeds.csv`` and ``seeds.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from evomerge.errors import EvomergeError
from evomerge.evaluation import format_table
from evomerge.io_utils import atomic_write_text

KEYS = ["method", "search", "model"]


def load_runs(specs: list[str]) -> pd.DataFrame:
    frames = []
    for spec in specs:
        label, sep, folder = spec.partition("=")
        if not sep or not label or not folder:
            raise EvomergeError(f"{spec!r}: expected LABEL=FOLDER")
        path = Path(folder) / "table1.csv"
        if not path.is_file():
            raise EvomergeError(f"{path}: no such file (a folder written by `evomerge report`)")
        frame = pd.read_csv(path)
        frame.insert(0, "run", label)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def metrics_of(table: pd.DataFrame) -> list[str]:
    return [c for c in ("alignment", "over_refusal", *sorted(c for c in table.columns if c.startswith("acc_")))
            if c in table.columns]


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (method, search, model) present in every run: mean +- half range, and the values."""
    runs = list(dict.fromkeys(table["run"]))
    table = table.copy()
    table.loc[table["search"] != "pool", "model"] = ""  # searched rows: named by method and search
    metrics = metrics_of(table)
    rows = []
    for key, group in table.groupby(KEYS, sort=False, dropna=False):
        if set(group["run"]) != set(runs):
            continue
        row = dict(zip(KEYS, key))
        for metric in metrics:
            values = group.set_index("run")[metric].reindex(runs)
            if values.isna().all():
                row[metric] = ""
                continue
            lo, hi = values.min(), values.max()
            row[metric] = f"{values.mean():.1f} +- {(hi - lo) / 2:.1f}"
            row[f"{metric} per run"] = " / ".join("" if pd.isna(v) else f"{v:.1f}" for v in values)
        rows.append(row)
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="LABEL=FOLDER of an `evomerge report` run")
    parser.add_argument("--out", default="runs/table1-seeds")
    args = parser.parse_args()
    try:
        table = load_runs(args.runs)
    except EvomergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    summary = summarise(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "seeds.csv", summary.to_csv(index=False))
    runs = " / ".join(dict.fromkeys(table["run"]))
    text = format_table(summary)
    atomic_write_text(out / "seeds.md", f"mean +- half the range over {runs}; per run in that order\n\n{text}\n")
    print(text)


if __name__ == "__main__":
    main()
