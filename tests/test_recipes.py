"""Every shipped recipe validates (fields, methods, modes) without building anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from datagen.recipe import load_datagen_recipe
from evomerge.search import load_search_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipe_is_valid(path):
    if path.stem.startswith("datagen-"):
        recipe = load_datagen_recipe(path)
        assert recipe.pool and (recipe.safety or recipe.domain)
    elif path.stem.startswith("table1-"):
        from evomerge.report import load_report_recipe, plan, search_recipe_for

        recipe = load_report_recipe(path)
        cells = plan(recipe)
        assert len(cells) == len(recipe.methods) * 6 + 2  # 6 rows per method (with constrained, pareto), LM-Cocktail twice
        for method, row in cells:
            search = search_recipe_for(recipe, method, row)
            assert search.merge.method == method and not search.write_model
    else:
        recipe = load_search_recipe(path)
        assert recipe.pool.experts and recipe.search.steps
    assert recipe.name == path.stem
