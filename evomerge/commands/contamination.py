"""``evomerge contamination RECIPE.yaml [--prompts SET ...] [--also DATA ...] [--strict]``."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "contamination", help="check that no evaluation prompt is in a search's data",
        description="Compare evaluation prompts (the recipe's evaluate section and named sets) with the search "
        "data and datagen outputs: exact, normalised and long shared n-gram matches. The search runs the same "
        "check before it starts.")
    parser.add_argument("recipe", help="search recipe YAML")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override recipe fields by dotted name")
    parser.add_argument("--prompts", nargs="+", metavar="SET",
                        help="evaluation sets to check (default: the recipe's evaluate section and the sets "
                        "'evomerge eval' uses for this pool)")
    parser.add_argument("--also", nargs="+", metavar="DATA", default=[],
                        help="more data the search came from: datagen output folders or files")
    parser.add_argument("--ngram", type=int, help="words in a shared run that counts (default: the recipe's, 13)")
    parser.add_argument("--strict", action="store_true", help="exit 1 on any finding")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from evomerge.contamination import check_contamination, eval_prompts_of, search_data_of
    from evomerge.search import load_search_recipe

    recipe = load_search_recipe(args.recipe, args.overrides)
    update = {"also": [*recipe.contamination.also, *args.also]}
    if args.ngram is not None:
        update["ngram"] = args.ngram
    recipe = recipe.model_copy(update={"contamination": recipe.contamination.model_copy(update=update)})
    prompts, skipped = eval_prompts_of(recipe, args.prompts)
    report = check_contamination(prompts, search_data_of(recipe), recipe.contamination.ngram)
    report.skipped.update(skipped)
    print(report.summary(examples=5))
    return 1 if args.strict and not report.clean else 0
