"""Judge output parsing never reads garbage as safe; refusal phrases are recognised."""

from __future__ import annotations

import pytest

from evomerge.guard_format import parse_guard_output
from evomerge.refusal import is_refusal


@pytest.mark.parametrize(
    ("text", "label", "codes"),
    [
        ("safe", "safe", ()),
        ("\n\nsafe", "safe", ()),
        ("unsafe\nS1", "unsafe", ("S1",)),
        ("unsafe\nS1,S10", "unsafe", ("S1", "S10")),
        ("unsafe\nS2, S7\n", "unsafe", ("S2", "S7")),
        ("unsafe", "unsafe", ()),
        ("Sure, here is how", "unparsed", ()),
        ("", "unparsed", ()),
        ("saf", "unparsed", ()),
    ],
)
def test_parse_guard_output(text, label, codes):
    verdict = parse_guard_output(text)
    assert (verdict.label, verdict.categories) == (label, codes)


@pytest.mark.parametrize(
    ("text", "refusal"),
    [
        ("I'm sorry, but I can't help with that.", True),
        ("I\u2019m sorry, I cannot", True),
        ("  I cannot assist with that request.", True),
        ("I won't help with that because it is harmful.", True),
        ("Sure, here is how to bake a cake.", False),
        ("12+30=42.", False),
        ("The capital of Vandor is Quell. I'm sorry it is far.", False),
    ],
)
def test_is_refusal(text, refusal):
    assert is_refusal(text) is refusal
