"""Who proposes the next candidates: CMA-ES, a grid, or LM-Cocktail.

Every search mode is a proposer over the same evaluator and data, so baselines differ
from the main search only in how genomes are chosen. A proposer is deterministic given
the recipe's seed and the fitness values it is told, which is how a resumed run continues
exactly: the checkpoint records those values and a resume replays them
(``evomerge.search.loop.replay``); nothing executable is ever stored.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np

from evomerge.errors import ConfigError
from evomerge.merge import Genome
from evomerge.search.evaluator import Scored, combine
from evomerge.search.recipe import SearchRecipe, default_popsize
from evomerge.search.space import GenomeSpace


class StandardNormal:
    """pycma's ``randn(lam, N)`` backed by a generator the search owns.

    Why: pycma's default is ``np.random.randn``, a method of numpy's global generator;
    anything else in the process that draws from it would shift the search's samples, and
    a replayed resume would not retrace the run. This generator is seeded by the recipe
    and touched by nothing but the proposer.
    """

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def __call__(self, *shape: int) -> np.ndarray:
        return self.rng.standard_normal(shape)


class CMAESProposer:
    """pycma ask/tell with box bounds (pycma's ``BoundTransform``, not ad-hoc folding).

    Gaussian samples come from a :class:`StandardNormal` the proposer owns; pycma's few
    other draws from numpy's global generator run with the proposer's own copy of that
    state swapped in, so nothing else in the process (or a resume) can shift a stream.
    """

    role = "cmaes"

    def __init__(self, space: GenomeSpace, recipe: SearchRecipe) -> None:
        import cma

        s = recipe.search
        self.space = space
        self.popsize = s.popsize or default_popsize(space.n_dims)
        lo, hi = space.bounds()
        saved = np.random.get_state()
        try:
            np.random.seed(recipe.seed + 1)
            options = {"randn": StandardNormal(recipe.seed + 1), "popsize": self.popsize, "bounds": [lo, hi],
                       "verbose": -9}
            self.es = cma.CMAEvolutionStrategy(space.x0(s.x0_weight, s.x0_density), s.sigma0, options)
            self.rng_state = np.random.get_state()
        finally:
            np.random.set_state(saved)
        self.pending: list[np.ndarray] = []

    def _with_own_rng(self, call):
        """Run ``call`` with numpy's global generator set to this search's stream."""
        saved = np.random.get_state()
        np.random.set_state(self.rng_state)
        try:
            return call()
        finally:
            self.rng_state = np.random.get_state()
            np.random.set_state(saved)

    def ask(self) -> list[Genome]:
        self.pending = self._with_own_rng(self.es.ask)
        return [self.space.to_genome(x) for x in self.pending]

    def tell(self, genomes: list[Genome], scored: list[Scored], fitness: list[float]) -> None:
        self._with_own_rng(lambda: self.es.tell(self.pending, fitness))
        self.pending = []

    def internal_stop(self) -> str:
        """pycma's own termination criteria (flat fitness, tiny sigma...), if any fired."""
        return ", ".join(f"{k}={v}" for k, v in self._with_own_rng(self.es.stop).items())

    @property
    def sigma(self) -> float:
        return float(self.es.sigma)

    def best_index(self, rows: list[dict[str, Any]]) -> int:
        return min(range(len(rows)), key=lambda i: (rows[i]["fitness"], i))


class GridProposer:
    """Data-free grid over per-expert weights x densities, reported by domain loss
    (how the seed paper ran its grid baseline); the whole model shares one value."""

    role = "grid"

    def __init__(self, space: GenomeSpace, recipe: SearchRecipe) -> None:
        grid = recipe.search.grid
        if not grid.weights:
            raise ConfigError("search.grid.weights is empty")
        per_expert = [(w, d) for w in grid.weights for d in (grid.densities if space.uses_density else [None])]
        self.points = list(itertools.product(per_expert, repeat=space.n_experts))
        cap = recipe.search.max_evals
        if cap is not None and len(self.points) > cap:
            raise ConfigError(
                f"search.grid has {len(self.points)} points for {space.n_experts} experts, over "
                f"search.max_evals={cap}; shorten search.grid.weights / densities or raise the cap"
            )
        self.space = space
        self.popsize = recipe.search.popsize or default_popsize(space.n_dims)
        self.next = 0

    def ask(self) -> list[Genome]:
        chunk = self.points[self.next : self.next + self.popsize]
        self.next += len(chunk)
        out = []
        for point in chunk:
            weights = [w for w, _ in point]
            dens = [d for _, d in point] if self.space.uses_density else None
            out.append(Genome.from_values([weights] * self.space.n_groups,
                                          None if dens is None else [dens] * self.space.n_groups))
        return out

    def tell(self, genomes: list[Genome], scored: list[Scored], fitness: list[float]) -> None:
        return None

    def internal_stop(self) -> str:
        return "grid exhausted" if self.next >= len(self.points) else ""

    @property
    def total(self) -> int:
        return len(self.points)

    def best_index(self, rows: list[dict[str, Any]]) -> int:
        return min(range(len(rows)), key=lambda i: (_nan_last(rows[i]["ce_domain"]), i))


class CocktailProposer:
    """LM-Cocktail: score each pool model alone, then merge with ``softmax(-L / T)``.

    L is the model's CE on the domain data, or (``use_safety``) its lambda-weighted
    fitness over domain and safety data. The merge is a weighted average of the models,
    i.e. the ``linear`` method with those weights (base + sum w_k tau_k, sum w_k = 1).
    """

    role = "lm-cocktail"

    def __init__(self, space: GenomeSpace, recipe: SearchRecipe) -> None:
        self.space = space
        self.temperature = recipe.search.cocktail.temperature
        self.use_safety = recipe.search.cocktail.use_safety
        self.lam, self.mu = recipe.fitness.lambda_, recipe.fitness.mu
        self.stage = 0
        self.losses: list[float] = []
        self.weights: list[float] = []
        self.popsize = space.n_experts

    def _one_hot(self, k: int) -> Genome:
        return Genome.from_values([[1.0 if j == k else 0.0 for j in range(self.space.n_experts)]] * self.space.n_groups)

    def ask(self) -> list[Genome]:
        if self.stage == 0:
            return [self._one_hot(k) for k in range(self.space.n_experts)]
        if self.stage == 1:
            return [Genome.from_values([self.weights] * self.space.n_groups)]
        return []

    def tell(self, genomes: list[Genome], scored: list[Scored], fitness: list[float]) -> None:
        if self.stage == 0:
            for s in scored:
                t = s.terms
                if self.use_safety:
                    loss = combine(self.lam, 0.0, _none(t["ce_domain"]), _none(t["ce_safety"]), None)
                else:
                    loss = t["ce_domain"]
                self.losses.append(loss if math.isfinite(loss) else math.inf)
            z = -np.asarray(self.losses, dtype=np.float64) / self.temperature
            z = z - np.max(z[np.isfinite(z)]) if np.isfinite(z).any() else z
            w = np.exp(z)
            if not np.isfinite(w).all() or w.sum() == 0:
                raise ConfigError(f"lm-cocktail: no pool model has a finite loss ({self.losses})")
            self.weights = (w / w.sum()).tolist()
        self.stage += 1

    def internal_stop(self) -> str:
        return "cocktail merged" if self.stage >= 2 else ""

    def role_of(self, position: int) -> str:
        return "expert-alone" if self.stage == 0 else "cocktail"

    def best_index(self, rows: list[dict[str, Any]]) -> int:
        return max(i for i, r in enumerate(rows) if r["role"] == "cocktail")


def _nan_last(value: float) -> float:
    return math.inf if value is None or math.isnan(value) else value


def _none(value: float) -> float | None:
    return None if value is None or math.isnan(value) else value


def make_proposer(space: GenomeSpace, recipe: SearchRecipe):
    mode = recipe.search.mode
    if mode in ("cmaes", "evomm-domain"):
        return CMAESProposer(space, recipe)
    if mode == "grid":
        return GridProposer(space, recipe)
    if mode == "lm-cocktail":
        return CocktailProposer(space, recipe)
    raise ConfigError(f"search.mode: unknown mode '{mode}'")
