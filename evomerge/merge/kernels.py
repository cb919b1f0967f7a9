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
    """Exact top-K selection by magnitude: keep ``|x| > t`` plus the first ``need`` ties."""

    keep: int  # K
    threshold: float  # K-th largest magnitude
    greater: int  # #{|x| > t}
    equal: int  # #{|x| == t}

    @property
    def need(self) -> int:
        return self.keep - self.greater


class MagnitudeTable:
    """Answers "which K largest |x|" for any density without sorting again.

    Built once from one sort of ``|x|``. With ``grid=G`` densities snap to the nearest
    ``g/G`` (``K = g*n // G``) and only ``G+1`` (threshold, #greater, #equal) rows are
    kept, a few KB per tensor. With ``grid=None`` the whole ascending sorted array is
    kept (4 bytes per element) and any density is exact, as in mergekit.
    """

    def __init__(self, magnitudes: torch.Tensor, grid: int | None) -> None:
        asc = torch.sort(magnitudes.reshape(-1).float()).values
        self.n = n = asc.numel()
        self.grid = grid
        self.asc: torch.Tensor | None = asc if grid is None else None
        if grid is None or n == 0:
            return
        ks = torch.tensor([(g * n) // grid for g in range(grid + 1)], dtype=torch.int64)
        ks = torch.where((ks == 0) & (torch.arange(grid + 1) > 0), 1, ks)  # d > 0 keeps >= 1
        self.k_table = ks.tolist()
        self.rows = [self._row(asc, k) for k in self.k_table]
        orig = n - torch.tensor([(g * n) // grid for g in range(grid + 1)])
        self.orig_table = [float(asc[k - 1]) if k >= 1 else -math.inf for k in orig.tolist()]

    @staticmethod
    def _row(asc: torch.Tensor, k: int) -> TopKQuery:
        n = asc.numel()
        if k >= n:
            return TopKQuery(n, -math.inf, n, 0)
        if k <= 0:
            return TopKQuery(0, math.inf, 0, 0)
        t = asc[n - k]
        hi = int(torch.searchsorted(asc, t, right=True))
        lo = int(torch.searchsorted(asc, t, right=False))
        return TopKQuery(k, float(t), n - hi, hi - lo)

    @property
    def nbytes(self) -> int:
        return self.asc.numel() * 4 if self.asc is not None else 40 * ((self.grid or 0) + 1)

    def snap(self, density: float) -> int:
        """Grid level of ``density`` (nearest, clamped to ``[0, G]``)."""
        assert self.grid is not None
        return min(self.grid, max(0, round(density * self.grid)))

    def query(self, density: float) -> TopKQuery:
        """The K largest magnitudes for ``density`` (mergekit's K rule when exact)."""
        if self.n == 0 or density >= 1:
            return TopKQuery(self.n, -math.inf, self.n, 0)
        if self.asc is not None:
            return self._row(self.asc, mergekit_keep_count(density, self.n))
        return self.rows[self.snap(density)]

    def original_threshold(self, density: float) -> float:
        """Original TIES trim: keep ``|x| >= kthvalue(n - int(n*d))`` (one more than K, plus ties)."""
        if density >= 1 or self.n == 0:
            return -math.inf
        if self.asc is not None:
            k = self.n - int(self.n * density)
            return float(self.asc[k - 1]) if k >= 1 else -math.inf
        return self.orig_table[self.snap(density)]


def topk_drop(abs_values: torch.Tensor, q: TopKQuery, out: torch.Tensor, eq_buf: torch.Tensor) -> torch.Tensor:
    """``out = True`` where an entry is *not* among the ``q.keep`` largest magnitudes.

    Ties at the threshold go to the lowest flat index, which is what a stable
    descending argsort keeps, without sorting: one comparison, plus one equality scan
    and a short ``nonzero`` only when the ties straddle the cut.
    """
    if q.keep >= abs_values.numel():
        return out.fill_(False)
    if q.keep <= 0:
        return out.fill_(True)
    need = q.need
    if need >= q.equal:
        return torch.lt(abs_values, q.threshold, out=out)
    torch.le(abs_values, q.threshold, out=out)
    if need > 0:
        torch.eq(abs_values, q.threshold, out=eq_buf)
        out[torch.nonzero(eq_buf).view(-1)[:need]] = False
    return out


def topk_mask(abs_values: torch.Tensor, q: TopKQuery) -> torch.Tensor:
    """Boolean keep-mask of the ``q.keep`` largest magnitudes (convenience for tests and tools)."""
    drop = torch.empty(abs_values.shape, dtype=torch.bool, device=abs_values.device)
    eq = torch.empty_like(drop)
    return ~topk_drop(abs_values, q, drop, eq)


# --------------------------------------------------------------------------- DARE
def tensor_key(seed: int, expert: str, tensor: str) -> int:
    """Stable 63-bit RNG key for (seed, expert, tensor): same mask on every build."""
    digest = hashlib.sha256(f"{seed}\x00{expert}\x00{tensor}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


_GENERATORS: dict[str, torch.Generator] = {}


def keyed_uniform(key: int, out: torch.Tensor) -> torch.Tensor:
    """Fill ``out`` with U[0,1) drawn from a generator seeded by ``key`` (regenerated, not stored)."""
    dev = str(out.device)
    gen = _GENERATORS.get(dev)
    if gen is None:
        gen = _GENERATORS[dev] = torch.Generator(device=out.device)
    gen.manual_seed(key)
    return out.uniform_(0.0, 1.0, generator=gen)


# --------------------------------------------------------------------------- consensus
def consensus_merge(
    weighted: torch.Tensor, coeffs: torch.Tensor, normalize: bool, out: torch.Tensor, scratch: torch.Tensor, sign_buf: torch.Tensor
) -> torch.Tensor:
    """mergekit ``sum`` consensus on weighted deltas ``W`` of shape ``(T, n)``, into ``out``.

    Elected sign ``s* = +1 if sum_k W_k >= 0 else -1``; keep entries whose sign equals
    ``s*`` (zeros never agree); sum them; with ``normalize`` divide by the sum of the
    agreeing coefficients (exact-zero divisor -> 1). ``copysign(1, S)`` gives ``s*``
    directly: a sum is ``-0.0`` only when every term is a zero, and then nothing agrees
    whichever sign is elected.
    """
    torch.sum(weighted, 0, out=out)
    torch.copysign(_ONE.to(out.device), out, out=sign_buf)
    torch.mul(weighted, sign_buf, out=scratch)  # s* W_k > 0 exactly where W_k agrees
    scratch.clamp_(min=0)
    torch.sum(scratch, 0, out=out).mul_(sign_buf)
    if normalize:
        scratch.sign_()  # 1 where agreeing, else 0
        torch.mv(scratch.t(), coeffs, out=sign_buf)
        sign_buf.masked_fill_(sign_buf == 0, 1.0)
        out.div_(sign_buf)
    return out


_ONE = torch.tensor(1.0)


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
