"""Tensor-level building blocks shared by the merge methods.

Kept free of pools, caches and genomes so each block can be tested on hand tensors
(section 7 of the research notes) and reused by both the cached and the uncached path.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- top-k tables
def mergekit_keep_count(density: float, n: int) -> int:
    """mergekit 0.1.5 ``magnitude``: keep ``max(1, int(d*n))``; d <= 0 keeps none, d >= 1 all.

    ``int(d*n)`` is a float product then a truncation, so ``int(0.29*100) == 28``; we
    replicate it for parity.
    """
    if density >= 1:
        return n
    if density <= 0 or n == 0:
        return 0
    return max(1, int(density * n))


@dataclass
class TopKQuery:
    """Exact top-K by magnitude: keep ``|x| >= t`` before flat index ``cut``, ``|x| > t`` after.

    With a stable descending sort, ties at ``t`` are kept in index order up to the K-th
    element, whose index is ``cut - 1``; one comparison pass split at ``cut`` reproduces
    ``argsort(..., stable=True)[:K]``. With mergekit's (unstable) sort order the kept
    ties are not a prefix: then ``ties`` lists their flat indices and ``cut`` is 0.
    """

    keep: int
    threshold: float
    cut: int
    ties: torch.Tensor | None = None


class MagnitudeTable:
    """Answers "which K largest |x|" for any density without sorting again (mergekit TIES).

    Built once from one argsort of ``|x|``. With ``grid=G`` densities snap to the nearest
    ``g/G`` (``K = g*n // G``), the sort is stable (ties to the lowest index) and only
    ``G+1`` (threshold, cut) pairs are kept, a few KB per tensor. With ``grid=None`` the
    int32 sort order is kept (4 bytes per element), any density is exact with
    mergekit's ``K = max(1, int(d*n))``, and the order is the one mergekit 0.1.5 gets
    from ``torch.argsort(|x|.float(), descending=True)`` on CPU, so even ties at the
    cut are resolved as mergekit resolves them.
    """

    def __init__(self, values: torch.Tensor, grid: int | None, l1: bool = False) -> None:
        flat = values.reshape(-1)
        self.n = n = flat.numel()
        self.grid = grid
        self.values = flat  # a view of the cached task vector: no extra memory
        self.l1_total = float(flat.abs().sum(dtype=torch.float64))
        self.l1_rows: list[float] | None = None
        if grid is None:
            mags = flat.abs().float().cpu()  # mergekit's order is the CPU (unstable) argsort's
            self.order: torch.Tensor | None = torch.argsort(mags, descending=True).to(torch.int32)
            return
        self.order = None
        # A stable sort has one answer on every device, so it runs where the values are
        # (a CPU sort of an 8B model's task vectors takes minutes, a GPU one seconds).
        mags = flat.abs().float()
        order = torch.argsort(mags, descending=True, stable=True)
        ks = [max(1, (g * n) // grid) if g > 0 and n else (g * n) // grid for g in range(grid + 1)]
        inner = [k for k in ks if 0 < k < n]
        idx = order[torch.tensor(inner, dtype=torch.int64, device=order.device) - 1] if inner else order[:0]
        found = dict(zip(inner, zip(mags[idx].tolist(), idx.tolist())))  # one device sync per table
        self.rows = [self._stable_row(k, found.get(k)) for k in ks]
        if l1:  # L1 norm of the kept top-K at each grid level, for mergekit's ``rescale``
            csum = torch.cumsum(mags[order].double(), 0)
            at = torch.tensor([max(k, 1) - 1 for k in ks], dtype=torch.int64, device=csum.device)
            vals = csum[at].tolist() if n else [0.0] * len(ks)
            self.l1_rows = [v if k > 0 else 0.0 for k, v in zip(ks, vals)]

    def _stable_row(self, k: int, at: tuple[float, int] | None) -> TopKQuery:
        """Row for K = k; ``at`` = (magnitude, flat index) of the k-th largest entry."""
        if k >= self.n:
            return TopKQuery(self.n, -math.inf, self.n)
        if k <= 0 or at is None:
            return TopKQuery(0, math.inf, 0)
        return TopKQuery(k, at[0], at[1] + 1)

    def _order_row(self, k: int) -> TopKQuery:
        """Query against the stored (mergekit) order: threshold, then which ties are in."""
        assert self.order is not None
        if k >= self.n:
            return TopKQuery(self.n, -math.inf, self.n)
        if k <= 0:
            return TopKQuery(0, math.inf, 0)
        mag = lambda pos: float(self.values[int(self.order[pos])].abs())  # noqa: E731
        t = mag(k - 1)
        lo, hi = 0, k - 1  # first position holding t (positions before it are > t)
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if mag(mid) > t else (lo, mid)
        first = lo
        lo, hi = k - 1, self.n - 1  # last position holding t
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if mag(mid) == t else (lo, mid - 1)
        if lo == k - 1:  # every tie is in: a plain >= comparison
            return TopKQuery(k, t, self.n)
        return TopKQuery(k, t, 0, self.order[first:k].to(torch.int64).to(self.values.device))

    @property
    def nbytes(self) -> int:
        return self.order.numel() * 4 if self.order is not None else 24 * ((self.grid or 0) + 1)

    def snap(self, density: float) -> int:
        """Grid level of ``density`` (nearest, clamped to ``[0, G]``)."""
        assert self.grid is not None
        return min(self.grid, max(0, round(density * self.grid)))

    def kept_l1(self, density: float) -> float:
        """``||top-K(x)||_1`` at ``density`` (the K that :meth:`query` keeps)."""
        if self.n == 0 or density >= 1:
            return self.l1_total
        if self.order is not None:
            k = mergekit_keep_count(density, self.n)
            return float(self.values[self.order[:k].to(torch.int64).to(self.values.device)].abs().sum(dtype=torch.float64))
        if self.l1_rows is None:
            raise ValueError("MagnitudeTable built without l1=True")
        return self.l1_rows[self.snap(density)]

    def rescale(self, density: float) -> float:
        """mergekit's ``rescale`` factor ``||x||_1 / ||top-K(x)||_1`` (1 when either is < 1e-7)."""
        if density >= 1:
            return 1.0
        kept = self.kept_l1(density)
        return 1.0 if kept < 1e-7 or self.l1_total < 1e-7 else self.l1_total / kept

    def query(self, density: float) -> TopKQuery:
        if self.n == 0 or density >= 1:
            return TopKQuery(self.n, -math.inf, self.n)
        if self.order is not None:
            return self._order_row(mergekit_keep_count(density, self.n))
        return self.rows[self.snap(density)]


class ThresholdTable:
    """Original-TIES trim over a whole model: keep ``|x| >= kthvalue(n - int(n*d))``.

    That keeps ``int(n*d) + 1`` entries plus every tie (one more than mergekit's K).
    Exact mode keeps the ascending sorted magnitudes (4 B per element); grid mode keeps
    ``G+1`` thresholds.
    """

    def __init__(self, magnitudes: torch.Tensor, grid: int | None) -> None:
        asc = torch.sort(magnitudes.reshape(-1).float()).values
        self.n = n = asc.numel()
        self.grid = grid
        self.asc: torch.Tensor | None = asc if grid is None else None
        if grid is not None:
            ks = [n - (g * n) // grid for g in range(grid + 1)]
            vals = asc[torch.tensor([max(k, 1) - 1 for k in ks], device=asc.device)].tolist() if n else [0.0] * len(ks)
            self.table = [v if k >= 1 else -math.inf for k, v in zip(ks, vals)]

    @property
    def nbytes(self) -> int:
        return self.asc.numel() * 4 if self.asc is not None else 8 * ((self.grid or 0) + 1)

    def threshold(self, density: float) -> float:
        if density >= 1 or self.n == 0:
            return -math.inf
        if self.asc is not None:
            k = self.n - int(self.n * density)
            return float(self.asc[k - 1]) if k >= 1 else -math.inf
        return self.table[min(self.grid, max(0, round(density * self.grid)))]  # type: ignore[type-var]


def topk_keep(abs_values: torch.Tensor, q: TopKQuery, out: torch.Tensor) -> torch.Tensor:
    """``out`` = 1 where an entry is among the ``q.keep`` largest magnitudes, else 0.

    One comparison pass, split at ``q.cut`` (see :class:`TopKQuery`). ``out`` may be
    float (a 0/1 mask: much faster than bool masks in the multiplies on CPU) or bool.
    """
    if q.keep >= abs_values.numel():
        return out.fill_(1)
    if q.keep <= 0:
        return out.fill_(0)
    torch.ge(abs_values[: q.cut], q.threshold, out=out[: q.cut])
    torch.gt(abs_values[q.cut :], q.threshold, out=out[q.cut :])
    if q.ties is not None:
        out.index_fill_(0, q.ties, 1)
    return out


def topk_mask(values: torch.Tensor, density: float, grid: int | None = None) -> torch.Tensor:
    """Boolean keep-mask of the top-K magnitudes at ``density`` (convenience for tests and tools)."""
    keep = torch.empty(values.numel(), dtype=torch.bool, device=values.device)
    return topk_keep(values.reshape(-1).abs(), MagnitudeTable(values, grid).query(density), keep).view(values.shape)


# --------------------------------------------------------------------------- DARE
def tensor_key(seed: int, expert: str, tensor: str) -> int:
    """Stable 63-bit RNG key for (seed, expert, tensor): same mask on every build."""
    digest = hashlib.sha256(f"{seed}\x00{expert}\x00{tensor}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def keyed_uniform(key: int, out: torch.Tensor) -> torch.Tensor:
    """Fill flat ``out`` with the U[0,1) field of ``key`` (same hash as the fused DARE kernel)."""
    from evomerge.merge.fused import hash_uniform

    idx = torch.arange(out.numel(), dtype=torch.int32, device=out.device)
    lo = torch.tensor(key & 0xFFFFFFFF, device=out.device)
    hi = torch.tensor((key >> 32) & 0xFFFFFFFF, device=out.device)
    return out.copy_(hash_uniform(idx, lo, hi))


DARE_GRID = 65536  # 16-bit quantiles of the uniform field


def dare_quantiles(u: torch.Tensor) -> torch.Tensor:
    """``q = floor(65536 u)`` (int32, ``[0, 65535]``) of a flat U[0,1) field: the level at
    which each entry enters the mask (``q < g`` keeps it at level ``g``); stored packed
    (:func:`pack_level`) so a build compares integers instead of rehashing."""
    return (u * DARE_GRID).to(torch.int32)  # exact: scaling by a power of two, then floor


def level_words(n_experts: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Room for the 16-bit mask levels of ``n_experts`` experts, two per int32 word:
    ``(ceil(T/2), n)``; :func:`pack_level` fills expert ``2j`` into the low half of row
    ``j`` and ``2j+1`` into the high half (2 B per element and expert; an odd T leaves one
    half-row empty).

    Why words and not uint8/int16 planes: inductor's AVX2 code loads integer vectors
    through a scalar copy, at about half the speed of a float load; there the fused
    kernels receive these words as a float32 view and bit-cast them back, a plain vector
    load (:func:`evomerge.merge.fused.level_words_arg`, benchmarks/RESULTS.md).
    """
    return torch.zeros((-(-n_experts // 2), n), dtype=torch.int32, device=device)


def pack_level(words: torch.Tensor, k: int, levels: torch.Tensor) -> None:
    """Store expert ``k``'s flat levels (values in ``[0, 65535]``) into ``words``."""
    v = levels.reshape(-1).to(torch.int32)
    words[k // 2] |= (v << 16) if k % 2 else v


def dare_level(density: float) -> int:
    """Density snapped to the nearest ``g/65536`` (clamped to ``[0, 65536]``).

    ``floor(65536 u) < g`` exactly when ``u < g/65536``, so a stored quantile and the
    snapped density give the mask of the full-resolution field at that density.
    """
    return min(DARE_GRID, max(0, round(density * DARE_GRID)))


# --------------------------------------------------------------------------- TSVM
def polar(a: torch.Tensor) -> torch.Tensor:
    """Nearest matrix with orthonormal columns (or rows): ``P Q^T`` from ``A = P S Q^T``."""
    p, _, qh = torch.linalg.svd(a, full_matrices=False)
    return p @ qh


@dataclass
class TsvmFactors:
    """``Delta(c) = U[:, B_k] diag(s_k) Vh[B_k, :]`` summed with weights ``c_k``; block k = rows k*rank..."""

    us: torch.Tensor  # (m, T*rank): U_perp with each column scaled by its singular value
    vh: torch.Tensor  # (T*rank, n)
    rank: int  # per-task block width actually used (k or k_l)

    def dense(self, n_experts: int) -> torch.Tensor:
        """Transformed task vectors ``M_k`` stacked as ``(T, m*n)``."""
        r = self.rank
        return torch.stack(
            [(self.us[:, k * r : (k + 1) * r] @ self.vh[k * r : (k + 1) * r]).reshape(-1) for k in range(n_experts)]
        )


def tsvm_factors(
    taus: list[torch.Tensor],
    keep_rank: int | None = None,
    order: str = "orth_then_trunc",
    drop_null_directions: bool = False,
    rtol: float = 1e-6,
) -> TsvmFactors | None:
    """TSVM transform of one 2-D tensor (notes section 4.1), computed in float32.

    Per-task rank ``k0 = min(m, n) // T``; concatenate the top-``k0`` singular triplets,
    replace ``U_cat`` and ``Vh_cat`` by their polar factors. ``keep_rank`` (R-TSVM's
    ``k_l <= k0``) keeps only the leading directions of each block, either after the
    orthogonalisation (``orth_then_trunc``) or before it (``trunc_then_orth``).
    Returns ``None`` when ``k0 == 0`` (more tasks than the rank): callers fall back to
    the mean.
    """
    t = len(taus)
    m, n = taus[0].shape
    k0 = min(m, n) // t
    if k0 == 0:
        return None
    kl = k0 if keep_rank is None else max(1, min(k0, keep_rank))
    first = kl if order == "trunc_then_orth" else k0
    us, ss, vhs = [], [], []
    for tau in taus:
        u, s, vh = torch.linalg.svd(tau.float(), full_matrices=False)
        u, s, vh = u[:, :first], s[:first], vh[:first]
        if drop_null_directions:
            # Null directions are arbitrary and would bend other tasks' directions.
            live = s > rtol * (s[0] if s.numel() else 0)
            u, s, vh = u * live, s * live, vh * live[:, None]
        us.append(u)
        ss.append(s)
        vhs.append(vh)
    if drop_null_directions:
        keep = torch.cat([s > 0 for s in ss])
        u_cat, vh_cat = torch.cat(us, 1)[:, keep], torch.cat(vhs, 0)[keep]
        u_perp = polar(u_cat) if keep.any() else u_cat
        vh_perp = polar(vh_cat.t()).t() if keep.any() else vh_cat
        full_u = torch.zeros(m, t * first)
        full_v = torch.zeros(t * first, n)
        full_u[:, keep] = u_perp
        full_v[keep] = vh_perp
        u_perp, vh_perp = full_u, full_v
    else:
        u_perp = polar(torch.cat(us, 1))
        vh_perp = polar(torch.cat(vhs, 0).t()).t()
    s_cat = torch.cat(ss)
    if kl < first:  # orth_then_trunc: keep the leading kl columns of every block
        idx = torch.cat([torch.arange(k * first, k * first + kl) for k in range(t)])
        u_perp, vh_perp, s_cat = u_perp[:, idx], vh_perp[idx], s_cat[idx]
    return TsvmFactors(us=u_perp * s_cat, vh=vh_perp.contiguous(), rank=kl)


@dataclass(frozen=True)
class RtsvmSettings:
    """The reconstruction switches of notes section 5.2/5.3."""

    beta: float = 0.1
    z: float = 3.0
    norm: str = "fro"  # fro | l1
    keep: str = "centered"  # centered | raw
    weight_mode: str = "direct"  # direct | inverse
    weight_norm: str = "sum"  # sum | mean
    std_correction: int = 1
    zero_tol: float = 0.0
    consensus: str = "mean"  # mean | all_zero


def outlier_weights(taus: list[torch.Tensor], cfg: RtsvmSettings) -> torch.Tensor:
    """R-TSVM per-model weights ``w_k`` from 3-sigma row outliers of the full deltas."""
    mags = []
    for tau in taus:
        x = tau.float()
        mu = x.mean(dim=1, keepdim=True)
        sigma = x.std(dim=1, keepdim=True, correction=cfg.std_correction)
        sigma = torch.nan_to_num(sigma, nan=math.inf)
        z = x - mu
        hit = z.abs() > cfg.z * sigma
        h = torch.where(hit, z if cfg.keep == "centered" else x, torch.zeros_like(x))
        mags.append(float(h.norm() if cfg.norm == "fro" else h.abs().sum()))
    a = torch.tensor(mags, dtype=torch.float64)
    t = len(taus)
    if cfg.weight_mode == "inverse":
        if bool((a == 0).any()):
            w = torch.full((t,), 1.0 / t, dtype=torch.float64)
        else:
            w = (1 / a) / (1 / a).sum()
    elif float(a.sum()) == 0:
        w = torch.full((t,), 1.0 / t, dtype=torch.float64)
    else:
        w = a / a.sum()
    if cfg.weight_norm == "mean":
        w = w * t
    return w


def sparsity_rank(taus: list[torch.Tensor], cfg: RtsvmSettings) -> int:
    """R-TSVM ``k_l = max(1, floor(k0 * (1 - beta*(1 - s))))`` from the sparsity consensus s."""
    t = len(taus)
    m, n = taus[0].shape
    k0 = min(m, n) // t
    zero = [tau.abs() <= cfg.zero_tol for tau in taus]
    if cfg.consensus == "all_zero":
        both = zero[0].clone()
        for z in zero[1:]:
            both &= z
        s = float(both.float().mean())
    else:
        s = sum(float(z.float().mean()) for z in zero) / t
    return max(1, min(k0, math.floor(k0 * (1 - cfg.beta * (1 - s)))))


# --------------------------------------------------------------------------- DELLA / Karcher
def della_rank_fraction(tau: torch.Tensor) -> torch.Tensor:
    """Per-row magnitude rank of each entry, scaled to ``[0, 1]`` (0 = smallest ``|x|``).

    DELLA (arXiv 2406.11617, mergekit's ``della_magprune``) ranks magnitudes within each
    row of a matrix; a 1-D tensor is one row. A row of one entry gets 0.5 (its keep
    probability is then the density itself). Returned flat, float32.
    """
    x = tau.float()
    rows = x.reshape(1, -1) if x.dim() < 2 else x.reshape(x.shape[0], -1)
    cols = rows.shape[1]
    if cols < 2:
        return torch.full((rows.numel(),), 0.5, dtype=torch.float32, device=x.device)
    order = torch.argsort(rows.abs(), dim=1)
    rank = torch.empty_like(order)
    ar = torch.arange(cols, device=x.device).expand_as(order)
    rank.scatter_(1, order, ar)
    return (rank.to(torch.float32) / (cols - 1)).reshape(-1)


DELLA_GRID = 65536  # DELLA's densities snap to g/65536, g in [1, 65535], inside (0, 1)


def della_level(density: float) -> int:
    """DELLA mask level of a density: 0 keeps none (``d <= 0``), ``DELLA_GRID`` keeps all
    (``d >= 1``); inside ``(0, 1)`` the nearest ``g/65536`` with ``1 <= g <= 65535``."""
    if density >= 1:
        return DELLA_GRID
    if density <= 0:
        return 0
    return min(DELLA_GRID - 1, max(1, round(density * DELLA_GRID)))


def della_thresholds(epsilon: float) -> torch.Tensor:
    """float32 ``thr[g] = g/65536 - eps`` for g in ``[0, 65536]``: level g keeps ``s < thr[g]``
    (``0 < d < 1``; level 0 and 65536 stand for ``d <= 0`` and ``d >= 1``: none and all)."""
    return (torch.arange(DELLA_GRID + 1, dtype=torch.float64) / DELLA_GRID - epsilon).to(torch.float32)


def della_levels(s: torch.Tensor, epsilon: float) -> torch.Tensor:
    """The level ``v`` (int64, ``[0, 65535]``) at which each keep score enters: ``v < g``
    exactly when ``s < thr[g]``, for every level ``1 <= g <= 65535``.

    ``v + 1`` is the first level whose float32 threshold exceeds ``s`` (clamped to
    ``[1, 65536]``), found by a binary search in the very thresholds a build compares
    with; prepare bins the kept L1 norm by it.
    """
    thr = della_thresholds(epsilon).to(s.device)
    return torch.searchsorted(thr, s.float().contiguous(), right=True).clamp_(1, DELLA_GRID).sub_(1)


def karcher_mean(tensors: list[torch.Tensor], alphas: list[float], max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """Weighted Karcher (Frechet) mean on the unit sphere, rescaled by ``sum a_k ||x_k||``.

    The iteration of mergekit's ``karcher`` (arXiv 2603.04972): start from the normalised
    weighted mean of the unit vectors, then ``max_iter`` Riemannian gradient steps (log
    map, mean tangent, exp map), stopping when the tangent norm falls below ``tol``.
    Inputs whose norm is at most ``tol`` are left out of the direction (not the scale).
    Computed in float32 on flat tensors.
    """
    if len(tensors) == 1:
        return tensors[0].clone()
    xs = [t.reshape(-1).float() for t in tensors]
    norms = [torch.linalg.vector_norm(x) for x in xs]
    live = [k for k, n in enumerate(norms) if float(n) > tol]
    if not live:
        return torch.zeros_like(xs[0]).view(tensors[0].shape)
    total = sum(alphas[k] for k in live)
    a = [alphas[k] / total for k in live]
    units = [xs[k] / norms[k] for k in live]
    mean = torch.zeros_like(xs[0])
    for ak, u in zip(a, units):
        mean += ak * u
    mnorm = torch.linalg.vector_norm(mean)
    mean = units[0].clone() if float(mnorm) < tol else mean / mnorm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for ak, u in zip(a, units):
            c = torch.clamp(torch.dot(mean, u), -1.0, 1.0)
            theta = torch.arccos(c)
            if float(theta) < tol:
                continue
            tangent += ak * (theta / torch.sin(theta)) * (u - c * mean)
        tnorm = torch.linalg.vector_norm(tangent)
        if float(tnorm) < tol:
            break
        mean = torch.cos(tnorm) * mean + torch.sin(tnorm) * (tangent / tnorm)
        un = torch.linalg.vector_norm(mean)
        if float(un) > tol:
            mean = mean / un
    scale = sum(ak * n for ak, n in zip(alphas, norms))
    return (scale * mean).view(tensors[0].shape)
