"""The ``ray`` evaluation backend: a generation's candidates spread over Ray actors.

Each actor builds its own :class:`CandidateEvaluator` from the recipe, so it holds its
own merge cache and live model, read from the pool's folders where it runs; the driver
ships only genomes (a few hundred floats) and receives fitness terms. Candidates go to
whichever actor is free (a queue), and the results are put back in input order.

Importing this module imports Ray; ``evomerge`` itself never does.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError
from evomerge.merge import Genome
from evomerge.search.backends import OnResult
from evomerge.search.evaluator import CandidateEvaluator, Scored
from evomerge.search.recipe import SearchRecipe

try:
    import ray
except ImportError as _exc:  # the message names the extra, not just the module
    raise ConfigError(f"search.workers.backend: ray needs Ray installed (pip install 'evomerge[ray]'): {_exc}") from None

log = logging.getLogger(__name__)


class _Worker:
    """One actor: a private evaluator and a fixed thread count."""

    def __init__(self, recipe: SearchRecipe, method: str, options: dict[str, Any] | None, threads: int) -> None:
        import torch

        # an actor's torch would otherwise size its pool to the whole node and the actors
        # would oversubscribe the cores between them
        torch.set_num_threads(threads)
        self.evaluator = CandidateEvaluator(recipe, method, options)

    def info(self) -> tuple[int, float]:
        """(num_layers, prepare_s); also the first call that shows a failed construction."""
        return self.evaluator.num_layers, self.evaluator.prepare_s

    def evaluate(self, genome: Genome) -> Scored:
        return self.evaluator.evaluate(genome)


def _package_root() -> str:
    """The folder holding the ``evomerge`` this driver imported: actors must import the same
    code (an editable install elsewhere, or a worktree on ``PYTHONPATH``, would differ)."""
    import evomerge

    return str(Path(evomerge.__file__).resolve().parents[1])


def _unwrap(exc: BaseException, what: str) -> BaseException:
    """The error an actor raised, rather than Ray's wrapper around it, naming the actor."""
    cause = getattr(exc, "cause", None)  # a task's own exception
    if isinstance(cause, Exception):
        try:
            return type(cause)(f"{what}: {cause}")
        except Exception:  # noqa: BLE001 - an exception type with another constructor: keep it as is
            return cause
    if getattr(exc, "actor_init_failed", False):
        # Ray keeps only the text of a failed constructor; its last line is the exception
        last = str(exc).strip().splitlines()[-1]
        return RuntimeError(f"{what} failed to start: {last}")
    return RuntimeError(f"{what}: {exc}")


class RayBackend:
    """``search.workers.n`` actors evaluating one generation at a time."""

    def __init__(self, recipe: SearchRecipe, method: str, options: dict[str, Any] | None) -> None:
        spec = recipe.search.workers
        self.recipe, self.method, self.options = recipe, method, options
        self._started_ray = False
        if not ray.is_initialized():
            # a local cluster is sized to the actors; an existing cluster brings its own resources
            cpus = spec.n * spec.num_cpus_per_worker if spec.address is None else None
            ray.init(address=spec.address, num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING)
            self._started_ray = True
        pythonpath = os.pathsep.join(p for p in (_package_root(), os.environ.get("PYTHONPATH")) if p)
        actor = ray.remote(_Worker).options(
            num_cpus=spec.num_cpus_per_worker, num_gpus=spec.num_gpus_per_worker,
            runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
        self.actors = [actor.remote(recipe, method, options, spec.num_cpus_per_worker) for _ in range(spec.n)]
        try:
            infos = [self._get(a.info.remote(), f"ray worker {i}") for i, a in enumerate(self.actors)]
        except BaseException:
            self.close()  # the run never gets the backend, so nobody else would
            raise
        self.num_layers = infos[0][0]
        self.prepare_s = max(p for _, p in infos)
        self._driver: CandidateEvaluator | None = None
        log.info("ray backend: %d actors (%d CPU, %g GPU each), prepare %.1fs", spec.n, spec.num_cpus_per_worker,
                 spec.num_gpus_per_worker, self.prepare_s)

    @staticmethod
    def _get(ref: Any, what: str) -> Any:
        try:
            return ray.get(ref)
        except ray.exceptions.RayError as exc:
            raise _unwrap(exc, what) from exc

    def evaluate_many(self, genomes: Sequence[Genome], on_result: OnResult | None = None) -> list[Scored]:
        """Each free actor takes the next genome; results land at their genome's position."""
        out: list[Scored | None] = [None] * len(genomes)
        queue = deque(enumerate(genomes))
        idle = deque(range(len(self.actors)))
        pending: dict[Any, tuple[int, int]] = {}  # ref -> (position, actor)
        while queue or pending:
            while queue and idle:
                pos, genome = queue.popleft()
                k = idle.popleft()
                pending[self.actors[k].evaluate.remote(genome)] = (pos, k)
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                pos, k = pending.pop(ref)
                out[pos] = self._get(ref, f"ray worker {k}, candidate {pos} of the generation")
                idle.append(k)
                if on_result is not None:
                    on_result(pos)
        return out  # type: ignore[return-value]  # every position was filled above

    def driver_evaluator(self) -> CandidateEvaluator:
        """Built here only when asked for (held-out check): the actors' copies are not
        reachable, and most runs never need one in the driver."""
        if self._driver is None:
            self._driver = CandidateEvaluator(self.recipe, self.method, self.options)
        return self._driver

    def close(self) -> None:
        """Kill the actors (freeing their caches and models) and a cluster we started."""
        for a in self.actors:
            ray.kill(a)
        self.actors = []
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False
