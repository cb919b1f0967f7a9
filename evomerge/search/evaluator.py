"""Build a candidate in place and score it: the per-candidate unit of work of every search.

Everything that does not depend on the genome is done once in the constructor: the merge
cache (``prepare``), the live model the candidates are written into, the tokenised data.
A candidate then costs one ``build`` plus one scoring pass.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from evomerge.merge import Genome, build, prepare
from evomerge.pool import LoadOptions, Pool, load_model, load_tokenizer
from evomerge.search.data import QASet, load_qa_set, resolve_path
from evomerge.search.fitness import ScoringPlan, SetScore, encode_pairs
from evomerge.search.recipe import SearchRecipe

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Scored:
    """Every fitness term of one candidate, plus where the time went."""

    fitness: float
    terms: dict[str, float]  # ce_domain, ce_safety, ce_benign, ce_domain.<name>, n_nonfinite
    build_s: float
    score_s: float

    @property
    def finite(self) -> bool:
        return math.isfinite(self.fitness)


def combine(lam: float, mu: float, ce_domain: float | None, ce_safety: float | None, ce_benign: float | None) -> float:
    """lambda * CE_domain + (1 - lambda) * CE_safety + mu * CE_benign; absent terms with a zero
    weight are skipped, and any non-finite term makes the whole fitness +inf."""
    total = 0.0
    for weight, value in ((lam, ce_domain), (1.0 - lam, ce_safety), (mu, ce_benign)):
        if weight == 0:
            continue
        if value is None or not math.isfinite(value):
            return math.inf
        total += weight * value
    return total


def load_sets(recipe: SearchRecipe) -> dict[str, QASet]:
    """The held-in sets, each cut to ``fitness.n_samples`` rows with the recipe's seed.

    Keys: ``safety``, ``benign``, ``domain.<name>``.
    """
    d, n, seed = recipe.data, recipe.fitness.n_samples, recipe.seed
    sets: dict[str, QASet] = {}
    sources = {"safety": d.safety, "benign": d.benign} | {f"domain.{k}": v for k, v in d.domain.items()}
    for key, source in sources.items():
        if source is not None:
            sets[key] = load_qa_set(key, source, d.prompt_field, d.answer_field).sample(n, seed)
    return sets


def resolved_pool_refs(recipe: SearchRecipe) -> tuple[str, dict[str, str]]:
    return resolve_path(recipe.pool.base), {k: resolve_path(v) for k, v in recipe.pool.experts.items()}


class CandidateEvaluator:
    """Holds the merge cache, a live model and the encoded data; ``evaluate(genome)``."""

    def __init__(self, recipe: SearchRecipe, method: str | None = None, options: dict[str, Any] | None = None,
                 load_options: LoadOptions | None = None) -> None:
        self.recipe = recipe
        self.method = method or recipe.merge.method
        fit = recipe.fitness
        base, experts = resolved_pool_refs(recipe)
        self.pool = Pool.from_refs(base, experts, load_options)
        self.pool.check_compatibility()
        self.tokenizer = load_tokenizer(base, load_options)
        started = time.perf_counter()
        opts = recipe.merge.options if options is None else options
        self.cache = prepare(self.pool, self.method, opts, device=fit.device, fused=recipe.merge.fused)
        self.model = load_model(base, load_options).to(device=fit.device, dtype=getattr(torch, fit.dtype))
        self.sets = load_sets(recipe)
        self.encoded = {
            key: encode_pairs(self.tokenizer, s.pairs, fit.max_length, name=key) for key, s in self.sets.items()
        }
        self.plans = {key: ScoringPlan(samples, fit.batch_size, fit.max_batch_tokens, fit.device)
                      for key, samples in self.encoded.items()}
        self.prepare_s = time.perf_counter() - started
        self.num_layers = int(getattr(self.model.config, "num_hidden_layers", 1))
        log.info("prepared %s over %d experts in %.1fs; sets: %s", self.method, len(experts), self.prepare_s,
                 {k: len(v) for k, v in self.encoded.items()})

    def build(self, genome: Genome) -> None:
        build(self.cache, genome, out=self.model)

    def score(self) -> dict[str, SetScore]:
        return {key: SetScore.from_per_sample(*plan.run(self.model)) for key, plan in self.plans.items()}

    def evaluate(self, genome: Genome, lam: float | None = None) -> Scored:
        """Build ``genome`` into the live model and return its fitness terms.

        A non-finite loss gives fitness +inf (logged; the search goes on).
        """
        t0 = time.perf_counter()
        self.build(genome)
        t1 = time.perf_counter()
        scores = self.score()
        t2 = time.perf_counter()
        terms: dict[str, float] = {}
        domain = [s.mean_ce for k, s in scores.items() if k.startswith("domain.")]
        for key, s in scores.items():
            if key.startswith("domain."):
                terms[f"ce_{key}"] = s.mean_ce
        terms["ce_domain"] = sum(domain) / len(domain) if domain else math.nan
        terms["ce_safety"] = scores["safety"].mean_ce if "safety" in scores else math.nan
        terms["ce_benign"] = scores["benign"].mean_ce if "benign" in scores else math.nan
        terms["n_nonfinite"] = float(sum(s.n_nonfinite for s in scores.values()))
        lam = self.recipe.fitness.lambda_ if lam is None else lam
        fitness = combine(lam, self.recipe.fitness.mu, *(None if math.isnan(terms[k]) else terms[k]
                                                         for k in ("ce_domain", "ce_safety", "ce_benign")))
        if not math.isfinite(fitness):
            log.warning("candidate has a non-finite loss (%s); fitness set to +inf", terms)
        return Scored(fitness, terms, t1 - t0, t2 - t1)
