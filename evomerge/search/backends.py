"""Evaluation backends: who turns a generation of genomes into fitness terms.

The search loop hands a whole generation to ``backend.evaluate_many(genomes)`` and gets
the :class:`Scored` results back in input order, whoever computed them:

- ``serial`` (default): this process's :class:`CandidateEvaluator`, one candidate after
  the other;
- ``ray`` (``pip install evomerge[ray]``): ``search.workers.n`` Ray actors, each with its
  own merge cache and live model (``evomerge.search.ray_backend``; Ray is imported only
  when this backend is asked for).

Scoring is deterministic per candidate and a build overwrites the whole live model, so
which worker evaluated which candidate cannot change a result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, get_args

from evomerge.errors import ConfigError
from evomerge.merge import Genome
from evomerge.registry import Registry
from evomerge.search.evaluator import CandidateEvaluator, Scored
from evomerge.search.recipe import EvalBackendName, SearchRecipe

OnResult = Callable[[int], None]  # called with a candidate's position once it is scored


class EvaluationBackend(Protocol):
    """What the search loop needs from whoever evaluates candidates."""

    num_layers: int  # of the pool's models, for the genome space
    prepare_s: float  # time spent in prepare (the slowest worker's, for parallel backends)

    def evaluate_many(self, genomes: Sequence[Genome], on_result: OnResult | None = None) -> list[Scored]:
        """Scores of ``genomes``, in their order."""
        ...

    def driver_evaluator(self) -> CandidateEvaluator:
        """An evaluator in this process, for the steps after the search (held-out check)."""
        ...

    def close(self) -> None:
        """Release workers and their memory; the backend is not used afterwards."""
        ...


class SerialBackend:
    """Today's loop: this process's evaluator, candidates one after the other."""

    def __init__(self, recipe: SearchRecipe, method: str, options: dict[str, Any] | None) -> None:
        self.evaluator = CandidateEvaluator(recipe, method, options)
        self.num_layers = self.evaluator.num_layers
        self.prepare_s = self.evaluator.prepare_s

    def evaluate_many(self, genomes: Sequence[Genome], on_result: OnResult | None = None) -> list[Scored]:
        out = []
        for pos, genome in enumerate(genomes):
            out.append(self.evaluator.evaluate(genome))
            if on_result is not None:
                on_result(pos)
        return out

    def driver_evaluator(self) -> CandidateEvaluator:
        return self.evaluator

    def close(self) -> None:
        """Nothing to release: the evaluator lives on for the finish steps."""


# name -> factory(recipe, method, options); "ray" imports ray only when chosen
BACKENDS = Registry("evaluation backend", {"ray": "evomerge.search.ray_backend:RayBackend"})
BACKENDS.add("serial", SerialBackend)
BACKEND_NAMES: tuple[str, ...] = get_args(EvalBackendName)  # what the recipe accepts; the tests keep both equal


def make_backend(recipe: SearchRecipe, method: str, options: dict[str, Any] | None) -> EvaluationBackend:
    """The backend named by ``search.workers.backend``, ready to evaluate."""
    name = recipe.search.workers.backend
    if name not in BACKENDS:
        raise ConfigError(f"search.workers.backend: unknown backend '{name}'; known: {', '.join(BACKENDS)}")
    return BACKENDS[name](recipe, method, options)
