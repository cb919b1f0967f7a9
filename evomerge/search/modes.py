"""The search modes, in one table: what each needs from the recipe and who proposes for it.

Every ``search.mode`` is one :class:`ModeInfo` row of :data:`MODES`. The recipe
(:mod:`evomerge.search.recipe`) validates against it, the loop builds the mode's proposer
from it (:func:`evomerge.search.proposers.make_proposer`), and the result's choice asks it
which fitness weights the mode stands for. Nothing else compares mode names.

This module holds data only (no optimiser imports), so the recipe can read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Need = Literal["lambda", "always", "never"]  # a data set: when fitness.lambda asks for it, always, never


@dataclass(frozen=True)
class ModeInfo:
    name: str
    proposer: str  # class in evomerge.search.proposers
    summary: str
    budget: bool  # stops on search.steps / search.max_evals (and needs one of them)
    domain: Need = "lambda"  # does the mode read data.domain
    safety: Need = "lambda"  # does the mode read data.safety
    method: str | None = None  # merge method the mode merges with, whatever merge.method says
    selectable: bool = True  # search.select: behaviour may choose its result
    reference: bool = False  # measures search.constraint.reference before the first generation
    lambda_: float | None = None  # the lambda its result stands for (None: fitness.lambda)

    def weights(self, lam: float, mu: float) -> tuple[float, float]:
        """(lambda, mu) this mode's result is judged by (``search.select: behaviour``)."""
        return (lam if self.lambda_ is None else self.lambda_), mu

    def needs_domain(self, lam: float) -> bool:
        return self.domain == "always" or (self.domain == "lambda" and lam > 0)

    def needs_safety(self, lam: float) -> bool:
        return self.safety == "always" or (self.safety == "lambda" and lam < 1)


MODES: dict[str, ModeInfo] = {m.name: m for m in (
    ModeInfo("cmaes", "CMAESProposer", "CMA-ES on the lambda/mu-weighted fitness", budget=True),
    ModeInfo("evomm-domain", "CMAESProposer", "CMA-ES on CE_domain alone (the safety-unaware baseline)",
             budget=True, domain="always", safety="never", lambda_=1.0),
    ModeInfo("grid", "GridProposer", "data-free grid of weights x densities, reported by domain loss", budget=False),
    ModeInfo("lm-cocktail", "CocktailProposer", "LM-Cocktail: softmax(-L/T) weighted average of the models",
             budget=False, method="linear", selectable=False),
    ModeInfo("constrained", "ConstrainedProposer",
             "CMA-ES on CE_domain subject to CE_safety <= reference + slack (pycma's augmented Lagrangian)",
             budget=True, domain="always", safety="always", reference=True),
    ModeInfo("pareto", "ParetoProposer",
             "NSGA-II (optuna) over (CE_safety, each CE_domain, CE_benign when mu > 0); returns the front",
             budget=True, domain="always", safety="always", reference=True),
)}
MODE_NAMES: tuple[str, ...] = tuple(MODES)
