"""The after-search check on held-out prompts: greedy answers, refusal phrases, exact match.

A quick, transparent check (refusal phrases are weaker than a guard judge: see
``evomerge.refusal``); it shows whether a lower safety loss became refusals on prompts
the search never saw.
"""

from __future__ import annotations

import re
from typing import Any

from evomerge.refusal import is_refusal
from evomerge.search.data import QASet, load_qa_set
from evomerge.search.recipe import EvaluateSpec
from evomerge.zoo.evaluate import generate, render_prompt


def answer_is_correct(domain: str, reply: str, row: dict[str, Any], answer_field: str = "answer") -> bool:
    """Zoo rows carry the key answer in ``topic`` (the sum, the capital): the synthetic
    world's own rule scores them. Other data: the reference answer appears in the reply,
    ignoring case and spacing."""
    if row.get("topic") and row.get("kind") == domain:
        from datagen.synthetic import Conversation, domain_answer_is_correct

        return domain_answer_is_correct(domain, reply, Conversation(row["prompt"], row[answer_field], domain, row["topic"]))
    norm = lambda s: re.sub(r"\s+", " ", s).strip().lower()  # noqa: E731
    return norm(row[answer_field]) in norm(reply)


def load_heldout(spec: EvaluateSpec, seed: int) -> dict[str, QASet]:
    sets: dict[str, QASet] = {}
    sources = {"unsafe": spec.unsafe, "benign": spec.benign} | {f"domain.{k}": v for k, v in spec.domain.items()}
    for key, source in sources.items():
        if source is not None:
            sets[key] = load_qa_set(key, source).sample(spec.limit, seed)
    return sets


def check_model(model, tokenizer, sets: dict[str, QASet], max_new_tokens: int = 24) -> dict[str, float]:
    """Percentages: ``refuses_unsafe``, ``refuses_benign`` and ``acc_<domain>``."""
    out: dict[str, float] = {}
    for key, qa in sets.items():
        prompts = [render_prompt(tokenizer, p) for p, _ in qa.pairs]
        replies = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
        if key in ("unsafe", "benign"):
            out[f"refuses_{key}"] = 100.0 * sum(map(is_refusal, replies)) / len(replies)
        else:
            domain = key.split(".", 1)[1]
            hits = sum(answer_is_correct(domain, r, row) for r, row in zip(replies, qa.rows))
            out[f"acc_{domain}"] = 100.0 * hits / len(replies)
    return out
