"""Safety data: unsafe prompts, every pool model's answers, a judge, one refusal per prompt.

    prompts  <- the uncensored generator (or a real prompt set), deduplicated
    answers  <- every pool model answers every prompt (greedy by default)
    labels   <- the judge on each (prompt, answer); "safe" to an unsafe prompt = a refusal
    keep     <- per prompt, one refusal drawn at random (seeded); prompts nobody refused go

Why refusals from the pool itself: the search then asks the merge to say what one of its
own constituents already says, instead of learning a foreign refusal style.
"""

from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass, field
from typing import Any

from datagen.recipe import DatagenRecipe, SafetySpec
from datagen.sources import load_prompts
from evomerge.errors import ConfigError
from evomerge.generation import GenerationParams, make_generator
from evomerge.judges import Judgement, make_judge
from evomerge.refs import resolve_path
from evomerge.refusal import is_refusal

log = logging.getLogger(__name__)

_SPACE = re.compile(r"\s+")
_LIST_MARK = re.compile(r"^\s*(?:[-*\u2022]\s+|\d+[.)]\s+)")  # "1. ", "2) ", "- ", "* "
_QUOTES = re.compile(r"^[\s\"'`*]+|[\s\"'`*]+$")


def normalize(text: str) -> str:
    """Dedupe key: case, spacing, list numbering, quotes and final punctuation ignored."""
    text = _QUOTES.sub("", _LIST_MARK.sub("", text.replace("\u2019", "'")))
    return _SPACE.sub(" ", text).strip().rstrip(".?!").lower()


@dataclass
class Deduped:
    kept: list[dict[str, Any]] = field(default_factory=list)
    empty: int = 0
    exact_copies: int = 0
    normalized_copies: int = 0


def dedupe(rows: list[dict[str, Any]], field_name: str = "prompt") -> Deduped:
    """Drop empty texts, exact copies, then copies that differ only in form (``normalize``)."""
    out = Deduped()
    exact: set[str] = set()
    norm: set[str] = set()
    for row in rows:
        text = row[field_name].strip()
        if not text:
            out.empty += 1
        elif text in exact:
            out.exact_copies += 1
        elif normalize(text) in norm:
            out.normalized_copies += 1
        else:
            exact.add(text)
            norm.add(normalize(text))
            out.kept.append({**row, field_name: text})
    return out


def first_line(text: str) -> str:
    """A generated request is its first non-empty line (small models ramble on)."""
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def write_prompts(spec: SafetySpec, backend: str, seed: int, device: str | None) -> list[dict[str, Any]]:
    """Ask the generator for ``spec.n`` unsafe requests, cycling categories and templates."""
    gen = make_generator(backend, resolve_path(spec.generator), device=device)
    _label(gen, "datagen safety: generator writes requests")
    asks = []
    for i in range(spec.n):
        category = spec.categories[i % len(spec.categories)]
        template = spec.request_templates[(i // len(spec.categories)) % len(spec.request_templates)]
        asks.append((category, template.format(category=category)))
    params = spec.prompt_generation.model_copy(update={"seed": seed})
    texts = gen.chat([[{"role": "user", "content": a}] for _, a in asks], params)
    return [{"prompt": first_line(t), "category": c, "request": a, "generator": spec.generator}
            for (c, a), t in zip(asks, texts)]


def answer_all(pool: dict[str, str], prompts: list[str], params: GenerationParams, backend: str,
               device: str | None) -> dict[str, list[str]]:
    """Every pool model's answer to every prompt; one model in memory at a time."""
    answers = {}
    for name, ref in pool.items():
        gen = make_generator(backend, resolve_path(ref), device=device)
        _label(gen, f"datagen safety: {name} answers")
        answers[name] = [a.strip() for a in gen.chat([[{"role": "user", "content": p}] for p in prompts], params)]
        del gen
        log.info("datagen: %s answered %d prompts", name, len(prompts))
    return answers


def _label(gen: Any, text: str) -> None:
    """What the generator's progress line says (evomerge.progress)."""
    if hasattr(gen, "label"):
        gen.label = text


def _judge(spec: SafetySpec, device: str | None):
    j = spec.judge
    kwargs: dict[str, Any] = {}
    if j.name == "llama_guard":
        kwargs = {"model": resolve_path(j.model), "threshold": j.threshold, "suffix": j.suffix,
                  "batch_size": j.batch_size, "device": device}
    return make_judge(j.name, **kwargs)


def build_safety_data(recipe: DatagenRecipe) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """(kept rows, every judged answer, report). Kept rows have ``prompt``, ``answer`` and
    provenance: ``source_model``, ``judge``, ``judge_label``, ``p_unsafe``, ``refusal_string``,
    ``n_refusers``, ``requested_category`` (what the generator was asked for, or the source's
    category), ``prompt_source``."""
    spec = recipe.safety
    if spec is None:
        raise ConfigError("the recipe has no 'safety' section")
    if not recipe.pool:
        raise ConfigError("pool: no models to answer the unsafe prompts")
    if spec.source is not None:
        raw = [{**r, "prompt_source": spec.source.package or spec.source.path} for r in load_prompts(spec.source, recipe.seed)]
    else:
        raw = [{**r, "prompt_source": spec.generator} for r in write_prompts(spec, recipe.backend, recipe.seed, recipe.device)]
    deduped = dedupe(raw)
    prompts = [r["prompt"] for r in deduped.kept]
    answers = answer_all(recipe.pool, prompts, spec.answer_generation, recipe.backend, recipe.device)
    judge = _judge(spec, recipe.device)
    models = list(recipe.pool)
    from evomerge import progress

    verdicts: dict[str, list[Judgement]] = {}
    with progress.task(f"datagen safety: {judge.name} judges", total=len(models)) as judged_models:
        for m in models:
            judged_models.note(f"{m}'s {len(prompts)} answers")
            verdicts[m] = judge.judge(list(zip(prompts, answers[m])))
            judged_models.advance(note=m)

    rng = random.Random(f"{recipe.seed}:safety")
    kept, judged = [], []
    for i, row in enumerate(deduped.kept):
        refusers = []
        for m in models:
            v, answer = verdicts[m][i], answers[m][i]
            phrase = is_refusal(answer)
            refused = v.label == "safe" and (phrase or not spec.require_refusal_string)
            judged.append({"prompt": row["prompt"], "model": m, "answer": answer, "judge_label": v.label,
                           "categories": ",".join(v.categories), "p_unsafe": v.p_unsafe, "refusal_string": phrase,
                           "refusal": refused})
            if refused:
                refusers.append(m)
        if not refusers:
            continue
        pick = rng.choice(refusers)
        v = verdicts[pick][i]
        kept.append({"prompt": row["prompt"], "answer": answers[pick][i], "kind": "unsafe",
                     "requested_category": row.get("category", ""), "source_model": pick, "judge": judge.name,
                     "judge_label": v.label, "p_unsafe": v.p_unsafe, "refusal_string": is_refusal(answers[pick][i]),
                     "n_refusers": len(refusers), "prompt_source": row["prompt_source"]})

    n_in = len(raw)
    per_model = []
    for m in models:
        rows = [r for r in judged if r["model"] == m]
        per_model.append({"model": m, "refuses_by_judge": sum(r["refusal"] for r in rows) / max(1, len(rows)),
                          "refusal_phrase": sum(r["refusal_string"] for r in rows) / max(1, len(rows)),
                          "unparsed": sum(r["judge_label"] == "unparsed" for r in rows),
                          "supplied": sum(r["source_model"] == m for r in kept)})
    agree = sum((r["judge_label"] == "safe") == r["refusal_string"] for r in judged) / max(1, len(judged))
    report = {
        "prompts_requested": n_in, "empty": deduped.empty, "exact_copies": deduped.exact_copies,
        "normalized_copies": deduped.normalized_copies, "unique_prompts": len(deduped.kept),
        "dropped_nobody_refused": len(deduped.kept) - len(kept), "kept": len(kept),
        "discard_rate": 1 - len(kept) / max(1, n_in), "judge": judge.name,
        "judge_agrees_with_refusal_strings": agree,
        "unparsed_judgements": sum(r["judge_label"] == "unparsed" for r in judged),
        "per_model": per_model,
    }
    return kept, judged, report
