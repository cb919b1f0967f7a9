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
    """Positions of the rows no other row beats on every term (lower is better)."""
    finite = [i for i, r in enumerate(rows) if all(math.isfinite(r.get(t, math.nan)) for t in terms)
              and math.isfinite(r["fitness"])]
    front = []
    for i in finite:
        a = [rows[i][t] for t in terms]
        dominated = any(all(rows[j][t] <= v for t, v in zip(terms, a)) and any(rows[j][t] < v for t, v in zip(terms, a))
                        for j in finite if j != i)
        if not dominated:
            front.append(i)
    return front


def behaviour(evaluator, max_new_tokens: int = 48) -> dict[str, float]:
    """Greedy held-in behaviour of the candidate last built into ``evaluator``, in percent."""
    from evomerge.behaviour import measure

    b = measure(evaluator.model, evaluator.tokenizer, evaluator.sets, max_new_tokens=max_new_tokens, batch_size=64)
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
    from evomerge.merge import Genome

    lam = 1.0 if recipe.search.mode == "evomm-domain" else recipe.fitness.lambda_
    mu = recipe.fitness.mu
    terms = [t for t, on in (("ce_domain", lam > 0), ("ce_safety", lam < 1), ("ce_benign", mu > 0)) if on]
    front = ce_pareto_front(candidates, terms)
    front = sorted(front, key=lambda i: candidates[i]["fitness"])[: recipe.search.select_max]
    if fitness_best not in front:
        front.insert(0, fitness_best)
    records = []
    for i in front:
        row = candidates[i]
        data = json.loads(row["genome"])
        evaluator.build(Genome.from_values(data["weights"], data.get("densities"), data.get("scale", 1.0),
                                           expert_names))
        b = behaviour(evaluator, recipe.search.select_max_new_tokens)
        records.append({"index": row["index"], "fitness": row["fitness"], **{t: row[t] for t in terms}, **b,
                        "behaviour_loss": behaviour_loss(b, lam, mu)})
    chosen = min(range(len(records)), key=lambda k: (records[k]["behaviour_loss"], records[k]["fitness"]))
    for k, rec in enumerate(records):
        rec["chosen"] = k == chosen
    log.info("selection by held-in behaviour: candidate #%d of %d on the fitness front (fitness-best #%d)",
             records[chosen]["index"], len(records), candidates[fitness_best]["index"])
    return front[chosen], records
