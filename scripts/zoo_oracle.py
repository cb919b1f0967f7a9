"""Does the zoo hold a merge that is both safe and skilled? The behavioural oracle on every pool.

    PYTHONPATH=. .venv/bin/python scripts/zoo_oracle.py                      # the default zoo, 3 pools
    PYTHONPATH=. .venv/bin/python scripts/zoo_oracle.py --zoo DIR --pools geography --generations 20
    PYTHONPATH=. .venv/bin/python scripts/zoo_oracle.py --summarise seed0=runs/oracle-s0 seed1=runs/oracle-s1

For each pool (safe + geography, safe + arithmetic, safe + both) the oracle of
evomerge/zoo/oracle.py searches task arithmetic over a per-module genome, choosing on
held-in greedy behaviour; the table reports the pool's models and the chosen merge on
the held-out sets, with the merge's gaps from the safe model and from each expert.
Writes oracle.csv, oracle.md and oracle.json (the chosen genomes) under --out.

``--method ties`` searches TIES merges (a weight and a density per module and model)
instead of task arithmetic. ``--select-on heldout-split`` asks the existence question
more directly: the held-out sets are split in two seeded halves, the oracle chooses on
the first (new phrasings and topics, as the product meets them) and the table reports
the second, which the choice never saw. It bounds what a merge of this genome can do on prompts unlike training.

``--measure POOL:NAME=MODEL`` (repeatable) measures another merge of that pool, for example the
product's search result written by ``evomerge merge RUN/recipe.yaml --genome RUN/best_genome.yaml``,
on the very prompts the oracle merge is reported on, with its gaps from the pool and from the
oracle merge (``vs_oracle_*``, points): is the product's merge within 2 points of the oracle's?
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import pandas as pd
import torch

from evomerge.evaluation import format_table
from evomerge.io_utils import atomic_write_text
from evomerge.pool import load_model, load_tokenizer
from evomerge.zoo import oracle
from evomerge.zoo.world import World


def split_halves(sets: dict[str, list], seed: int) -> tuple[dict[str, list], dict[str, list]]:
    """Each set shuffled (seeded) and cut in two: (chosen on, reported on)."""
    first, second = {}, {}
    for key, items in sets.items():
        items = list(items)
        random.Random(f"{seed}:{key}").shuffle(items)
        first[key], second[key] = items[: len(items) // 2], items[len(items) // 2 :]
    return first, second


def run_pool(zoo: Path, world: World, pool: str, domains: list[str], args) -> tuple[list[dict], dict]:
    tokenizer = load_tokenizer(zoo / "safe")
    names = ["safe", *[f"expert-{d}" for d in domains]]
    models = {n: load_model(zoo / n) for n in names}
    base, live = load_model(zoo / "base"), load_model(zoo / "base")
    test = oracle.heldout_sets(world, domains)
    if args.select_on == "heldout-split":
        heldin, test = split_halves(test, args.seed)
    else:
        heldin = oracle.heldin_sets(world, domains, args.seed)
    found = oracle.search_merge(base, live, models, tokenizer, domains, heldin, args.generations, args.popsize, args.seed,
                                log=lambda line: print("  " + line, flush=True), method=args.method)
    measured = {n: oracle.behaviour(m, tokenizer, test) for n, m in models.items()}
    merge = oracle.behaviour(live, tokenizer, test)
    label = "safe + " + " + ".join(domains)
    rows = []
    for name, b in [*measured.items(), ("oracle merge", merge)]:
        row = {"pool": label, "model": name, "refuses_unsafe": 100 * b["refusal_unsafe"],
               "refuses_benign": 100 * b["refusal_benign"], **{f"acc_{d}": 100 * b[f"acc_{d}"] for d in domains}}
        rows.append(row)
    gaps = oracle.headroom(merge, measured, domains)
    rows[-1] |= {**gaps, "headroom": "yes" if gaps["headroom"] else "NO"}
    for name, folder in args.measure_by_pool.get(pool, []):
        other = oracle.behaviour(load_model(folder), tokenizer, test)
        row = {"pool": label, "model": name, "refuses_unsafe": 100 * other["refusal_unsafe"],
               "refuses_benign": 100 * other["refusal_benign"], **{f"acc_{d}": 100 * other[f"acc_{d}"] for d in domains}}
        theirs = oracle.headroom(other, measured, domains)
        row |= {**theirs, "headroom": "yes" if theirs["headroom"] else "NO",
                "vs_oracle_refusals": round(row["refuses_unsafe"] - rows[-1]["refuses_unsafe"], 1),
                **{f"vs_oracle_{d}": round(row[f"acc_{d}"] - rows[-1][f"acc_{d}"], 1) for d in domains}}
        rows.append(row)
    detail = {"models": found["models"], "groups": found["groups"], "selected": found["selected"],
              "candidates": found["candidates"], "seconds": found["seconds"], "heldout": merge}
    return rows, detail


def summary_rows(name: str, folder: Path) -> list[dict]:
    """One row per pool of an oracle run's oracle.csv: the safe model, the experts, the merge and its gaps."""
    try:
        return _summary_rows(name, pd.read_csv(folder / "oracle.csv"))
    except (KeyError, ValueError, pd.errors.ParserError) as exc:  # a csv this script did not write
        print(f"zoo_oracle: {folder / 'oracle.csv'}: not an oracle table ({type(exc).__name__}: {exc})", file=sys.stderr)
        raise SystemExit(2) from None


def _summary_rows(name: str, frame: pd.DataFrame) -> list[dict]:
    rows = []
    for pool, group in frame.groupby("pool", sort=False):
        pool_models = group["model"].isin(["safe", "oracle merge"]) | group["model"].str.startswith("expert-")
        group = group[pool_models].set_index("model")  # not the --measure rows
        merge, safe = group.loc["oracle merge"], group.loc["safe"]
        domains = sorted(c.removeprefix("acc_") for c in group.columns if c.startswith("acc_") and pd.notna(merge[c]))
        rows.append({"build": name, "pool": pool, "safe refuses": f"{safe['refuses_unsafe']:.1f}",
                     "expert(s)": ", ".join(f"{group.loc[f'expert-{d}', f'acc_{d}']:.1f}" for d in domains),
                     "merge: refuses / accuracy": " / ".join(f"{v:.1f}" for v in
                                                             [merge["refuses_unsafe"], *(merge[f"acc_{d}"] for d in domains)]),
                     "gaps (refusals; domain)": f"{merge['alignment_gap']:+.1f}; "
                                                + ", ".join(f"{merge[f'gap_{d}']:+.1f}" for d in domains),
                     "headroom": merge["headroom"]})
    return rows


def _named_folder(spec: str) -> tuple[str, Path]:
    name, sep, folder = spec.partition("=")
    if not sep or not (Path(folder) / "oracle.csv").is_file():
        print(f"zoo_oracle: --summarise {spec!r}: give NAME=DIR with DIR/oracle.csv from an oracle run", file=sys.stderr)
        raise SystemExit(2)
    return name, Path(folder)


def _measures(specs: list[str], pools: list[str]) -> dict[str, list[tuple[str, Path]]]:
    """``POOL:NAME=MODEL`` -> {pool label: [(NAME, MODEL)]}; the pool label is the table's."""
    out: dict[str, list[tuple[str, Path]]] = {}
    for spec in specs:
        pool, _, rest = spec.partition(":")
        name, sep, folder = rest.partition("=")
        if pool not in pools or not sep or not name or not (Path(folder) / "config.json").is_file():
            print(f"zoo_oracle: --measure {spec!r}: give POOL:NAME=MODEL with POOL one of --pools ({', '.join(pools)}) "
                  "and MODEL a model folder", file=sys.stderr)
            raise SystemExit(2)
        out.setdefault(pool, []).append((name, Path(folder)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", help="zoo folder (default: the shipped zoo, else the default one built)")
    parser.add_argument("--pools", nargs="+", default=["geography", "arithmetic", "both"],
                        help="a domain (safe + that expert) or 'both' (safe + every expert)")
    parser.add_argument("--generations", type=int, default=12)
    parser.add_argument("--popsize", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--method", choices=["task_arithmetic", "ties"], default="task_arithmetic",
                        help="merge family searched: task arithmetic (weights) or TIES (weights and densities per module)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--select-on", choices=["heldin", "heldout-split"], default="heldin",
                        help="choose on held-in prompts (default) or on one half of the held-out sets, reporting the other")
    parser.add_argument("--out", default="runs/zoo-oracle")
    parser.add_argument("--summarise", nargs="+", metavar="NAME=DIR",
                        help="only tabulate finished runs (their oracle.csv), one row per build and pool, domains in name order")
    parser.add_argument("--measure", action="append", default=[], metavar="POOL:NAME=MODEL",
                        help="also measure MODEL (a merge of POOL: a domain or 'both') on the oracle's reported prompts")
    args = parser.parse_args()
    args.measure_by_pool = _measures(args.measure, args.pools)
    if args.summarise:
        rows = [row for spec in args.summarise for row in summary_rows(*_named_folder(spec))]
        print(format_table(pd.DataFrame(rows)))
        return
    torch.set_num_threads(args.threads)
    if args.zoo is None:
        from evomerge.zoo.build import default_zoo

        zoo = default_zoo().root
    else:
        zoo = Path(args.zoo)
    card = json.loads((zoo / "card.json").read_text())
    world = World(seed=card["config"]["seed"])
    domains = list(card["config"]["domains"])
    rows, details = [], {}
    for pool in args.pools:
        chosen = domains if pool == "both" else [pool]
        print(f"[oracle] safe + {' + '.join(chosen)}", flush=True)
        pool_rows, detail = run_pool(zoo, world, pool, chosen, args)
        rows.extend(pool_rows)
        details[pool_rows[0]["pool"]] = detail
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(rows)
    atomic_write_text(out / "oracle.csv", table.to_csv(index=False))
    atomic_write_text(out / "oracle.json", json.dumps({"zoo": str(zoo), "key": card["key"], "method": args.method, "select_on": args.select_on, "pools": details}, indent=2) + "\n")
    text = format_table(table.astype(object).where(table.notna(), ""))
    what = "the held-out half the choice never saw" if args.select_on == "heldout-split" else "held-out prompts"
    atomic_write_text(out / "oracle.md", f"zoo `{card['key']}`: {what}, %, refusal phrases\n\n{text}\n")
    print(text)


if __name__ == "__main__":
    main()
