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

# mergekit's two-model methods: lazy entries like the others of methods_more.py (kept here,
# not in methods.py, so that file's list stays as it is)
for _name in ("nearswap", "arcee_fusion"):
    METHODS.add_lazy(_name, "evomerge.merge.methods_more:TWO_MODEL_METHODS")
for _name in ("ram", "ramplus_tl"):
    METHODS.add_lazy(_name, "evomerge.merge.methods_more:RAM_METHODS")

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
