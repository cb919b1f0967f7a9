"""``evomerge merge RECIPE.yaml [--genome G.yaml] [--out DIR]``: write one merged model folder.

RECIPE is an evomerge recipe or a mergekit config (``merge_method: ties`` ...).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from evomerge.merge.recipe import load_genome
from evomerge.merge.writer import explain_merge, load_recipe, write_merged_model
from evomerge.pool import LoadOptions


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("merge", help="materialise a merge (evomerge recipe or mergekit YAML)")
    parser.add_argument("recipe", help="evomerge recipe YAML, or a mergekit config YAML")
    parser.add_argument("--genome", help="YAML with weights/densities/scale; overrides the recipe's genome")
    parser.add_argument("--out", help="output model folder (default: ./<recipe name>-merged)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--device", default="cpu", help="device for the merge arithmetic (cpu, cuda)")
    parser.add_argument("--allow-pickle", action="store_true", help="accept pickle (.bin) checkpoints")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow custom model code")
    parser.add_argument("--explain", action="store_true",
                        help="print what would be computed per tensor group (method, weights, densities, dtypes); write nothing")
    parser.set_defaults(func=run_merge)


def run_merge(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe)
    genome = load_genome(args.genome) if args.genome else None
    out = Path(args.out) if args.out else Path(f"{Path(args.recipe).stem}-merged")
    options = LoadOptions(allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code)
    if args.explain:
        print(explain_merge(recipe, genome, load_options=options))
        return 0
    write_merged_model(recipe, out, genome, overwrite=args.overwrite, load_options=options, device=args.device)
    print(f"wrote {out}")
    return 0
