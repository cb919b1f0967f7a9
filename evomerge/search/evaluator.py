"""Build a candidate in place and score it: the per-candidate unit of work of every search.

Everything that does not depend on the genome is done once in the constructor: the merge
cache (``prepare``), the live model the candidates are written into, the tokenised data.
A candidate then costs one ``build`` plus one scoring pass.

With ``fitness.backend: vllm`` the live model is a vLLM engine instead: each candidate is
built into one reusable state dict and swapped into the running engine in place, and every
set is scored from prompt logprobs (``evomerge.vllm_backend``). A transformers copy of the
model is loaded only if something asks for ``.model`` (the held-out check after a search).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from evomerge.errors import ConfigError, check_device
from evomerge.merge import Genome, build, prepare
from evomerge.pool import LoadOptions, Pool, load_model, load_tokenizer
from evomerge.refs import resolve_path
from evomerge.search.data import QASet, load_qa_set
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


_SHARED: dict[Any, Any] | None = None  # set inside ``sharing_preparation()``


@contextlib.contextmanager
def sharing_preparation() -> Iterator[dict[Any, Any]]:
    """Within this block, searches in this process reuse each other's expensive state:
    the prepared merge cache and live model (same pool, method, options, device) and the
    tokenised data (same data, sample count, seed). Ablations and reports run many
    searches that differ only in lambda, budget or mode; this makes each one start at once.

    Sharing the live model is safe because every build rewrites all merged tensors."""
    global _SHARED
    outer = _SHARED
    _SHARED = {} if outer is None else outer
    try:
        yield _SHARED
    finally:
        _SHARED = outer


def _shared(key: Any, make: Callable[[], Any]) -> Any:
    if _SHARED is None:
        return make()
    if key not in _SHARED:
        for other in [k for k in _SHARED if k[0] == key[0]]:
            del _SHARED[other]  # one of each kind at a time: a big model's cache is not kept twice
        _SHARED[key] = make()
    else:
        log.info("reusing prepared state %s", key[0])
    return _SHARED[key]


class CandidateEvaluator:
    """Holds the merge cache, a live model and the encoded data; ``evaluate(genome)``."""

    def __init__(self, recipe: SearchRecipe, method: str | None = None, options: dict[str, Any] | None = None,
                 load_options: LoadOptions | None = None) -> None:
        self.recipe = recipe
        self.method = method or recipe.merge.method
        fit = recipe.fitness
        check_device(fit.device, "fitness.device")
        base, experts = resolved_pool_refs(recipe)
        started = time.perf_counter()
        opts = recipe.merge.options if options is None else options
        pool_key = ("merge cache", base, tuple(experts.items()), self.method, repr(sorted(opts.items())),
                    fit.device, recipe.merge.fused, repr(load_options))

        def prepared() -> tuple[Any, Any, Any]:
            pool = Pool.from_refs(base, experts, load_options)
            pool.check_compatibility()
            cache = prepare(pool, self.method, opts, device=fit.device, fused=recipe.merge.fused)
            return pool, load_tokenizer(base, load_options), cache

        self.pool, self.tokenizer, self.cache = _shared(pool_key, prepared)
        self._base, self._load_options = base, load_options
        self._model: Any = None
        self.engine: Any = None  # the vLLM scorer, when fitness.backend is vllm
        self.state: dict[str, torch.Tensor] | None = None  # the candidate pushed into the engine
        if fit.backend == "vllm":
            self.engine = _vllm_scorer(base, fit.dtype, recipe.seed, fit.engine_options, load_options)
        else:
            self._model = _shared(("live model", base, fit.device, fit.dtype, repr(load_options)),
                                  self._load_live_model)
        data_key = ("encoded data", base, recipe.data.model_dump_json(), fit.n_samples, recipe.seed, fit.max_length,
                    fit.safety_tokens)
        self.sets, self.encoded = _shared(data_key, lambda: self._encode(recipe))
        self.plans = ({} if self.engine is not None else
                      {key: ScoringPlan(samples, fit.batch_size, fit.max_batch_tokens, fit.device)
                       for key, samples in self.encoded.items()})
        self.prepare_s = time.perf_counter() - started
        config = self._model.config if self._model is not None else _load_config(base)
        self.num_layers = int(getattr(config, "num_hidden_layers", 1))
        log.info("prepared %s over %d experts in %.1fs; sets: %s", self.method, len(experts), self.prepare_s,
                 {k: len(v) for k, v in self.encoded.items()})

    def _encode(self, recipe: SearchRecipe) -> tuple[dict[str, QASet], dict[str, Any]]:
        sets = load_sets(recipe)
        encoded = {key: encode_pairs(self.tokenizer, s.pairs, recipe.fitness.max_length, name=key)
                   for key, s in sets.items()}
        k = recipe.fitness.safety_tokens
        if k is not None and "safety" in encoded:
            encoded["safety"] = [sample.head(k) for sample in encoded["safety"]]
        return sets, encoded

    def _load_live_model(self) -> Any:
        fit = self.recipe.fitness
        return load_model(self._base, self._load_options).to(device=fit.device, dtype=getattr(torch, fit.dtype))

    @property
    def model(self) -> Any:
        """The live transformers model holding the last built candidate (loaded on first
        use with the vLLM backend, which does not need it to score)."""
        if self._model is None:
            self._model = self._load_live_model()
            if self.state is not None:
                self._model.load_state_dict(self.state, strict=False)
        return self._model

    def build(self, genome: Genome) -> None:
        if self.engine is None:
            build(self.cache, genome, out=self._model)
            return
        if self.state is None:  # allocated once, rewritten in place for every candidate
            self.state = build(self.cache, genome, dtype=getattr(torch, self.recipe.fitness.dtype))
        else:
            build(self.cache, genome, out=self.state)
        self.engine.load_state_dict(self.state)
        if self._model is not None:
            self._model.load_state_dict(self.state, strict=False)

    def score(self) -> dict[str, SetScore]:
        if self.engine is not None:
            return self._score_vllm()
        return {key: SetScore.from_per_sample(*plan.run(self.model)) for key, plan in self.plans.items()}

    def _score_vllm(self) -> dict[str, SetScore]:
        """Every set in one engine call (vLLM schedules them together), then split back."""
        keys = list(self.encoded)
        ce, counts = self.engine.score([s for k in keys for s in self.encoded[k]])
        out: dict[str, SetScore] = {}
        start = 0
        for key in keys:
            n = len(self.encoded[key])
            out[key] = SetScore.from_per_sample(ce[start : start + n], counts[start : start + n])
            start += n
        return out

    def evaluate(self, genome: Genome) -> Scored:
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
        fitness = combine(self.recipe.fitness.lambda_, self.recipe.fitness.mu, *(None if math.isnan(terms[k]) else terms[k]
                                                         for k in ("ce_domain", "ce_safety", "ce_benign")))
        if not math.isfinite(fitness):
            log.warning("candidate has a non-finite loss (%s); fitness set to +inf", terms)
        return Scored(fitness, terms, t1 - t0, t2 - t1)


def _vllm_scorer(base: str, dtype: str, seed: int, options: dict[str, Any], load_options: LoadOptions | None) -> Any:
    try:
        from evomerge.vllm_backend import VLLMScorer
    except ImportError as exc:
        raise ConfigError(f"fitness.backend: vllm needs vllm installed ({exc})") from None
    return VLLMScorer(base, dtype=dtype, seed=seed, load_options=load_options, **options)


def _load_config(base: str) -> Any:
    from evomerge.pool import load_config

    return load_config(base)
