"""Build the zoo for several seeds and torch thread counts and tabulate their cards.

    PYTHONPATH=. .venv/bin/python scripts/zoo_robustness.py                  # seeds 0 1 2 x threads 1 2
    PYTHONPATH=. .venv/bin/python scripts/zoo_robustness.py --table-only     # re-tabulate built zoos

Why: float summation order differs between CPUs and thread counts, so every machine
trains a different zoo, as if with another seed. A thread count is a cheap stand-in
for another CPU; the zoo's claims (docs/zoo.md) must hold on every such build.
Writes builds.csv and builds.md (one row per build, then mean, min and max) under --out;
each zoo is kept in its own folder there (a few MB per model).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from evomerge.evaluation import format_table
from evomerge.io_utils import atomic_write_text
from evomerge.zoo.card import check_targets


def card_row(card: dict) -> dict:
    """The figures the issue's targets speak of, in percent, plus build time and targets met."""
    models, domains = card["models"], card["config"]["domains"]
    row = {"seed": card["config"]["seed"], "threads": card["config"]["threads"],
           "safe_refuses_unsafe": 100 * models["safe"]["refusal_unsafe"],
           "safe_refuses_benign": 100 * models["safe"]["refusal_benign"]}
    for d in domains:
        row[f"safe_acc_{d}"] = 100 * models["safe"][f"acc_{d}"]
        row[f"expert_{d}_acc"] = 100 * models[f"expert-{d}"][f"acc_{d}"]
        row[f"expert_{d}_refuses_unsafe"] = 100 * models[f"expert-{d}"]["refusal_unsafe"]
    row["guard_agreement"] = 100 * card["guard"]["agreement"]
    for expert, probe in card["merge_probe"].items():
        d = expert.removeprefix("expert-")
        row[f"probe_{d}_refuses"] = 100 * probe["heldout"]["refusal_unsafe"]
        row[f"probe_{d}_acc"] = 100 * probe["heldout"][f"acc_{d}"]
    row["build_s"] = card["build_seconds"] + card["card_seconds"]
    row["base"] = "reused" if card.get("base_from") else "trained"
    targets = check_targets(card)  # judged by today's bars, not those of the build
    row["targets_met"] = f"{sum(targets.values())}/{len(targets)}"
    return row


def summarise(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    numeric = frame.drop(columns=["seed", "threads", "targets_met", "base"])
    stats = pd.DataFrame({"mean": numeric.mean(), "min": numeric.min(), "max": numeric.max()}).T.reset_index()
    stats = stats.rename(columns={"index": "seed"})
    return pd.concat([frame.astype({"seed": str, "threads": str}), stats], ignore_index=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", default="runs/zoo-robustness")
    parser.add_argument("--table-only", action="store_true", help="tabulate the zoos already built under --out")
    parser.add_argument("--base-from", help="reuse pretrained bases: a folder with seed{S}-threads{T} zoos of the same pretraining")
    parser.add_argument("--set", nargs="*", default=[], metavar="key=value",
                        help="zoo config overrides for every build (as `evomerge zoo build key=value`)")
    args = parser.parse_args()
    from evomerge.errors import EvomergeError
    from evomerge.zoo.config import zoo_config

    try:  # a bad override is named before anything is built
        zoo_config(args.set)
    except EvomergeError as exc:
        print(f"zoo_robustness: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    out = Path(args.out)
    rows = []
    for seed in args.seeds:
        for threads in args.threads:
            folder = out / f"seed{seed}-threads{threads}"
            if not args.table_only:
                from evomerge.zoo import build_zoo

                print(f"[zoo] seed {seed}, {threads} thread(s) -> {folder}", flush=True)
                source = Path(args.base_from) / folder.name if args.base_from else None
                build_zoo(zoo_config([*args.set, f"threads={threads}"], seed=seed), out=folder,
                          base_from=source if source is not None and (source / "card.json").exists() else None)
            if (folder / "card.json").exists():
                rows.append(card_row(json.loads((folder / "card.json").read_text())))
    table = summarise(rows)
    atomic_write_text(out / "builds.csv", table.to_csv(index=False))
    text = format_table(table.fillna(""))
    atomic_write_text(out / "builds.md", text + "\n")
    print(text)
    failed = [r for r in rows if r["targets_met"].split("/")[0] != r["targets_met"].split("/")[1]]
    print(f"{len(rows) - len(failed)} of {len(rows)} builds meet every card target")


if __name__ == "__main__":
    main()
