"""Does a constrained search hold its safety bar? Feasible candidates per generation.

    PYTHONPATH=. .venv/bin/python scripts/constraint_drift.py runs/table1-zoo/searches/*constrained*

For each finished constrained (or pareto) run folder: the bar (checkpoint.json), the candidates within
it per generation, how many of the last three generations' candidates are, and the chosen candidate's
CE_safety and CE_domain (docs/search.md, "Holding the bar in a short search").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from evomerge.evaluation import format_table


def drift_row(run: Path) -> dict:
    state = json.loads((run / "checkpoint.json").read_text())
    bound = float(state["reference"]["bound"])
    table = pd.read_parquet(run / "candidates.parquet")
    ok = table["ce_safety"] <= bound
    per_gen = ok.groupby(table["generation"]).sum().astype(int).tolist()
    sizes = table.groupby("generation").size().tolist()
    chosen = json.loads((run / "summary.json").read_text())["best"]
    return {"run": str(run), "bound": f"{bound:.3f}", "within the bar per generation": " ".join(map(str, per_gen)),
            "last 3 generations": f"{sum(per_gen[-3:])} of {sum(sizes[-3:])}",
            "chosen CE_safety": f"{chosen['ce_safety']:.3f}", "chosen CE_domain": f"{chosen['ce_domain']:.3f}",
            "chosen within": bool(chosen["ce_safety"] <= bound)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished constrained or pareto run folders")
    args = parser.parse_args()
    rows = []
    for run in args.runs:
        try:
            rows.append(drift_row(run))
        except (OSError, KeyError, ValueError) as exc:
            print(f"constraint_drift: {run}: not a finished constrained run ({type(exc).__name__}: {exc})", file=sys.stderr)
            raise SystemExit(2) from None
    print(format_table(pd.DataFrame(rows)))


if __name__ == "__main__":
    main()
