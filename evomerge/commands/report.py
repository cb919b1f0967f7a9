"""``evomerge report RECIPE.yaml [--out DIR] [key=value ...]``: the Table 1 comparison."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report", help="Table 1: pool models, grid, domain-only, safety-aware, LM-Cocktail, per merge method",
        description="Run (or resume) every search of the comparison, evaluate the results and the pool on the same "
        "held-out prompts, and write runs/<name>/report.md, table1.csv and pareto.png.")
    parser.add_argument("recipe", help="report recipe YAML (see recipes/table1-zoo.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override report fields, e.g. rows=[grid]")
    parser.add_argument("--out", help="report folder (default: runs/<name>)")
    parser.add_argument("--runs-root", default="runs", help="where the report folder goes without --out (default: runs)")
    parser.add_argument("--report-to", nargs="+", metavar="TRACKER",
                        help="experiment trackers: tensorboard, mlflow, wandb (default: none)")
    parser.add_argument("--strict", action="store_true", default=None,
                        help="refuse to start when a held-out prompt is in the search data (default: warn)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from evomerge.report import load_report_recipe, run_report

    report = run_report(load_report_recipe(args.recipe, args.overrides), args.out, args.runs_root, strict=args.strict,
                          report_to=args.report_to or ())
    print(report.markdown.split("![", 1)[0].rstrip())
    if report.checks is not None and not report.checks.empty:
        from evomerge.evaluation import format_table

        print("\ntargets (safety-aware search):\n")
        print(format_table(report.checks))
    print(f"\nreport: {report.folder / 'report.md'}")
    return 0
