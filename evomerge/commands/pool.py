"""``evomerge pool check BASE EXPERT...``: is this pool mergeable?"""

from __future__ import annotations

import argparse

from evomerge.pool import LoadOptions, Pool


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("pool", help="inspect a model pool")
    sub = parser.add_subparsers(dest="pool_command", required=True)
    check = sub.add_parser("check", help="check that a base and its experts can be merged")
    check.add_argument("base", help="base model: local folder or hub id[@revision]")
    check.add_argument("experts", nargs="+", help="expert models: local folders or hub ids")
    check.add_argument("--allow-pickle", action="store_true", help="accept pickle (.bin) checkpoints")
    check.add_argument("--trust-remote-code", action="store_true", help="allow custom model code")
    check.set_defaults(func=run_check)


def run_check(args: argparse.Namespace) -> int:
    options = LoadOptions(allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code)
    pool = Pool.from_refs(args.base, args.experts, options)
    pool.check_compatibility()
    pool.check_weights()  # every tensor read once: truncated files and NaN/Inf are named
    n_tensors = len(pool.base.tensor_names)
    print(f"ok: base + {len(pool.experts)} experts agree on {n_tensors} tensors (all finite), vocabulary and chat template")
    return 0
