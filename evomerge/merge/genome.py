"""Genome: what the optimiser controls for one candidate merge.

Per layer group and per expert a weight (coefficient ``c_k``) and a density ``d_k``,
plus one global scale (``lambda`` / ``alpha`` in the notes). Everything else (method,
static options) lives in the recipe and the cache, so a genome stays a few floats.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from evomerge.errors import ConfigError


def _as_rows(values: Any, n_experts: int, what: str) -> tuple[tuple[float, ...], ...]:
    """Accept a scalar, a per-expert list or a per-group list of per-expert lists."""
    if isinstance(values, (int, float)):
        return ((float(values),) * n_experts,)
    rows = list(values)
    if rows and not isinstance(rows[0], (list, tuple)):
        rows = [rows]
    out = []
    for g, row in enumerate(rows):
        row = tuple(float(v) for v in row)
        if len(row) != n_experts:
            raise ConfigError(f"genome {what}[{g}] has {len(row)} values, expected one per expert ({n_experts})")
        if not all(math.isfinite(v) for v in row):
            raise ConfigError(f"genome {what}[{g}] has a non-finite value: {list(row)}")
        if what == "densities" and not all(0.0 <= v <= 1.0 for v in row):
            raise ConfigError(f"genome densities[{g}] = {list(row)}: a density is the kept fraction of a task "
                              "vector and must lie in [0, 1]")
        out.append(row)
    if not out:
        raise ConfigError(f"genome {what} is empty")
    return tuple(out)


@dataclass(frozen=True)
class Genome:
    """Candidate parameters, shaped ``[group][expert]``.

    ``weights`` and ``densities`` have one row per layer group: one row means the same
    values for every layer; ``G`` rows split the decoder layers into ``G`` equal
    contiguous blocks (``layer_granularity = num_layers // G``). Tensors outside the
    decoder layers use the first group (embeddings) or the last one (final norm,
    lm_head), as mergekit's slices do.
    """

    weights: tuple[tuple[float, ...], ...]
    densities: tuple[tuple[float, ...], ...] | None = None
    scale: float = 1.0
    # ``modules=True``: groups are [embeddings, attention of layer 0, MLP of layer 0, ...,
    # MLP of the last layer, final norm + lm_head], 2 * num_layers + 2 in all, since
    # skills and safety need not sit in the same kind of module.
    modules: bool = False
    # mergekit's ``filter:`` values: each group above is split into ``len(filters) + 1``
    # classes, a tensor going to the first filter that is a substring of its name, or to
    # the last class (mergekit's entry without a filter). Rows run slot-major:
    # ``group = slot * (len(filters) + 1) + class``.
    filters: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        n = len(self.weights[0])
        object.__setattr__(self, "weights", _as_rows(self.weights, n, "weights"))
        if self.densities is not None:
            dens = _as_rows(self.densities, n, "densities")
            if len(dens) != len(self.weights):
                raise ConfigError(
                    f"genome has {len(self.weights)} weight groups but {len(dens)} density groups"
                )
            object.__setattr__(self, "densities", dens)
        if not math.isfinite(self.scale):
            raise ConfigError(f"genome scale must be finite, got {self.scale}")
        object.__setattr__(self, "filters", tuple(self.filters))
        if any(not isinstance(f, str) or not f for f in self.filters) or len(set(self.filters)) != len(self.filters):
            raise ConfigError(f"genome filters must be distinct non-empty strings, got {list(self.filters)}")
        if len(self.weights) % (len(self.filters) + 1):
            raise ConfigError(f"genome has {len(self.weights)} groups, not a multiple of {len(self.filters) + 1} "
                              f"(one per filter {list(self.filters)} plus the default)")

    @property
    def n_slots(self) -> int:
        """Layer groups (or module groups) before the split by filter."""
        return len(self.weights) // (len(self.filters) + 1)

    @property
    def n_experts(self) -> int:
        return len(self.weights[0])

    @property
    def n_groups(self) -> int:
        return len(self.weights)

    @classmethod
    def uniform(
        cls, n_experts: int, weight: float | None = None, density: float | None = None, scale: float = 1.0, groups: int = 1
    ) -> Genome:
        """Same weight (default ``1/T``) and density for every expert and group."""
        w = 1.0 / n_experts if weight is None else weight
        weights = ((w,) * n_experts,) * groups
        densities = None if density is None else ((density,) * n_experts,) * groups
        return cls(weights, densities, scale)

    @classmethod
    def from_values(
        cls,
        weights: Any,
        densities: Any = None,
        scale: float = 1.0,
        expert_names: Sequence[str] | None = None,
        modules: bool = False,
        filters: Sequence[str] = (),
    ) -> Genome:
        """Build from scalars, lists, nested lists or ``{expert: value}`` mappings."""

        def resolve(values: Any, what: str) -> Any:
            if not isinstance(values, Mapping):
                return values
            if expert_names is None:
                raise ConfigError(f"genome {what} given by expert name but the expert names are unknown")
            unknown = sorted(set(values) - set(expert_names))
            if unknown:
                raise ConfigError(f"genome {what} names unknown expert '{unknown[0]}' (experts: {list(expert_names)})")
            missing = [n for n in expert_names if n not in values]
            if missing:
                raise ConfigError(f"genome {what} has no value for expert '{missing[0]}'")
            per_expert = [values[n] for n in expert_names]
            if any(isinstance(v, (list, tuple)) for v in per_expert):  # per-group lists per expert
                n_groups = {len(v) for v in per_expert}
                if len(n_groups) != 1:
                    raise ConfigError(f"genome {what}: every expert needs the same number of group values")
                return [[per_expert[k][g] for k in range(len(per_expert))] for g in range(n_groups.pop())]
            return per_expert

        w = resolve(weights, "weights")
        n = len(expert_names) if expert_names is not None else (1 if isinstance(w, (int, float)) else None)
        if isinstance(w, (int, float)):
            if n is None:
                raise ConfigError("a scalar genome weight needs the expert names")
            w = [float(w)] * n
        rows = _as_rows(w, len(w[0]) if isinstance(w[0], (list, tuple)) else len(w), "weights")
        dens = None
        if densities is not None:
            d = resolve(densities, "densities")
            if isinstance(d, (int, float)):
                d = [[float(d)] * len(rows[0])] * len(rows)
            dens = _as_rows(d, len(rows[0]), "densities")
            if len(dens) == 1 and len(rows) > 1:
                dens = dens * len(rows)
            elif len(rows) == 1 and len(dens) > 1:  # one weight row shared by every group
                rows = rows * len(dens)
        return cls(rows, dens, float(scale), modules, tuple(filters))

    def to_dict(self, expert_names: Sequence[str]) -> dict[str, Any]:
        """Plain YAML-friendly form keyed by expert name (inverse of :meth:`from_values`)."""

        def by_name(rows: tuple[tuple[float, ...], ...]) -> dict[str, Any]:
            if len(rows) == 1:
                return {n: rows[0][k] for k, n in enumerate(expert_names)}
            return {n: [row[k] for row in rows] for k, n in enumerate(expert_names)}

        out: dict[str, Any] = {"weights": by_name(self.weights)}
        if self.densities is not None:
            out["densities"] = by_name(self.densities)
        out["scale"] = self.scale
        if self.modules:
            out["modules"] = True
        if self.filters:
            out["filters"] = list(self.filters)
        return out


def filter_class(name: str, filters: Sequence[str]) -> int:
    """Index of the first filter contained in ``name`` (mergekit: first match wins), else
    ``len(filters)``, the class of mergekit's entry without a filter."""
    for i, f in enumerate(filters):
        if f in name:
            return i
    return len(filters)
