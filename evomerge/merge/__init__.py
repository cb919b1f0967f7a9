"""Merge engine: methods by name, ``prepare`` once, ``build`` each candidate in place.

    >>> cache = prepare(pool, "ties", {"normalize": True})
    >>> build(cache, Genome.from_values([0.6, 0.4], [0.5, 0.5]), out=model)
"""

from evomerge.merge.cache import (
    CacheTooLargeError,
    MergeBuildError,
    MergeCache,
    StatePool,
    build,
    estimate_cache_bytes,
    prepare,
)
from evomerge.merge.genome import Genome
from evomerge.merge.methods import METHODS, get_method, parse_options, register_method
from evomerge.merge.recipe import MergeRecipe
from evomerge.merge.reference import merge_uncached
from evomerge.merge.writer import load_recipe, write_merged_model

__all__ = [
    "METHODS",
    "CacheTooLargeError",
    "Genome",
    "MergeBuildError",
    "MergeCache",
    "MergeRecipe",
    "StatePool",
    "build",
    "estimate_cache_bytes",
    "get_method",
    "load_recipe",
    "merge_uncached",
    "parse_options",
    "prepare",
    "register_method",
    "write_merged_model",
]
