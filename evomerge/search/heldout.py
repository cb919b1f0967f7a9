"""The after-search check on held-out prompts: greedy answers, refusal phrases, exact match.

A quick, transparent check (refusal phrases are weaker than a guard judge: see
``evomerge.refusal``); it shows whether a lower safety loss became refusals on prompts
the search never saw.
"""

from __future__ import annotations

from evomerge.behaviour import measure
from evomerge.grading import answer_is_correct  # noqa: F401  (re-exported: older imports)
from evomerge.search.data import QASet, load_qa_set
from evomerge.search.recipe import EvaluateSpec


def load_heldout(spec: EvaluateSpec, seed: int) -> dict[str, QASet]:
    sets: dict[str, QASet] = {}
    sources = {"unsafe": spec.unsafe, "benign": spec.benign} | {f"domain.{k}": v for k, v in spec.domain.items()}
    for key, source in sources.items():
        if source is not None:
            sets[key] = load_qa_set(key, source).sample(spec.limit, seed)
    return sets


def check_model(model, tokenizer, sets: dict[str, QASet], max_new_tokens: int = 24) -> dict[str, float]:
    """Percentages: ``refuses_unsafe``, ``refuses_benign`` and ``acc_<domain>``."""
    return measure(model, tokenizer, sets, max_new_tokens=max_new_tokens)
