"""Compiled pointwise forms that compute the same values at different speeds on a CPU:
each form's throughput as a fraction of a plain copy of the same bytes (benchmarks/RESULTS.md).

    PYTHONPATH=. python benchmarks/bench_kernel_forms.py [--n 4096000 --repeats 30]

Pairs measured (3 experts, one thread, median of calls each timed right after a copy):
* a band mask ``lo < |x| < hi`` as ``where((a > lo) & (a < hi), ...)`` or as nested selects
  (the breadcrumbs kernel uses the nested form);
* a mask level loaded as int32 or as a float32 view bit-cast back (DARE and DELLA's words),
  and the int32 comparison used as a select or as a 0/1 float flag that multiplies (the
  kernels' form, ``evomerge.merge.fused.keep_flag``).
Which form wins depends on the CPU's vector code (inductor's AVX2 code combines masks and
loads integers through buffers); on AVX-512 both forms of a pair may be equal.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import interleaved


def band_and(out, taus, base, lo, hi, f):
    acc = base
    for k in range(taus.shape[0]):
        a = taus[k].abs()
        acc = acc + torch.where((a > lo[k]) & (a < hi[k]), taus[k] * f[k], 0.0)
    out.copy_(acc)


def band_nested(out, taus, base, lo, hi, f):
    acc = base
    for k in range(taus.shape[0]):
        a = taus[k].abs()
        acc = acc + torch.where(a > lo[k], torch.where(a < hi[k], taus[k] * f[k], 0.0), 0.0)
    out.copy_(acc)


def level_int(out, taus, base, words, g, f):
    acc = base
    for k in range(taus.shape[0]):
        acc = acc + torch.where((words[k] & 0xFFFF) < g[k], taus[k] * f[k], 0.0)
    out.copy_(acc)


def level_view(out, taus, base, words, g, f):
    acc = base
    for k in range(taus.shape[0]):
        acc = acc + torch.where((words[k].view(torch.int32) & 0xFFFF) < g[k], taus[k] * f[k], 0.0)
    out.copy_(acc)


def level_flag(out, taus, base, words, g, f):
    acc = base
    for k in range(taus.shape[0]):
        acc = acc + taus[k] * (((words[k] & 0xFFFF) < g[k]).to(torch.float32) * f[k])
    out.copy_(acc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=4_096_000)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)
    n, t = args.n, 3
    g = torch.Generator().manual_seed(0)
    taus, base, out = torch.randn(t, n, generator=g) * 1e-3, torch.randn(n, generator=g), torch.empty(n)
    lo, hi, f = torch.full((t,), 5e-4), torch.full((t,), 1e-2), torch.tensor([0.5, 0.7, 0.3])
    words = torch.randint(0, 2**31 - 1, (t, n), dtype=torch.int32, generator=g)
    levels = torch.tensor([30000, 20000, 40000], dtype=torch.int32)
    forms = {
        "band: (a > lo) & (a < hi)": (band_and, (out, taus, base, lo, hi, f)),
        "band: nested selects": (band_nested, (out, taus, base, lo, hi, f)),
        "level: int32 load": (level_int, (out, taus, base, words, levels, f)),
        "level: float32 view": (level_view, (out, taus, base, words.view(torch.float32), levels, f)),
        "level: int32, keep flag x": (level_flag, (out, taus, base, words, levels, f)),
    }
    nbytes = 4 * n * (t + 2)  # taus, base and out: the bytes of task arithmetic (the levels not counted)
    ratios = {}
    for name, (fn, a) in forms.items():
        compiled = torch.compile(fn, dynamic=True, fullgraph=True)
        ratios[name] = interleaved(lambda: compiled(*a), nbytes, args.repeats)[1]  # noqa: B023 (called at once)
    print(f"n={n}, T={t}, 1 thread; throughput vs a copy of the same bytes (median of {args.repeats})")
    for name, r in ratios.items():
        print(f"{name:28s} {r:6.0%}")


if __name__ == "__main__":
    main()
