"""Proposers by search mode (``search.mode``), as lazy registry entries.

Each entry names the class in ``evomerge/search/proposers.py`` that proposes genomes for
that mode; ``evomm-domain`` is CMA-ES on the domain term only (the fitness decides
that, not the proposer).
"""

from __future__ import annotations

from evomerge.registry import Registry

PROPOSERS = Registry("search mode", {
    "cmaes": "evomerge.search.proposers:CMAESProposer",
    "evomm-domain": "evomerge.search.proposers:CMAESProposer",
    "grid": "evomerge.search.proposers:GridProposer",
    "lm-cocktail": "evomerge.search.proposers:CocktailProposer",
})
