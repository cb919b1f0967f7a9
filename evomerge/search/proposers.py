"""Who proposes the next candidates: one proposer per search mode (``evomerge.search.modes``).

Every search mode is a :class:`Proposer` over the same evaluator and data, so baselines
differ from the main search only in how genomes are chosen. A proposer owns what makes
its mode: the value it minimises (how lambda and mu combine the terms, or a constraint, or
several objectives), its stop rule, its ask/tell and how its result is chosen. The loop
only asks it.

A proposer is deterministic given the recipe's seed and the scores it is told, which is
how a resumed run continues exactly: the checkpoint records those scores and a resume
replays them (``evomerge.search.loop.replay``); nothing executable is ever stored.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from evomerge.errors import ConfigError
from evomerge.merge import Genome
from evomerge.search.evaluator import CandidateEvaluator, Scored, combine
from evomerge.search.modes import MODES, ModeInfo
from evomerge.search.recipe import SearchRecipe, default_popsize
from evomerge.search.space import GenomeSpace

log = logging.getLogger(__name__)
Choice = tuple[int, list[dict[str, Any]] | None]  # (position of the result, records of a selection step)


class Proposer(Protocol):
    """What the search loop asks of a search mode."""

    mode: ModeInfo
    popsize: int
    sigma: float  # step size, NaN when the mode has none

    def ask(self) -> list[Genome]:
        """The next generation (empty: nothing left to propose)."""
        ...

    def tell(self, genomes: list[Genome], scored: list[Scored]) -> list[float]:
        """Learn from a generation's scores; returns the value minimised for each (the
        table's ``fitness`` column)."""
        ...

    def role_of(self, position: int) -> str:
        """The ``role`` column of the last asked generation's candidate at ``position``."""
        ...

    def stop(self, generation: int, n_evals: int) -> str:
        """Why the search stops before the next generation ('' to go on)."""
        ...

    def planned_evals(self) -> int | None:
        """Candidates the search expects to score (the progress bar's total)."""
        ...

    def columns(self, rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
        """Columns derived from all rows so far (front flags), added to the candidates table."""
        ...

    def choose(self, rows: list[dict[str, Any]], evaluator: Callable[[], CandidateEvaluator],
               expert_names: list[str]) -> Choice:
        """The result: its position in ``rows``, and the selection records (if any)."""
        ...


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


class _Base:
    """Defaults shared by the proposers: one role, no derived columns, the lowest value
    wins unless ``search.select: behaviour`` asks for the held-in behaviour rule."""

    role = "candidate"
    sigma = math.nan

    def __init__(self, space: GenomeSpace, recipe: SearchRecipe) -> None:
        self.space, self.recipe = space, recipe
        self.mode = MODES[recipe.search.mode]

    def role_of(self, position: int) -> str:
        return self.role

    def columns(self, rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
        return {}

    def best_index(self, rows: list[dict[str, Any]]) -> int:
        return min(range(len(rows)), key=lambda i: (rows[i]["fitness"], i))

    def _budget_stop(self, generation: int, n_evals: int) -> str:
        s = self.recipe.search
        if s.steps is not None and generation >= s.steps:
            return f"search.steps={s.steps} generations done"
        if s.max_evals is not None and n_evals >= s.max_evals:
            return f"search.max_evals={s.max_evals} reached"
        return ""

    def _budget(self) -> int | None:
        s = self.recipe.search
        limits = [v for v in (s.steps and s.steps * self.popsize, s.max_evals) if v]
        return min(limits) if limits else None

    def choose(self, rows: list[dict[str, Any]], evaluator: Callable[[], CandidateEvaluator],
               expert_names: list[str]) -> Choice:
        best = self.best_index(rows)
        if self.recipe.search.select != "behaviour" or not self.mode.selectable:
            return best, None
        from evomerge.search.select import select_by_behaviour

        return select_by_behaviour(self.recipe, rows, evaluator(), expert_names, best)


class CMAESProposer(_Base):
    """pycma ask/tell with box bounds (pycma's ``BoundTransform``, not ad-hoc folding),
    minimising the lambda/mu-weighted fitness (``evomm-domain``: CE_domain alone).

    Gaussian samples come from a :class:`StandardNormal` the proposer owns; pycma's few
    other draws from numpy's global generator run with the proposer's own copy of that
    state swapped in, so nothing else in the process (or a resume) can shift a stream.
    """

    role = "cmaes"

    def __init__(self, space: GenomeSpace, recipe: SearchRecipe, reference: dict[str, Any] | None = None) -> None:
        import cma

        super().__init__(space, recipe)
        s = recipe.search
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

    def value(self, s: Scored) -> float:
        """What this mode minimises: the recipe's weighted fitness, or (a mode with its own
        lambda, ``evomm-domain``) that lambda's combination without the benign term."""
        if self.mode.lambda_ is None:
            return s.fitness
        t = s.terms
        return combine(self.mode.lambda_, 0.0, _none(t["ce_domain"]), _none(t["ce_safety"]), None)

    def ask(self) -> list[Genome]:
        self.pending = self._with_own_rng(self.es.ask)
        return [self.space.to_genome(x) for x in self.pending]

    def tell(self, genomes: list[Genome], scored: list[Scored]) -> list[float]:
        values = [self.value(s) for s in scored]
        self._with_own_rng(lambda: self.es.tell(self.pending, values))
        self.pending = []
        return values

    def stop(self, generation: int, n_evals: int) -> str:
        """The budget, then pycma's own termination criteria (flat fitness, tiny sigma...).
        pycma's check runs every time, so a replay retraces it whatever the budget."""
        internal = self.internal_stop()
        return self._budget_stop(generation, n_evals) or internal

    def internal_stop(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self._with_own_rng(self.es.stop).items())

    def planned_evals(self) -> int | None:
        return self._budget()

    @property
    def sigma(self) -> float:
        return float(self.es.sigma)


class _SafetyBar:
    """The result rule of the modes with a safety bar (``constrained``, ``pareto``).

    By CE (``search.select: fitness``): among the candidates on the front of
    ``objectives``, those with CE_safety <= bound; of them the lowest CE_domain (the mean
    over the domain sets: the most skilled). If none meets the bar, the lowest CE_safety.
    By greedy held-in behaviour (``select: behaviour``): see
    :func:`evomerge.search.select.select_under_bar`.
    """

    objectives: list[str]
    bound: float
    recipe: SearchRecipe

    def front(self, rows: list[dict[str, Any]]) -> list[int]:
        from evomerge.search.select import ce_pareto_front

        return ce_pareto_front(rows, self.objectives)

    def columns(self, rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
        on_front = set(self.front(rows))
        return {"feasible": [bool(r["ce_safety"] <= self.bound) for r in rows],
                "front": [i in on_front for i in range(len(rows))]}

    def best_index(self, rows: list[dict[str, Any]]) -> int:
        front = self.front(rows) or list(range(len(rows)))
        ok = [i for i in front if rows[i]["ce_safety"] <= self.bound]
        if ok:
            return min(ok, key=lambda i: (rows[i]["ce_domain"], rows[i]["ce_safety"], i))
        log.warning("no candidate has CE_safety <= %.4f (the reference + slack); the result is the safest one",
                    self.bound)
        return min(front, key=lambda i: (_nan_last(rows[i]["ce_safety"]), i))

    def choose(self, rows: list[dict[str, Any]], evaluator: Callable[[], CandidateEvaluator],
               expert_names: list[str]) -> Choice:
        best = self.best_index(rows)
        if self.recipe.search.select != "behaviour":
            return best, None
        from evomerge.search.select import select_under_bar

        return select_under_bar(self.recipe, rows, self.front(rows), evaluator(), expert_names, best,
                                self.reference)


class ConstrainedProposer(_SafetyBar, CMAESProposer):
    """CMA-ES on CE_domain subject to CE_safety - bound <= 0, through pycma's
    augmented Lagrangian (``cma.ConstrainedFitnessAL``): each candidate is told
    ``f + lam * g + mu * g^2 / 2`` (pycma's form), and ``update`` adapts lam and mu after
    every generation. ``bound`` = the measured reference + ``search.constraint.slack``.
    Until a candidate is within the bar, only the violation is minimised (pycma's
    ``find_feasible_first``): the plain sum x0 of a three-model pool starts outside it.
    ``search.constraint.al_dimension`` (default 1) sets how fast lam and mu adapt: with
    pycma's default (the genome's length) they barely move in 10 generations, and the
    searches drifted out of the bar (docs/search.md, "The safety bar").

    The AL's state is a function of what it was told, in order, so a replay of the
    recorded generations rebuilds it exactly, as it does the CMA-ES state. A candidate
    with a non-finite term is told +inf and kept away from the AL's coefficients.
    """

    role = "constrained"

    def __init__(self, space: GenomeSpace, recipe: SearchRecipe, reference: dict[str, Any] | None = None) -> None:
        import cma

        super().__init__(space, recipe)
        if reference is None:
            raise ConfigError("search.mode constrained: no reference measured")  # the loop always passes one
        self.reference = reference
        self.bound = float(reference["bound"])
        self.objectives = ["ce_safety", "ce_domain"]
        self._fg: tuple[float, list[float]] = (math.nan, [math.nan])
        dimension = recipe.search.constraint.al_dimension or space.n_dims
        self.al = cma.ConstrainedFitnessAL(lambda x: self._fg[0], lambda x: self._fg[1], dimension=dimension,
                                           find_feasible_first=True,
                                           archives=False, logging=False)  # no outcmaes/ in the working folder

    def tell(self, genomes: list[Genome], scored: list[Scored]) -> list[float]:
        def told() -> list[float]:
            values = []
            for x, s in zip(self.pending, scored):
                f, g = s.terms["ce_domain"], s.terms["ce_safety"] - self.bound
                if not (math.isfinite(f) and math.isfinite(g)):
                    values.append(math.inf)
                    continue
                self._fg = (float(f), [float(g)])
                values.append(float(self.al(x)))
            self.es.tell(self.pending, values)
            self.al.update(self.es)
            return values

        values = self._with_own_rng(told)
        self.pending = []
        return values


class ParetoProposer(_SafetyBar, _Base):
    """NSGA-II (optuna's ``NSGAIISampler``) over the objectives (CE_safety, CE of each
    domain set, CE_benign when ``fitness.mu`` > 0), all minimised, through optuna's
    ask/tell on an in-memory study. The first candidate is the recipe's x0 (enqueued);
    the first generation is otherwise random within the bounds.

    The ``fitness`` column is the lambda/mu-weighted fitness, for reference only: the
    search returns the non-dominated front, and the result is chosen from it
    (:class:`_SafetyBar`). A candidate with a non-finite objective is a failed trial,
    which NSGA-II leaves out. The sampler is seeded and sees only what it was told, in
    order, so a replay rebuilds the study exactly.
    """

    role = "pareto"

    def __init__(self, space: GenomeSpace, recipe: SearchRecipe, reference: dict[str, Any] | None = None) -> None:
        import optuna

        super().__init__(space, recipe)
        if reference is None:
            raise ConfigError("search.mode pareto: no reference measured")
        self.reference = reference
        self.bound = float(reference["bound"])
        self.objectives = ["ce_safety", *(f"ce_domain.{d}" for d in recipe.data.domain)]
        if recipe.fitness.mu > 0:
            self.objectives.append("ce_benign")
        s = recipe.search
        self.popsize = s.popsize or default_popsize(space.n_dims)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        sampler = optuna.samplers.NSGAIISampler(population_size=self.popsize, seed=recipe.seed + 1)
        self.study = optuna.create_study(directions=["minimize"] * len(self.objectives), sampler=sampler)
        self.names = space.columns()
        self.lo, self.hi = space.bounds()
        self.study.enqueue_trial(dict(zip(self.names, space.x0(s.x0_weight, s.x0_density))))
        self.pending: list[Any] = []

    def ask(self) -> list[Genome]:
        self.pending = [self.study.ask() for _ in range(self.popsize)]
        xs = [[t.suggest_float(n, lo, hi) for n, lo, hi in zip(self.names, self.lo, self.hi)] for t in self.pending]
        return [self.space.to_genome(x) for x in xs]

    def tell(self, genomes: list[Genome], scored: list[Scored]) -> list[float]:
        from optuna.trial import TrialState

        for trial, s in zip(self.pending, scored):
            values = [s.terms.get(o, math.nan) for o in self.objectives]
            if all(math.isfinite(v) for v in values):
                self.study.tell(trial, values)
            else:
                self.study.tell(trial, state=TrialState.FAIL)
        self.pending = []
        return [s.fitness for s in scored]

    def stop(self, generation: int, n_evals: int) -> str:
        return self._budget_stop(generation, n_evals)

    def planned_evals(self) -> int | None:
        return self._budget()


class GridProposer(_Base):
    """Data-free grid over per-expert weights x densities, reported by domain loss
    (how the seed paper ran its grid baseline); the whole model shares one value."""

    role = "grid"

    def __init__(self, space: GenomeSpace, recipe: SearchRecipe, reference: dict[str, Any] | None = None) -> None:
        super().__init__(space, recipe)
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
        self.popsize = recipe.search.popsize or default_popsize(space.n_dims)
        self.next = 0

    def ask(self) -> list[Genome]:
        chunk = self.points[self.next : self.next + self.popsize]
        self.next += len(chunk)
        return [self.space.uniform([w for w, _ in point], [d for _, d in point] if self.space.uses_density else None)
                for point in chunk]

    def tell(self, genomes: list[Genome], scored: list[Scored]) -> list[float]:
        return [s.fitness for s in scored]

    def stop(self, generation: int, n_evals: int) -> str:
        return "grid exhausted" if self.next >= len(self.points) else ""

    def planned_evals(self) -> int | None:
        return len(self.points)

    def best_index(self, rows: list[dict[str, Any]]) -> int:
        return min(range(len(rows)), key=lambda i: (_nan_last(rows[i]["ce_domain"]), i))


class CocktailProposer(_Base):
    """LM-Cocktail: score each pool model alone, then merge with ``softmax(-L / T)``.

    L is the model's CE on the domain data, or (``use_safety``) its lambda-weighted
    fitness over domain and safety data. The merge is a weighted average of the models,
    i.e. the ``linear`` method with those weights (base + sum w_k tau_k, sum w_k = 1).
    """

    def __init__(self, space: GenomeSpace, recipe: SearchRecipe, reference: dict[str, Any] | None = None) -> None:
        super().__init__(space, recipe)
        self.temperature = recipe.search.cocktail.temperature
        self.use_safety = recipe.search.cocktail.use_safety
        self.lam, self.mu = recipe.fitness.lambda_, recipe.fitness.mu
        self.stage = 0
        self.losses: list[float] = []
        self.weights: list[float] = []
        self.popsize = space.n_experts

    def _one_hot(self, k: int) -> Genome:
        return self.space.uniform([1.0 if j == k else 0.0 for j in range(self.space.n_experts)])

    def ask(self) -> list[Genome]:
        if self.stage == 0:
            return [self._one_hot(k) for k in range(self.space.n_experts)]
        if self.stage == 1:
            return [self.space.uniform(self.weights)]
        return []

    def tell(self, genomes: list[Genome], scored: list[Scored]) -> list[float]:
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
        return [s.fitness for s in scored]

    def stop(self, generation: int, n_evals: int) -> str:
        return "cocktail merged" if self.stage >= 2 else ""

    def planned_evals(self) -> int | None:
        return self.popsize + 1

    def role_of(self, position: int) -> str:
        return "expert-alone" if self.stage == 0 else "cocktail"

    def best_index(self, rows: list[dict[str, Any]]) -> int:
        return max(i for i, r in enumerate(rows) if r["role"] == "cocktail")


def _nan_last(value: float) -> float:
    return math.inf if value is None or math.isnan(value) else value


def _none(value: float) -> float | None:
    return None if value is None or math.isnan(value) else value


def make_proposer(space: GenomeSpace, recipe: SearchRecipe, reference: dict[str, Any] | None = None) -> Proposer:
    """The proposer of ``search.mode`` (the table in :mod:`evomerge.search.modes`)."""
    info = MODES.get(recipe.search.mode)
    if info is None:
        raise ConfigError(f"search.mode: unknown mode '{recipe.search.mode}'")
    return globals()[info.proposer](space, recipe, reference)
