"""Every shipped recipe validates (fields, methods, modes) without building anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from evomerge.search import load_search_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipe_is_valid(path):
    recipe = load_search_recipe(path)
    assert recipe.name == path.stem
    assert recipe.pool.experts and recipe.search.steps
