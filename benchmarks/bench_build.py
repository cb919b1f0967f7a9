"""Per-candidate build time, cached vs uncached, for every method; cached throughput as a
fraction of a plain torch copy of the same bytes.

    PYTHONPATH=. nice -n 19 python benchmarks/bench_build.py [--hidden 512 --layers 4 --experts 3 --threads 1]
    PYTHONPATH=. nice -n 19 python benchmarks/bench_build.py --new     # della ... breadcrumbs: the ">= 50% of copy" bar

Bytes of one cached build = 4*P*(T+2) for TA-like methods (read base + T cached deltas,
write the output), the same count used for the copy baseline.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from benchmarks.common import copy_bandwidth, interleaved, llama_shapes, random_states, timeit
from evomerge.merge import Genome, StatePool, build, merge_uncached, prepare

METHODS = {
    "task_arithmetic": {},
    "linear": {},
    "ties": {},
    "dare_linear": {},
    "dare_ties": {},
    "slerp": {},
    "tsvm": {"storage": "dense"},
    "tsvm (factored)": {"storage": "factored"},
    "r_tsvm": {"storage": "dense"},
    "della": {},
    "della_linear": {},
    "model_stock": {},
    "model_stock (filter_wise)": {"filter_wise": True},
    "sce": {"select_topk": 0.5},
    "nuslerp": {},
    "nuslerp (rows)": {"flatten": False},
    "multislerp": {},
    "karcher": {},
    "breadcrumbs": {},
    "breadcrumbs_ties": {},
}
# the bar: a cached build of each of these at >= 50% of plain-copy throughput
NEW = ["task_arithmetic", "della", "della_linear", "model_stock", "model_stock (filter_wise)", "sce", "nuslerp",
       "nuslerp (rows)", "multislerp", "karcher", "breadcrumbs", "breadcrumbs_ties"]
EXPERTS = {"slerp": 1, "nuslerp": 2}  # methods that take a fixed number of experts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1376)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", nargs="*", default=None)
    ap.add_argument("--skip-uncached", nargs="*", default=[], help="methods whose uncached timing is skipped")
    ap.add_argument("--split", action="store_true", help="also print where a cached build's thread CPU time goes: the "
                    "method's per-build planning (begin_build), the fused kernels, the rest (per-tensor host work)")
    ap.add_argument("--new", action="store_true", help="the mergekit methods of issue #15 (with task_arithmetic as a "
                    "reference), cached builds only: prints each one's fraction of plain-copy throughput")
    args = ap.parse_args()
    if args.new:
        args.methods, args.skip_uncached = args.methods or NEW, [m.split(" ")[0] for m in METHODS]
    args.methods = args.methods or list(METHODS)
    torch.set_num_threads(args.threads)
    shapes = llama_shapes(args.hidden, args.intermediate, args.layers, args.vocab)
    params = sum(torch.Size(s).numel() for s in shapes.values())
    copy_bps = copy_bandwidth(4 * params * (args.experts + 2))
    print(f"pool: P={params / 1e6:.1f}M params per model, T={args.experts} experts, threads={args.threads}")
    print(f"plain torch copy: {copy_bps / 1e9:.2f} GB/s (read+write)"
          + (" at the start; 'vs copy': median of builds each timed next to a copy of the same bytes" if args.new else ""))
    print(f"{'method':18s} {'cached s':>9s} {'uncached s':>11s} {'speedup':>8s} {'GB/s':>7s} {'vs copy':>8s}")
    rng = random.Random(0)
    for label in args.methods:
        method = label.split(" ")[0]
        t = EXPERTS.get(method, args.experts)
        base, experts = random_states(shapes, t)
        pool = StatePool(base, experts, num_layers=args.layers)
        cache = prepare(pool, method, METHODS[label])
        out = {n: torch.empty(s) for n, s in shapes.items()}
        genomes = [Genome.from_values([rng.uniform(0.2, 1) for _ in range(t)], [rng.uniform(0.2, 0.9) for _ in range(t)], 1.0) for _ in range(8)]
        it = iter(genomes * 100)
        moved = 4 * params * (t + 2)
        if args.new:  # a loaded machine: each build is timed next to a copy of the same bytes
            cached, ratio = interleaved(lambda: build(cache, next(it), out=out), moved, args.repeats)
        else:
            cached = timeit(lambda: build(cache, next(it), out=out), repeats=args.repeats)
            ratio = moved / cached / copy_bps
        if args.split:
            print(f"  {label}: " + split_times(cache, lambda: build(cache, next(it), out=out), moved), flush=True)
        if method in args.skip_uncached:
            uncached = float("nan")
        else:
            uncached = timeit(lambda: merge_uncached(pool, method, METHODS[label], genomes[0]), repeats=1, warmup=0)
        print(
            f"{label:18s} {cached:9.3f} {uncached:11.3f} {uncached / cached:7.1f}x {moved / cached / 1e9:7.2f} {ratio:7.0%}",
            flush=True,
        )
        del cache, pool, base, experts, out


def split_times(cache, fn, nbytes: int, builds: int = 8) -> str:
    """Thread CPU ms per build in ``begin_build``, in the fused kernels and elsewhere, and
    for a copy of the same bytes (thread time: a loaded machine's other jobs drop out)."""
    from evomerge.merge import fused

    spent = {"begin": 0.0, "kernels": 0.0}
    impl, run = cache.impl, fused.run

    def timed(key, f):
        def g(*a, **k):
            t0 = time.thread_time()
            try:
                return f(*a, **k)
            finally:
                spent[key] += time.thread_time() - t0
        return g

    impl.begin_build, fused.run = timed("begin", impl.begin_build), timed("kernels", run)
    try:
        fn()
        spent.update(begin=0.0, kernels=0.0)
        t0 = time.thread_time()
        for _ in range(builds):
            fn()
        total = (time.thread_time() - t0) / builds
    finally:
        del impl.begin_build
        fused.run = run
    src, dst = torch.randn(nbytes // 8), torch.empty(nbytes // 8)
    dst.copy_(src)
    t0 = time.thread_time()
    dst.copy_(src)
    copy = time.thread_time() - t0
    b, k = spent["begin"] / builds, spent["kernels"] / builds
    return (f"build {1e3 * total:.1f} ms = begin_build {1e3 * b:.1f} + kernels {1e3 * k:.1f} + other {1e3 * (total - b - k):.1f}"
            f" (thread CPU time); copy of the same bytes {1e3 * copy:.1f} ms")


if __name__ == "__main__":
    main()
