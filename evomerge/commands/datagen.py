"""``evomerge datagen safety|domain RECIPE.yaml [--out DIR] [--force] [key=value ...]``."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "datagen", help="build safety or domain data for a search",
        description="safety: unsafe prompts from a generator (or real prompts), answered by every pool "
        "model, judged, one refusal kept per prompt. domain: experts self-question from 3 in-context "
        "examples and answer. Overrides: dotted recipe fields, e.g. safety.n=500.",
    )
    parser.add_argument("kind", choices=["safety", "domain"],
                        help="safety: unsafe prompts and pool refusals; domain: self-questioned expert data")
    parser.add_argument("recipe", help="datagen recipe YAML (see recipes/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override recipe fields by dotted name")
    parser.add_argument("--n", type=int, help="N: prompts to write (safety) or questions per expert (domain)")
    parser.add_argument("--out", help="output folder (default: runs/<recipe name>)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the folder holds other data")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from datagen.recipe import load_datagen_recipe
    from datagen.run import run_datagen

    overrides = list(args.overrides) + ([f"{args.kind}.n={args.n}"] if args.n is not None else [])
    recipe = load_datagen_recipe(args.recipe, overrides)
    folder, report, rebuilt = run_datagen(recipe, args.kind, args.out, args.force)
    report_md = folder / f"{args.kind}-report.md"
    if rebuilt:
        print(report_md.read_text())
    else:
        print(f"{args.kind} data in {folder} is up to date (built from the same recipe); --force rebuilds it")
    print(f"data: {folder}")
    return 0
