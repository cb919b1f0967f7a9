"""The search space: a flat vector for the optimiser <-> a :class:`Genome` for the engine.

Layout: every weight ``w[group][expert]``, then (for TIES / DARE) every density
``d[group][expert]``. Bounds are box bounds handed to the optimiser's own boundary handling.

Groups (``search.genome``): ``per_layer`` splits the decoder layers into equal blocks of
``search.layer_granularity`` layers (embeddings go with the first block, the head with the
last); ``per_module`` gives the embeddings, the attention and the MLP of every layer, and
the head (final norm + ``lm_head``) their own genes: ``2 * layers + 2`` groups, named
``emb``, ``attn0``, ``mlp0``, ..., ``head`` in the tables and the genome file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from evomerge.errors import ConfigError
from evomerge.merge import Genome
from evomerge.merge.methods import get_method
from evomerge.search.recipe import SearchRecipe


@dataclass(frozen=True)
class GenomeSpace:
    expert_names: tuple[str, ...]
    n_groups: int
    uses_density: bool
    weight_bounds: tuple[float, float]
    density_bounds: tuple[float, float]
    modules: bool = False  # per-module groups (see the module docstring)

    @classmethod
    def from_recipe(cls, recipe: SearchRecipe, num_layers: int, method: str | None = None) -> GenomeSpace:
        """``method`` overrides the recipe's (LM-Cocktail merges with ``linear``): it decides
        whether densities are genes."""
        gran = recipe.search.layer_granularity
        modules = recipe.search.genome == "per_module"
        if modules:
            groups = 2 * num_layers + 2
        elif gran == 0:
            groups = 1
        elif num_layers % gran:
            raise ConfigError(
                f"search.layer_granularity={gran} does not divide the model's {num_layers} layers"
            )
        else:
            groups = num_layers // gran
        b = recipe.search.bounds
        uses_density = get_method(method or recipe.merge.method).uses_density
        return cls(tuple(recipe.pool.experts), groups, uses_density, tuple(b.weight), tuple(b.density), modules)

    @property
    def n_experts(self) -> int:
        return len(self.expert_names)

    @property
    def n_dims(self) -> int:
        return self.n_groups * self.n_experts * (2 if self.uses_density else 1)

    def bounds(self) -> tuple[list[float], list[float]]:
        half = self.n_groups * self.n_experts
        lo = [self.weight_bounds[0]] * half + ([self.density_bounds[0]] * half if self.uses_density else [])
        hi = [self.weight_bounds[1]] * half + ([self.density_bounds[1]] * half if self.uses_density else [])
        return lo, hi

    def x0(self, weight: float | None, density: float) -> list[float]:
        w = 1.0 / self.n_experts if weight is None else weight
        half = self.n_groups * self.n_experts
        x = [w] * half + ([density] * half if self.uses_density else [])
        lo, hi = self.bounds()
        for i, (v, a, b) in enumerate(zip(x, lo, hi)):
            if not a <= v <= b:
                what = "x0_weight" if i < half else "x0_density"
                raise ConfigError(f"search.{what}={v} lies outside its bounds [{a}, {b}]")
        return x

    def to_genome(self, x: Sequence[float]) -> Genome:
        x = np.asarray(x, dtype=np.float64)
        if x.shape != (self.n_dims,):
            raise ConfigError(f"a genome vector needs {self.n_dims} values, got {x.shape}")
        half = self.n_groups * self.n_experts
        weights = x[:half].reshape(self.n_groups, self.n_experts).tolist()
        dens = x[half:].reshape(self.n_groups, self.n_experts).tolist() if self.uses_density else None
        return Genome.from_values(weights, dens, modules=self.modules)

    def uniform(self, weights: Sequence[float], densities: Sequence[float] | None = None) -> Genome:
        """One per-expert row of weights (and densities) for every group."""
        dens = None if densities is None else [list(densities)] * self.n_groups
        return Genome.from_values([list(weights)] * self.n_groups, dens, modules=self.modules)

    def from_genome(self, genome: Genome) -> list[float]:
        """Inverse of :meth:`to_genome` (a one-group genome is repeated over the groups)."""
        w = genome.weights * self.n_groups if genome.n_groups == 1 else genome.weights
        x = [v for row in w for v in row]
        if self.uses_density:
            d = genome.densities or ((1.0,) * self.n_experts,)
            d = d * self.n_groups if len(d) == 1 else d
            x += [v for row in d for v in row]
        return x

    def group_names(self) -> list[str]:
        """``0``, ``1``, ... per layer block; ``emb``, ``attn0``, ``mlp0``, ..., ``head`` per module."""
        if not self.modules:
            return [str(g) for g in range(self.n_groups)]
        layers = (self.n_groups - 2) // 2
        return ["emb", *(f"{kind}{i}" for i in range(layers) for kind in ("attn", "mlp")), "head"]

    def columns(self) -> list[str]:
        """Table column per dimension: ``w.<group>.<expert>`` / ``d.<group>.<expert>``."""
        groups = self.group_names()
        cols = [f"w.{g}.{e}" for g in groups for e in self.expert_names]
        if self.uses_density:
            cols += [f"d.{g}.{e}" for g in groups for e in self.expert_names]
        return cols
