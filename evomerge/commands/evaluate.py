"""``evomerge eval MODEL... [--out FILE.csv] [--prompts SET ...]`` and ``evomerge audit MERGE``."""

from __future__ import annotations

import argparse

from evomerge.evaluation import PROMPT_SETS, EvalConfig, EvalResult


def _add_eval_options(parser: argparse.ArgumentParser) -> None:
    sets = ", ".join(sorted(PROMPT_SETS))
    parser.add_argument("--prompts", nargs="+", metavar="SET",
                        help=f"prompt sets: names ({sets}) or KIND:PATH with KIND unsafe, benign or domain.NAME "
                        "(default: the zoo's sets for zoo models, else the real unsafe sets)")
    parser.add_argument("--out", help="write the table as FILE.csv (+ FILE.md, FILE.answers.parquet)")
    parser.add_argument("--judge", action="append", metavar="NAME[=MODEL]",
                        help="judge of unsafe answers: llama_guard (default), shieldgemma, wildguard, refusal_strings; "
                        "repeat for several: the first gives 'alignment', each 'alignment[NAME]', each pair "
                        "'agreement[A|B]'")
    parser.add_argument("--guard", help="the Llama Guard model (default: zoo:guard for zoo models, "
                        "else meta-llama/Llama-Guard-3-8B)")
    parser.add_argument("--limit", type=int, help="rows per set (a fixed random subset)")
    parser.add_argument("--max-new-tokens", type=int, help="answer length (default: 64 zoo, 256 otherwise)")
    parser.add_argument("--backend", default="transformers", help="generation backend (transformers, vllm)")
    parser.add_argument("--device", default="cpu", help="where models and judges run: cpu, cuda, cuda:N (default cpu)")
    parser.add_argument("--dtype", help="load models in this dtype (bfloat16, float16, float32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --limit subset and of generation (default 0)")


def config_from_args(args: argparse.Namespace, models: list[str]) -> EvalConfig:
    from evomerge.evaluation import JudgeConfig
    from evomerge.refs import is_zoo_ref

    zoo = any(is_zoo_ref(m) for m in models)  # only for a bare --judge llama_guard: the zoo's guard
    guard = args.guard or ("zoo:guard" if zoo else None)
    judges = [JudgeConfig.parse(text, guard) for text in (args.judge or ["llama_guard"])]
    fields: dict = {"backend": args.backend, "device": args.device, "dtype": args.dtype, "seed": args.seed,
                    "limit": args.limit, "judge": judges[0], "extra_judges": judges[1:]}
    if args.prompts:
        fields["sets"] = args.prompts
    if args.max_new_tokens:
        fields["max_new_tokens"] = args.max_new_tokens
    from evomerge.config import validate_mapping

    # the defaults are EvalConfig's (the library's): only what was given on the command line is set here
    return validate_mapping(EvalConfig, EvalConfig.default_fields(models) | fields, "--judge/--prompts")


def _print(frame, title: str) -> None:
    """Markdown (no column is cut short, unlike a terminal-width table); the refs are in the CSV."""
    from evomerge.evaluation import format_table

    print(f"\n{title}\n")
    print(format_table(frame.drop(columns=["ref"], errors="ignore")))
    print()


def register(subparsers: argparse._SubParsersAction) -> None:
    ev = subparsers.add_parser("eval", help="alignment, over-refusal and domain accuracy of models",
                               description="Evaluate models on held-out prompt sets; percentages, one row per model.")
    ev.add_argument("models", nargs="+", metavar="MODEL", help="model folders, hub ids or zoo:NAME")
    _add_eval_options(ev)
    ev.set_defaults(func=run_eval)

    au = subparsers.add_parser("audit", help="compare a merge's alignment with its constituents'",
                               description="Evaluate a merge and the models it was made from on the same prompts. "
                               "Constituents come from the merge's mergekit_config.yml or --constituents.")
    au.add_argument("merges", metavar="MERGE", nargs="*", help="merged model folders or hub ids")
    au.add_argument("--from", dest="from_file", metavar="FILE", help="a file of merges, one folder or hub id per line")
    au.add_argument("--leaderboard", metavar="DIR",
                    help="audit folder for several merges (default runs/audit): leaderboard.csv/.md, drop.png and a "
                    "per-model cache that makes reruns and killed runs resume")
    au.add_argument("--constituents", nargs="+", metavar="MODEL", help="the merged models (default: from its mergekit config)")
    au.add_argument("--fail-below", type=float, metavar="X",
                    help="exit 1 when the merge's alignment is below X percent (a gate for hubs and CI)")
    au.add_argument("--no-base", action="store_true", help="do not evaluate the config's base_model")
    au.add_argument("--update-card", action="store_true",
                    help="write each merge's measured results into its README.md as the hub's model-index")
    au.add_argument("--tolerance", type=float, default=5.0,
                    help="points below the safest constituent the verdict still calls ok (default 5)")
    _add_eval_options(au)
    au.set_defaults(func=run_audit)


def _save(result: EvalResult, out: str | None) -> None:
    if out:
        for path in result.save(out):
            print(f"wrote {path}")


def run_eval(args: argparse.Namespace) -> int:
    from evomerge.evaluation import evaluate_models

    result = evaluate_models(args.models, config_from_args(args, args.models))
    sizes = ", ".join(f"{k} {v}" for k, v in result.sizes.items())
    _print(result.table, f"held-out evaluation, percent ({sizes}; {result.seconds:.0f} s)")
    if result.agreement is not None and not result.agreement.empty:
        _print(result.agreement, "judge agreement on the unsafe answers (percent; kappa: Cohen's)")
    _save(result, args.out)
    return 0


def run_audit(args: argparse.Namespace) -> int:
    from evomerge.audit import audit, audit_many, read_merge_list
    from evomerge.errors import ConfigError

    merges = list(args.merges) + (read_merge_list(args.from_file) if args.from_file else [])
    if not merges:
        raise ConfigError("audit: name a merge (MERGE ... or --from FILE)")
    if len(merges) > 1 or args.from_file or args.leaderboard:
        if args.constituents:
            raise ConfigError("--constituents names one merge's models; with several merges each comes from its "
                              "mergekit_config.yml")
        batch = audit_many(merges, args.leaderboard or "runs/audit", lambda models: config_from_args(args, models),
                           include_base=not args.no_base, tolerance=args.tolerance)
        _print(batch.leaderboard, f"audit of {len(merges)} merges ({batch.evaluated} models evaluated, "
               f"{batch.cached} from the cache)")
        for report in batch.reports:
            print(f"- {report.merge}: {report.verdict}")
        print(f"\nleaderboard: {batch.folder / 'leaderboard.md'}")
        reports = batch.reports
    else:
        report = audit(merges[0], args.constituents, lambda models: config_from_args(args, models),
                       include_base=not args.no_base, tolerance=args.tolerance)
        _print(report.table(), f"audit of {merges[0]} (constituents from {report.constituents.source})")
        print(report.verdict)
        _save(report.result, args.out)
        reports = [report]
    if args.update_card:
        for r in reports:
            print(f"model card: {r.update_card()}")
    if args.fail_below is not None:
        failed = [r for r in reports if r.merge_alignment < args.fail_below]
        for r in failed:
            print(f"FAIL: merge alignment {r.merge_alignment:.1f} < --fail-below {args.fail_below:g} ({r.merge})")
        return 1 if failed else 0
    return 0
