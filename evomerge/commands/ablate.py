"""``evomerge ablate RECIPE.yaml --over lambda=0,0.5,1 [--over steps=10,20] [--out DIR] [--storage URL]``."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from evomerge.ablate import ALIASES

    parser = subparsers.add_parser(
        "ablate", help="a grid of searches over recipe fields (optuna grid sampler, resumable)",
        description="Run one search per grid point of the --over factors, evaluate each best merge on held-out "
        "prompts, and write per-factor tables and figures. Stop and rerun to resume. Short factor names: "
        + ", ".join(f"{k} ({v})" for k, v in ALIASES.items()) + "; any dotted recipe field works too.")
    parser.add_argument("recipe", help="search recipe YAML")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="fixed overrides for every grid point")
    parser.add_argument("--over", action="append", required=True, metavar="NAME=V1,V2,...",
                        help="a factor and its values (repeat for a full grid)")
    parser.add_argument("--out", help="ablation folder (default: runs/ablate-<recipe name>-<factors>)")
    parser.add_argument("--storage", help="optuna storage shared by several workers: a database URL "
                        "(postgresql://...) or journal:PATH (default: SQLite in the ablation folder)")
    parser.add_argument("--study", help="study name inside --storage (default: ablation)")
    parser.add_argument("--prompts", nargs="+", metavar="SET",
                        help="held-out sets to evaluate on (default: the recipe's evaluate section)")
    parser.add_argument("--judge", help="judge of unsafe answers (default: llama_guard; the zoo guard for the zoo)")
    parser.add_argument("--guard", help="the Llama Guard model")
    parser.add_argument("--report-to", nargs="+", metavar="TRACKER",
                        help="experiment trackers: tensorboard, mlflow, wandb (default: none)")
    parser.add_argument("--strict", action="store_true", default=None,
                        help="refuse to start when a held-out prompt is in a grid point's search data (default: warn)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from evomerge.ablate import Factor, eval_config_for, run_ablation
    from evomerge.evaluation import JudgeConfig
    from evomerge.search import load_search_recipe

    factors = [Factor.parse(text) for text in args.over]
    search = load_search_recipe(args.recipe, args.overrides)
    judge = None
    if args.judge or args.guard:
        judge = JudgeConfig(name=args.judge or "llama_guard", model=args.guard)
    config = eval_config_for(search, judge)
    if args.prompts:
        config = config.model_copy(update={"sets": list(args.prompts)})
        config.prompt_sets()  # named sets checked now, not after the first search
    from evomerge.runfolder import check_name

    default = f"ablate-{search.name}-{'-'.join(f.name for f in factors)}"
    out = Path(args.out) if args.out else Path("runs") / check_name(default, "--over factor names")
    result = run_ablation(args.recipe, factors, out, args.overrides, args.storage, config, args.study,
                          strict=args.strict,
                          report_to=args.report_to or ())
    print(result.markdown)
    print(f"\nablation folder: {result.folder}")
    return 0
