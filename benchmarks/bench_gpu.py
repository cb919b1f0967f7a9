"""GPU benchmark at real Llama shapes: build time, scoring throughput, projected search time.

Random-initialised models of Llama-3.2-1B / Llama-3.1-8B shapes (no download): a base
and T experts (base + a small random perturbation) are made on the device in bf16,
``prepare`` keeps a bf16 cache there, and every candidate is built in place into one
live bf16 ``LlamaForCausalLM`` and scored with the project's answer-only cross-entropy
(``evomerge.search.fitness.answer_cross_entropy``) on random token sequences.

Why random weights are enough: build time depends only on shapes and the method, and a
forward pass costs the same whatever the weights are.

    PYTHONPATH=. python benchmarks/bench_gpu.py --shape 1b          # on a GPU
    PYTHONPATH=. nice -n 19 .venv/bin/python benchmarks/bench_gpu.py --shape tiny   # CPU smoke test
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import math
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from evomerge.merge import Genome, StatePool, build, estimate_cache_bytes, parse_options, prepare
from evomerge.merge.cache import fmt_bytes
from evomerge.search.fitness import EncodedSample, answer_cross_entropy

SEED_PAPER_MIN = 45.0  # Hammoud et al.: 100 fitness evaluations of 2 x 8B TIES in 45 min on 4 A100s
SEED_PAPER_FEVALS = 100
GIB = 1024**3


@dataclass(frozen=True)
class Shape:
    """The LlamaConfig fields that decide tensor shapes and forward cost."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool


SHAPES = {
    "tiny": Shape(64, 4, 128, 4, 2, 512, False),
    "1b": Shape(2048, 16, 8192, 32, 8, 128256, True),  # Llama-3.2-1B
    "8b": Shape(4096, 32, 14336, 32, 8, 128256, False),  # Llama-3.1-8B
}


def make_model(shape: Shape, device: torch.device):
    """A live bf16 LlamaForCausalLM with SDPA attention, allocated on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        intermediate_size=shape.intermediate,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=shape.tied,
        attn_implementation="sdpa",
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # allocate in bf16 directly: no fp32 copy of an 8B model
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def seeded_base(model, seed: int) -> dict[str, torch.Tensor]:
    """Refill the model's weights from ``seed`` and return them as the pool's base state.

    Builds overwrite the live model, so each method's pool starts from this refill; tied
    weights appear once (``named_parameters`` drops duplicates), as in a checkpoint.
    """
    state = {}
    for i, (name, p) in enumerate(model.named_parameters()):
        g = torch.Generator(p.device).manual_seed(seed * 100003 + i)
        with torch.no_grad():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
        state[name] = p.data
    return state


def make_experts(base: dict[str, torch.Tensor], n: int, seed: int, noise: float) -> dict[str, dict[str, torch.Tensor]]:
    """Experts = base + N(0, (noise * 0.02)^2) in bf16, made on the base's device."""
    experts = {}
    for k in range(n):
        e = {}
        for i, (name, b) in enumerate(base.items()):
            g = torch.Generator(b.device).manual_seed(seed * 7919 + k * 100003 + i)
            e[name] = (b + torch.randn(b.shape, generator=g, device=b.device, dtype=b.dtype) * (noise * 0.02)).to(b.dtype)
        experts[f"expert{k}"] = e
    return experts


class ConsumingPool(StatePool):
    """A StatePool that frees each expert tensor once ``prepare`` has read it.

    At 8B the experts (48 GB in bf16) and the cache they turn into would not fit side by
    side; freed as they are read, the peak is about the cache plus the live model.
    """

    def iter_task_vectors(self, names=None):
        for name, base, taus in super().iter_task_vectors(names):
            for e in self.expert_states.values():
                e.pop(name, None)
            yield name, base, taus


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_op(fn: Callable[[], object], device: torch.device, reps: int, warmup: int) -> tuple[float, float]:
    """(median seconds, first call seconds): CUDA events on a GPU, perf_counter on a CPU."""
    t0 = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times), first


def random_genome(rng: random.Random, n_experts: int, groups: int) -> Genome:
    """Per-layer-group weights and densities in the ranges a search visits."""
    w = tuple(tuple(rng.uniform(0.2, 1.0) for _ in range(n_experts)) for _ in range(groups))
    d = tuple(tuple(rng.uniform(0.2, 0.9) for _ in range(n_experts)) for _ in range(groups))
    return Genome(w, d, 1.0)


def random_samples(n: int, prompt: int, answer: int, vocab: int, seed: int) -> list[EncodedSample]:
    """Token-id samples with lengths spread +-30% around ``prompt`` and ``answer``."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = max(1, round(prompt * rng.uniform(0.7, 1.3)))
        a = max(1, round(answer * rng.uniform(0.7, 1.3)))
        ids = [rng.randrange(vocab) for _ in range(p + a)]
        out.append(EncodedSample.from_ids(ids, p))
    return out


def popsize(n: int) -> int:
    """CMA-ES default population ``4 + floor(3 ln n)``."""
    return 4 + math.floor(3 * math.log(n))


def mem_peak(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--methods", nargs="+", default=["task_arithmetic", "ties", "dare_ties"])
    ap.add_argument("--cache-dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2, help="build calls before timing (the first includes torch.compile)")
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--prompt-len", type=int, default=150)
    ap.add_argument("--answer-len", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-batch-tokens", type=int, default=16384)
    ap.add_argument("--score-reps", type=int, default=3)
    ap.add_argument("--noise", type=float, default=0.1, help="expert perturbation, relative to the 0.02 weight std")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    ap.add_argument("--no-write", action="store_true", help="print only (the default off a GPU): do not append to RESULTS.md")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (CPU smoke runs share the machine)")
    args = ap.parse_args(argv)
    if args.shape == "tiny" and args.samples == 200:
        args.samples, args.prompt_len, args.answer_len = 16, 20, 20

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shape = SHAPES[args.shape]
    cache_dtype = getattr(torch, args.cache_dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    import transformers

    print(f"device {name}, torch {torch.__version__}, transformers {transformers.__version__}, shape {args.shape}", flush=True)

    model = make_model(shape, device)
    params = sum(p.numel() for p in model.parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rows: list[dict[str, object]] = []
    rng = random.Random(0)
    groups = shape.layers  # per-layer genes, as the seed paper's layer_granularity 1

    for seed, method in enumerate(args.methods, start=1):
        row: dict[str, object] = {"method": method}
        phase = "expert creation"
        try:
            base = seeded_base(model, seed)
            pool = ConsumingPool(base, make_experts(base, args.experts, seed, args.noise), num_layers=shape.layers)
            pool_bytes = sum(t.numel() * t.element_size() for e in pool.expert_states.values() for t in e.values())
            free(device)
            reset_peak(device)
            before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            t0 = time.perf_counter()
            # the experts are freed while the cache fills, so the limit counts them as available
            limit = None if device.type != "cuda" else int(torch.cuda.mem_get_info(device)[0]) + pool_bytes
            phase = "prepare (cache estimate " + fmt_bytes(
                estimate_cache_bytes(pool.tensor_specs(), args.experts, method, parse_options(method, None), cache_dtype).total
            ) + f" + live model {fmt_bytes(model_bytes)})"
            cache = prepare(pool, method, device=device, cache_dtype=cache_dtype, memory_limit=limit)
            phase = "build"
            sync(device)
            row["prepare s"] = time.perf_counter() - t0
            del pool, base
            free(device)
            row["cache est"] = fmt_bytes(cache.estimate.total)
            row["cache held"] = fmt_bytes(cache.nbytes)
            after = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            row["cache+ws measured"] = fmt_bytes(after - before + pool_bytes) if device.type == "cuda" else "-"
            row["prepare peak"] = fmt_bytes(mem_peak(device)) if device.type == "cuda" else "-"
            genomes = [random_genome(rng, args.experts, groups) for _ in range(args.reps + args.warmup)]
            it = iter(genomes)
            reset_peak(device)
            build_s, first_s = time_op(lambda: build(cache, next(it), out=model), device, args.reps, args.warmup)
            row["build s"] = build_s
            row["first build s"] = first_s
            row["build GB/s"] = (cache.nbytes + model_bytes) / build_s / 1e9  # read the cache, write the model
            after_ws = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            row["cache+ws measured"] = fmt_bytes(after_ws - before + pool_bytes) if device.type == "cuda" else "-"
            row["build peak"] = fmt_bytes(mem_peak(device)) if device.type == "cuda" else "-"
            del cache
        except torch.OutOfMemoryError as exc:
            row["note"] = f"out of memory in {phase}: " + str(exc).splitlines()[0][:90]
            print(f"{method}: {row['note']}", flush=True)
        free(device)
        rows.append(row)
        print(row, flush=True)

    # scoring: the last candidate stays in the model; throughput does not depend on weights
    samples = random_samples(args.samples, args.prompt_len, args.answer_len, shape.vocab, seed=0)
    tokens = sum(len(s.ids) for s in samples)
    answer_tokens = sum(s.n_answer_tokens for s in samples)
    reset_peak(device)

    def score() -> None:
        answer_cross_entropy(model, samples, batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens, device=device)

    score_s, score_first = time_op(score, device, args.score_reps, 1)
    score_peak = mem_peak(device)
    score = {
        "samples": args.samples,
        "tokens": tokens,
        "answer tokens": answer_tokens,
        "score s": score_s,
        "first score s": score_first,
        "tokens/s": tokens / score_s,
        "score peak": fmt_bytes(score_peak) if device.type == "cuda" else "-",
    }

    # projection: candidates per search x (build + score)
    proj = []
    ties = next((r for r in rows if r["method"] == "ties" and "build s" in r), None)
    ref = ties or next((r for r in rows if "build s" in r), None)
    if ref is not None:
        per_cand = float(ref["build s"]) + score_s  # type: ignore[arg-type]
        for label, n_genes in [(f"per layer ({groups} groups x 2 models x (w, d))", groups * 2 * 2), ("whole model (2 models x (w, d))", 4)]:
            lam = popsize(n_genes)
            total = 100 * lam * per_cand
            proj.append(
                {
                    "search": f"100 generations, {label}, {ref['method']}",
                    "genes": n_genes,
                    "popsize": lam,
                    "candidates": 100 * lam,
                    "s/candidate": per_cand,
                    "wall time": str(dt.timedelta(seconds=round(total))),
                    "vs 45 min (4 A100)": f"{total / 60 / SEED_PAPER_MIN:.2f}x",
                }
            )
        fevals = SEED_PAPER_FEVALS * per_cand
        proj.append(
            {
                "search": f"seed-paper budget: {SEED_PAPER_FEVALS} evaluations, 1 GPU",
                "genes": groups * 4,
                "popsize": popsize(groups * 4),
                "candidates": SEED_PAPER_FEVALS,
                "s/candidate": per_cand,
                "wall time": str(dt.timedelta(seconds=round(fevals))),
                "vs 45 min (4 A100)": f"{SEED_PAPER_MIN * 60 / fevals:.0f}x faster ({SEED_PAPER_MIN * 60 * 4 / fevals:.0f}x per GPU)",
            }
        )

    report(args, name, shape, params, model_bytes, rows, score, proj)
    return 0


def report(args, device_name: str, shape: Shape, params: int, model_bytes: int, rows, score, proj) -> None:
    """Rich tables on stdout; the same figures as markdown appended to RESULTS.md."""
    import pandas as pd
    import transformers
    from rich.console import Console
    from rich.table import Table

    frames = {
        "builds": pd.DataFrame(rows).astype(object).fillna(""),  # a failed method has only a note
        "scoring": pd.DataFrame([score]),
        "projection": pd.DataFrame(proj),
    }
    console = Console(width=200)
    for title, frame in frames.items():
        table = Table(title=title)
        for col in frame.columns:
            table.add_column(str(col))
        for _, r in frame.iterrows():
            table.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.tolist()])
        console.print(table)
    if args.no_write or device_name == "CPU":
        return
    head = (
        f"\n## {args.shape}: {device_name}, {dt.date.today().isoformat()}\n\n"
        f"torch {torch.__version__}, transformers {transformers.__version__}; P = {params:,} parameters "
        f"({fmt_bytes(model_bytes)} in bf16), T = {args.experts} experts, cache {args.cache_dtype}, "
        f"genome {shape.layers} layer groups; builds: median of {args.reps} after {args.warmup} warm-up "
        f"(the first includes torch.compile); scoring: {score['samples']} samples, prompt ~{args.prompt_len} + "
        f"answer ~{args.answer_len} tokens, batch {args.batch_size} / {args.max_batch_tokens} tokens, median of {args.score_reps}.\n"
        f"Command: `python benchmarks/bench_gpu.py {' '.join(sys.argv[1:])}`\n"
    )
    body = "\n\n".join(f"{title}:\n\n{frame.to_markdown(index=False, floatfmt='.4g')}" for title, frame in frames.items())
    if not args.results.exists():
        args.results.write_text("# GPU benchmark results\n\nWritten by `benchmarks/bench_gpu.py`; see benchmarks/README.md.\n")
    with args.results.open("a") as fh:
        fh.write(head + "\n" + body + "\n")
    print(f"appended to {args.results}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
