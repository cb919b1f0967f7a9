"""Search speed on the tiny zoo: scorer throughput and where a search's time goes.

1. Scorer: the batched answer-only CE (length-sorted batches, logits only at answer
   positions) against a naive loop (one example at a time, full logits, HF's own loss),
   on the same samples; prints answer tokens/s for both and the ratio (target >= 5x).
2. Search overhead: a short demo search; prints the share of wall time spent outside
   building and scoring candidates (optimiser, bookkeeping, checkpoints; target < 5%).

    PYTHONPATH=. nice -n 19 .venv/bin/python benchmarks/bench_search.py [--threads 1] [--n 200]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--n", type=int, default=200, help="samples per data set for the scorer comparison")
    parser.add_argument("--steps", type=int, default=5, help="generations of the overhead run")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from rich.console import Console
    from rich.table import Table

    from evomerge.pool import load_model, load_tokenizer
    from evomerge.search import load_search_recipe, run_search
    from evomerge.search.data import load_qa_set, resolve_path
    from evomerge.search.finish import timing_summary
    from evomerge.search.fitness import ScoringPlan, answer_cross_entropy, encode_pairs, naive_answer_cross_entropy

    console = Console()
    safe = resolve_path("zoo:safe")
    model, tok = load_model(safe), load_tokenizer(safe)
    pairs = []
    for name in ("safety", "domain-arithmetic", "domain-geography", "benign"):
        pairs += load_qa_set(name, f"zoo:data/{name}.jsonl").sample(args.n // 4, 0).pairs
    samples = encode_pairs(tok, pairs)
    tokens = sum(s.n_answer_tokens for s in samples)
    answer_cross_entropy(model, samples[:8])  # warm-up

    def timed(fn, reps: int = 3) -> float:
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        return best

    plan = ScoringPlan(samples, batch_size=args.batch_size)
    batched = timed(lambda: plan.run(model))
    unplanned = timed(lambda: answer_cross_entropy(model, samples, batch_size=args.batch_size))
    naive = timed(lambda: naive_answer_cross_entropy(model, samples), reps=1)
    diff = (answer_cross_entropy(model, samples)[0] - naive_answer_cross_entropy(model, samples)).abs().max().item()
    table = Table(title=f"scorer on the tiny zoo's safe model: {len(samples)} samples, {tokens} answer tokens, "
                        f"{args.threads} thread(s)")
    for col in ("scorer", "seconds", "answer tokens/s", "speedup"):
        table.add_column(col)
    table.add_row("naive (one at a time, full logits)", f"{naive:.3f}", f"{tokens / naive:,.0f}", "1.0x")
    table.add_row("batched, collated per call", f"{unplanned:.3f}", f"{tokens / unplanned:,.0f}",
                  f"{naive / unplanned:.1f}x")
    table.add_row("batched, ScoringPlan (what a search uses)", f"{batched:.3f}", f"{tokens / batched:,.0f}",
                  f"{naive / batched:.1f}x")
    console.print(table)
    console.print(f"max |batched - naive| per-sample CE: {diff:.2e}")

    with tempfile.TemporaryDirectory() as tmp:
        recipe = load_search_recipe("recipes/demo.yaml", [f"search.steps={args.steps}", "write_model=false"])
        result = run_search(recipe, f"{tmp}/run", progress=False, write_outputs=False)
        t = timing_summary(result)
    console.print(
        f"search overhead ({t['candidates']} candidates, {args.steps} generations): wall {t['search_wall_s']:.2f} s, "
        f"build {t['build_s']:.2f} s, scoring {t['score_s']:.2f} s, outside build+score "
        f"{t['outside_build_and_score_s']:.3f} s = {100 * t['outside_share']:.2f}% (target < 5%); "
        f"{t['s_per_candidate'] * 1000:.0f} ms per candidate; prepare {t['prepare_s']:.2f} s"
    )


if __name__ == "__main__":
    main()
