"""Merge methods behind one small protocol, registered by name.

Each method splits its work in two:

* ``prepare_tensor`` does everything that depends only on the task vectors (sorts,
  SVDs, statistics) and returns a per-tensor *state*;
* ``build_tensor`` turns a state plus one candidate's coefficients into merged weights,
  writing into a preallocated float32 buffer, with no sort, SVD or allocation of
  model-sized tensors.

States hold their task-vector-sized tensors in ``TensorInfo.cache_dtype`` (float32 by
default; bf16/fp16 halves the cache for models that would not fit otherwise). Builds
always widen to float32 before any arithmetic, and tables (TIES thresholds, DARE L1
norms) are computed in float32 from the values as stored, so they describe exactly
what a build compares.

The math is summarised in ``docs/merging.md``.
"""

from __future__ import annotations

import fnmatch
import functools
import itertools
import logging
import math
import struct
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from evomerge.errors import ConfigError
from evomerge.merge import fused as F
from evomerge.merge import kernels as K
from evomerge.registry import Registry

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- options
class MethodOptions(BaseModel):
    """Static options: fixed for a whole search, so they are part of the cache key."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class TaskArithmeticOptions(MethodOptions):
    normalize: bool = False


class LinearOptions(MethodOptions):
    normalize: bool = True


class TiesOptions(MethodOptions):
    normalize: bool = True
    variant: Literal["mergekit", "original"] = "mergekit"
    density_grid: int | None = Field(
        1024, ge=1, description="snap densities to g/G (tiny tables); null = exact densities (4 B/element/expert)"
    )
    rescale: bool = Field(False, description="mergekit's rescale: scale each trimmed delta back to its L1 norm")

    @model_validator(mode="after")
    def _rescale_needs_mergekit(self) -> TiesOptions:
        if self.rescale and self.variant == "original":
            raise ValueError("rescale: only the mergekit variant rescales trimmed deltas (the paper's TIES does not)")
        return self


class BreadcrumbsOptions(MethodOptions):
    normalize: bool = False
    rescale: bool = Field(False, description="scale each sparsified delta back to its L1 norm (mergekit's rescale)")
    gamma: float = Field(0.01, ge=0.0, le=1.0, description="fraction of the largest |tau| dropped as outliers")


class DareOptions(MethodOptions):
    normalize: bool = False
    rescale: Literal["inv_density", "l1", "none"] = "inv_density"
    seed: int = 0


class SlerpOptions(MethodOptions):
    dot_threshold: float = 0.9995
    eps: float = 1e-8


class TsvmOptions(MethodOptions):
    storage: Literal["auto", "dense", "factored"] = "auto"
    exclude: tuple[str, ...] = ()
    drop_null_directions: bool = False


class RTsvmOptions(TsvmOptions):
    beta: float = Field(0.1, ge=0.0, le=1.0)
    z: float = Field(3.0, gt=0.0)
    norm: Literal["fro", "l1"] = "fro"
    keep: Literal["centered", "raw"] = "centered"
    weight_mode: Literal["direct", "inverse"] = "direct"
    weight_norm: Literal["sum", "mean"] = "sum"
    std_correction: int = 1
    zero_tol: float = Field(0.0, ge=0.0)
    consensus: Literal["mean", "all_zero"] = "mean"
    order: Literal["orth_then_trunc", "trunc_then_orth"] = "orth_then_trunc"
    weight_1d: bool = False  # 1-D tensors: outlier weights with the vector as one row (default: plain mean)


# --------------------------------------------------------------------------- protocol
@dataclass
class TensorInfo:
    """What a method may know about a tensor besides its values."""

    name: str
    shape: tuple[int, ...]
    expert_names: list[str]
    cache_dtype: torch.dtype = torch.float32  # storage dtype of task-vector-sized state


@dataclass
class Candidate:
    """One layer group's genome values, resolved once per build."""

    coeffs: torch.Tensor  # (T,) float32 on the cache device
    weights: list[float]
    densities: list[float]
    scale: float


class Workspace(Protocol):
    compiled: bool  # run the fused kernels through torch.compile

    def get(self, name: str, numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor: ...


class MergeMethod(Protocol):
    name: ClassVar[str]
    options_model: ClassVar[type[MethodOptions]]
    uses_density: ClassVar[bool]
    min_experts: ClassVar[int]
    max_experts: ClassVar[int | None]

    def state_bytes(self, shape: tuple[int, ...], n_experts: int, options: Any, elem: int = 4) -> int: ...

    def prepare_tensor(self, info: TensorInfo, base: torch.Tensor, taus: list[torch.Tensor], options: Any) -> Any: ...

    def finalize(self, states: list[Any], options: Any) -> None: ...

    def begin_build(
        self, states: list[Any], candidates: list[Candidate], groups: list[int], options: Any, ws: Workspace
    ) -> Any: ...

    def build_tensor(
        self, state: Any, base: torch.Tensor, cand: Candidate, dst: torch.Tensor, ws: Workspace, options: Any, ctx: Any
    ) -> None: ...


METHODS = Registry("merge method")  # name -> MergeMethod instance


def register_method(name: str):
    """Class decorator: instantiate and register a method under ``name``."""

    def wrap(cls: type) -> type:
        inst = cls()
        inst.name = name
        METHODS[name] = inst
        return cls

    return wrap


def get_method(name: str) -> MergeMethod:
    return METHODS.lookup(name)


def parse_options(method: str, options: Any) -> MethodOptions:
    """Validate ``options`` (dict or options object) for ``method``; errors name the field."""
    impl = get_method(method)
    if isinstance(options, impl.options_model):
        return options
    if isinstance(options, BaseModel):
        options = options.model_dump()
    try:
        return impl.options_model.model_validate(options or {})
    except Exception as exc:  # pydantic.ValidationError -> one readable line per field
        errors = getattr(exc, "errors", None)
        if errors is None:
            raise
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]  # type: ignore[attr-defined]
        raise ConfigError(f"invalid options for method '{method}': " + "; ".join(parts)) from None


# --------------------------------------------------------------------------- shared helpers
def _affine(
    base: torch.Tensor, stack: torch.Tensor, coef: torch.Tensor, dst: torch.Tensor, ws: Workspace, beta: float = 1.0
) -> None:
    """``dst = beta*base + sum_k coef_k stack_k``: one BLAS gemv over the expert axis for an
    fp32 cache; a low-precision cache goes through the fused kernel that widens as it reads.
    """
    if base.dtype == torch.float32 and stack.dtype == torch.float32:
        torch.addmv(base, stack.t(), coef, beta=beta, out=dst)
        return
    F.run("affine", ws.compiled, dst, base, stack, coef, torch.tensor(beta, dtype=torch.float32, device=base.device))


def _abs_into(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``|x|`` into the fp32 buffer ``out``, widening a bf16/fp16 ``x`` first."""
    if x.dtype == out.dtype:
        return torch.abs(x, out=out)
    return out.copy_(x).abs_()


def masked_ties(
    dst: torch.Tensor, base: torch.Tensor, taus: torch.Tensor, keep: torch.Tensor, num: torch.Tensor,
    coeffs: torch.Tensor, scale: float, normalize: bool, ws: Workspace,
) -> None:
    """``dst = base + scale * TIES(keep * num * taus)``: sign election by the sum, disjoint
    sum, divided by the agreeing ``coeffs`` with ``normalize``.

    The masks' TIES on the eager path (DELLA, breadcrumbs_ties): a few whole-``(T, n)``
    in-place passes in the workspace, overwriting ``keep``. The per-expert kernel with
    scalar ``torch.where`` calls took 25x longer per tensor; compiled builds fuse
    ``ties_masked`` instead. Same operations as the reference's consensus, so cached and
    uncached builds agree to float rounding.
    """
    t, n = taus.shape
    w = keep.mul_(taus).mul_(num[:, None])  # kept, weighted values
    total = ws.get("ties_sum", n)
    sgn = ws.get("ties_sign", n)
    torch.sum(w, 0, out=total)
    torch.ge(total, 0, out=sgn)
    sgn.mul_(2).sub_(1)  # elected sign: +1 where the sum is >= 0, else -1
    agree = ws.get("abs", t * n).view(t, n)
    torch.mul(w, sgn, out=agree).clamp_(min=0)  # > 0 exactly where a kept value agrees
    torch.sum(agree, 0, out=total)
    total.mul_(sgn)
    if normalize:
        torch.gt(agree, 0, out=w)
        torch.mv(w.t(), coeffs, out=sgn)  # sum of the agreeing experts' coefficients
        sgn.masked_fill_(sgn == 0, 1.0)
        total.div_(sgn)
    torch.add(base, total, alpha=scale, out=dst) if base.dtype == dst.dtype else dst.copy_(base.float().add_(total, alpha=scale))


def _coef_tensor(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=like.device)


def _stack(taus: list[torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Flat ``(T, n)`` task vectors in the cache's storage dtype."""
    return torch.stack([t.reshape(-1).to(dtype) for t in taus]).contiguous()  # taus arrive in fp32


class _Base:
    """Defaults for the optional hooks."""

    min_experts: ClassVar[int] = 1
    max_experts: ClassVar[int | None] = None
    uses_density: ClassVar[bool] = False

    def finalize(self, states: list[Any], options: Any) -> None:
        return None

    def begin_build(
        self, states: list[Any], candidates: list[Candidate], groups: list[int], options: Any, ws: Workspace
    ) -> Any:
        return None


# --------------------------------------------------------------------------- TA / linear
@register_method("task_arithmetic")
class TaskArithmetic(_Base):
    """``theta = theta0 + lambda * sum_k c_k tau_k`` (``/ sum c`` with normalize), section 1."""

    options_model = TaskArithmeticOptions

    def state_bytes(self, shape, n_experts, options, elem=4) -> int:
        return elem * n_experts * math.prod(shape)

    def prepare_tensor(self, info, base, taus, options) -> torch.Tensor:
        return _stack(taus, info.cache_dtype)

    def _divisor(self, cand: Candidate, normalize: bool) -> float:
        total = sum(cand.weights)
        return total if normalize and abs(total) >= 1e-8 else 1.0

    def build_tensor(self, state, base, cand, dst, ws, options, ctx) -> None:
        factor = cand.scale / self._divisor(cand, options.normalize)
        _affine(base, state, cand.coeffs * factor, dst, ws)


@register_method("linear")
class Linear(TaskArithmetic):
    """mergekit ``linear``: ``sum_k w_k theta_k`` (``/ sum w`` with normalize, the default).

    Written on task vectors: without normalize the base enters with weight ``sum w``,
    so ``theta = theta0 + lambda * (sum_k w_k tau_k + (sum w - 1) theta0)``.
    """

    options_model = LinearOptions

    def build_tensor(self, state, base, cand, dst, ws, options, ctx) -> None:
        div = self._divisor(cand, options.normalize)
        extra = 0.0 if options.normalize else sum(cand.weights) - 1.0
        _affine(base, state, cand.coeffs * (cand.scale / div), dst, ws, beta=1.0 + cand.scale * extra)


# --------------------------------------------------------------------------- TIES
@dataclass
class TiesState:
    taus: torch.Tensor  # (T, n)
    tables: list[Any]  # MagnitudeTable per expert (mergekit) or shared ThresholdTable (original)


@register_method("ties")
class Ties(_Base):
    """TIES (section 2): trim per tensor by magnitude, elect the sign of the weighted sum,
    disjoint (weighted) mean. ``variant="original"`` follows the paper: global top-k with
    ``>=``, zero sign -> global majority, unweighted ``dis-mean`` count.
    """

    options_model = TiesOptions
    uses_density = True
    one_launch_devices: ClassVar[tuple[str, ...]] = ("cuda",)  # where _device_tables is used

    def state_bytes(self, shape, n_experts, options, elem=4) -> int:
        n = math.prod(shape)
        table = 4 * n if options.density_grid is None else 24 * (options.density_grid + 1)
        return n_experts * (elem * n + (0 if options.variant == "original" else table))

    def prepare_tensor(self, info, base, taus, options) -> TiesState:
        stack = _stack(taus, info.cache_dtype)  # tables read these stored values, widened to fp32
        if options.variant == "original":
            return TiesState(stack, [])  # global tables are built in finalize()
        return TiesState(stack, [K.MagnitudeTable(row, options.density_grid, l1=options.rescale) for row in stack])

    @staticmethod
    def _num(state: TiesState, cand: Candidate, options: Any) -> torch.Tensor | None:
        """Kept-value multipliers ``c_k * ||tau_k||_1/||trim(tau_k)||_1`` with ``rescale``, else None."""
        if not getattr(options, "rescale", False):
            return None
        f = [table.rescale(d) for table, d in zip(state.tables, cand.densities)]
        return cand.coeffs * torch.tensor(f, dtype=torch.float32, device=cand.coeffs.device)

    def finalize(self, states: list[TiesState], options) -> None:
        if options.variant != "original" or not states:
            return
        for k in range(states[0].taus.shape[0]):
            table = K.ThresholdTable(torch.cat([s.taus[k].abs() for s in states]), options.density_grid)
            for s in states:
                s.tables.append(table)

    def _weighted(self, state: TiesState, cand: Candidate, ws, options) -> torch.Tensor:
        t, n = state.taus.shape
        absb = ws.get("abs", t * n).view(t, n)
        keep = ws.get("keep", t * n).view(t, n)  # float 0/1 masks: far faster than bool on CPU
        _abs_into(state.taus, absb)
        for k, table in enumerate(state.tables):
            torch.ge(absb[k], table.threshold(cand.densities[k]), out=keep[k])
        keep.mul_(cand.coeffs[:, None])
        w = ws.get("w", t * n).view(t, n)
        return torch.mul(state.taus, keep, out=w)

    def begin_build(self, states, candidates, groups, options, ws) -> Any:
        if options.variant != "original":
            return self._device_tables(states, candidates, groups)
        if len(candidates) > 1:
            raise ConfigError("ties variant 'original' trims over the whole model: use a genome with one layer group")
        # Zero elected signs take the model-wide majority sign: a first pass sums sign(S).
        total = 0.0
        for state, g in zip(states, groups):
            w = self._weighted(state, candidates[g], ws, options)
            total += float(torch.sign(w.sum(0)).sum())
        return 1.0 if total >= 0 else -1.0  # ties (incl. empty) -> +

    @staticmethod
    def _device_tables(states: list[TiesState], candidates: list[Candidate], groups: list[int]) -> Any:
        """On a GPU: every tensor's (threshold, cut) pairs for this candidate, sent in one copy.

        Per-tensor copies of a few numbers each stall the GPU (a pageable host-to-device
        copy waits for the stream); one table per build and a single-launch kernel per
        tensor do not. Returns None on the CPU or when exact-density ties need masks.
        """
        if not states or states[0].taus.device.type not in Ties.one_launch_devices:
            return None
        thr, cut, scales = [], [], []
        for state, g in zip(states, groups):
            queries = [table.query(d) for table, d in zip(state.tables, candidates[g].densities)]
            if any(q.ties is not None for q in queries):
                return None
            thr.append([q.threshold for q in queries])
            cut.append([q.cut for q in queries])
            scales.append(candidates[g].scale)
        dev = states[0].taus.device
        rows = {id(s): i for i, s in enumerate(states)}
        return rows, torch.tensor(thr, dtype=torch.float32).to(dev), torch.tensor(cut, dtype=torch.int64).to(dev), torch.tensor(scales, dtype=torch.float32).to(dev)

    def build_tensor(self, state, base, cand, dst, ws, options, ctx) -> None:
        if options.variant == "mergekit" and ctx is not None:
            rows, thr, cut, scales = ctx
            i = rows[id(state)]
            F.run("ties_cut", ws.compiled, dst, state.taus, base, thr[i], cut[i], cand.coeffs, scales[i], options.normalize, self._num(state, cand, options))
            return
        if options.variant == "mergekit":
            num = self._num(state, cand, options)
            queries = [table.query(d) for table, d in zip(state.tables, cand.densities)]
            scale = torch.tensor(cand.scale, dtype=torch.float32, device=base.device)
            if any(q.ties is not None for q in queries):  # exact mode, ties straddle the cut
                t, n = state.taus.shape
                keep = ws.get("keep", t * n).view(t, n)
                absb = ws.get("abs", n)
                for k, q in enumerate(queries):
                    K.topk_keep(_abs_into(state.taus[k], absb), q, keep[k])
                F.run("ties_masked", ws.compiled, dst, state.taus, keep, base, cand.coeffs, scale, options.normalize, num)
                return
            # Expert k keeps |x| >= t_k before its cut index and |x| > t_k after; split the
            # tensor at the cuts so each piece is one strict comparison per expert.
            n = base.numel()
            t_strict = torch.tensor([q.threshold for q in queries], dtype=torch.float32)
            t_loose = torch.nextafter(t_strict, torch.tensor(-math.inf))  # x >= t  <=>  x > t_loose
            bounds = sorted({0, n, *(q.cut for q in queries if 0 < q.cut < n)})
            for lo, hi in zip(bounds, bounds[1:]):
                thr = torch.where(torch.tensor([lo < q.cut for q in queries]), t_loose, t_strict).to(base.device)
                F.run("ties", ws.compiled, dst[lo:hi], state.taus[:, lo:hi], base[lo:hi], thr, cand.coeffs, scale, options.normalize, num)
            return
        # original variant: global thresholds and the model-wide majority sign (ctx)
        t, n = state.taus.shape
        w = self._weighted(state, cand, ws, options)
        delta = ws.get("delta", n)
        sign = ws.get("sign", n)
        scratch = ws.get("abs", t * n).view(t, n)
        torch.sum(w, 0, out=sign)
        sign.sign_()
        sign.masked_fill_(sign == 0, ctx)
        torch.mul(w, sign, out=scratch)
        scratch.clamp_(min=0)
        torch.sum(scratch, 0, out=delta).mul_(sign)
        count = scratch.sign_().sum(0).clamp_(min=1)  # agreeing nonzero entries
        delta.div_(count)
        torch.add(base, delta, alpha=cand.scale, out=dst)


# --------------------------------------------------------------------------- breadcrumbs
def breadcrumbs_band(n: int, density: float, gamma: float) -> tuple[int, int]:
    """Ranks ``[lo, hi)`` (by descending ``|tau|``) that breadcrumbs keeps, as mergekit 0.1.5.

    ``K = int(d*n)`` entries are kept (none when ``K == 0``, all at ``d >= 1``) after the
    ``int(gamma*n)`` largest are dropped, fewer dropped when that would leave under K.
    """
    if density >= 1:
        return 0, n
    k = max(0, int(density * n))
    top = min(int(gamma * n), n - k)
    return top, top + k


BREADCRUMBS_BLOCK = 256  # ranks per sampled magnitude / L1 prefix sum
_RUN_WINDOW = 16  # ranks read inside each end of a band per build, where runs of equal magnitudes are looked for first


def _f32_step(v: float, up: bool) -> float:
    """The float32 neighbour of the float32 magnitude ``v >= 0`` towards +inf (``up``) or
    -inf, as ``torch.nextafter`` gives it: ``|x| <= v`` is ``|x| < step(v, up)``."""
    if (math.isinf(v) and up) or (v == 0 and not up):
        return v if up else -_f32_step(0.0, True)
    bits = struct.unpack("<I", struct.pack("<f", v))[0]
    return struct.unpack("<f", struct.pack("<I", bits + (1 if up else -1)))[0]


@functools.cache
def _run_offsets(w: int, device: torch.device) -> torch.Tensor:
    """Rank offsets of a plan's probe from ``(lo, hi)``: ``-1, 0..w-1`` and ``-w..-1, 0``."""
    return torch.tensor([-1, *range(w), *range(-w, 0), 0], dtype=torch.int64, device=device)


@dataclass
class BreadcrumbsState:
    taus: torch.Tensor  # (T, n)
    order: torch.Tensor  # (T, n) int32: descending-|tau| order (mergekit's CPU argsort)
    neg_samples: torch.Tensor  # (T, ceil(n/B)) float32: -|tau| at ranks 0, B, 2B, ... (B = BREADCRUMBS_BLOCK; ascending), host
    csum: torch.Tensor | None  # (T, ceil(n/B) + 1) float64: L1 of the first j*B ranks, on the host (rescale only)
    l1: list[float]  # ||tau_k||_1


@dataclass
class BandPlan:
    """One tensor's breadcrumbs masks for one candidate: expert k keeps ``lo_k < |x| < hi_k``
    plus the listed indices (entries tied with a cut value whose rank is inside the band)."""

    lo: list[float]  # float32 values
    hi: list[float]
    factors: list[float]  # kept-value multipliers (weights, L1 rescale, / sum c)
    ties: list[torch.Tensor | None]  # per expert: flat indices kept besides the strict band (no repeats)


@register_method("breadcrumbs")
class Breadcrumbs(_Base):
    """Model Breadcrumbs (arXiv 2312.06795), mergekit semantics: per tensor and expert keep
    the ``K = int(d*n)`` largest ``|tau|`` after dropping the ``gamma`` outliers on top,
    optionally rescale to the L1 norm, then a weighted sum (``/ sum c`` with normalize).

    The sort is done once in prepare (the int32 order, 4 B per element and expert, plus
    every 256th sorted magnitude and, with rescale, L1 prefix sums every 256 ranks). The
    kept band of ranks ``[lo, hi)`` is then a band of magnitudes: a build reads the two
    cut magnitudes and compares ``|tau|`` with them in the same pass that merges (no
    extra bytes per element). Entries tied with a cut value are kept exactly as
    mergekit's (unstable) argsort orders them: when a run of equal magnitudes straddles a
    cut, the band excludes the value and the run's in-band ranks are listed (a slice of
    the order), then those few outputs are recomputed. Any density is exact.
    """

    options_model = BreadcrumbsOptions
    uses_density = True
    ties: ClassVar[bool] = False

    def state_bytes(self, shape, n_experts, options, elem=4) -> int:
        n = math.prod(shape)
        blocks = -(-n // BREADCRUMBS_BLOCK)
        return n_experts * ((elem + 4) * n + 4 * blocks + (8 * (blocks + 1) if options.rescale else 0))

    def prepare_tensor(self, info, base, taus, options) -> BreadcrumbsState:
        stack = _stack(taus, info.cache_dtype)
        t, n = stack.shape
        order = torch.empty((t, n), dtype=torch.int32)
        blocks = -(-n // BREADCRUMBS_BLOCK)
        neg_samples = torch.empty((t, blocks), dtype=torch.float32)
        csum = torch.zeros((t, blocks + 1), dtype=torch.float64) if options.rescale else None
        for k, row in enumerate(stack):
            mags = row.abs().float().cpu()
            o = torch.argsort(mags, descending=True)  # mergekit's order (ties included)
            order[k] = o.to(torch.int32)
            desc = mags[o]
            neg_samples[k] = -desc[::BREADCRUMBS_BLOCK]
            if csum is not None:
                pad = torch.zeros(blocks * BREADCRUMBS_BLOCK, dtype=torch.float64)
                pad[:n] = desc.double()
                csum[k, 1:] = torch.cumsum(pad.view(blocks, -1).sum(1), 0)
        l1 = [float(row.abs().sum(dtype=torch.float64)) for row in stack]
        return BreadcrumbsState(stack, order.to(stack.device), neg_samples, csum, l1)

    # -- per-candidate band lookups (a handful of small gathers per tensor)
    @staticmethod
    def _mags(state: BreadcrumbsState, k: int, lo: int, hi: int) -> torch.Tensor:
        """Sorted magnitudes at ranks ``[lo, hi)`` (float32, on the host)."""
        return state.taus[k].index_select(0, state.order[k, lo:hi]).abs().float().cpu()

    def _run_edge(self, state: BreadcrumbsState, k: int, a: float, end: bool) -> int:
        """First rank with ``|x| < a`` (``end``) or with ``|x| <= a`` (the start of ``a``'s run)."""
        n = state.taus.shape[1]
        b = BREADCRUMBS_BLOCK
        j = int(torch.searchsorted(state.neg_samples[k], -a, right=end))
        lo = max(0, (j - 1) * b)
        window = self._mags(state, k, lo, min(j * b + 1, n))  # descending, <= B + 1 values
        return lo + int(torch.searchsorted(window.neg_(), -a, right=end))

    def _kept_l1(self, state: BreadcrumbsState, k: int, lo: int, hi: int) -> float:
        assert state.csum is not None
        b = BREADCRUMBS_BLOCK

        def prefix(r: int) -> float:
            j = r // b
            return float(state.csum[k, j]) + float(self._mags(state, k, j * b, r).double().sum())

        return prefix(hi) - prefix(lo)

    def _plan(self, state: BreadcrumbsState, cand: Candidate, options: Any) -> BandPlan:
        t, n = state.taus.shape
        total = sum(cand.weights)
        div = total if not self.ties and options.normalize and abs(total) >= 1e-8 else 1.0
        bands = [breadcrumbs_band(n, d, options.gamma) for d in cand.densities]
        # magnitudes just outside both ends of every band and the W ranks inside each end:
        # one gather for all experts; the runs of equal magnitudes at a cut are usually found
        # in these windows (python floats from here: a build plans every tensor, and each
        # torch call on a handful of values costs more than the merge of a small tensor)
        w = _RUN_WINDOW
        dev = state.order.device
        ends = torch.tensor(bands, dtype=torch.int64, device=dev).repeat_interleave(w + 1, 1)  # lo x (w+1), hi x (w+1)
        probe = ends.add_(_run_offsets(w, dev)).clamp_(0, n - 1)  # ranks lo-1, lo..lo+w-1, hi-w..hi-1, hi
        mags = state.taus.gather(1, state.order.gather(1, probe).to(torch.int64)).abs_().tolist()
        lo_t, hi_t, factors, ties = [], [], [], []
        for k, (lo, hi) in enumerate(bands):
            f = cand.weights[k] / div
            tie = None
            if hi <= lo:
                lo_t.append(math.inf), hi_t.append(math.inf)
            elif hi - lo >= n:
                lo_t.append(-math.inf), hi_t.append(math.inf)
            else:
                m = mags[k]
                prev, top, bot, nxt = m[0], m[1], m[2 * w], m[2 * w + 1]
                lists = []
                # (a run of zeros needs no list: a kept zero adds nothing, and TIES counts only nonzero votes)
                if lo > 0 and prev == top:  # the run of the top value straddles the outlier cut
                    hi_t.append(top)
                    if top > 0:
                        end = next((r for r, v in zip(range(lo, min(lo + w, hi)), m[1 : w + 1]) if v < top), None)
                        if end is None:  # the run reaches past the window (or fills the band)
                            end = hi if lo + w >= hi else min(self._run_edge(state, k, top, True), hi)
                        lists.append(state.order[k, lo:end])
                else:
                    hi_t.append(_f32_step(top, up=True))  # |x| <= top
                if hi < n and nxt == bot:  # the run of the bottom value straddles the K-th cut
                    lo_t.append(bot)
                    if bot > 0:
                        start = next((r + 1 for r, v in zip(range(hi - 1, max(hi - w, lo) - 1, -1), m[2 * w : w : -1]) if v > bot), None)
                        if start is None:
                            start = lo if hi - w <= lo else max(self._run_edge(state, k, bot, False), lo)
                        lists.append(state.order[k, start:hi])
                else:
                    lo_t.append(_f32_step(bot, up=False))  # |x| >= bot
                if len(lists) == 2 and top == bot:  # one run holds the whole band: both lists are order[lo:hi]
                    lists = lists[:1]
                tie = (torch.cat(lists) if len(lists) > 1 else lists[0]).to(torch.int64) if lists else None
                if options.rescale:
                    kept = self._kept_l1(state, k, lo, hi)
                    if kept >= 1e-7 and state.l1[k] >= 1e-7:
                        f *= state.l1[k] / kept
            factors.append(f)
            ties.append(tie)
        return BandPlan(lo_t, hi_t, factors, ties)

    def begin_build(self, states, candidates, groups, options, ws) -> Any:
        """Compiled builds: every tensor's bands and factors, sent to the device in one copy,
        and for TIES the merged deltas at every listed (tied) entry of the build."""
        if not ws.compiled or not states:
            return None
        dev = states[0].taus.device
        plans = [self._plan(s, candidates[g], options) for s, g in zip(states, groups)]
        t = len(candidates[0].weights)
        rows = torch.tensor([[*p.lo, *p.hi, *p.factors, candidates[g].scale] for p, g in zip(plans, groups)], dtype=torch.float32).to(dev)
        fixes = self._tie_deltas(states, plans, [candidates[g].coeffs for g in groups], rows, options) if self.ties else {}
        return {id(s): (rows[i, :t], rows[i, t : 2 * t], rows[i, 2 * t : 3 * t], rows[i, 3 * t], p, fixes.get(i))
                for i, (s, p) in enumerate(zip(states, plans))}

    def _tie_deltas(self, states, plans: list[BandPlan], coeffs: list[torch.Tensor], rows: torch.Tensor,
                    options: Any) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """TIES at the listed entries of every tensor, as one batch: ``{tensor: (indices,
        merged delta)}``. A build has listed entries in about half its tensors (a few each on
        real checkpoints); recomputing them per tensor cost more host time than the merge
        itself. The entries' columns are merged with exactly the kernel's operations."""
        t = rows.shape[1] // 3
        sel, idxs, xs, forced = [], [], [], []
        for i, (state, plan) in enumerate(zip(states, plans)):
            lists = [x for x in plan.ties if x is not None]
            if not lists:
                continue
            idx = torch.unique(torch.cat(lists)) if len(lists) > 1 else lists[0].sort().values
            sel.append(i), idxs.append(idx), xs.append(state.taus.index_select(1, idx).float())
        if not sel:
            return {}
        sizes = [len(idx) for idx in idxs]
        total = sum(sizes)
        for i, idx, off in zip(sel, idxs, itertools.accumulate(sizes, initial=0)):  # flat (expert, column) positions kept by a list
            forced += [torch.searchsorted(idx, tie) + (k * total + off) for k, tie in enumerate(plans[i].ties) if tie is not None]
        counts = torch.tensor(sizes, device=rows.device)
        cols = torch.cat([rows[sel, : 3 * t], torch.stack([coeffs[i] for i in sel])], 1).repeat_interleave(counts, 0).t()
        lo, hi, factors, coef = cols[:t], cols[t : 2 * t], cols[2 * t : 3 * t], cols[3 * t :]
        x = torch.cat(xs, 1)  # (T, total)
        a = x.abs()
        keep = (a > lo) & (a < hi)
        keep.view(-1).index_fill_(0, torch.cat(forced), True)
        delta = F._consensus(list(torch.where(keep, x * factors, 0.0).unbind(0)), coef, options.normalize)
        return {i: (idx, d) for i, idx, d in zip(sel, idxs, delta.split(sizes))}

    def build_tensor(self, state, base, cand, dst, ws, options, ctx) -> None:
        if ctx is not None:
            lo, hi, factors, scale, plan, fix = ctx[id(state)]
            F.run("breadcrumbs", ws.compiled, dst, state.taus, base, lo, hi, factors, cand.coeffs, scale, self.ties, options.normalize)
            if fix is not None:  # TIES: the outputs at the listed entries, merged with the exact masks
                idx, delta = fix
                dst.index_copy_(0, idx, (base[idx].float() + scale * delta).to(dst.dtype))
            elif not self.ties:  # a sum: add the listed (in-band, tied) entries' terms
                for k, tie in enumerate(plan.ties):
                    if tie is not None:
                        dst.index_add_(0, tie, (state.taus[k, tie].float() * (factors[k] * scale)).to(dst.dtype))
            return
        plan = self._plan(state, cand, options)
        t, n = state.taus.shape
        keep = ws.get("keep", t * n).view(t, n)
        absb = ws.get("abs", n)
        below = ws.get("below", n, torch.bool)
        for k in range(t):
            _abs_into(state.taus[k], absb)
            torch.gt(absb, plan.lo[k], out=keep[k])
            keep[k].mul_(torch.lt(absb, plan.hi[k], out=below))
            if plan.ties[k] is not None:
                keep[k].index_fill_(0, plan.ties[k], 1)
        num = torch.tensor(plan.factors, dtype=torch.float32, device=state.taus.device)
        if self.ties:
            masked_ties(dst, base, state.taus, keep, num, cand.coeffs, cand.scale, options.normalize, ws)
            return
        keep.mul_(state.taus)  # the kept tau values (fp32) overwrite the mask
        _affine(base, keep, num * cand.scale, dst, ws)


@register_method("breadcrumbs_ties")
class BreadcrumbsTies(Breadcrumbs):
    """Breadcrumbs sparsification, then TIES's sign election and disjoint (weighted) merge."""

    ties = True


# --------------------------------------------------------------------------- DARE
@dataclass
class DareState:
    taus: torch.Tensor  # (T, n)
    words: torch.Tensor  # (ceil(T/2), n) int32: each expert's 16-bit uniform quantile, two per word (K.level_words)
    l1: torch.Tensor  # (T,) float32: ||tau_k||_1, for the L1-matching rescale


class _Dare(_Base):
    """DARE (section 3): keep ``u < d`` from a keyed uniform field, rescale, then merge.

    ``u`` is a counter-based hash of ``(seed, expert, tensor, index)``, hashed once in
    prepare and kept as 16-bit quantiles (2 B per element and expert, packed two experts
    per int32 word), so a build is an integer compare instead of a hash. The mask's density snaps to the nearest ``g/65536``
    (like TIES's ``density_grid``); masks still nest across densities and need no
    per-density storage. The rescale uses the requested density.
    """

    options_model = DareOptions
    uses_density = True
    ties: ClassVar[bool] = False

    def state_bytes(self, shape, n_experts, options, elem=4) -> int:
        return (elem * n_experts + 4 * -(-n_experts // 2)) * math.prod(shape)

    def prepare_tensor(self, info, base, taus, options) -> DareState:
        stack = _stack(taus, info.cache_dtype)
        u = torch.empty(stack.shape[1], dtype=torch.float32, device=stack.device)
        words = K.level_words(*stack.shape, device=stack.device)
        for k, e in enumerate(info.expert_names):  # one field at a time: prepare's peak stays small
            K.pack_level(words, k, K.dare_quantiles(K.keyed_uniform(K.tensor_key(options.seed, e, info.name), u)))
        # float64 sums: torch's fp32 vector_norm(ord=1) is ~4% low on 25M-entry tensors
        l1 = torch.stack([row.abs().sum(dtype=torch.float64) for row in stack]).float()
        return DareState(stack, words, l1)

    def _factors(self, cand: Candidate, options: Any) -> list[float]:
        if options.rescale == "l1":
            factors = list(cand.weights)  # the L1 ratio is computed inside the kernel
        else:
            factors = [w * dare_rescale(options.rescale, d) for w, d in zip(cand.weights, cand.densities)]
        total = sum(cand.weights)
        if not self.ties and options.normalize and abs(total) >= 1e-8:
            factors = [f / total for f in factors]
        return factors

    def begin_build(self, states, candidates, groups, options, ws) -> dict[int, tuple[torch.Tensor, ...]]:
        """Each layer group's kernel arguments, sent to the device in one copy per build
        (per-tensor copies of a few numbers each would stall a GPU stream)."""
        dev = states[0].taus.device if states else torch.device("cpu")
        rows = []
        for cand in candidates:
            levels = [K.dare_level(d) for d in cand.densities]
            rows.append([*levels, *cand.densities, *self._factors(cand, options), cand.scale])
        packed = torch.tensor(rows, dtype=torch.float64).to(dev)  # exact for all of these values
        t = len(candidates[0].weights) if candidates else 0
        out = {}
        for cand, row in zip(candidates, packed):
            levels = row[:t].to(torch.int32)
            floats = row[t:].to(torch.float32)  # one rounding from double, as torch.tensor(list) does
            out[id(cand)] = (levels, floats[:t], floats[t : 2 * t], floats[2 * t])
        return out

    def build_tensor(self, state, base, cand, dst, ws, options, ctx) -> None:
        levels, dens, factors, scale = ctx[id(cand)]
        F.run(
            "dare",
            ws.compiled,
            dst,
            state.taus,
            base,
            F.level_words_arg(state.words),  # int32 or a float32 view, whichever loads faster here
            levels,
            dens,
            factors,
            cand.coeffs,
            state.l1,
            scale,
            self.ties,
            options.normalize,
            options.rescale == "l1",
        )


def dare_rescale(mode: str, density: float, l1_before: float = 0.0, masked: torch.Tensor | None = None) -> float:
    """Rescale factor of a DARE-masked delta: ``1/d``, L1-matching (mergekit >= 0.1) or 1."""
    if density >= 1:
        return 1.0
    if density <= 0:
        return 0.0
    if mode == "inv_density":
        return 1.0 / density
    if mode == "l1":
        assert masked is not None
        after = float(masked.abs().sum(dtype=torch.float64))
        return 1.0 if l1_before < 1e-7 or after < 1e-7 else l1_before / after
    return 1.0


@register_method("dare_linear")
class DareLinear(_Dare):
    pass


@register_method("dare_ties")
class DareTies(_Dare):
    ties = True


# --------------------------------------------------------------------------- SLERP
@dataclass
class SlerpState:
    tau: torch.Tensor  # (1, n)
    theta: float
    linear: bool


@register_method("slerp")
class Slerp(_Base):
    """Spherical interpolation base -> expert at ``t`` = the expert's weight (mergekit semantics:
    whole flattened tensor, fp32, lerp when ``|cos| > dot_threshold``).
    """

    options_model = SlerpOptions
    max_experts = 1

    def state_bytes(self, shape, n_experts, options, elem=4) -> int:
        return elem * math.prod(shape)

    def prepare_tensor(self, info, base, taus, options) -> SlerpState:
        v0 = base.reshape(-1).float()
        v1 = v0 + taus[0].reshape(-1).float()
        n0, n1 = v0.norm(), v1.norm()
        n0 = n0 if n0 > options.eps else torch.tensor(1.0)
        n1 = n1 if n1 > options.eps else torch.tensor(1.0)
        dot = float(((v0 / n0) * (v1 / n1)).sum().clamp(-1, 1))
        linear = abs(dot) > options.dot_threshold
        dtype = info.cache_dtype if info is not None else torch.float32  # the reference passes no info
        return SlerpState(_stack(taus, dtype), 0.0 if linear else math.acos(dot), linear)

    @staticmethod
    def coefficients(t: float, theta: float, linear: bool) -> tuple[float, float]:
        if linear:
            return 1.0 - t, t
        s = math.sin(theta)
        return math.sin((1 - t) * theta) / s, math.sin(t * theta) / s

    def build_tensor(self, state, base, cand, dst, ws, options, ctx) -> None:
        a, b = self.coefficients(cand.weights[0], state.theta, state.linear)
        lam = cand.scale
        # slerp = a*theta0 + b*(theta0 + tau); then theta = theta0 + lam*(slerp - theta0)
        _affine(base, state.tau, _coef_tensor([lam * b], base), dst, ws, beta=1.0 + lam * (a + b - 1.0))


# --------------------------------------------------------------------------- TSVM / R-TSVM
@dataclass
class TsvmState:
    dense: torch.Tensor | None = None  # (T, n): transformed task vectors M~_k
    us: torch.Tensor | None = None  # factored: (m, T*r) with weights folded in
    vh: torch.Tensor | None = None  # (T*r, n)
    rank: int = 0
    shape: tuple[int, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)


@register_method("tsvm")
class Tsvm(_Base):
    """TSVM (section 4): per-task rank ``min(m,n)//T``, polar factors of ``U_cat``/``Vh_cat``.

    Cached as TA on the transformed task vectors (section 6.4), ``Delta(c) = sum c_k M_k``,
    dense (``T*m*n`` floats) or factored (``(m+n)*T*r`` floats, one GEMM per build).
    1-D and excluded tensors: ``M_k = tau_k / T`` (the mean).
    """

    options_model = TsvmOptions
    factored_default: ClassVar[bool] = False

    def is_matrix(self, name: str, shape: tuple[int, ...], n_experts: int, options: Any) -> bool:
        excluded = any(fnmatch.fnmatch(name, pat) for pat in options.exclude)
        return len(shape) == 2 and not excluded and min(shape) // n_experts > 0

    def state_bytes(self, shape, n_experts, options, elem=4) -> int:
        n = math.prod(shape)
        if options.storage == "factored" and len(shape) == 2:
            m, k = shape
            return elem * (m + k) * n_experts * (min(m, k) // n_experts)
        return elem * n_experts * n

    def weights(self, taus: list[torch.Tensor], options: Any) -> tuple[torch.Tensor | None, int | None]:
        return None, None

    def vector_weights(self, taus: list[torch.Tensor], options: Any) -> torch.Tensor:
        """Per-expert factor for non-matrix tensors: ``1/T`` (the mean)."""
        return torch.full((len(taus),), 1.0 / len(taus), device=taus[0].device)

    def prepare_tensor(self, info, base, taus, options) -> TsvmState:
        t = len(taus)
        if not self.is_matrix(info.name, info.shape, t, options):
            if len(info.shape) == 2 and min(info.shape) // t == 0:
                log.warning("%s: rank %d < %d tasks, TSVM falls back to the mean", info.name, min(info.shape), t)
            dense = _stack(taus) * self.vector_weights(taus, options)[:, None]
            return TsvmState(dense=dense.to(info.cache_dtype), shape=info.shape)
        w, keep_rank = self.weights(taus, options)
        order = getattr(options, "order", "orth_then_trunc")
        f = K.tsvm_factors(taus, keep_rank, order, options.drop_null_directions)
        assert f is not None
        us = f.us
        if w is not None:  # fold R-TSVM weights into each task's block of columns
            us = us * torch.repeat_interleave(w.float().to(us.device), f.rank)[None, :]  # w is computed on the CPU
        extra = {} if w is None else {"w": w.tolist(), "k_l": keep_rank}
        dt = info.cache_dtype
        if options.storage == "factored":
            return TsvmState(us=us.to(dt).contiguous(), vh=f.vh.to(dt).contiguous(), rank=f.rank, shape=info.shape, info=extra)
        return TsvmState(dense=K.TsvmFactors(us, f.vh, f.rank).dense(t).to(dt), shape=info.shape, info=extra)

    def build_tensor(self, state, base, cand, dst, ws, options, ctx) -> None:
        if state.dense is not None:
            _affine(base, state.dense, cand.coeffs * cand.scale, dst, ws)
            return
        assert state.us is not None and state.vh is not None
        m, n = state.shape
        scaled = ws.get("us", state.us.numel()).view(state.us.shape)
        torch.mul(state.us, torch.repeat_interleave(cand.coeffs, state.rank)[None, :], out=scaled)
        if state.vh.dtype == torch.float32 and base.dtype == torch.float32:
            torch.addmm(base.view(m, n), scaled, state.vh, alpha=cand.scale, out=dst.view(m, n))
            return
        vh = ws.get("vh", state.vh.numel()).view(state.vh.shape).copy_(state.vh)  # widen: the GEMM runs in fp32
        dst.copy_(base)
        dst.view(m, n).addmm_(scaled, vh, alpha=cand.scale)


@register_method("r_tsvm")
class RTsvm(Tsvm):
    """R-TSVM / RESM, the reconstruction of section 5.2: TSVM with per-tensor outlier
    weights ``w_k`` and sparsity-adaptive rank ``k_l``; 1-D tensors use the plain mean.
    """

    options_model = RTsvmOptions

    @staticmethod
    def settings(options: RTsvmOptions) -> K.RtsvmSettings:
        return K.RtsvmSettings(
            beta=options.beta,
            z=options.z,
            norm=options.norm,
            keep=options.keep,
            weight_mode=options.weight_mode,
            weight_norm=options.weight_norm,
            std_correction=options.std_correction,
            zero_tol=options.zero_tol,
            consensus=options.consensus,
        )

    def weights(self, taus, options):
        cfg = self.settings(options)
        return K.outlier_weights(taus, cfg), K.sparsity_rank(taus, cfg)

    def vector_weights(self, taus, options):
        if not (options.weight_1d and taus[0].dim() == 1):
            return super().vector_weights(taus, options)
        return K.outlier_weights([t.reshape(1, -1) for t in taus], self.settings(options)).float().to(taus[0].device)


# mergekit's other methods (DELLA, Model Stock, SCE, NuSLERP, Multi-SLERP, Karcher): lazy
# entries, registered for real when evomerge/merge/methods_more.py is first imported
for _name in ("della", "della_linear", "model_stock", "sce", "nuslerp", "multislerp", "karcher"):
    METHODS.add_lazy(_name, "evomerge.merge.methods_more:NEW_METHODS")
