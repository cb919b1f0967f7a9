"""Scorer throughput: the batched answer-only CE (``ScoringPlan``) vs a naive loop.

The naive loop is how CE fitness is often written: one example at a time, full logits,
HF's own shifted loss. Both score the same samples; the script prints answer tokens/s,
the ratio (target >= 5x) and the largest per-sample difference.

    # the tiny zoo's safe model on its own data (CPU)
    PYTHONPATH=. .venv/bin/python benchmarks/bench_scorer.py --model zoo --threads 2
    # random-initialised Llama shapes on random tokens (GPU), short and long samples
    PYTHONPATH=. python3 benchmarks/bench_scorer.py --model 1b --device cuda --prompt 20 --answer 20
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="zoo", help="zoo, or a bench_gpu shape: tiny, 1b, 8b")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--n", type=int, default=200, help="samples")
    parser.add_argument("--prompt", type=int, default=150, help="mean prompt tokens (random shapes)")
    parser.add_argument("--answer", type=int, default=150, help="mean answer tokens (random shapes)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-batch-tokens", type=int, default=16384)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    from rich.console import Console
    from rich.table import Table

    from evomerge.search.fitness import ScoringPlan, naive_answer_cross_entropy

    if args.model == "zoo":
        from evomerge.pool import load_model, load_tokenizer
        from evomerge.search.data import load_qa_set, resolve_path
        from evomerge.search.fitness import encode_pairs

        safe = resolve_path("zoo:safe")
        model, tok = load_model(safe).to(device), load_tokenizer(safe)
        pairs = []
        for name in ("safety", "domain-arithmetic", "domain-geography", "benign"):
            pairs += load_qa_set(name, f"zoo:data/{name}.jsonl").sample(args.n // 4, 0).pairs
        samples = encode_pairs(tok, pairs)
        what = "tiny zoo safe model, zoo data"
    else:
        from bench_gpu import SHAPES, make_model, random_samples

        shape = SHAPES[args.model]
        model = make_model(shape, device)
        samples = random_samples(args.n, args.prompt, args.answer, shape.vocab, seed=0)
        what = f"random {args.model} shape ({next(model.parameters()).dtype}), random tokens"

    tokens = sum(s.n_answer_tokens for s in samples)
    total_tokens = sum(len(s.ids) for s in samples)
    plan = ScoringPlan(samples, args.batch_size, args.max_batch_tokens, device)

    def naive() -> torch.Tensor:
        with torch.no_grad():
            out = []
            for s in samples:
                ids = torch.tensor([s.ids], device=device)
                labels = torch.full_like(ids, -100)
                labels[0, s.answer_start : s.answer_end] = ids[0, s.answer_start : s.answer_end]
                out.append(model(input_ids=ids, labels=labels).loss.float())
            return torch.stack(out).double().cpu()

    def timed(fn, reps: int) -> tuple[float, torch.Tensor]:
        result = fn()  # warm-up
        best = float("inf")
        for _ in range(reps):
            _sync(device)
            t = time.perf_counter()
            result = fn()
            _sync(device)
            best = min(best, time.perf_counter() - t)
        return best, result

    t_plan, (ce_plan, _) = timed(lambda: plan.run(model), 3)
    t_naive, ce_naive = timed(naive, 1 if device.type == "cpu" else 2)
    if device.type == "cpu" and args.model == "zoo":
        ce_naive = naive_answer_cross_entropy(model, samples)  # the library's reference, same thing
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} thread(s)"
    table = Table(title=f"{what}; {len(samples)} samples, {total_tokens} tokens ({tokens} answer); {name}")
    for col in ("scorer", "seconds", "answer tokens/s", "speedup"):
        table.add_column(col)
    table.add_row("naive: one at a time, full logits", f"{t_naive:.3f}", f"{tokens / t_naive:,.0f}", "1.0x")
    table.add_row(f"ScoringPlan: batch {args.batch_size}, length-sorted", f"{t_plan:.3f}",
                  f"{tokens / t_plan:,.0f}", f"{t_naive / t_plan:.1f}x")
    Console(width=120).print(table)
    print(f"max |plan - naive| per-sample CE: {(ce_plan - ce_naive).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
