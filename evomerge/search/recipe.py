"""``SearchRecipe``: the typed YAML behind ``evomerge search``.

    name: demo
    seed: 0
    pool: {base: zoo:base, experts: {safe: zoo:safe, math: ./math-ft}}
    merge: {method: ties, options: {}}
    data: {safety: zoo:data/safety.jsonl, domain: {math: data/math.jsonl}, benign: null}
    fitness: {lambda: 0.5, mu: 0.0, n_samples: 100}
    search: {mode: cmaes, steps: 20, layer_granularity: 0, workers: {backend: serial}}

Every field can be overridden from the command line by its dotted name
(``search.steps=3 fitness.lambda=0.5``); values are parsed as YAML scalars or lists.
Paths starting with ``zoo:`` point into the tiny zoo (built on first use, then cached).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from evomerge.config import apply_overrides, load_overridden, load_yaml, validate_mapping  # noqa: F401  (re-exported)
from evomerge.errors import ConfigError
from evomerge.merge.mergekit_compat import PASSTHROUGH_SEARCH
from evomerge.merge.methods import get_method, parse_options
from evomerge.refs import ZOO_PREFIX
from evomerge.search.modes import MODE_NAMES, MODES

SearchMode = Literal[MODE_NAMES]  # one table of modes: evomerge.search.modes


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class PoolSpec(_Strict):
    """The models: a base and named experts (local folders, hub ids or ``zoo:NAME``)."""

    base: str
    experts: dict[str, str]

    @field_validator("experts")
    @classmethod
    def _some(cls, v: dict[str, str]) -> dict[str, str]:
        if not v:
            raise ValueError("at least one expert is needed")
        return v


class MergeSpec(_Strict):
    method: str = "ties"
    options: dict[str, Any] = {}
    fused: bool | None = None  # compile the TIES/DARE kernels (None: engine default); pays off on big models

    @model_validator(mode="after")
    def _known(self) -> MergeSpec:
        if self.method == "passthrough":
            raise ValueError(PASSTHROUGH_SEARCH)
        get_method(self.method)
        parse_options(self.method, self.options)
        return self


class DataSpec(_Strict):
    """Held-in sets the fitness reads: JSONL / parquet files or ``datasets`` folders."""

    safety: str | None = None
    domain: dict[str, str] = {}
    benign: str | None = None
    prompt_field: str = "prompt"
    answer_field: str = "answer"


class FitnessSpec(_Strict):
    """fitness = lambda * CE_domain + (1 - lambda) * CE_safety + mu * CE_benign."""

    @field_validator("device")
    @classmethod
    def _device_spelling(cls, v: str) -> str:
        from evomerge.errors import check_device

        check_device(v, "fitness.device", available=False)
        return v

    lambda_: float = Field(0.5, alias="lambda", ge=0.0, le=1.0)
    mu: float = Field(0.0, ge=0.0)
    n_samples: int = Field(100, gt=0)
    # score only the first k answer tokens of the safety set (None: the whole answer). A greedy
    # answer refuses or complies in its first tokens; the rest of a refusal text dilutes the CE.
    safety_tokens: int | None = Field(None, gt=0)
    batch_size: int = Field(64, gt=0)
    max_batch_tokens: int = Field(16384, gt=0)
    max_length: int = Field(2048, gt=1)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"  # spelling checked here; availability when the search starts (CandidateEvaluator)
    # who scores: a live transformers model, or a vLLM engine the candidates are swapped into
    backend: Literal["transformers", "vllm"] = "transformers"
    engine_options: dict[str, Any] = {}  # extra vLLM engine arguments (gpu_memory_utilization, ...)


class Bounds(_Strict):
    weight: tuple[float, float] = (0.0, 1.0)
    density: tuple[float, float] = (0.1, 1.0)

    @model_validator(mode="after")
    def _ordered(self) -> Bounds:
        for name in ("weight", "density"):
            lo, hi = getattr(self, name)
            if not lo < hi:
                raise ValueError(f"{name}: lower bound {lo} must be below the upper bound {hi}")
        if self.density[0] < 0 or self.density[1] > 1:
            raise ValueError(f"density: bounds {list(self.density)} must lie within [0, 1]")
        return self


class GridSpec(_Strict):
    weights: list[float] = [0.25, 0.5, 0.75, 1.0]
    densities: list[float] = [0.5, 1.0]


class CocktailSpec(_Strict):
    temperature: float = Field(5.0, gt=0)
    use_safety: bool = True


EvalBackendName = Literal["serial", "ray"]


class WorkersSpec(_Strict):
    """Who evaluates a generation: this process (``serial``) or ``n`` Ray actors, each
    holding its own merge cache and live model (``ray``, the optional extra)."""

    backend: EvalBackendName = "serial"
    n: int = Field(2, ge=1)  # actors (ray only)
    address: str | None = None  # None: start a local cluster; "auto" or "ray://host:port": join one
    num_cpus_per_worker: int = Field(1, ge=1)  # also each actor's torch thread count
    num_gpus_per_worker: float = Field(0.0, ge=0.0)  # 1: one GPU per actor (set fitness.device: cuda)


class ConstraintSpec(_Strict):
    """The safety bar of ``constrained`` and ``pareto``: CE_safety <= reference + slack.

    ``reference`` None: the pool model with the lowest safety CE (measured once, before the
    first generation, and kept in the checkpoint); an expert's name: that model's safety CE;
    a number: that CE itself. ``alignment_slack``: for ``pareto`` with ``search.select:
    behaviour``, points of held-in refusals below the aligned model's still accepted.
    ``al_dimension``: the dimension ``constrained`` hands pycma's augmented Lagrangian, which
    divides its multipliers and their adaptation rate by it; 1 lets them settle within the tens
    of generations of a merge search, None (the genome's length, pycma's own choice) suits
    hundreds (docs/search.md, "The safety bar")."""

    reference: float | str | None = None
    slack: float = Field(0.05, ge=0.0)  # nats of safety CE
    alignment_slack: float = Field(2.0, ge=0.0)  # percentage points
    al_dimension: int | None = Field(1, ge=1)


class SearchSpec(_Strict):
    mode: SearchMode = "cmaes"
    # genes: per_layer (one group per search.layer_granularity layers) or per_module
    # (embeddings, attention and MLP of every layer, head: 2 * layers + 2 groups)
    genome: Literal["per_layer", "per_module"] = "per_layer"
    steps: int | None = Field(20, gt=0)  # generations
    max_evals: int | None = Field(None, gt=0)
    popsize: int | None = Field(None, gt=1)
    sigma0: float = Field(1 / 6, gt=0)
    layer_granularity: int = Field(0, ge=0)  # layers per group; 0 = one group for the whole model
    x0_weight: float | None = None  # None: 1 / number of experts
    x0_density: float = 1.0
    bounds: Bounds = Bounds()
    grid: GridSpec = GridSpec()
    cocktail: CocktailSpec = CocktailSpec()
    workers: WorkersSpec = WorkersSpec()
    constraint: ConstraintSpec = ConstraintSpec()
    # which candidate is the result: lowest fitness, or best greedy behaviour on the held-in
    # data among the fitness terms' Pareto front (evomerge.search.select explains why)
    select: Literal["fitness", "behaviour"] = "fitness"
    select_max: int = Field(32, gt=0)  # front members (best fitness first) judged by behaviour
    select_max_new_tokens: int = Field(48, gt=0)

    @model_validator(mode="after")
    def _stop_rule(self) -> SearchSpec:
        if MODES[self.mode].budget and self.steps is None and self.max_evals is None:
            raise ValueError("a stop rule is needed: search.steps (generations) or search.max_evals")
        if self.genome == "per_module" and self.layer_granularity:
            raise ValueError(f"search.genome: per_module has its own groups (embeddings, attention and MLP of each "
                             f"layer, head); set search.layer_granularity: 0 (it is {self.layer_granularity})")
        return self


class EvaluateSpec(_Strict):
    """Held-out sets for the after-search check (greedy answers; refusal phrases)."""

    unsafe: str | None = None
    benign: str | None = None
    domain: dict[str, str] = {}
    limit: int | None = Field(None, gt=0)
    compare_pool: bool = True
    max_new_tokens: int = Field(24, gt=0)


class ContaminationSpec(_Strict):
    """The check before a search starts (``evomerge.contamination``): evaluation prompts
    against the search data. ``eval_sets`` None: the recipe's ``evaluate`` sets plus the
    sets ``evomerge eval`` uses by default for this pool; ``also``: more data the search
    came from (datagen output folders or files)."""

    check: bool = True
    strict: bool = False  # refuse to start instead of warning
    ngram: int = Field(13, ge=1)  # words in a shared run that counts as contamination
    eval_sets: list[str] | None = None
    also: list[str] = []


class SearchRecipe(_Strict):
    name: str = "search"  # run folders are <runs-root>/<name>-<timestamp>: one folder name, never a path
    seed: int = 0
    pool: PoolSpec
    merge: MergeSpec = MergeSpec()
    data: DataSpec
    fitness: FitnessSpec = FitnessSpec()
    search: SearchSpec = SearchSpec()
    evaluate: EvaluateSpec = EvaluateSpec()
    contamination: ContaminationSpec = ContaminationSpec()
    write_model: bool = True
    report_to: list[str] = []  # experiment trackers: tensorboard, mlflow, wandb (evomerge.tracking)

    @field_validator("report_to")
    @classmethod
    def _known_trackers(cls, v: list[str]) -> list[str]:
        from evomerge.tracking import check_report_to

        try:
            return check_report_to(v)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None  # so the error names the field

    @field_validator("name")
    @classmethod
    def _folder_name(cls, v: str) -> str:
        from evomerge.runfolder import check_name

        return check_name(v, "name")

    @model_validator(mode="after")
    def _consistent(self) -> SearchRecipe:
        lam, mu = self.fitness.lambda_, self.fitness.mu
        mode = MODES[self.search.mode]
        why = lambda need, cond: f"search.mode {mode.name}" if need == "always" else cond  # noqa: E731
        if mode.needs_domain(lam) and not self.data.domain:
            raise ValueError(f"data.domain: no domain set, but {why(mode.domain, 'fitness.lambda > 0')} needs one")
        if mode.needs_safety(lam) and self.data.safety is None:
            raise ValueError(f"data.safety: no safety set, but {why(mode.safety, 'fitness.lambda < 1')} needs one")
        if mu > 0 and self.data.benign is None:
            raise ValueError("data.benign: no benign set, but fitness.mu > 0 needs one")
        ref = self.search.constraint.reference
        if isinstance(ref, str) and ref not in self.pool.experts:
            raise ValueError(f"search.constraint.reference: '{ref}' is neither a number nor a pool expert "
                             f"(experts: {', '.join(self.pool.experts)})")
        if isinstance(ref, float) and not math.isfinite(ref):
            raise ValueError(f"search.constraint.reference: {ref} is not a finite cross-entropy")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(by_alias=True, mode="json"), sort_keys=False)


# --------------------------------------------------------------------------- loading
def recipe_from_dict(data: Any, source: str = "recipe") -> SearchRecipe:
    """Validate a mapping as a :class:`SearchRecipe`."""
    if isinstance(data, dict) and "merge_method" in data and "pool" not in data:
        why = PASSTHROUGH_SEARCH if data["merge_method"] == "passthrough" else (
            "write one with pool, data and merge: {method: ...}, or run it with `evomerge merge`")
        raise ConfigError(f"{source}: a mergekit config (merge_method: {data['merge_method']}) is not a search "
                          f"recipe: {why}")
    return validate_mapping(SearchRecipe, data, source)


def load_search_recipe(path: str | os.PathLike[str], overrides: list[str] | None = None) -> SearchRecipe:
    recipe = recipe_from_dict(load_overridden(path, overrides), str(path))
    root = Path(path).parent
    also = [_anchor(v, root) for v in recipe.contamination.also]
    return recipe.model_copy(update={"data": _anchor_paths(recipe.data, root),
                                     "evaluate": _anchor_paths(recipe.evaluate, root),
                                     "contamination": recipe.contamination.model_copy(update={"also": also})})


def _anchor(value: str, root: Path) -> str:
    """Relative data paths are read relative to the recipe's folder when they exist there."""
    if value.startswith(ZOO_PREFIX) or Path(value).is_absolute() or Path(value).exists():
        return value
    candidate = root / value
    return str(candidate) if candidate.exists() else value


def _anchor_paths(spec: Any, root: Path) -> Any:
    update: dict[str, Any] = {}
    for field in ("safety", "benign", "unsafe"):
        value = getattr(spec, field, None)
        if isinstance(value, str):
            update[field] = _anchor(value, root)
    update["domain"] = {k: _anchor(v, root) for k, v in spec.domain.items()}
    return spec.model_copy(update=update)


def default_popsize(n_dims: int) -> int:
    """pycma's default, ``4 + floor(3 ln n)``."""
    return 4 + int(math.floor(3 * math.log(max(1, n_dims))))
