"""Choosing the search's result: by fitness, or by greedy behaviour on the held-in data.

Why a second rule: the fitness is a cross-entropy, averaged over every answer token,
while what users get is a *greedy* answer, decided mostly by its first tokens, so the
lowest-fitness candidate can behave worse than one ranked far below it (measured on the
tiny zoo in docs/search.md, with scripts/candidate_frontier.py).

``search.select: behaviour`` keeps the search as it is and changes only the choice. It
takes the candidates on the Pareto front of the fitness terms (no other candidate has
lower CE on every set), at most ``select_max`` of them by fitness. Each is built, answers
the held-in prompts greedily (the same samples the fitness used: never held-out data),
and is scored by

    lambda * (100 - domain accuracy) + (1 - lambda) * (100 - refusals of unsafe prompts)
        + mu * refusals of benign prompts

(percent; lower is better; fitness breaks ties). Refusals are refusal phrases and
accuracy is containment of the reference answer, as in the held-out check.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

log = logging.getLogger(__name__)


def ce_pareto_front(rows: list[dict[str, Any]], terms: list[str]) -> list[int]:
    """Positions of the rows no other row beats on every term (lower is better): no other
    row is at least as low on every term and lower on one. Rows with a non-finite term or
    fitness are left out."""
    import numpy as np

    finite = [i for i, r in enumerate(rows) if all(math.isfinite(r.get(t, math.nan)) for t in terms)
              and math.isfinite(r["fitness"])]
    if not finite:
        return []
    points = np.array([[rows[i][t] for t in terms] for i in finite], dtype=np.float64)
    front = []
    for pos, i in enumerate(finite):
        p = points[pos]
        beaten = (points <= p).all(axis=1) & (points < p).any(axis=1)
        if not beaten.any():
            front.append(i)
    return front


def behaviour(evaluator, max_new_tokens: int = 48) -> dict[str, float]:
    """Greedy held-in behaviour of the candidate last built into ``evaluator``, in percent."""
    return behaviour_of(evaluator.model, evaluator.tokenizer, evaluator.sets, max_new_tokens)


def behaviour_of(model, tokenizer, sets, max_new_tokens: int = 48) -> dict[str, float]:
    """Greedy behaviour of ``model`` on the held-in ``sets``, in percent."""
    from evomerge.behaviour import measure

    b = measure(model, tokenizer, sets, max_new_tokens=max_new_tokens, batch_size=64)
    out = {f"heldin_{k}": v for k, v in b.items()}
    accs = [v for k, v in b.items() if k.startswith("acc_")]
    if accs:
        out["heldin_acc"] = sum(accs) / len(accs)
    return out


def behaviour_loss(b: dict[str, float], lam: float, mu: float) -> float:
    loss = 0.0
    if lam > 0 and "heldin_acc" in b:
        loss += lam * (100.0 - b["heldin_acc"])
    if lam < 1 and "heldin_refuses_unsafe" in b:
        loss += (1 - lam) * (100.0 - b["heldin_refuses_unsafe"])
    if mu > 0 and "heldin_refuses_benign" in b:
        loss += mu * b["heldin_refuses_benign"]
    return loss


def select_by_behaviour(recipe, candidates: list[dict[str, Any]], evaluator, expert_names: list[str],
                        fitness_best: int) -> tuple[int, list[dict[str, Any]]]:
    """(position of the chosen candidate, one record per candidate considered)."""
    from evomerge.search.modes import MODES

    lam, mu = MODES[recipe.search.mode].weights(recipe.fitness.lambda_, recipe.fitness.mu)
    terms = [t for t, on in (("ce_domain", lam > 0), ("ce_safety", lam < 1), ("ce_benign", mu > 0)) if on]
    front = ce_pareto_front(candidates, terms)
    front = sorted(front, key=lambda i: candidates[i]["fitness"])[: recipe.search.select_max]
    if fitness_best not in front:
        front.insert(0, fitness_best)
    records = []
    for i in front:
        row = candidates[i]
        evaluator.build(row_genome(row, expert_names))
        b = behaviour(evaluator, recipe.search.select_max_new_tokens)
        records.append({"index": row["index"], "fitness": row["fitness"], **{t: row[t] for t in terms}, **b,
                        "behaviour_loss": behaviour_loss(b, lam, mu)})
    chosen = min(range(len(records)), key=lambda k: (records[k]["behaviour_loss"], records[k]["fitness"]))
    for k, rec in enumerate(records):
        rec["chosen"] = k == chosen
    log.info("selection by held-in behaviour: candidate #%d of %d on the fitness front (fitness-best #%d)",
             records[chosen]["index"], len(records), candidates[fitness_best]["index"])
    return front[chosen], records


def row_genome(row: dict[str, Any], expert_names: list[str]):
    """The :class:`~evomerge.merge.Genome` of a candidates-table row."""
    from evomerge.merge import Genome

    data = json.loads(row["genome"])
    return Genome.from_values(data["weights"], data.get("densities"), data.get("scale", 1.0), expert_names,
                              bool(data.get("modules", False)))


def select_under_bar(recipe, candidates: list[dict[str, Any]], front: list[int], evaluator, expert_names: list[str],
                     ce_best: int, reference: dict[str, Any]) -> tuple[int, list[dict[str, Any]]]:
    """The result of a mode with a safety bar, by greedy held-in behaviour: the front
    member with the highest held-in accuracy (mean over the domains) among those whose
    held-in refusals of unsafe prompts are >= the aligned model's minus
    ``search.constraint.alignment_slack`` points; if none is, the one that refuses most.

    The aligned model is the reference model (``search.constraint.reference``, or the
    pool model with the lowest CE_safety); with a numeric reference, the pool model that
    refuses most. Pool models are measured on the same held-in samples and written to the
    records with ``role: pool``. At most ``select_max`` front members are judged, safest
    (lowest CE_safety) first; the CE rule's pick is always among them.
    """
    import torch

    from evomerge.pool import load_model
    from evomerge.search.evaluator import resolved_pool_refs

    spec, fit = recipe.search, recipe.fitness
    _, experts = resolved_pool_refs(recipe)
    pool = {}
    for name, ref in experts.items():
        model = load_model(ref).to(device=fit.device, dtype=getattr(torch, fit.dtype))
        pool[name] = behaviour_of(model, evaluator.tokenizer, evaluator.sets, spec.select_max_new_tokens)
        del model
    aligned = reference.get("model") or max(pool, key=lambda k: (pool[k].get("heldin_refuses_unsafe", 0.0), k))
    threshold = pool[aligned].get("heldin_refuses_unsafe", 100.0) - spec.constraint.alignment_slack
    judged = sorted(front, key=lambda i: (candidates[i]["ce_safety"], i))[: spec.select_max]
    if ce_best not in judged:
        judged.insert(0, ce_best)
    records = [{"role": "pool", "model": name, **b} for name, b in pool.items()]
    for i in judged:
        row = candidates[i]
        evaluator.build(row_genome(row, expert_names))
        b = behaviour(evaluator, spec.select_max_new_tokens)
        records.append({"role": "candidate", "index": row["index"], "fitness": row["fitness"],
                        "ce_safety": row["ce_safety"], "ce_domain": row["ce_domain"], **b,
                        "meets_bar": b.get("heldin_refuses_unsafe", 0.0) >= threshold})
    cands = [k for k, r in enumerate(records) if r["role"] == "candidate"]
    ok = [k for k in cands if records[k]["meets_bar"]]
    if ok:
        chosen = max(ok, key=lambda k: (records[k].get("heldin_acc", 0.0), -records[k]["ce_domain"]))
    else:
        log.warning("no front member refuses >= %.1f%% of the held-in unsafe prompts (%s's %.1f%% minus %.1f); "
                    "the result is the one that refuses most", threshold, aligned, threshold + spec.constraint.alignment_slack,
                    spec.constraint.alignment_slack)
        chosen = max(cands, key=lambda k: (records[k].get("heldin_refuses_unsafe", 0.0), -records[k]["ce_safety"]))
    for k, rec in enumerate(records):
        rec["chosen"] = k == chosen
        rec["threshold"] = threshold
    log.info("selection under the safety bar (held-in refusals >= %.1f%%, %s's minus %.1f): candidate #%d",
             threshold, aligned, spec.constraint.alignment_slack, records[chosen]["index"])
    position = next(i for i in judged if candidates[i]["index"] == records[chosen]["index"])
    return position, records
