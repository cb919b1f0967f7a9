"""Fused single-pass kernels for the candidate-dependent part of TIES and DARE.

Eager TIES/DARE need a dozen passes over ``(T, n)`` per tensor; written with the
expert axis unrolled, every step is pointwise over ``n`` and ``torch.compile``
(inductor: C++ on CPU, Triton on GPU) fuses them into one loop that reads the cached
task vectors and the base once and writes the output once. The same functions run
eagerly when compilation is off or unavailable, with identical results (DARE compares
stored 16-bit quantiles of an integer-hash field: exact in both modes). A bf16/fp16
cache is widened to float32 inside the kernels (``.float()`` is a no-op on fp32).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)

def _mix32(x: torch.Tensor) -> torch.Tensor:
    """32-bit integer finaliser (xorshift-multiply) on int32 lanes.

    int32 rather than int64: twice the SIMD lanes and a native 32-bit multiply (prepare
    hashes every element of every expert). Products wrap mod 2**32
    (two's complement), and the shifts are arithmetic, so each ``>> s`` is masked to the
    bits a logical shift keeps: the result is bit-identical to the unsigned hash.
    """
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * 0x7FEB352D
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * 0x5BD1E995
    return x ^ ((x >> 16) & 0xFFFF)


def hash_uniform(idx: torch.Tensor, key_lo: torch.Tensor, key_hi: torch.Tensor) -> torch.Tensor:
    """U[0,1) with 24-bit resolution from (key, int32 flat index): a counter-based RNG.

    The same (seed, expert, tensor) key gives the same field on every prepare, so
    ``u < d`` masks nest across densities; the cache keeps its 16-bit quantiles.
    The int64 key halves (values below 2**32) wrap to int32 with the same bits.
    """
    x = _mix32((idx + key_hi.to(torch.int32)) ^ key_lo.to(torch.int32))
    return ((x >> 8) & 0xFFFFFF).to(torch.float32) * (1.0 / 16777216.0)


def _consensus(ws: list[torch.Tensor], coeffs: torch.Tensor, normalize: bool) -> torch.Tensor:
    """TIES's sign election and disjoint (weighted) mean of the masked, weighted deltas
    ``ws``: the sum of the values that agree with the sign of their total, divided with
    ``normalize`` by the sum of those experts' coefficients. Selects the agreeing values
    instead of multiplying by the elected sign and back (fewer vector ops, the same
    values: a sum of same-signed values is the signed sum of their magnitudes)."""
    s = ws[0]
    for w in ws[1:]:
        s = s + w
    pos = s >= 0
    num = torch.zeros_like(s)
    den = torch.zeros_like(s)
    for k, w in enumerate(ws):
        agree = torch.where(pos, w > 0, w < 0)  # nonzero and of the elected sign
        num = num + torch.where(agree, w, 0.0)
        if normalize:
            den = den + torch.where(agree, coeffs[k], 0.0)
    if normalize:
        num = num / torch.where(den == 0, 1.0, den)
    return num


def ties_kernel(
    out: torch.Tensor,
    taus: torch.Tensor,
    base: torch.Tensor,
    thr: torch.Tensor,
    coeffs: torch.Tensor,
    scale: torch.Tensor,
    normalize: bool,
    num: torch.Tensor | None = None,
) -> None:
    """``out = base + scale * TIES(taus)`` where expert k keeps ``|x| > thr_k``.

    ``num`` (default ``coeffs``) multiplies the kept values; the divisor always sums
    ``coeffs``: mergekit's ``rescale`` scales the trimmed delta, not the weight.

    ``>=`` is expressed as ``> nextafter(t, -inf)`` by the caller, which also splits a
    tensor at the tie cut indices, so the kernel needs no index arithmetic.
    """
    ws = []
    for k in range(taus.shape[0]):
        x = taus[k].float()  # a bf16/fp16 cache is widened here: the merge math stays fp32
        ws.append(torch.where(x.abs() > thr[k], x * (coeffs if num is None else num)[k], 0.0))
    out.copy_(base.float() + scale * _consensus(ws, coeffs, normalize))


def ties_cut_kernel(
    out: torch.Tensor,
    taus: torch.Tensor,
    base: torch.Tensor,
    thr: torch.Tensor,
    cut: torch.Tensor,
    coeffs: torch.Tensor,
    scale: torch.Tensor,
    normalize: bool,
    num: torch.Tensor | None = None,
) -> None:
    """:func:`ties_kernel` with the tie cut inside: expert k keeps ``|x| >= thr_k`` before
    flat index ``cut_k`` and ``|x| > thr_k`` after, so a whole tensor is one launch.

    Used on GPUs, where per-piece launches and their host-to-device copies of thresholds
    cost more than the merge itself; the index is generated in the fused loop.
    """
    idx = torch.arange(base.shape[0], device=base.device)
    ws = []
    for k in range(taus.shape[0]):
        x = taus[k].float()
        a = x.abs()
        keep = (a > thr[k]) | ((a == thr[k]) & (idx < cut[k]))
        ws.append(torch.where(keep, x * (coeffs if num is None else num)[k], 0.0))
    out.copy_(base.float() + scale * _consensus(ws, coeffs, normalize))


def ties_masked_kernel(
    out: torch.Tensor,
    taus: torch.Tensor,
    keep: torch.Tensor,
    base: torch.Tensor,
    coeffs: torch.Tensor,
    scale: torch.Tensor,
    normalize: bool,
    num: torch.Tensor | None = None,
) -> None:
    """TIES with explicit 0/1 keep masks ``(T, n)``: for ties cut in mergekit's sort order
    and for breadcrumbs_ties' band of ranks."""
    num = coeffs if num is None else num
    ws = [torch.where(keep[k] > 0, taus[k].float() * num[k], 0.0) for k in range(taus.shape[0])]
    out.copy_(base.float() + scale * _consensus(ws, coeffs, normalize))


def level_words_arg(words: torch.Tensor) -> torch.Tensor:
    """The packed level words (int32, :func:`evomerge.merge.kernels.level_words`) in the
    form the compiled kernels load fastest on this machine; :func:`unpack_level` reads both.

    Inductor's AVX2 code loads integer vectors through a scalar copy, so there the kernels
    get a float32 view (a float load, bit-cast back); its AVX-512 code loads int32 vectors
    directly but bit-casts a float vector element by element, so there they get the words
    themselves (DELLA's TIES kernel 2.5x faster on an AVX-512 Xeon; benchmarks/RESULTS.md).
    """
    if words.device.type == "cpu" and _cpu_capability() == "AVX512":
        return words
    return words.view(torch.float32)


@functools.cache
def _cpu_capability() -> str:
    """torch's vector ISA for this CPU ("AVX512", "AVX2", ...; ``ATEN_CPU_CAPABILITY``
    lowers it, and inductor's generated code follows the same setting)."""
    return torch.backends.cpu.get_cpu_capability()


def unpack_level(words: torch.Tensor, k: int) -> torch.Tensor:
    """Expert ``k``'s 16-bit mask levels (int32) from the packed words of
    :func:`evomerge.merge.kernels.level_words`, given as int32 or as a float32 view
    (:func:`level_words_arg`; the bit cast of a view costs nothing in eager torch)."""
    w = words[k // 2].view(torch.int32)
    return ((w >> 16) & 0xFFFF) if k % 2 else (w & 0xFFFF)


def keep_flag(words: torch.Tensor, k: int, level: torch.Tensor) -> torch.Tensor:
    """1.0 where expert ``k``'s stored level is below ``level``, else 0.0; the kernels
    multiply by it instead of selecting with the comparison (``where(keep, x, 0)``).

    Why: inductor's CPU code turns an int32 comparison into a mask that a float select
    then converts lane by lane; the float flag is a plain convert and multiply. DELLA's
    TIES kernel ran 1.6x faster on an AMD EPYC (Zen 5, AVX-512 and AVX2 code alike;
    benchmarks/RESULTS.md). Same values for finite task vectors (the pool refuses
    non-finite weights), up to the sign of a dropped zero."""
    return (unpack_level(words, k) < level).to(torch.float32)


def dare_kernel(
    out: torch.Tensor,
    taus: torch.Tensor,
    base: torch.Tensor,
    words: torch.Tensor,
    levels: torch.Tensor,
    dens: torch.Tensor,
    factors: torch.Tensor,
    coeffs: torch.Tensor,
    l1_before: torch.Tensor,
    scale: torch.Tensor,
    ties: bool,
    normalize: bool,
    l1: bool,
) -> None:
    """``out = base + scale * DARE(taus)``: keep ``q < g_k`` (the stored 16-bit quantile of
    the keyed field vs the snapped density level, ``words`` the packed levels as
    :func:`level_words_arg` gives them), scale by ``factors_k`` (``c_k`` times the
    rescale; with ``l1`` the L1-matching ratio is computed here), then sum or TIES
    consensus. ``normalize`` for dare_linear is folded into ``factors`` by the caller.
    """
    ws = []
    for k in range(taus.shape[0]):
        x = taus[k].float()
        m = x * keep_flag(words, k, levels[k])
        f = factors[k]
        if l1:
            f = f * _l1_ratio(m, l1_before[k], dens[k])
        ws.append(m * f)
    out.copy_(base.float() + scale * _combine(ws, coeffs, normalize, ties))


def _l1_ratio(m: torch.Tensor, l1_before: torch.Tensor, density: torch.Tensor) -> torch.Tensor:
    """The factor that gives the kept entries ``m`` the task vector's L1 norm again (1 where
    either norm is ~0 or the density keeps all or nothing). float64 accumulation: a compiled
    fp32 reduction over millions of small values drifts by about a percent; eager torch
    sums pairwise and does not."""
    after = m.abs().sum(dtype=torch.float64)
    before = l1_before.to(torch.float64)
    ok = (before >= 1e-7) & (after >= 1e-7) & (density < 1) & (density > 0)
    return torch.where(ok, before / torch.where(ok, after, 1.0), 1.0).to(torch.float32)


def _combine(ws: list[torch.Tensor], coeffs: torch.Tensor, normalize: bool, ties: bool) -> torch.Tensor:
    """The experts' weighted, masked deltas into one: TIES consensus, or their sum."""
    if ties:
        return _consensus(ws, coeffs, normalize)
    delta = ws[0]
    for w in ws[1:]:
        delta = delta + w
    return delta


def della_kernel(
    out: torch.Tensor,
    taus: torch.Tensor,
    base: torch.Tensor,
    words: torch.Tensor,
    levels: torch.Tensor,
    dens: torch.Tensor,
    factors: torch.Tensor,
    coeffs: torch.Tensor,
    l1_before: torch.Tensor,
    scale: torch.Tensor,
    ties: bool,
    normalize: bool,
    rescale: bool,
) -> None:
    """``out = base + scale * DELLA(taus)``: keep ``v < g_k`` (``v`` each entry's 16-bit
    keep level from prepare, ``words`` the packed levels (:func:`level_words_arg`);
    ``g_k`` the density's level, 0 keeps none and 65536 all), scale by ``factors_k`` (times the
    L1-matching ratio with ``rescale``: tensors without a kept-L1 table, a second pass),
    then TIES consensus or a sum.
    """
    ws = []
    for k in range(taus.shape[0]):
        x = taus[k].float()
        m = x * keep_flag(words, k, levels[k])
        f = factors[k]
        if rescale:
            f = f * _l1_ratio(m, l1_before[k], dens[k])
        ws.append(m * f)
    out.copy_(base.float() + scale * _combine(ws, coeffs, normalize, ties))


def breadcrumbs_kernel(
    out: torch.Tensor,
    taus: torch.Tensor,
    base: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    factors: torch.Tensor,
    coeffs: torch.Tensor,
    scale: torch.Tensor,
    ties: bool,
    normalize: bool,
) -> None:
    """``out = base + scale * breadcrumbs(taus)``: expert k keeps ``lo_k < |x| < hi_k`` (the
    band of ranks as a band of magnitudes; the caller fixes the entries of runs of equal
    magnitudes that straddle a cut), scaled by ``factors_k``, then TIES consensus or a
    sum. One pass that reads the cache and the base once, like task arithmetic.
    """
    ws = []
    for k in range(taus.shape[0]):
        x = taus[k].float()
        a = x.abs()
        ws.append(torch.where((a > lo[k]) & (a < hi[k]), x * factors[k], 0.0))
    out.copy_(base.float() + scale * _combine(ws, coeffs, normalize, ties))


def sce_kernel(out: torch.Tensor, kept: torch.Tensor, base: torch.Tensor, coef: torch.Tensor, scale: torch.Tensor) -> None:
    """``out = base + scale * sum_k coef_k kept_k / max(sum_k coef_k [kept_k != 0], 1e-6)``
    (SCE's weighted mean over the agreeing experts): one pass over the kept values."""
    num = torch.zeros_like(base, dtype=torch.float32)
    den = torch.zeros_like(base, dtype=torch.float32)
    for k in range(kept.shape[0]):
        x = kept[k].float()
        num = num + coef[k] * x
        den = den + torch.where(x != 0, coef[k], 0.0)
    out.copy_(base.float() + scale * (num / den.clamp(min=1e-6)))


def affine_kernel(out: torch.Tensor, base: torch.Tensor, taus: torch.Tensor, coeffs: torch.Tensor, beta: torch.Tensor) -> None:
    """``out = beta*base + sum_k coeffs_k taus_k`` in float32 for a low-precision cache.

    The fp32 cache uses one ``addmv`` instead; a bf16/fp16 cache would need widened
    copies for BLAS, while this pointwise form fuses the widening into one pass.
    """
    acc = beta * base.float()
    for k in range(taus.shape[0]):
        acc = acc + coeffs[k] * taus[k].float()
    out.copy_(acc)


_COMPILED: dict[str, Callable[..., Any]] = {}
_FAILED = False


def fused_enabled(requested: bool | None) -> bool:
    """Fusion on unless ``requested`` is False or ``EVOMERGE_FUSED=0``."""
    if requested is not None:
        return requested
    return os.environ.get("EVOMERGE_FUSED", "1") != "0"


def get_kernel(name: str, compiled: bool) -> Callable[..., Any]:
    """The kernel, compiled once per process (dynamic shapes) when ``compiled``.

    If compilation fails (no C++ compiler, unsupported device) we log once and run
    the same code eagerly.
    """
    global _FAILED
    fn = {
        "ties": ties_kernel,
        "ties_cut": ties_cut_kernel,
        "ties_masked": ties_masked_kernel,
        "dare": dare_kernel,
        "della": della_kernel,
        "breadcrumbs": breadcrumbs_kernel,
        "sce": sce_kernel,
        "affine": affine_kernel,
    }[name]
    if not compiled or _FAILED:
        return fn
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn, dynamic=True, fullgraph=True)
    return _COMPILED[name]


def run(name: str, compiled: bool, *args: Any) -> None:
    global _FAILED
    try:
        get_kernel(name, compiled)(*args)
    except Exception as exc:  # inductor raises many types; the eager path is always valid
        if not compiled or _FAILED:
            raise
        _FAILED = True
        log.warning("torch.compile of the %s kernel failed (%s); using eager kernels", name, str(exc).splitlines()[0][:200])
        get_kernel(name, False)(*args)
