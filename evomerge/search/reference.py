"""The safety bar of ``constrained`` and ``pareto``: a reference CE_safety plus a slack.

``search.constraint.reference`` is a number (that CE), an expert's name (that model's own
CE_safety on the held-in safety samples) or null (the pool model with the lowest CE_safety,
the most aligned one by the fitness's own measure). The pool's models are scored once,
before the first generation, by the same scoring plan as the candidates; the result is
kept in the checkpoint, so a resumed run uses the very same bound.
"""

from __future__ import annotations

import logging
from typing import Any

from evomerge.search.evaluator import CandidateEvaluator, resolved_pool_refs
from evomerge.search.recipe import SearchRecipe

log = logging.getLogger(__name__)


def pool_safety_ce(recipe: SearchRecipe, evaluator: CandidateEvaluator) -> dict[str, float]:
    """Expert name -> the model's own mean CE on the held-in safety samples."""
    import torch

    from evomerge.pool import load_model
    from evomerge.search.fitness import ScoringPlan, SetScore

    fit = recipe.fitness
    plan = ScoringPlan(evaluator.encoded["safety"], fit.batch_size, fit.max_batch_tokens, fit.device)
    _, experts = resolved_pool_refs(recipe)
    out = {}
    for name, ref in experts.items():
        model = load_model(ref).to(device=fit.device, dtype=getattr(torch, fit.dtype))
        out[name] = float(SetScore.from_per_sample(*plan.run(model)).mean_ce)
        del model
    return out


def measure_reference(recipe: SearchRecipe, evaluator: CandidateEvaluator) -> dict[str, Any]:
    """``{"model", "ce_safety", "slack", "bound", "pool_ce_safety"}``; ``bound`` is what
    the search holds CE_safety to."""
    spec = recipe.search.constraint
    if isinstance(spec.reference, float):
        value, model, pool = float(spec.reference), None, {}
    else:
        pool = pool_safety_ce(recipe, evaluator)
        model = spec.reference if isinstance(spec.reference, str) else min(pool, key=lambda k: (pool[k], k))
        value = pool[model]
    out = {"model": model, "ce_safety": value, "slack": spec.slack, "bound": value + spec.slack,
           "pool_ce_safety": pool}
    log.info("safety bar: CE_safety <= %.4f (%s %.4f + slack %.4f)", out["bound"], model or "reference", value,
             spec.slack)
    return out
