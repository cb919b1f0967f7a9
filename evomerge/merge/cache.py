"""prepare / build: the genome-independent work once, then cheap in-place candidates.

``prepare(pool, method, options)`` streams the task vectors once and keeps, per tensor,
the base and the method's state, stored in ``cache_dtype`` (float32 by default; bf16
halves the cache so an 8B model with three experts fits on one GPU). ``build(cache,
genome, out=model)`` computes each tensor in float32 and writes the candidate straight
into a live model's parameters.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from evomerge.errors import EvomergeError, check_device
from evomerge.merge.fused import fused_enabled
from evomerge.merge.genome import Genome, filter_class
from evomerge.merge.methods import Candidate, MergeMethod, MethodOptions, TensorInfo, get_method, parse_options

log = logging.getLogger(__name__)

_LAYER = re.compile(r"\.layers\.(\d+)\.")
PRE, POST = -1, -2  # embeddings use the first layer group; final norm and lm_head the last
# tensors of a decoder layer that belong to its attention block (the rest is its MLP block)
_ATTENTION = re.compile(r"(self_attn|attention|attn|input_layernorm)")
_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CacheTooLargeError(EvomergeError):
    """The merge cache would not fit in the memory available."""


class MergeBuildError(EvomergeError):
    """A genome or output model does not match the cache."""


# --------------------------------------------------------------------------- sources
class StatePool:
    """A pool held as in-memory state dicts: for tests, notebooks and benchmarks.

    Same interface as :class:`evomerge.pool.Pool` as far as ``prepare`` is concerned.
    """

    def __init__(self, base: Mapping[str, torch.Tensor], experts: Mapping[str, Mapping[str, torch.Tensor]], num_layers: int | None = None):
        self.base_state = dict(base)
        self.expert_states = {k: dict(v) for k, v in experts.items()}
        self.num_layers = num_layers

    @property
    def expert_names(self) -> list[str]:
        return list(self.expert_states)

    def tensor_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {n: (tuple(t.shape), t.dtype) for n, t in self.base_state.items()}

    def iter_task_vectors(self, names: Sequence[str] | None = None) -> Iterator[tuple[str, torch.Tensor, list[torch.Tensor]]]:
        for name in names if names is not None else list(self.base_state):
            base = self.base_state[name].to(torch.float32)
            yield name, base, [e[name].to(torch.float32) - base for e in self.expert_states.values()]

    def get_base(self, name: str) -> torch.Tensor:
        return self.base_state[name]


class RoundedInputsPool:
    """A pool whose inputs are rounded to ``dtype`` before task vectors are taken.

    This is mergekit's ``dtype``: its loader casts every input to it and takes the task
    vectors in it, so both the inputs and ``expert - base`` are rounded here (the
    latter matters for TIES, whose top-k then sees mergekit's magnitudes and ties).
    The merge arithmetic after that stays float32 (mergekit's stays in ``dtype``).
    """

    def __init__(self, pool: Any, dtype: torch.dtype) -> None:
        self._pool = pool
        self.dtype = dtype

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)

    def tensor_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return _specs(self._pool)

    def iter_task_vectors(self, names: Sequence[str] | None = None) -> Iterator[tuple[str, torch.Tensor, list[torch.Tensor]]]:
        for name, base, taus in self._pool.iter_task_vectors(names):
            b = base.to(self.dtype).float()
            yield name, b, [((base + t).to(self.dtype).float() - b).to(self.dtype).float() for t in taus]


def _specs(pool: Any) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    if hasattr(pool, "tensor_specs"):
        return pool.tensor_specs()
    from safetensors import safe_open

    from evomerge.pool import reading

    specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    kind, _ = pool.base._weights
    for name, path in pool.base._tensor_files.items():
        if kind != "safetensors":
            t = pool.base.get_tensor(name)
            specs[name] = (tuple(t.shape), t.dtype)
            continue
        with reading(path, pool.base.name), safe_open(str(path), framework="pt") as handle:
            sl = handle.get_slice(name)
            specs[name] = (tuple(sl.get_shape()), _ST_DTYPES.get(sl.get_dtype(), torch.float32))
    return specs


def _num_layers(pool: Any, names: Sequence[str]) -> int:
    n = getattr(pool, "num_layers", None)
    if n is None and hasattr(pool, "base") and hasattr(pool.base, "config"):
        n = getattr(pool.base.config, "num_hidden_layers", None)
    found = [int(m.group(1)) for m in map(_LAYER.search, names) if m]
    return int(n) if n else (max(found) + 1 if found else 1)


def layer_of(name: str) -> int:
    m = _LAYER.search(name)
    if m:
        return int(m.group(1))
    return PRE if "embed" in name else POST


def is_attention(name: str) -> bool:
    """Whether a decoder-layer tensor belongs to its attention block (else its MLP block)."""
    return bool(_ATTENTION.search(name))


def genome_group(name: str, genome: Genome, num_layers: int) -> int:
    """The genome row a tensor reads: its slot (layer block, or module with ``modules``;
    embeddings the first, final norm and lm_head the last), then its filter class.
    The one place that maps tensors to rows (build, the uncached reference, --explain)."""
    slots, layer = genome.n_slots, layer_of(name)
    if layer == PRE:
        slot = 0
    elif layer == POST:
        slot = slots - 1
    elif genome.modules:
        slot = 1 + 2 * layer + (0 if is_attention(name) else 1)
    else:
        slot = min(slots - 1, layer * slots // num_layers)
    return slot * (len(genome.filters) + 1) + filter_class(name, genome.filters)


# --------------------------------------------------------------------------- workspace
class Workspace:
    """Named scratch buffers that grow to the largest tensor once and are then reused."""

    def __init__(self, device: torch.device | str = "cpu", compiled: bool = False) -> None:
        self.device = torch.device(device)
        self.compiled = compiled
        self._bufs: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, name: str, numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        buf = self._bufs.get((name, dtype))
        if buf is None or buf.numel() < numel:
            buf = self._bufs[(name, dtype)] = torch.empty(numel, dtype=dtype, device=self.device)
        return buf[:numel]

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._bufs.values())


# --------------------------------------------------------------------------- memory estimate
@dataclass
class MemoryEstimate:
    """Bytes the cache will hold, with the formula that produced them."""

    total: int
    base: int
    state: int
    workspace: int
    params: int
    n_experts: int
    formula: str

    def describe(self) -> str:
        return (
            f"{fmt_bytes(self.total)} = base {fmt_bytes(self.base)} + method state {fmt_bytes(self.state)} "
            f"+ scratch {fmt_bytes(self.workspace)}  [{self.formula}; P={self.params:,} parameters, T={self.n_experts}]"
        )


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.2f} GiB"


CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def scratch_elements(method: str, options: MethodOptions, n_experts: int) -> tuple[int, str]:
    """Float32 scratch a build needs, in units of the largest tensor, and its formula.

    One output buffer (a bf16 model is written through it); TIES's original variant and
    its exact-density tie path keep (T, n) masks; factored TSVM a widened factor.
    """
    impl = get_method(method)
    if hasattr(impl, "scratch"):  # methods that declare their own scratch
        return impl.scratch(options, n_experts)
    if method == "ties" and getattr(options, "variant", "") == "original":
        return 3 * n_experts + 3, "4*(3T+3)*max_numel"
    if method == "ties" and getattr(options, "density_grid", 0) is None:
        return n_experts + 2, "4*(T+2)*max_numel"
    if method in ("tsvm", "r_tsvm") and getattr(options, "storage", "") == "factored":
        return 3, "4*3*max_numel"
    if method == "breadcrumbs_ties":  # eager TIES (masked_ties): masks, |values|, sum, sign, out; a bool compare
        return 2 * n_experts + 4, "4*(2T+4)*max_numel"
    if method in ("breadcrumbs", "breadcrumbs_ties"):  # eager: masks, |values|, out, a bool compare
        return n_experts + 3, "4*(T+3)*max_numel"
    return 1, "4*max_numel"


def estimate_cache_bytes(
    specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    n_experts: int,
    method: str,
    options: MethodOptions,
    cache_dtype: torch.dtype = torch.float32,
) -> MemoryEstimate:
    """Bytes ``prepare`` will keep: base and method state in ``cache_dtype`` plus fp32 scratch.

    ``e`` in the formulas is the storage size of one element (4 for float32, 2 for
    bf16/fp16); index tables (TIES exact order, DARE quantiles) do not depend on it.
    """
    impl = get_method(method)
    elem = torch.empty((), dtype=cache_dtype).element_size()
    float_specs = [(n, s) for n, (s, d) in specs.items() if d.is_floating_point]
    params = sum(math.prod(s) for _, s in float_specs)
    max_numel = max((math.prod(s) for _, s in float_specs), default=0)
    state = sum(impl.state_bytes(s, n_experts, options, elem=elem) for _, s in float_specs)
    units, scratch = scratch_elements(method, options, n_experts)
    workspace = 4 * max_numel * units
    formula = {
        "task_arithmetic": "{e}*P + {e}*T*P",
        "linear": "{e}*P + {e}*T*P",
        "ties": "{e}*P + {e}*T*P + tables (grid: 24*(G+1) B per tensor per expert; exact: 4*T*P)",
        "dare_linear": "{e}*P + {e}*T*P + 16-bit mask quantiles 4*ceil(T/2)*P",
        "dare_ties": "{e}*P + {e}*T*P + 16-bit mask quantiles 4*ceil(T/2)*P",
        "della": "{e}*P + {e}*T*P + 16-bit keep levels 4*ceil(T/2)*P (+ rescale: 512 KiB kept-L1 table per tensor >= 65536 entries and expert)",
        "della_linear": "{e}*P + {e}*T*P + 16-bit keep levels 4*ceil(T/2)*P (+ rescale: 512 KiB kept-L1 table per tensor >= 65536 entries and expert)",
        "slerp": "{e}*P + {e}*P",
        "breadcrumbs": "{e}*P + {e}*T*P + sort order 4*T*P (+ 4/256 B sampled magnitudes, rescale 8/256 B prefix sums)",
        "breadcrumbs_ties": "{e}*P + {e}*T*P + sort order 4*T*P (+ 4/256 B sampled magnitudes, rescale 8/256 B prefix sums)",
        "tsvm": "{e}*P + dense {e}*T*P | factored {e}*(m+n)*T*(min(m,n)//T) per matrix",
        "r_tsvm": "{e}*P + dense {e}*T*P | factored {e}*(m+n)*T*(min(m,n)//T) per matrix",
    }.get(method, "{e}*P + state").format(e=elem) + f" + scratch {scratch}"
    if cache_dtype != torch.float32:
        formula += f" [cache {str(cache_dtype).removeprefix('torch.')}]"
    return MemoryEstimate(elem * params + state + workspace, elem * params, state, workspace, params, n_experts, formula)


def available_bytes(device: torch.device | str = "cpu") -> int:
    """Free memory on ``device``: CUDA free memory, or Linux MemAvailable."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown platform: do not block


# --------------------------------------------------------------------------- cache
@dataclass
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # storage dtype of the base (output dtype when writing a folder)
    layer: int
    base: torch.Tensor  # flat, in the cache dtype (or the raw tensor for non-float passthrough)
    state: Any = None


@dataclass
class MergeCache:
    """Everything genome-independent for one (pool, method, options)."""

    method: str
    options: MethodOptions
    expert_names: list[str]
    num_layers: int
    plans: list[TensorPlan]
    passthrough: list[TensorPlan]
    device: torch.device
    estimate: MemoryEstimate
    cache_dtype: torch.dtype = torch.float32
    workspace: Workspace = field(init=False)
    _bound: dict[int, tuple[Any, list[torch.Tensor], list[torch.Tensor]]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.workspace = Workspace(self.device)

    @property
    def impl(self) -> MergeMethod:
        return get_method(self.method)

    @property
    def n_experts(self) -> int:
        return len(self.expert_names)

    @property
    def nbytes(self) -> int:
        """Bytes actually held (tensors in states and bases), excluding scratch."""
        seen: set[int] = set()

        def size(obj: Any) -> int:
            if isinstance(obj, torch.Tensor):
                if id(obj) in seen:
                    return 0
                seen.add(id(obj))
                return obj.numel() * obj.element_size()
            if type(obj).__name__ in ("MagnitudeTable", "ThresholdTable"):
                return obj.nbytes
            if hasattr(obj, "__dict__"):
                return sum(size(v) for v in vars(obj).values())
            if isinstance(obj, (list, tuple)):
                return sum(size(v) for v in obj)
            return 0

        return sum(size(p.base) + size(p.state) for p in self.plans)

    def candidates(self, genome: Genome) -> list[Candidate]:
        if genome.n_experts != self.n_experts:
            raise MergeBuildError(
                f"genome has {genome.n_experts} experts per group, the cache has {self.n_experts} ({self.expert_names})"
            )
        per = f" per filter class ({len(genome.filters) + 1})" if genome.filters else ""
        if genome.modules and genome.n_slots != 2 * self.num_layers + 2:
            raise MergeBuildError(
                f"a per-module genome needs {2 * self.num_layers + 2} groups{per} for {self.num_layers} layers "
                f"(embeddings, attention and MLP of each layer, head); it has {genome.n_slots}"
            )
        if not genome.modules and genome.n_slots > self.num_layers:
            raise MergeBuildError(f"genome has {genome.n_slots} layer groups{per} but the model has {self.num_layers} layers")
        if self.impl.uses_density and genome.densities is None:
            raise MergeBuildError(f"method '{self.method}' needs densities in the genome")
        out = []
        for g, weights in enumerate(genome.weights):
            dens = list(genome.densities[g]) if genome.densities is not None else [1.0] * len(weights)
            coeffs = torch.tensor(weights, dtype=torch.float32, device=self.device)
            out.append(Candidate(coeffs, list(weights), dens, float(genome.scale)))
        return out


def _check_experts(impl: MergeMethod, method: str, n: int) -> None:
    if n < impl.min_experts or (impl.max_experts is not None and n > impl.max_experts):
        want = f"exactly {impl.max_experts}" if impl.max_experts == impl.min_experts else f"at least {impl.min_experts}"
        raise EvomergeError(f"method '{method}' needs {want} expert(s) besides the base, got {n}")


def prepare(
    pool: Any,
    method: str,
    options: MethodOptions | Mapping[str, Any] | None = None,
    device: torch.device | str = "cpu",
    memory_limit: int | None = None,
    fused: bool | None = None,
    cache_dtype: torch.dtype = torch.float32,
    progress: Any = None,
) -> MergeCache:
    """Do every genome-independent step once and return the cache ``build`` reads.

    ``pool`` is an :class:`evomerge.pool.Pool` or a :class:`StatePool`. The cache size
    is estimated from the shapes first; if it exceeds ``memory_limit`` (default: the
    memory available on ``device``) a :class:`CacheTooLargeError` says by how much.
    ``fused`` (default: on unless ``EVOMERGE_FUSED=0``) compiles the TIES/DARE build
    kernels with ``torch.compile`` once per process (seconds), falling back to eager.
    ``cache_dtype`` (float32, bfloat16 or float16) stores the base and the task-vector
    state; builds still compute in float32, so bf16 only rounds what is stored (about
    3 significant digits of each task vector) in exchange for half the memory.
    ``progress(done, total)`` is called after each tensor is read (a big model takes minutes).
    """
    if cache_dtype not in CACHE_DTYPES:
        raise EvomergeError(f"cache_dtype must be one of {', '.join(map(str, CACHE_DTYPES))}, got {cache_dtype}")
    check_device(device)
    impl = get_method(method)
    opts = parse_options(method, options)
    names = list(pool.expert_names)
    _check_experts(impl, method, len(names))
    specs = _specs(pool)
    est = estimate_cache_bytes(specs, len(names), method, opts, cache_dtype)
    limit = available_bytes(device) if memory_limit is None else memory_limit
    if method in ("tsvm", "r_tsvm") and opts.storage == "auto":  # type: ignore[attr-defined]
        storage = "dense" if est.total <= limit else "factored"
        opts = opts.model_copy(update={"storage": storage})
        est = estimate_cache_bytes(specs, len(names), method, opts, cache_dtype)
    if est.total > limit:
        hint = {
            "tsvm": "use options.storage: factored, or fewer experts",
            "r_tsvm": "use options.storage: factored, or fewer experts",
            "ties": "use options.density_grid (tables of a few KB instead of a sorted copy), or fewer experts",
        }.get(method, "use fewer experts or a machine/device with more memory")
        raise CacheTooLargeError(
            f"the '{method}' cache needs {est.describe()}, but only {fmt_bytes(limit)} is available "
            f"on {device}; {hint}"
        )
    device = torch.device(device)
    plans: list[TensorPlan] = []
    passthrough: list[TensorPlan] = []
    float_names = [n for n, (_, d) in specs.items() if d.is_floating_point]
    for name, (shape, dtype) in specs.items():
        if not dtype.is_floating_point:
            raw = pool.get_base(name) if hasattr(pool, "get_base") else pool.base.get_tensor(name)
            passthrough.append(TensorPlan(name, shape, dtype, layer_of(name), raw.to(device)))
    with torch.no_grad():
        for name, base, taus in pool.iter_task_vectors(float_names):
            shape, dtype = specs[name]
            info = TensorInfo(name, tuple(shape), names, cache_dtype)
            state = impl.prepare_tensor(info, base.to(device), [t.to(device) for t in taus], opts)
            stored = base.reshape(-1).to(device=device, dtype=cache_dtype).contiguous()
            plans.append(TensorPlan(name, tuple(shape), dtype, layer_of(name), stored, state))
            del base, taus  # free this tensor's fp32 task vectors before the next is read
            if progress is not None:
                progress(len(plans), len(float_names))
        impl.finalize([p.state for p in plans], opts)
    cache = MergeCache(method, opts, names, _num_layers(pool, list(specs)), plans, passthrough, device, est, cache_dtype)
    cache.workspace.compiled = fused_enabled(fused)
    return cache


def _targets(cache: MergeCache, out: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Destination tensors for the cache's plans and passthrough tensors, resolved once per model."""
    bound = cache._bound.get(id(out))  # only modules are memoised: their parameters do not move
    if bound is not None and bound[0] is out:
        return bound[1], bound[2]
    if isinstance(out, torch.nn.Module):
        table = dict(out.named_parameters(remove_duplicate=False))
        table.update(dict(out.named_buffers(remove_duplicate=False)))
    else:
        table = out
    dests: list[list[torch.Tensor]] = [[], []]
    for i, plans in enumerate((cache.plans, cache.passthrough)):
        for plan in plans:
            t = table.get(plan.name)
            if t is None:
                raise MergeBuildError(f"output model has no tensor '{plan.name}' (the pool's base has it)")
            if tuple(t.shape) != plan.shape:
                raise MergeBuildError(f"tensor '{plan.name}': output has shape {list(t.shape)}, pool has {list(plan.shape)}")
            dests[i].append(t.data if isinstance(t, torch.nn.Parameter) else t)
    if isinstance(out, torch.nn.Module):
        cache._bound = {id(out): (out, dests[0], dests[1])}
    return dests[0], dests[1]


def _casts_in_kernel(cache: MergeCache) -> bool:
    """Whether every tensor of this cache is built by a fused kernel that computes in fp32
    and rounds once on store, so a bf16/fp16 model can be written without the fp32
    scratch copy (half the bytes moved per build). True for low-precision caches except
    TIES 'original' and factored TSVM, which write with BLAS/out= ops."""
    if cache.cache_dtype == torch.float32 or getattr(cache.impl, "fp32_dst_only", False):
        return False
    opts = cache.options
    if cache.method == "ties" and getattr(opts, "variant", "") == "original":
        return False
    return not (cache.method in ("tsvm", "r_tsvm") and getattr(opts, "storage", "") == "factored")


def build(cache: MergeCache, genome: Genome, out: Any = None, dtype: torch.dtype | None = None) -> Any:
    """Write the candidate ``genome`` into ``out`` in place and return it.

    ``out`` is a live model (``nn.Module``; names as in the checkpoint) or a dict of
    tensors; ``None`` allocates a fresh state dict (in the base's dtype, or ``dtype``).
    Float32 contiguous parameters are written directly; so are bf16/fp16 ones from a
    low-precision cache (the fused kernels round once on store); others go through one
    fp32 scratch buffer and a ``copy_`` (cast).
    """
    if out is None:
        out = {
            p.name: torch.empty(p.shape, dtype=dtype or p.dtype, device=cache.device) for p in cache.plans
        } | {p.name: torch.empty(p.shape, dtype=p.dtype, device=cache.device) for p in cache.passthrough}
    dests, pass_dests = _targets(cache, out)
    cast_in_kernel = _casts_in_kernel(cache)
    cands = cache.candidates(genome)
    groups = [genome_group(p.name, genome, cache.num_layers) for p in cache.plans]
    impl, opts, ws = cache.impl, cache.options, cache.workspace
    with torch.no_grad():
        ctx = impl.begin_build([p.state for p in cache.plans], cands, groups, opts, ws)
        for plan, dst, g in zip(cache.plans, dests, groups):
            same = dst.is_contiguous() and dst.device == cache.device
            direct = same and (dst.dtype == torch.float32 or (cast_in_kernel and dst.dtype in (torch.bfloat16, torch.float16)))
            flat = dst.view(-1) if direct else ws.get("out", plan.base.numel())
            impl.build_tensor(plan.state, plan.base, cands[g], flat, ws, opts, ctx)
            if not direct:
                dst.copy_(flat.view(plan.shape))
        for plan, dst in zip(cache.passthrough, pass_dests):
            dst.copy_(plan.base)
    return out
