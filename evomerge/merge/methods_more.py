"""mergekit's remaining merge methods in the prepare / build form of ``methods.py``.

DELLA (and DELLA linear), Model Stock, SCE, NuSLERP, Multi-SLERP and the Karcher mean,
with mergekit 0.1.5's semantics (``shared/research/mergekit.md``). Everything that does
not depend on a candidate's coefficients (ranks, cosines, angles, Gram matrices, the
SCE selection, the whole Karcher mean) is computed once in ``prepare_tensor``; a build
is then one or two matrix-vector products over the expert axis plus a few elementwise
passes, writing into the destination buffer.

These builds always write a float32 buffer (``fp32_dst_only``): a bf16/fp16 model is
written through the build's scratch copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import Field

from evomerge.errors import ConfigError
from evomerge.merge import fused as F
from evomerge.merge import kernels as K
from evomerge.merge.methods import (
    Candidate,
    MethodOptions,
    _abs_into,
    _affine,
    _Base,
    _coef_tensor,
    _stack,
    masked_ties,
    register_method,
)


def _row_view(n_shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, cols) of a tensor seen as rows of its last axis (a 1-D tensor is one row)."""
    if len(n_shape) < 2:
        return 1, math.prod(n_shape)
    return n_shape[0], math.prod(n_shape[1:])


# --------------------------------------------------------------------------- DELLA
class DellaOptions(MethodOptions):
    normalize: bool = True
    rescale: bool = Field(True, description="scale each pruned delta back to its L1 norm (mergekit's default)")
    epsilon: float = Field(0.15, ge=0.0, lt=1.0, description="keep probabilities run from d-eps (smallest |tau|) to d+eps")
    seed: int = 0


class DellaLinearOptions(DellaOptions):
    normalize: bool = False


@dataclass
class DellaState:
    taus: torch.Tensor  # (T, n)
    words: torch.Tensor  # (ceil(T/2), n) int32: each entry's 16-bit keep level v (kept at level g where v < g), K.level_words
    l1: list[float]  # ||tau_k||_1
    l1t: torch.Tensor  # the same, (T,) float32 on the cache device, for the fused kernel
    kept_l1: torch.Tensor | None  # (T, 65536) float64 on the host: ||kept||_1 at each level (tensors >= 65536 entries)


L1_TABLE_MIN = K.DELLA_GRID  # tensors at least this large get a kept-L1 table (8 B per level and expert)


@register_method("della")
class Della(_Base):
    """DELLA (arXiv 2406.11617), mergekit's ``della_magprune``: within each row the entry of
    magnitude rank ``r`` in ``[0, 1]`` is kept with probability ``d - eps + 2 eps r``,
    the pruned delta is rescaled to its L1 norm, then TIES's sign election and disjoint
    weighted mean (``della``) or a weighted sum (``della_linear``).

    The Bernoulli draws come from the keyed uniform field ``u`` of DARE (same candidate,
    same mask; masks nest across densities): an entry is kept where ``s = u - 2 eps r``
    is below ``thr[g] = float32(g/65536 - eps)``, densities inside ``(0, 1)`` snapped to
    the nearest ``g/65536`` (``1 <= g <= 65535``, as DARE's). ``prepare`` keeps each
    entry's level ``v`` (the number of thresholds at or below its ``s``: ``v < g`` exactly
    when ``s < thr[g]``; 2 B per element and expert, packed as DARE's) and, for tensors of
    at least 65536 entries, the L1 norm of the kept delta at every level (512 KB per
    tensor and expert). A build is then one pass (an integer compare per expert, the
    rescale a table lookup); smaller tensors sum the kept L1 in the kernel, a second
    pass. Probabilities outside ``[0, 1]`` are clamped (mergekit
    refuses ``d +- eps`` outside ``(0, 1)``; the mergekit config reader does too).
    """

    options_model = DellaOptions
    uses_density = True
    fp32_dst_only = True
    ties: ClassVar[bool] = True

    def state_bytes(self, shape, n_experts, options, elem=4) -> int:
        n = math.prod(shape)
        table = 8 * K.DELLA_GRID if options.rescale and n >= L1_TABLE_MIN else 0
        return n_experts * (elem * n + table) + 4 * -(-n_experts // 2) * n

    def scratch(self, options, n_experts) -> tuple[int, str]:
        return 2 * n_experts + 3, "4*(2T+3)*max_numel"  # masks, |tau|, out; eager TIES: sum and sign

    def prepare_tensor(self, info, base, taus, options) -> DellaState:
        stack = _stack(taus, info.cache_dtype)
        t, n = stack.shape
        words = K.level_words(t, n, device=stack.device)
        s = torch.empty(n, dtype=torch.float32, device=stack.device)
        table = options.rescale and n >= L1_TABLE_MIN
        kept_l1 = torch.empty((t, K.DELLA_GRID), dtype=torch.float64) if table else None
        for k, e in enumerate(info.expert_names):
            K.keyed_uniform(K.tensor_key(options.seed, e, info.name), s)
            # ranks from the unrounded task vectors: a bf16 cache keeps the fp32 cache's masks
            s.sub_(K.della_rank_fraction(taus[k].view(info.shape)).to(s.device), alpha=2.0 * options.epsilon)
            levels = K.della_levels(s, options.epsilon)
            K.pack_level(words, k, levels)
            if kept_l1 is not None:  # level g keeps v < g: ||kept||_1 at g is the sum over the levels below g
                hist = torch.bincount(levels, weights=stack[k].abs().to(torch.float64), minlength=K.DELLA_GRID)
                kept_l1[k] = torch.cumsum(hist, 0).cpu()  # [g - 1]: what level g keeps
        l1 = [float(row.abs().sum(dtype=torch.float64)) for row in stack]
        return DellaState(stack, words, l1, torch.tensor(l1, dtype=torch.float32, device=stack.device), kept_l1)

    def _factors(self, state: DellaState, cand: Candidate, levels: list[int], options: Any) -> tuple[list[float], bool]:
        """Kept-value multipliers ``c_k`` (``/ sum c`` for della_linear with normalize), times
        the L1-matching ratio when the state has a table; the flag says the kernel must
        still compute that ratio itself (rescale without a table)."""
        total = sum(cand.weights)
        div = total if not self.ties and options.normalize and abs(total) >= 1e-8 else 1.0
        factors = [w / div for w in cand.weights]
        if not options.rescale:
            return factors, False
        if state.kept_l1 is None:
            return factors, True
        for k, (d, g) in enumerate(zip(cand.densities, levels)):
            if 0 < d < 1:
                kept = float(state.kept_l1[k, g - 1])
                if kept >= 1e-7 and state.l1[k] >= 1e-7:
                    factors[k] *= state.l1[k] / kept
        return factors, False

    def begin_build(self, states, candidates, groups, options, ws) -> dict[int, tuple[Any, ...]] | None:
        """Compiled builds: every tensor's levels and factors, sent to the device in one copy."""
        if not ws.compiled or not states:
            return None
        dev = states[0].taus.device
        levels = {id(c): [K.della_level(d) for d in c.densities] for c in candidates}
        rows, in_kernel = [], []
        for state, g in zip(states, groups):
            cand = candidates[g]
            lv = levels[id(cand)]
            factors, l1 = self._factors(state, cand, lv, options)
            rows.append([*lv, *cand.densities, *factors, cand.scale])
            in_kernel.append(l1)
        t = len(candidates[0].weights)
        table = torch.tensor(rows, dtype=torch.float64).to(dev)  # levels exact; floats: one rounding, as torch.tensor(list)
        lv_t, floats_t = table[:, :t].to(torch.int32), table[:, t:].to(torch.float32)
        return {
            id(s): (lv_t[i], floats_t[i, :t], floats_t[i, t : 2 * t], floats_t[i, 2 * t], in_kernel[i])
            for i, s in enumerate(states)
        }

    def build_tensor(self, state, base, cand, dst, ws, options, ctx) -> None:
        if ctx is not None:
            levels, dens, factors, scale, l1 = ctx[id(state)]
            F.run("della", ws.compiled, dst, state.taus, base, F.level_words_arg(state.words), levels, dens, factors,
                  cand.coeffs, state.l1t, scale, self.ties, options.normalize, l1)
            return
        t, n = state.taus.shape
        keep = ws.get("keep", t * n).view(t, n)
        levels = [K.della_level(d) for d in cand.densities]
        factors, l1 = self._factors(state, cand, levels, options)
        for k, g in enumerate(levels):
            torch.lt(F.unpack_level(state.words, k), g, out=keep[k])
            d = cand.densities[k]
            if l1 and 0 < d < 1:
                kept = float(torch.dot(_abs_into(state.taus[k], ws.get("abs", n)), keep[k]))
                if kept >= 1e-7 and state.l1[k] >= 1e-7:
                    factors[k] *= state.l1[k] / kept
        numt = torch.tensor(factors, dtype=torch.float32, device=state.taus.device)
        if self.ties:
            masked_ties(dst, base, state.taus, keep, numt, cand.coeffs, cand.scale, options.normalize, ws)
            return
        keep.mul_(state.taus)
        _affine(base, keep, numt * cand.scale, dst, ws)


@register_method("della_linear")
class DellaLinear(Della):
    options_model = DellaLinearOptions
    ties = False


def della_mask(tau: torch.Tensor, s: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Keep-mask of one expert at ``density`` (reference path and tests): ``s`` below the
    float32 threshold of the density's level (see :func:`evomerge.merge.kernels.della_level`)."""
    g = K.della_level(density)
    if g >= K.DELLA_GRID:
        return torch.ones_like(tau, dtype=torch.bool)
    if g <= 0:
        return torch.zeros_like(tau, dtype=torch.bool)
    return (s.float() < K.della_thresholds(epsilon)[g]).view_as(tau)


# --------------------------------------------------------------------------- Model Stock
class ModelStockOptions(MethodOptions):
    filter_wise: bool = Field(False, description="one ratio per row (mergekit's filter_wise) instead of per tensor")


@dataclass
class ModelStockState:
    taus: torch.Tensor  # (T, n)
    t: torch.Tensor  # (R,) float32: interpolation ratio per row (R = 1 unless filter_wise)
    rows: int


def model_stock_ratio(taus: list[torch.Tensor], filter_wise: bool) -> torch.Tensor:
    """Model Stock's ratio ``t = T cos / (1 + (T-1) cos)`` from the mean pairwise cosine of the
    task vectors (per tensor, or per row with ``filter_wise``); 0 at the singularity."""
    if filter_wise:
        vs = [t.float().reshape(1, -1) if t.dim() < 2 else t.float().reshape(t.shape[0], -1) for t in taus]
    else:
        vs = [t.float().reshape(-1) for t in taus]
    cos = []
    for i, a in enumerate(vs):
        for b in vs[i + 1 :]:
            prod = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cos.append(((a * b).sum(dim=-1) / prod.clamp(min=1e-6)).clamp(-1, 1))
    c = torch.stack(cos).mean(dim=0).reshape(-1)
    count = len(vs)
    den = 1 + (count - 1) * c
    singular = den.abs() < 1e-6
    return torch.where(singular, torch.zeros_like(c), count * c / torch.where(singular, torch.ones_like(den), den))


@register_method("model_stock")
class ModelStock(_Base):
    """Model Stock (arXiv 2403.19522): ``theta = theta0 + t * sum_k c_k tau_k`` with the ratio
    ``t`` fixed per tensor (or row) by the task vectors' mean pairwise cosine.

    mergekit's model_stock takes no weights: its merge is ``c_k = 1/T`` (the average of the
    experts); other weights reweight the average the ratio is applied to.
    """

    options_model = ModelStockOptions
    min_experts = 2
    fp32_dst_only = True

    def state_bytes(self, shape, n_experts, options, elem=4) -> int:
        return elem * n_experts * math.prod(shape) + 4 * _row_view(shape)[0]

    def scratch(self, options, n_experts) -> tuple[int, str]:
        return 2, "4*2*max_numel"

    def prepare_tensor(self, info, base, taus, options) -> ModelStockState:
        t = model_stock_ratio(taus, options.filter_wise).to(base.device)
        return ModelStockState(_stack(taus, info.cache_dtype), t, t.numel())

    def build_tensor(self, state, base, cand, dst, ws, options, ctx) -> None:
        if state.rows == 1:
            _affine(base, state.taus, cand.coeffs * (cand.scale * state.t), dst, ws)
            return
        mix = ws.get("mix", base.numel())
        _affine(base, state.taus, cand.coeffs * cand.scale, mix, ws, beta=0.0)
        mix.view(state.rows, -1).mul_(state.t[:, None])
        torch.add(base, mix, out=dst)


# --------------------------------------------------------------------------- SCE
class SceOptions(MethodOptions):
    select_topk: float = Field(1.0, ge=0.0, le=1.0, description="fraction of the highest-variance entries kept")


@dataclass
class SceState:
    kept: torch.Tensor  # (T, n): selected task vectors where they agree with the elected sign, else 0
    tvw: torch.Tensor  # (T,) float32: mean-square weights of the selected task vectors


def sce_select(taus: list[torch.Tensor], select_topk: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SCE (arXiv 2408.07990) as mergekit: Select the top ``select_topk`` of the nonzero
    per-entry variances across experts, Calculate per-expert weights from the mean
    square of the selected task vectors, Erase entries against the elected (sum) sign.
    Returns (selected task vectors ``(T, n)``, agreement mask, weights ``(T,)``)."""
    tv = torch.stack([t.float().reshape(-1) for t in taus])
    if select_topk < 1:
        mask = torch.zeros(tv.shape[1], dtype=tv.dtype, device=tv.device)
        if select_topk > 0:
            var = torch.var(tv, dim=0, unbiased=False)
            k = int(int(torch.count_nonzero(var)) * select_topk)
            if k > 0:
                mask[torch.topk(var.abs(), k=k, largest=True).indices] = 1
        tv = tv * mask
    elected = torch.where(tv.sum(0) >= 0, 1.0, -1.0)
    agree = (tv.sign() == elected).to(tv.dtype)
    w = tv.square().mean(dim=1)
    total = float(w.sum())
    w = torch.full_like(w, 1.0 / w.numel()) if abs(total) < 1e-6 else w / total
    return tv, agree, w


@register_method("sce")
class Sce(_Base):
    """SCE: ``theta = theta0 + sum_k c_k w_k m_k tau_k / max(sum_k c_k w_k m_k, 1e-6)`` per entry,
    with the selection, weights ``w_k`` and sign mask ``m_k`` of :func:`sce_select` fixed
    in prepare. mergekit's sce takes no weights (``c_k = 1``); others reweight the experts.
    """

    options_model = SceOptions
    fp32_dst_only = True

    def state_bytes(self, shape, n_experts, options, elem=4) -> int:
        return elem * n_experts * math.prod(shape)

    def scratch(self, options, n_experts) -> tuple[int, str]:
        return 4, "4*4*max_numel"  # eager: numerator, divisor, one expert's agreement, out

    def prepare_tensor(self, info, base, taus, options) -> SceState:
        tv, agree, w = sce_select(taus, options.select_topk)
        return SceState((tv * agree).to(info.cache_dtype), w.to(base.device))

    def build_tensor(self, state, base, cand, dst, ws, options, ctx) -> None:
        """The agreement mask is not stored: an entry agrees exactly where its kept value is
        nonzero (``sign(tv) == elected`` needs ``tv != 0``), so a build reads the kept
        values and the base once, like task arithmetic."""
        coef = cand.coeffs * state.tvw
        if ws.compiled:
            scale = torch.tensor(cand.scale, dtype=torch.float32, device=base.device)
            F.run("sce", True, dst, state.kept, base, coef, scale)
            return
        n = base.numel()
        num = ws.get("num", n)
        den = ws.get("den", n).zero_()
        agree = ws.get("agree", n)
        _affine(base, state.kept, coef, num, ws, beta=0.0)
        for k, ck in enumerate(coef.tolist()):
            torch.ne(state.kept[k], 0, out=agree)
            den.add_(agree, alpha=ck)
        den.clamp_(min=1e-6)
        num.div_(den)
        torch.add(base, num, alpha=cand.scale, out=dst)


# --------------------------------------------------------------------------- NuSLERP
class NuslerpOptions(MethodOptions):
    row_wise: bool = Field(False, description="slerp each column (mergekit's nuslerp_row_wise: along dim 0)")
    flatten: bool = Field(True, description="slerp the whole flattened tensor (mergekit's nuslerp_flatten)")
    on_task_vectors: bool = Field(True, description="slerp the task vectors (mergekit with a base_model); false: the models")
    eps: float = 1e-8


@dataclass
class NuslerpState:
    x: torch.Tensor  # (2, n): task vectors or models
    theta: torch.Tensor  # angles, shape () / (R, 1) / (1, C)
    colinear: torch.Tensor  # bool, same shape
    shape2d: tuple[int, int]


def nuslerp_angles(v0: torch.Tensor, v1: torch.Tensor, row_wise: bool, flatten: bool, eps: float) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """Angle(s) between ``v0`` and ``v1`` as mergekit's nuslerp measures them: whole tensor
    (``flatten``), per column (``row_wise``) or per row; shaped to broadcast over the
    tensor viewed as ``(R, C)``."""
    if flatten or v0.dim() < 2:
        a, b = v0.reshape(1, -1).float(), v1.reshape(1, -1).float()
        shape2d = (1, v0.numel())
    else:
        shape2d = (v0.shape[0], v0.numel() // v0.shape[0])
        a, b = v0.reshape(shape2d).float(), v1.reshape(shape2d).float()
        if row_wise:
            a, b = a.t(), b.t()
    au = a / torch.norm(a, dim=-1, keepdim=True).clamp(min=1e-7)
    bu = b / torch.norm(b, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = torch.sum(au * bu, dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    if row_wise and not (flatten or v0.dim() < 2):
        theta, colinear = theta.t(), colinear.t()  # (1, C): one angle per column
    return theta, colinear, shape2d


def nuslerp_t(weights: list[float]) -> float:
    total = sum(weights)
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


@register_method("nuslerp")
class Nuslerp(_Base):
    """NuSLERP: slerp between two experts' task vectors (or the two models) at
    ``t = c_1 / (c_0 + c_1)``, per tensor, row or column; lerp where colinear.
    ``theta = theta0 + scale * (slerp - theta0)`` (mergekit has no scale: 1)."""

    options_model = NuslerpOptions
    min_experts = 2
    max_experts = 2
    fp32_dst_only = True

    def state_bytes(self, shape, n_experts, options, elem=4) -> int:
        return elem * 2 * math.prod(shape) + 8 * max(_row_view(shape))

    def prepare_tensor(self, info, base, taus, options) -> NuslerpState:
        xs = taus if options.on_task_vectors else [base + t for t in taus]
        theta, colinear, shape2d = nuslerp_angles(xs[0].view(info.shape), xs[1].view(info.shape), options.row_wise, options.flatten, options.eps)
        # the task vectors are stored either way (the models are base + tau): the same numbers
        # in a bf16 cache as in an fp32 one wherever the task vectors are bf16-exact
        return NuslerpState(_stack(taus, info.cache_dtype), theta, colinear, shape2d)

    @staticmethod
    def coefficients(t: float, theta: torch.Tensor, colinear: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = torch.sin(theta)
        a = torch.where(colinear, 1 - t, torch.sin((1 - t) * theta) / s)
        b = torch.where(colinear, t, torch.sin(t * theta) / s)
        return a, b

    def build_tensor(self, state, base, cand, dst, ws, options, ctx) -> None:
        a, b = self.coefficients(nuslerp_t(cand.weights), state.theta, state.colinear)
        lam = cand.scale
        # on the models: theta0 + lam * (a (theta0 + tau0) + b (theta0 + tau1) - theta0)
        on_models = not options.on_task_vectors
        if state.theta.numel() == 1:
            beta = 1.0 + lam * float(a + b - 1) if on_models else 1.0
            _affine(base, state.x, torch.cat([a.reshape(1), b.reshape(1)]) * lam, dst, ws, beta=beta)
            return
        dv = dst.view(state.shape2d)
        torch.mul(state.x[0].view(state.shape2d), a * lam, out=dv)
        dv.addcmul_(state.x[1].view(state.shape2d), b * lam)
        if on_models:
            dv.addcmul_(base.view(state.shape2d), 1.0 + lam * (a + b - 1))
        else:
            dst.add_(base)


# --------------------------------------------------------------------------- Multi-SLERP
class MultislerpOptions(MethodOptions):
    normalize_weights: bool = True
    on_task_vectors: bool = Field(True, description="interpolate task vectors (mergekit with a base_model); false: the models")
    eps: float = 1e-8


@dataclass
class MultislerpState:
    x: torch.Tensor  # (T, n)
    norms: torch.Tensor  # (T,) float64
    gram: torch.Tensor  # (T, T) float64: Gram matrix of the unit vectors x_k / (|x_k| + eps)
    name: str


@register_method("multislerp")
class Multislerp(_Base):
    """Multi-SLERP (mergekit's ``multislerp``): barycentric interpolation on the sphere.

    The unit vectors ``u_k`` are averaged with weights ``w``, the mean is normalised, the
    weighted tangent vectors at it are mapped back and the result scaled by
    ``sum_k w_k |x_k|``. The tangent vectors of a normalised weighted mean sum to zero
    (``sum_k w_k (u_k - (u_k.m) m) = |m_raw| m - |m_raw| m``), so the result is
    ``(sum_k w_k |x_k|) m_raw / |m_raw|`` and needs only the Gram matrix of the ``u_k``,
    computed once: a build is one matrix-vector product. Two experts whose weighted mean
    vanishes are interpolated linearly, as mergekit does.
    """

    options_model = MultislerpOptions
    fp32_dst_only = True

    def state_bytes(self, shape, n_experts, options, elem=4) -> int:
        return elem * n_experts * math.prod(shape)

    def prepare_tensor(self, info, base, taus, options) -> MultislerpState:
        xs = taus if options.on_task_vectors else [base + t for t in taus]
        flat = torch.stack([x.reshape(-1).float() for x in xs])
        norms = torch.norm(flat, dim=-1)
        units = flat / (norms[:, None] + options.eps)
        gram = (units.double() @ units.double().t())
        # task vectors stored either way (the models are base + tau), as nuslerp
        return MultislerpState(_stack(taus, info.cache_dtype), norms.double(), gram, info.name)

    def alphas(self, state: MultislerpState, weights: list[float], options: Any) -> list[float]:
        t = len(weights)
        if t == 1:
            return [1.0]
        w = torch.tensor(weights, dtype=torch.float64)
        if options.normalize_weights:
            w = w / w.sum()
        mnorm = float(torch.sqrt((w @ state.gram @ w).clamp(min=0)))
        if mnorm < options.eps:
            if t == 2:
                return w.tolist()
            raise ConfigError(f"multislerp: the weighted mean of the unit task vectors of '{state.name}' is zero "
                              f"(antipodal inputs with balancing weights {weights}); use other weights")
        avg = float((state.norms * w).sum())
        return (w * avg / mnorm / (state.norms + options.eps)).tolist()

    def build_tensor(self, state, base, cand, dst, ws, options, ctx) -> None:
        coef = _coef_tensor(self.alphas(state, cand.weights, options), base)
        beta = 1.0 if options.on_task_vectors else 1.0 + cand.scale * (float(coef.sum()) - 1.0)
        _affine(base, state.x, coef * cand.scale, dst, ws, beta=beta)


# --------------------------------------------------------------------------- Karcher
class KarcherOptions(MethodOptions):
    max_iter: int = Field(10, ge=0)
    tol: float = Field(1e-5, gt=0.0)


@register_method("karcher")
class Karcher(_Base):
    """Karcher mean of the base and the experts (equal weights, as mergekit's ``karcher``,
    whose inputs include the base model), on the sphere and rescaled to the mean norm.
    It has no coefficients: prepare computes the mean, a build writes
    ``theta0 + scale * (karcher - theta0)``; genome weights are not used."""

    options_model = KarcherOptions
    fp32_dst_only = True

    def state_bytes(self, shape, n_experts, options, elem=4) -> int:
        return elem * math.prod(shape)

    def prepare_tensor(self, info, base, taus, options) -> torch.Tensor:
        inputs = [base] + [base + t for t in taus]
        mean = K.karcher_mean(inputs, [1.0 / len(inputs)] * len(inputs), options.max_iter, options.tol)
        return (mean.reshape(1, -1).float() - base.reshape(1, -1).float()).to(info.cache_dtype)

    def build_tensor(self, state, base, cand, dst, ws, options, ctx) -> None:
        _affine(base, state, _coef_tensor([cand.scale], base), dst, ws)


NEW_METHODS = ("della", "della_linear", "model_stock", "sce", "nuslerp", "multislerp", "karcher")
_ = Candidate  # re-exported for type checkers of build hooks


# --------------------------------------------------------------------------- NearSwap
class NearswapOptions(MethodOptions):
    """No static options: mergekit's ``t`` is the expert's genome weight."""


@dataclass
class NearswapState:
    tau: torch.Tensor  # (1, n) in the cache dtype
    absdiff: torch.Tensor  # (n,) float32: max(|theta0 - theta1|, 1e-6)


@register_method("nearswap")
class Nearswap(_Base):
    """NearSwap (mergekit's ``nearswap``): entries where the base and the expert are within
    ``t`` take the expert, the others move ``t`` towards it:
    ``theta = theta0 + scale * clamp(t / max(|tau|, 1e-6), 0, 1) * tau``, with ``t`` the
    expert's genome weight (mergekit has no scale: 1). ``|tau|`` is fixed in prepare."""

    options_model = NearswapOptions
    min_experts = 1
    max_experts = 1
    fp32_dst_only = True

    def state_bytes(self, shape, n_experts, options, elem=4) -> int:
        return (elem + 4) * math.prod(shape)

    def scratch(self, options, n_experts) -> tuple[int, str]:
        return 1, "4*max_numel"

    def prepare_tensor(self, info, base, taus, options) -> NearswapState:
        return NearswapState(_stack(taus, info.cache_dtype), taus[0].reshape(-1).float().abs().clamp(min=1e-6))

    def build_tensor(self, state, base, cand, dst, ws, options, ctx) -> None:
        w = ws.get("w", base.numel())
        torch.div(_coef_tensor([cand.weights[0]], base), state.absdiff, out=w)  # t / |a - b|, as mergekit divides
        w.clamp_(0, 1).mul_(state.tau[0])
        torch.add(base, w, alpha=cand.scale, out=dst)


# --------------------------------------------------------------------------- Arcee Fusion
class ArceeFusionOptions(MethodOptions):
    """No options (mergekit's ``arcee_fusion`` takes none)."""


def arcee_fusion_mask(base: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    """mergekit's fusion mask: ``importance = |expert - base| * KL(softmax(expert) || softmax(base))``
    (softmaxes along the last axis, ``+ 1e-8``; one KL per row), kept where ``importance >=
    median + 1.5 (q3 - q1)``, the quartiles read from the sorted importances at index
    ``int(q (n - 1))`` (float32 ``q``). mergekit estimates them from 10^6 random samples when a
    tensor has more entries; here they are always exact (deterministic)."""
    x, b = expert.float(), base.float()
    p = torch.softmax(x, dim=-1) + 1e-8
    q = torch.softmax(b, dim=-1) + 1e-8
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    importance = (x - b).abs() * kl
    flat = importance.reshape(-1)
    idx = (torch.tensor([0.25, 0.5, 0.75], dtype=torch.float32) * (flat.numel() - 1)).long()
    q1, median, q3 = torch.sort(flat).values[idx.to(flat.device)]
    return importance >= median + 1.5 * (q3 - q1)


@register_method("arcee_fusion")
class ArceeFusion(_Base):
    """Arcee Fusion (mergekit's ``arcee_fusion``): ``theta = theta0 + scale * m * tau`` with the
    importance mask ``m`` of :func:`arcee_fusion_mask`, computed in prepare. It has no
    coefficients (as karcher): genome weights are not used, a build is one axpy."""

    options_model = ArceeFusionOptions
    min_experts = 1
    max_experts = 1
    fp32_dst_only = True

    def state_bytes(self, shape, n_experts, options, elem=4) -> int:
        return elem * math.prod(shape)

    def prepare_tensor(self, info, base, taus, options) -> torch.Tensor:
        b = base.reshape(info.shape).float()
        tau = taus[0].reshape(info.shape).float()
        mask = arcee_fusion_mask(b, b + tau)
        return (tau * mask).reshape(1, -1).to(info.cache_dtype)

    def build_tensor(self, state, base, cand, dst, ws, options, ctx) -> None:
        _affine(base, state, _coef_tensor([cand.scale], base), dst, ws)


TWO_MODEL_METHODS = ("nearswap", "arcee_fusion")


# --------------------------------------------------------------------------- RAM
class RamOptions(MethodOptions):
    epsilon: float = Field(1e-5, ge=0.0)  # a task-vector entry counts as a change when |tau| > epsilon


class RamplusOptions(RamOptions):
    r: float = Field(0.1, ge=0.0)  # how much the unique entries of a model are boosted per unit of overlap ratio
    alpha: float = Field(0.2, ge=0.0)  # the overlap ratio's cap


def ram_delta(taus: list[torch.Tensor], epsilon: float, r: float | None = None, alpha: float = 0.0) -> torch.Tensor:
    """Reinforced agent merging (mergekit's ``ram`` / ``ramplus_tl``): each entry averages the
    deltas of the models that change it (``|tau| > epsilon``). With ``r`` (RAM+, per tensor),
    the entries only one model changes are scaled by ``1 + r * min(max(rho, 0), alpha)``, with
    ``rho`` that model's count of shared changed entries over its count of unique ones."""
    tv = torch.stack([t.reshape(-1).float() for t in taus])
    changed = tv.abs() > epsilon
    counts = changed.sum(0, keepdim=True)
    kept = tv * changed
    shared = kept * (counts > 1) / counts.clamp(min=1)
    unique = kept * (counts == 1)
    if r is not None:
        n_shared = (changed & (counts > 1)).sum(1).float()
        n_unique = (changed & (counts == 1)).sum(1).float()
        rho = n_shared / n_unique.clamp(min=epsilon)
        unique = unique * (1 + r * rho.clamp(min=0, max=alpha)).unsqueeze(-1)
    return (unique + shared).sum(0)


@register_method("ram")
class Ram(_Base):
    """RAM (mergekit's ``ram``): ``theta = theta0 + scale * ram_delta``. It has no coefficients
    (as karcher): prepare computes the merged delta, a build is one axpy; genome weights are
    not used."""

    options_model = RamOptions
    fp32_dst_only = True

    def state_bytes(self, shape, n_experts, options, elem=4) -> int:
        return elem * math.prod(shape)

    def _delta(self, taus, options) -> torch.Tensor:
        return ram_delta(taus, options.epsilon)

    def prepare_tensor(self, info, base, taus, options) -> torch.Tensor:
        return self._delta(taus, options).reshape(1, -1).to(info.cache_dtype)

    def build_tensor(self, state, base, cand, dst, ws, options, ctx) -> None:
        _affine(base, state, _coef_tensor([cand.scale], base), dst, ws)


@register_method("ramplus_tl")
class RamplusTl(Ram):
    """RAM+ with a tensor-local overlap ratio (mergekit's ``ramplus_tl``); see :func:`ram_delta`."""

    options_model = RamplusOptions

    def _delta(self, taus, options) -> torch.Tensor:
        return ram_delta(taus, options.epsilon, options.r, options.alpha)


RAM_METHODS = ("ram", "ramplus_tl")
