"""``MergeRecipe``: the YAML a user writes to materialise one merge.

    base: org/base-model            # local folder or hub id[@revision]
    experts: {math: ./math-ft, code: org/code-ft}
    method: ties
    options: {normalize: true, density_grid: null}
    dtype: bfloat16                 # output dtype (default: the base's)
    compute_dtype: bfloat16         # round inputs to this first, as mergekit's ``dtype`` (default: none)
    genome:
      weights: {math: 0.6, code: 0.4}      # or per layer group: {math: [0.6, 0.5], ...}
      densities: {math: 0.5, code: 0.5}
      scale: 1.0
"""

from __future__ import annotations

import os
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from evomerge.config import load_yaml, validate_mapping  # noqa: F401  (re-exported: older imports)
from evomerge.errors import ConfigError
from evomerge.merge.genome import Genome
from evomerge.merge.methods import MethodOptions, get_method, parse_options


class GenomeSpec(BaseModel):
    """Genome as written in YAML: values keyed by expert name (scalar or per layer group)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    weights: float | list[Any] | dict[str, float | list[float]]
    densities: float | list[Any] | dict[str, float | list[float]] | None = None
    scale: float = 1.0
    layer_granularity: int = 0  # > 0: repeat scalar values over num_layers // layer_granularity groups
    modules: bool = False  # groups are [embeddings, attention and MLP of each layer, head] (see Genome)
    filters: list[str] | None = None  # mergekit ``filter:`` classes within each group (see Genome)

    @field_validator("densities")
    @classmethod
    def _in_unit_interval(cls, v: Any) -> Any:
        """Checked when the file is read (so the error names it), not only when merged."""
        def walk(x: Any, where: str) -> None:
            if isinstance(x, dict):
                for k, item in x.items():
                    walk(item, f"{where}.{k}")
            elif isinstance(x, (list, tuple)):
                for i, item in enumerate(x):
                    walk(item, f"{where}[{i}]")
            elif isinstance(x, (int, float)) and not 0.0 <= float(x) <= 1.0:
                raise ValueError(f"{where} = {x}: a density must lie in [0, 1]")

        walk(v, "densities")
        return v

    def to_genome(self, expert_names: list[str], num_layers: int | None = None) -> Genome:
        genome = Genome.from_values(self.weights, self.densities, self.scale, expert_names, self.modules, self.filters or ())
        if self.layer_granularity and genome.n_groups == 1 and not genome.filters and num_layers:
            if num_layers % self.layer_granularity:
                raise ConfigError(
                    f"genome.layer_granularity {self.layer_granularity} does not divide the {num_layers} layers"
                )
            groups = num_layers // self.layer_granularity
            dens = None if genome.densities is None else genome.densities * groups
            genome = Genome(genome.weights * groups, dens, genome.scale)
        return genome

    @classmethod
    def from_genome(cls, genome: Genome, expert_names: list[str]) -> GenomeSpec:
        return cls.model_validate(genome.to_dict(expert_names))


class MergeRecipe(BaseModel):
    """One merge: pool, method, static options, output dtype and (optionally) the genome."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    base: str
    experts: dict[str, str]
    method: str
    options: dict[str, Any] = {}
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    # mergekit's ``dtype``: inputs are rounded to it before any arithmetic (which stays float32)
    compute_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    genome: GenomeSpec | None = None

    @model_validator(mode="after")
    def _check(self) -> MergeRecipe:
        if not self.experts:
            raise ValueError("experts: at least one expert is needed")
        get_method(self.method)
        parse_options(self.method, self.options)
        return self

    @property
    def method_options(self) -> MethodOptions:
        return parse_options(self.method, self.options)

    @classmethod
    def from_dict(cls, data: Any, source: str = "recipe") -> MergeRecipe:
        return validate_mapping(cls, data, source)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(exclude_none=True), sort_keys=False)


def load_genome(path: str | os.PathLike[str]) -> GenomeSpec:
    """A genome file: the ``genome:`` block of a recipe, or the mapping on its own."""
    data = load_yaml(path)
    if isinstance(data, dict) and "genome" in data:
        data = data["genome"]
    return validate_mapping(GenomeSpec, data, str(path))
