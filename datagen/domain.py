"""Domain data by self-questioning: each expert writes questions from 3 in-context
examples of its domain, then answers them itself.

Why the expert's own answers: the search's domain term should reward a merge for
keeping what the expert knows, in the expert's own words, with no external labels.
Copies of an in-context example (or of any seed question) and duplicates are dropped;
the expert is asked again, up to ``max_attempts`` rounds, until ``n`` questions are kept.
"""

from __future__ import annotations

import json
import logging
import random
from typing import Any

from datagen.recipe import DatagenRecipe
from datagen.safety import first_line, normalize
from datagen.sources import load_prompts
from evomerge.errors import ConfigError
from evomerge.generation import make_generator
from evomerge.refs import resolve_path

log = logging.getLogger(__name__)


def self_question(domain: str, expert: str, seeds: list[str], recipe: DatagenRecipe) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    spec = recipe.domain
    gen = make_generator(recipe.backend, resolve_path(expert), device=recipe.device)
    if hasattr(gen, "label"):
        gen.label = f"datagen domain: {domain}"  # progress lines (evomerge.progress)
    rng = random.Random(f"{recipe.seed}:{domain}")
    seed_norm = {normalize(q) for q in seeds}
    kept: list[dict[str, Any]] = []
    seen: set[str] = set()
    counts = {"asked": 0, "empty": 0, "copy_of_in_context_example": 0, "copy_of_seed_question": 0,
              "duplicate": 0, "attempts": 0}
    for attempt in range(spec.max_attempts):
        missing = spec.n - len(kept)
        if missing <= 0:
            break
        counts["attempts"] += 1
        shown = [rng.sample(seeds, 3) for _ in range(missing)]
        prompts = [spec.prompt_template.format(domain=domain, examples="\n".join(s)) for s in shown]
        params = spec.question_generation.model_copy(update={"seed": recipe.seed * 1000 + attempt})
        texts = gen.chat([[{"role": "user", "content": p}] for p in prompts], params)
        counts["asked"] += len(texts)
        for examples, text in zip(shown, texts):
            q = first_line(text)
            key = normalize(q)
            if not key:
                counts["empty"] += 1
            elif key in {normalize(e) for e in examples}:
                counts["copy_of_in_context_example"] += 1
            elif key in seed_norm:
                counts["copy_of_seed_question"] += 1
            elif key in seen:
                counts["duplicate"] += 1
            else:
                seen.add(key)
                kept.append({"prompt": q, "examples": json.dumps(examples), "attempt": attempt})
            if len(kept) >= spec.n:
                break
    answers = gen.chat([[{"role": "user", "content": r["prompt"]}] for r in kept], spec.answer_generation)
    rows = [{"prompt": r["prompt"], "answer": a.strip(), "kind": domain, "domain": domain, "expert": expert,
             "in_context_examples": r["examples"], "attempt": r["attempt"]} for r, a in zip(kept, answers)]
    rows = [r for r in rows if r["answer"]]
    counts["empty_answers"] = len(kept) - len(rows)
    counts["kept"] = len(rows)
    counts["discard_rate"] = 1 - len(rows) / max(1, counts["asked"])
    if len(rows) < spec.n:
        log.warning("datagen: %s kept %d of %d questions after %d rounds", domain, len(rows), spec.n, spec.max_attempts)
    return rows, counts


def from_source(domain: str, expert: str | None, recipe: DatagenRecipe) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Real (question[, answer]) data; without an answer column the expert answers."""
    src = recipe.domain.source[domain]
    rows = load_prompts(src, recipe.seed)
    if src.answer_field is not None:
        if rows and src.answer_field not in rows[0]:
            raise ConfigError(f"domain.source.{domain}: no '{src.answer_field}' column (columns: {sorted(rows[0])})")
        answers = [str(r[src.answer_field]) for r in rows]
        who = src.path or src.package
    else:
        if expert is None:
            raise ConfigError(f"domain.source.{domain}: no answer_field and no expert to answer the questions")
        gen = make_generator(recipe.backend, resolve_path(expert), device=recipe.device)
        answers = [a.strip() for a in gen.chat([[{"role": "user", "content": r["prompt"]}] for r in rows],
                                              recipe.domain.answer_generation)]
        who = expert
    out = [{"prompt": r["prompt"], "answer": a, "kind": domain, "domain": domain, "expert": who,
            "in_context_examples": "[]", "attempt": 0} for r, a in zip(rows, answers) if a.strip()]
    return out, {"asked": len(rows), "kept": len(out), "discard_rate": 1 - len(out) / max(1, len(rows))}


def build_domain_data(recipe: DatagenRecipe) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """Per domain: kept rows (``prompt``, ``answer``, provenance) and a report."""
    spec = recipe.domain
    if spec is None:
        raise ConfigError("the recipe has no 'domain' section")
    domains = list(dict.fromkeys([*spec.experts, *spec.source]))
    if not domains:
        raise ConfigError("domain.experts: no expert (and no domain.source) to build domain data from")
    from evomerge import progress

    data, report = {}, {}
    with progress.task("datagen domain", total=len(domains)) as done:
        for d in domains:
            done.note(d)
            if d in spec.source:
                data[d], report[d] = from_source(d, spec.experts.get(d), recipe)
            else:
                data[d], report[d] = self_question(d, spec.experts[d], spec.seed_questions[d], recipe)
            log.info("datagen: domain %s: %s", d, report[d])
            done.advance(note=f"{d}: {report[d].get('kept', '?')} kept")
    return data, report
