"""Uncached reference merges: every step recomputed from the task vectors per candidate.

This is the straightforward reading of the formulas (argsort top-k, fresh SVDs, ...).
It exists to check the cached ``build`` against (tests) and to time what caching saves
(benchmarks); it is not meant to be fast.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from evomerge.merge import kernels as K
from evomerge.merge.cache import genome_group, layer_of
from evomerge.merge.genome import Genome
from evomerge.merge.methods import RTsvm, Slerp, Tsvm, breadcrumbs_band, dare_rescale, get_method, parse_options


def _argsort_mask(x: torch.Tensor, keep: int, stable: bool) -> torch.Tensor:
    """mergekit's selection: the first ``keep`` of a descending argsort of ``|x|``."""
    mask = torch.zeros(x.numel(), dtype=torch.bool)
    if keep > 0:
        order = torch.argsort(x.abs().reshape(-1).float(), descending=True, stable=stable)
        mask[order[:keep]] = True
    return mask.view_as(x)


def _snapped_keep(density: float, n: int, grid: int | None) -> int:
    if grid is None or density >= 1:
        return K.mergekit_keep_count(density, n)
    k = (min(grid, max(0, round(density * grid))) * n) // grid
    return max(1, k) if density > 0 and n else k


def _l1_rescaled(tau: torch.Tensor, masked: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return masked
    before = float(tau.abs().sum(dtype=torch.float64))
    after = float(masked.abs().sum(dtype=torch.float64))
    return masked if before < 1e-7 or after < 1e-7 else masked * (before / after)


def _consensus(w: torch.Tensor, c: torch.Tensor, normalize: bool) -> torch.Tensor:
    elected = torch.where(w.sum(0) >= 0, 1.0, -1.0)
    agree = w.sign() == elected
    mixed = (w * agree).sum(0)
    if normalize:
        div = (c.view(-1, *[1] * (w.dim() - 1)) * agree).sum(0)
        div[div == 0] = 1
        mixed = mixed / div
    return mixed


def _delta(method: str, opts: Any, name: str, base: torch.Tensor, taus: list[torch.Tensor], w: list[float], d: list[float], ctx: Any) -> torch.Tensor:
    c = torch.tensor(w, dtype=torch.float32)
    stack = torch.stack(taus)
    cb = c.view(-1, *[1] * base.dim())
    if method in ("task_arithmetic", "linear"):
        mixed = (cb * stack).sum(0)
        total = sum(w)
        if opts.normalize:
            return mixed / (total if abs(total) >= 1e-8 else 1.0)
        return mixed + (total - 1.0) * base if method == "linear" else mixed
    if method == "ties" and opts.variant == "mergekit":
        stable = opts.density_grid is not None  # exact mode follows mergekit's (unstable) sort
        trimmed = torch.stack(
            [t * _argsort_mask(t, _snapped_keep(dk, t.numel(), opts.density_grid), stable) for t, dk in zip(taus, d)]
        )
        if opts.rescale:  # mergekit: each trimmed delta scaled back to its own L1 norm
            trimmed = torch.stack([_l1_rescaled(t, m, dk) for t, m, dk in zip(taus, trimmed, d)])
        return _consensus(cb * trimmed, c, opts.normalize)
    if method == "ties":  # original: global thresholds and majority come from ctx
        trimmed = torch.stack([t * (t.abs() >= thr) for t, thr in zip(taus, ctx["thresholds"])])
        wt = cb * trimmed
        elected = wt.sum(0).sign()
        elected[elected == 0] = ctx["majority"]
        sel = wt * (wt.sign() == elected)
        return sel.sum(0) / (sel != 0).sum(0).clamp(min=1)
    if method in ("breadcrumbs", "breadcrumbs_ties"):
        rows = []
        for t, dk in zip(taus, d):
            lo, hi = breadcrumbs_band(t.numel(), dk, opts.gamma)
            order = torch.argsort(t.abs().reshape(-1).float(), descending=True)
            mask = torch.zeros(t.numel(), dtype=torch.bool)
            mask[order[lo:hi]] = True
            masked = t * mask.view_as(t)
            rows.append(_l1_rescaled(t, masked, dk) if opts.rescale else masked)
        wt = cb * torch.stack(rows)
        if method == "breadcrumbs_ties":
            return _consensus(wt, c, opts.normalize)
        total = sum(w)
        return wt.sum(0) / (total if opts.normalize and abs(total) >= 1e-8 else 1.0)
    if method in ("dare_linear", "dare_ties"):
        rows = []
        for k, (t, dk) in enumerate(zip(taus, d)):
            # full-resolution field against the snapped density: what the 16-bit quantiles give
            u = K.keyed_uniform(K.tensor_key(opts.seed, ctx["experts"][k], name), torch.empty(t.numel()))
            m = (u < K.dare_level(dk) / K.DARE_GRID).view_as(t)
            masked = t * m
            rows.append(masked * dare_rescale(opts.rescale, dk, float(t.abs().sum(dtype=torch.float64)), masked))
        wt = cb * torch.stack(rows)
        if method == "dare_ties":
            return _consensus(wt, c, opts.normalize)
        total = sum(w)
        return wt.sum(0) / (total if opts.normalize and abs(total) >= 1e-8 else 1.0)
    if method == "slerp":
        state = Slerp().prepare_tensor(None, base, taus, opts)  # type: ignore[arg-type]
        a, b = Slerp.coefficients(w[0], state.theta, state.linear)
        return a * base + b * (base + taus[0]) - base
    if method in ("tsvm", "r_tsvm"):
        impl = get_method(method)
        assert isinstance(impl, Tsvm)
        if not impl.is_matrix(name, tuple(base.shape), len(taus), opts):
            vw = impl.vector_weights(taus, opts).view(-1, *[1] * base.dim())
            return (cb * vw * stack).sum(0)
        weights, keep_rank = impl.weights(taus, opts) if isinstance(impl, RTsvm) else (None, None)
        f = K.tsvm_factors(taus, keep_rank, getattr(opts, "order", "orth_then_trunc"), opts.drop_null_directions)
        assert f is not None
        eff = c if weights is None else c * weights.float()
        return (f.us * torch.repeat_interleave(eff, f.rank)[None, :]) @ f.vh
    if method in _MORE:
        return _delta_more(method, opts, name, base, taus, w, d, ctx)
    raise ValueError(f"no reference for method '{method}'")


_MORE = ("della", "della_linear", "model_stock", "sce", "nuslerp", "multislerp", "karcher", "nearswap", "arcee_fusion",
         "ram", "ramplus_tl")


def _delta_more(method: str, opts: Any, name: str, base: torch.Tensor, taus: list[torch.Tensor], w: list[float], d: list[float], ctx: Any) -> torch.Tensor:
    """mergekit's remaining methods, written out per candidate (mergekit's order of steps)."""
    from evomerge.merge import methods_more as M

    c = torch.tensor(w, dtype=torch.float32)
    cb = c.view(-1, *[1] * base.dim())
    if method in ("della", "della_linear"):
        rows = []
        for k, (t, dk) in enumerate(zip(taus, d)):
            u = K.keyed_uniform(K.tensor_key(opts.seed, ctx["experts"][k], name), torch.empty(t.numel()))
            s = u - 2.0 * opts.epsilon * K.della_rank_fraction(t)
            masked = t * M.della_mask(t, s, dk, opts.epsilon)
            rows.append(_l1_rescaled(t, masked, dk if dk > 0 else 1.0) if opts.rescale else masked)
        wt = cb * torch.stack(rows)
        if method == "della":
            return _consensus(wt, c, opts.normalize)
        total = sum(w)
        return wt.sum(0) / (total if opts.normalize and abs(total) >= 1e-8 else 1.0)
    if method == "model_stock":
        t = M.model_stock_ratio(taus, opts.filter_wise)
        mix = (cb * torch.stack(taus)).sum(0)
        if opts.filter_wise and base.dim() >= 2:
            return (mix.reshape(base.shape[0], -1) * t[:, None]).view_as(base)
        return mix * t
    if method == "sce":
        tv, agree, tvw = M.sce_select(taus, opts.select_topk)
        ew = (c * tvw)[:, None] * agree
        return ((tv * ew).sum(0) / ew.sum(0).clamp(min=1e-6)).view_as(base)
    if method == "nuslerp":
        v0, v1 = (taus[0], taus[1]) if opts.on_task_vectors else (base + taus[0], base + taus[1])
        tt = M.nuslerp_t(w)
        if opts.flatten or base.dim() < 2:
            a, b = v0.reshape(-1), v1.reshape(-1)
        else:
            a, b = v0.reshape(base.shape[0], -1), v1.reshape(base.shape[0], -1)
            a, b = (a.t(), b.t()) if opts.row_wise else (a, b)
        au = a / torch.norm(a, dim=-1, keepdim=True).clamp(min=1e-7)
        bu = b / torch.norm(b, dim=-1, keepdim=True).clamp(min=1e-7)
        cos = torch.sum(au * bu, dim=-1, keepdim=True).clamp(-1, 1)
        colinear = (1 - cos.square()) <= opts.eps**2
        theta = torch.acos(torch.where(colinear, 0, cos))
        res = (torch.sin((1 - tt) * theta) * a + torch.sin(tt * theta) * b) / torch.sin(theta)
        res = torch.where(colinear, (1 - tt) * a + tt * b, res)
        if not (opts.flatten or base.dim() < 2) and opts.row_wise:
            res = res.t()
        res = res.reshape(base.shape)
        return res if opts.on_task_vectors else res - base
    if method == "multislerp":  # mergekit's tangent-space algorithm, step by step
        xs = torch.stack([t.reshape(-1) for t in taus]) if opts.on_task_vectors else torch.stack([(base + t).reshape(-1) for t in taus])
        if len(taus) == 1:
            res = xs[0]
        else:
            wt = c / c.sum() if opts.normalize_weights else c
            norms = torch.norm(xs, dim=-1, keepdim=True)
            units = xs / (norms + opts.eps)
            mean = (units * wt.view(-1, 1)).sum(0)
            mnorm = torch.norm(mean)
            if mnorm < opts.eps and len(taus) == 2:
                res = xs[0] * wt[0] + xs[1] * wt[1]
            else:
                mean = mean / mnorm
                dots = (units * mean).sum(-1, keepdim=True)
                tangent = ((units - dots * mean) * wt.view(-1, 1)).sum(0)
                tn = torch.norm(tangent) + opts.eps
                res = (mean * torch.cos(tn) + tangent * (torch.sin(tn) / tn)) * (norms.squeeze(-1) * wt).sum()
        res = res.view_as(base)
        return res if opts.on_task_vectors else res - base
    if method == "karcher":
        inputs = [base] + [base + t for t in taus]
        return K.karcher_mean(inputs, [1.0 / len(inputs)] * len(inputs), opts.max_iter, opts.tol) - base
    if method == "nearswap":  # mergekit: w b + (1 - w) a with w = clamp(t / |a - b|, 0, 1)
        a, b = base, base + taus[0]
        wt = (w[0] / (a - b).abs().clamp(min=1e-6)).clamp(min=0, max=1)
        return wt * b + (1 - wt) * a - a
    if method == "arcee_fusion":  # mergekit's steps, with a full argsort for the quartiles
        a, b = base.float(), base.float() + taus[0].float()
        p = torch.softmax(b, dim=-1) + 1e-8
        q = torch.softmax(a, dim=-1) + 1e-8
        imp = (b - a).abs() * (p * (p / q).log()).sum(dim=-1, keepdim=True)
        order = imp.reshape(-1)[torch.argsort(imp.reshape(-1))]
        q1, med, q3 = (order[int(f * (order.numel() - 1))] for f in (torch.tensor(0.25), torch.tensor(0.5), torch.tensor(0.75)))
        return (b - a) * (imp >= med + 1.5 * (q3 - q1))
    if method in ("ram", "ramplus_tl"):  # mergekit's unique / overlap split, entry by entry
        tv = torch.stack([t.reshape(-1) for t in taus])
        nz = tv.abs() > opts.epsilon
        n = nz.sum(0, keepdim=True)
        lam = torch.ones(len(taus), 1)
        if method == "ramplus_tl":
            rho = (nz & (n > 1)).sum(1) / (nz & (n == 1)).sum(1).clamp(min=opts.epsilon)
            lam = (1 + opts.r * rho.clamp(min=0, max=opts.alpha)).unsqueeze(-1)
        z = tv * nz
        return (z * (n == 1) * lam + z * (n > 1) / n.clamp(min=1)).sum(0).view_as(base)
    raise ValueError(method)


def merge_uncached(pool: Any, method: str, options: Any, genome: Genome, num_layers: int | None = None) -> dict[str, torch.Tensor]:
    """Merged float32 state dict for ``genome``, recomputing every step (no cache)."""
    opts = parse_options(method, options)
    experts = list(pool.expert_names)
    items = list(pool.iter_task_vectors())
    names = [n for n, _, _ in items]
    layers = [layer_of(n) for n in names]
    nl = num_layers or getattr(pool, "num_layers", None) or max([l for l in layers if l >= 0], default=0) + 1  # noqa: E741
    ctx: dict[str, Any] = {"experts": experts}
    if method == "ties" and opts.variant == "original":
        # global (whole-model) trim per expert and global majority sign, as in the paper
        assert genome.n_groups == 1 and genome.densities is not None
        ctx["thresholds"] = []
        for k in range(len(experts)):
            flat = torch.cat([taus[k].abs().reshape(-1) for _, _, taus in items])
            dk = genome.densities[0][k]
            if opts.density_grid is not None and dk < 1:
                dk = min(opts.density_grid, max(0, round(dk * opts.density_grid))) / opts.density_grid
                keep_n = flat.numel() - (round(genome.densities[0][k] * opts.density_grid) * flat.numel()) // opts.density_grid
            else:
                keep_n = flat.numel() - int(flat.numel() * dk)
            ctx["thresholds"].append(-math.inf if dk >= 1 or keep_n < 1 else float(flat.kthvalue(keep_n).values))
        c = torch.tensor(genome.weights[0])
        total = 0.0
        for _, base, taus in items:
            trimmed = torch.stack([t * (t.abs() >= thr) for t, thr in zip(taus, ctx["thresholds"])])
            total += float((c.view(-1, *[1] * base.dim()) * trimmed).sum(0).sign().sum())
        ctx["majority"] = 1.0 if total >= 0 else -1.0
    out = {}
    for name, base, taus in items:
        g = genome_group(name, genome, nl)
        w = list(genome.weights[g])
        d = list(genome.densities[g]) if genome.densities is not None else [1.0] * len(w)
        out[name] = base + genome.scale * _delta(method, opts, name, base, taus, w, d, ctx)
    return out
