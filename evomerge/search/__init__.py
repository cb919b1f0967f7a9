"""Search: CMA-ES (and baselines) over merge genomes, scored by answer-only cross-entropy.

    >>> from evomerge.search import load_search_recipe, run_search
    >>> result = run_search(load_search_recipe("recipes/demo.yaml", ["search.steps=3"]))
"""

from evomerge.search.evaluator import CandidateEvaluator, Scored
from evomerge.search.fitness import EncodedSample, answer_cross_entropy, encode_pair, encode_pairs
from evomerge.search.loop import SearchResult, run_search
from evomerge.search.recipe import SearchRecipe, apply_overrides, load_search_recipe, recipe_from_dict
from evomerge.search.run import RunDir, RunExistsError
from evomerge.search.space import GenomeSpace

__all__ = [
    "CandidateEvaluator",
    "EncodedSample",
    "GenomeSpace",
    "RunDir",
    "RunExistsError",
    "Scored",
    "SearchRecipe",
    "SearchResult",
    "answer_cross_entropy",
    "apply_overrides",
    "encode_pair",
    "encode_pairs",
    "load_search_recipe",
    "recipe_from_dict",
    "run_search",
]
