"""Why a search stops where it does: evaluate many of a finished run's candidates on the
held-out prompts, and compare the fitness's choice with the best any selection could make.

    PYTHONPATH=. .venv/bin/python scripts/candidate_frontier.py runs/table1-zoo/searches/ties-safety-aware \
        --top 40 --out runs/table1-zoo/frontier.csv

The held-out numbers here are for diagnosis only: picking a merge by them would be
selecting on the test set. Prints, per candidate evaluated, fitness rank, alignment and
domain accuracy, then the candidates no other beats on both.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from evomerge.evaluation import Candidate, EvalConfig, Evaluator, format_table
from evomerge.merge import Genome
from evomerge.search import load_search_recipe
from evomerge.search.evaluator import CandidateEvaluator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--top", type=int, default=40, help="best candidates by fitness to evaluate")
    parser.add_argument("--spread", type=int, default=20, help="more candidates, evenly spaced over the fitness ranks")
    parser.add_argument("--sets", nargs="+", default=["zoo-unsafe", "zoo-benign", "zoo-geography"])
    parser.add_argument("--out", help="CSV of every evaluated candidate")
    args = parser.parse_args()

    run = Path(args.run_dir)
    recipe = load_search_recipe(run / "recipe.yaml")
    frame = pd.read_parquet(run / "candidates.parquet")
    frame = frame[frame["fitness"].map(lambda v: v == v and v != float("inf"))]
    ranked = frame.sort_values("fitness").reset_index(drop=True)
    picks = set(range(min(args.top, len(ranked))))
    if args.spread and len(ranked) > args.top:
        step = max(1, (len(ranked) - args.top) // args.spread)
        picks |= set(range(args.top, len(ranked), step))
    ev = CandidateEvaluator(recipe)
    evaluator = Evaluator(EvalConfig.for_zoo(sets=args.sets))
    rows = []
    for rank in sorted(picks):
        cand = ranked.iloc[rank]
        genome = json.loads(cand["genome"])
        ev.build(Genome.from_values(genome["weights"], genome.get("densities"), expert_names=list(recipe.pool.experts)))
        measured, _ = evaluator.evaluate(Candidate(f"#{int(cand['index'])}", ev.model, ev.tokenizer))
        rows.append({"fitness_rank": rank + 1, "index": int(cand["index"]), "fitness": cand["fitness"],
                     "ce_domain": cand["ce_domain"], "ce_safety": cand["ce_safety"], **measured})
    table = pd.DataFrame(rows).drop(columns=["ref"])
    acc = [c for c in table.columns if c.startswith("acc_")][0]
    front = table[[not ((table["alignment"] >= r["alignment"]) & (table[acc] >= r[acc]) &
                        ((table["alignment"] > r["alignment"]) | (table[acc] > r[acc]))).any()
                   for _, r in table.iterrows()]]
    print(format_table(table.head(10), 3))
    print(f"\n{len(table)} candidates evaluated; not beaten on both alignment and {acc}:\n")
    print(format_table(front.sort_values("alignment", ascending=False), 3))
    if args.out:
        table.to_csv(args.out, index=False)
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
