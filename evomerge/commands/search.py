"""``evomerge search RECIPE.yaml [--run-dir DIR] [--resume] [--force] [key=value ...]``."""

from __future__ import annotations

import argparse
import math

from evomerge.search import load_search_recipe, run_search


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "search", help="evolutionary (CMA-ES) or baseline search for a safe merge",
        description="Search merge genomes scored by lambda-weighted answer-only cross-entropy. "
        "Overrides: dotted recipe fields, e.g. search.steps=3 fitness.lambda=0.5 seed=1.",
    )
    parser.add_argument("recipe", help="search recipe YAML (see recipes/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override recipe fields by dotted name")
    parser.add_argument("--run-dir", help="run folder (default: runs/<recipe name>-<timestamp>)")
    parser.add_argument("--runs-root", default="runs", help="where new run folders go (default: runs)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --run-dir (default: the newest)")
    parser.add_argument("--force", action="store_true", help="delete an existing run folder and start over")
    parser.add_argument("--report-to", nargs="+", metavar="TRACKER",
                        help="experiment trackers: tensorboard, mlflow, wandb (default: the recipe's report_to, none)")
    parser.add_argument("--strict", action="store_true", default=None,
                        help="refuse to start when an evaluation prompt is in the search data (default: warn)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    overrides = list(args.overrides) + ([f"report_to=[{','.join(args.report_to)}]"] if args.report_to else [])
    recipe = load_search_recipe(args.recipe, overrides)
    result = run_search(recipe, args.run_dir, resume=args.resume, force=args.force, runs_root=args.runs_root,
                        progress=not args.quiet, strict=args.strict)
    console = Console()
    best = result.best
    genome = Table(title=f"best genome (candidate #{best['index']}, {recipe.search.mode}, {recipe.merge.method})")
    genome.add_column("expert")
    genome.add_column("weight per layer group")
    if result.best_genome.densities is not None:
        genome.add_column("density per layer group")
    for k, name in enumerate(result.space.expert_names):
        cells = [", ".join(f"{row[k]:.3f}" for row in result.best_genome.weights)]
        if result.best_genome.densities is not None:
            cells.append(", ".join(f"{row[k]:.3f}" for row in result.best_genome.densities))
        genome.add_row(name, *cells)
    console.print(genome)
    terms = {k: best[k] for k in ("fitness", "ce_domain", "ce_safety", "ce_benign") if not math.isnan(best[k])}
    console.print("fitness terms: " + "  ".join(f"{k}={v:.4f}" for k, v in terms.items()))
    if result.heldout is not None:
        table = Table(title="held-out prompts, percent (refusal phrases / exact match)")
        for column in result.heldout.columns:
            table.add_column(str(column))
        for row in result.heldout.itertuples(index=False):
            table.add_row(*(f"{v:.1f}" if isinstance(v, float) else str(v) for v in row))
        console.print(table)
    console.print(f"run folder: {result.run_dir}")
    return 0
