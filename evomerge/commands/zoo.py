"""``evomerge zoo build``: build (or reuse) the tiny model zoo, print its card, and compare
it with the zoo shipped in the repository (zoo/)."""

from __future__ import annotations

import argparse
import json
import sys

from evomerge.zoo.build import build_zoo, compare_cards, shipped_zoo
from evomerge.zoo.card import render_card
from evomerge.zoo.config import zoo_config


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("zoo", help="the tiny model zoo (a real, small pool built locally)")
    sub = parser.add_subparsers(dest="zoo_command", required=True)
    build = sub.add_parser("build", help="build the zoo (cached) and print its card")
    build.add_argument("--out", help="explicit output folder (default: a content-addressed cache folder)")
    build.add_argument("--force", action="store_true", help="rebuild even if a complete zoo exists")
    build.add_argument("--seed", type=int, default=0, help="seed of the synthetic world and of training (default 0)")
    build.add_argument("--micro", action="store_true", help="a seconds-long micro zoo for plumbing tests")
    build.add_argument("overrides", nargs="*", metavar="key=value",
                       help="override zoo config fields by dotted name (evomerge/zoo/config.py), "
                            "for example shape.hidden_size=128 experts.geography.merge_aware=true")
    build.add_argument("--jobs", type=int, default=None,
                       help="fine-tunes trained at once, in worker processes (default: 2, or 1 on one core); "
                            "the weights do not depend on it")
    build.add_argument("--json", action="store_true", help="print the card as JSON instead of tables")
    build.add_argument(
        "--strict", action="store_true", help="exit with status 1 when a card target is missed"
    )
    build.set_defaults(func=run_build)


def run_build(args: argparse.Namespace) -> int:
    config = zoo_config(args.overrides, seed=args.seed, micro=args.micro)
    zoo = build_zoo(config, out=args.out, force=args.force, jobs=args.jobs)
    if args.json:
        json.dump(zoo.card, sys.stdout, indent=2)
        print()
    else:
        render_card(zoo.card)
    print(f"zoo: {zoo.root}")
    shipped = None if args.micro else shipped_zoo()
    if shipped is not None and shipped.root.resolve() != zoo.root.resolve():
        rows = compare_cards(zoo.card, shipped.card)
        worst = max(rows, key=lambda r: abs(r["points"]), default=None)
        if worst is not None:
            print(f"against the shipped zoo ({shipped.root}, seed {shipped.card['config']['seed']}): "
                  f"largest difference {worst['points']:+.1f} points ({worst['model']} {worst['measure']}: "
                  f"{worst['built']} here, {worst['shipped']} shipped)")
    missed = [name for name, ok in zoo.card["targets"].items() if not ok]
    if missed and args.strict:
        print(f"missed targets: {', '.join(missed)}", file=sys.stderr)
        return 1
    return 0
