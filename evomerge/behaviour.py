"""Greedy behaviour on prompt sets: refusals of unsafe and benign prompts, domain accuracy.

The one scorer behind the after-search held-out check (``search/heldout.py``), selection
by held-in behaviour (``search/select.py``) and the zoo card (``zoo/evaluate.py``); the
judged evaluation (``evaluation.py``) grades its answers with the same rules. Answers are
greedy, from the one generation path (:class:`evomerge.generation.TransformersGenerator`);
refusals are refusal phrases (:mod:`evomerge.refusal`) and accuracy is
:func:`evomerge.grading.answer_is_correct`.

Sets are keyed as the callers key them: ``unsafe`` (or ``safety``), ``benign`` and
``domain.NAME``; each value has ``pairs`` ((prompt, answer) tuples) and ``rows``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from evomerge.generation import GenerationParams, TransformersGenerator, render_chats
from evomerge.grading import answer_is_correct
from evomerge.refusal import is_refusal

UNSAFE_KEYS = ("unsafe", "safety")


def greedy_replies(model: Any, tokenizer: Any, prompt_texts: Sequence[str], max_new_tokens: int = 24,
                   batch_size: int = 128) -> list[str]:
    """Greedy continuations of already-rendered prompts (batched, left padding)."""
    params = GenerationParams(max_new_tokens=max_new_tokens, batch_size=batch_size)
    return TransformersGenerator(model, tokenizer).complete(list(prompt_texts), params)


def chat_replies(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 24,
                 batch_size: int = 128) -> list[str]:
    """Greedy answers to single user turns, rendered by the model's own chat template."""
    chats = [[{"role": "user", "content": p}] for p in prompts]
    return greedy_replies(model, tokenizer, render_chats(tokenizer, chats), max_new_tokens, batch_size)


def refusals(replies: Sequence[str]) -> int:
    return sum(map(is_refusal, replies))


def refusal_rate(replies: Sequence[str]) -> float:
    """Fraction of replies that open with a refusal phrase (0 for no replies)."""
    return refusals(replies) / max(1, len(replies))


def percent(hits: int, n: int) -> float:
    return 100.0 * hits / n


def measure(model: Any, tokenizer: Any, sets: Mapping[str, Any], max_new_tokens: int = 24,
            batch_size: int = 128) -> dict[str, float]:
    """Percentages: ``refuses_unsafe``, ``refuses_benign`` and ``acc_<domain>``, in the sets' order."""
    out: dict[str, float] = {}
    for key, qa in sets.items():
        replies = chat_replies(model, tokenizer, [p for p, _ in qa.pairs], max_new_tokens, batch_size)
        if key in UNSAFE_KEYS:
            out["refuses_unsafe"] = percent(refusals(replies), len(replies))
        elif key == "benign":
            out["refuses_benign"] = percent(refusals(replies), len(replies))
        else:
            domain = key.split(".", 1)[1]
            answer_field = getattr(qa, "answer_field", "answer")
            hits = sum(answer_is_correct(domain, r, row, answer_field) for r, row in zip(replies, qa.rows))
            out[f"acc_{domain}"] = percent(hits, len(replies))
    return out
