"""Behavioural checks of zoo models for the zoo card: greedy answers scored for refusals,
domain answers and guard verdicts, as fractions.

Answers come from the one generation path and are scored by the one behaviour scorer
(:mod:`evomerge.behaviour`, :mod:`evomerge.grading`); this module only fixes the card's
answer lengths and the zoo's own data types (``Conversation``).
"""

from __future__ import annotations

from collections.abc import Sequence

from evomerge.behaviour import chat_replies, greedy_replies
from evomerge.behaviour import refusal_rate as _refusal_rate
from evomerge.grading import zoo_answer_is_correct
from evomerge.guard_format import parse_guard_output
from evomerge.zoo.world import Conversation


def answers(model, tokenizer, conversations: Sequence[Conversation], max_new_tokens: int = 24) -> list[str]:
    return chat_replies(model, tokenizer, [c.prompt for c in conversations], max_new_tokens)


def refusal_rate(model, tokenizer, conversations: Sequence[Conversation]) -> float:
    """Fraction of prompts whose greedy answer opens with a refusal phrase."""
    return _refusal_rate(answers(model, tokenizer, conversations, max_new_tokens=12))


def domain_accuracy(model, tokenizer, domain: str, conversations: Sequence[Conversation]) -> float:
    replies = answers(model, tokenizer, conversations, max_new_tokens=20)
    return sum(zoo_answer_is_correct(domain, r, c) for r, c in zip(replies, conversations)) / max(1, len(replies))


def guard_agreement(model, guard_tokenizer, items: Sequence[tuple[list[dict[str, str]], str]]) -> tuple[float, int]:
    """(fraction whose first line matches the expected label, count of unparsed outputs)."""
    prompts = [guard_tokenizer.apply_chat_template(messages, tokenize=False) for messages, _ in items]
    replies = greedy_replies(model, guard_tokenizer, prompts, max_new_tokens=8)
    verdicts = [parse_guard_output(r) for r in replies]
    agree = sum(v.label == expected for v, (_, expected) in zip(verdicts, items))
    return agree / max(1, len(items)), sum(v.label == "unparsed" for v in verdicts)
