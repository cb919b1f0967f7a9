"""Answer grading: whether a reply gets a domain question right.

One rule for every caller (the held-out check, selection by behaviour, ``evomerge eval``,
the zoo card): zoo rows (with a ``topic`` and ``kind`` equal to the domain) are graded by
the synthetic world's own rule (:func:`evomerge.zoo.world.domain_answer_is_correct`);
any other row by containment of its reference answer, ignoring case and spacing.
Refusals are detected by phrase in :mod:`evomerge.refusal`.
"""

from __future__ import annotations

import re
from typing import Any

from evomerge.refusal import is_refusal

__all__ = ["answer_is_correct", "contains_reference", "is_refusal", "zoo_answer_is_correct"]


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def contains_reference(reference: str, reply: str) -> bool:
    """The reference answer appears in the reply, ignoring case and spacing."""
    return _norm(reference) in _norm(reply)


def zoo_answer_is_correct(domain: str, reply: str, conversation: Any) -> bool:
    """The synthetic world's rule for one of its own questions (a ``Conversation``)."""
    from evomerge.zoo.world import domain_answer_is_correct

    return domain_answer_is_correct(domain, reply, conversation)


def answer_is_correct(domain: str, reply: str, row: dict[str, Any], answer_field: str = "answer") -> bool:
    """Zoo rows carry the key answer in ``topic`` (the sum, the capital): the synthetic
    world's own rule scores them. Other data: the reference answer appears in the reply,
    ignoring case and spacing."""
    if row.get("topic") and row.get("kind") == domain:
        from evomerge.zoo.world import Conversation

        return zoo_answer_is_correct(domain, reply, Conversation(row["prompt"], row[answer_field], domain, row["topic"]))
    return contains_reference(row[answer_field], reply)
