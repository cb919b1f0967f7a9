"""TSVM and R-TSVM: cached candidate build vs recomputing the SVDs, 1024x1024-class matrices.

    PYTHONPATH=. nice -n 19 python benchmarks/bench_tsvm.py [--dim 1024 --mlp 2816 --layers 2 --experts 3]

The uncached path redoes, per candidate, the per-task SVDs and the two polar
decompositions of every matrix (``merge_uncached``); the cached path is one weighted
sum over the transformed task vectors (dense) or one GEMM per matrix (factored).
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from benchmarks.common import random_states, timeit
from evomerge.merge import Genome, StatePool, build, merge_uncached, prepare


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--mlp", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(args.layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (args.dim, args.dim),
            p + "self_attn.o_proj.weight": (args.dim, args.dim),
            p + "mlp.up_proj.weight": (args.mlp, args.dim),
            p + "mlp.down_proj.weight": (args.dim, args.mlp),
            p + "input_layernorm.weight": (args.dim,),
        }
    base, experts = random_states(shapes, args.experts, noise=0.5)
    pool = StatePool(base, experts, num_layers=args.layers)
    n2d = sum(1 for s in shapes.values() if len(s) == 2)
    print(f"{n2d} matrices ({args.dim}x{args.dim} and {args.mlp}x{args.dim}), T={args.experts}, threads={args.threads}")
    rng = random.Random(0)
    genomes = [Genome.from_values([rng.uniform(0.2, 1.2) for _ in range(args.experts)], scale=rng.uniform(0.5, 1.5)) for _ in range(4)]
    for method in ("tsvm", "r_tsvm"):
        for storage in ("dense", "factored"):
            t0 = time.perf_counter()
            cache = prepare(pool, method, {"storage": storage})
            t_prep = time.perf_counter() - t0
            out = {n: torch.empty(s) for n, s in shapes.items()}
            it = iter(genomes * 50)
            t_cached = timeit(lambda: build(cache, next(it), out=out), repeats=5)
            t_uncached = timeit(lambda: merge_uncached(pool, method, {"storage": storage}, genomes[0]), repeats=1, warmup=0)
            ref = merge_uncached(pool, method, {"storage": storage}, genomes[1])
            got = build(cache, genomes[1], out=out)
            err = max(float((got[n] - ref[n]).abs().max()) for n in ref)
            print(
                f"{method:7s} {storage:9s} prepare {t_prep:6.2f}s  cached build {t_cached * 1e3:8.1f} ms  "
                f"uncached {t_uncached:6.2f}s  -> {t_uncached / t_cached:7.0f}x cheaper  (max diff {err:.1e})",
                flush=True,
            )


if __name__ == "__main__":
    main()
