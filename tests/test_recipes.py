"""Every shipped recipe validates (fields, methods, modes) without building or downloading anything."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from datagen.recipe import load_datagen_recipe
from evomerge.search import load_search_recipe

ROOT = Path(__file__).resolve().parents[1] / "recipes"
RECIPES = sorted(ROOT.rglob("*.yaml"))


@pytest.fixture
def gpu_recipes_validate(monkeypatch):
    """Recipes for a GPU machine name ``device: cuda``; the eval config checks that the device
    exists, so pretend one does (nothing is loaded or run)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def test_recipes_are_found():
    assert len(RECIPES) >= 8 and any(p.parent != ROOT for p in RECIPES)  # subfolders too


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(ROOT).with_suffix("")) for p in RECIPES])
def test_shipped_recipe_is_valid(path, gpu_recipes_validate):
    if path.stem.startswith("datagen-"):
        recipe = load_datagen_recipe(path)
        assert recipe.pool and (recipe.safety or recipe.domain)
    elif path.stem.startswith("table1-"):
        from evomerge.report import load_report_recipe, plan, search_recipe_for

        recipe = load_report_recipe(path)
        cells = plan(recipe)
        assert len(cells) == len(recipe.methods) * 4 + 2  # 4 rows per method, LM-Cocktail twice
        for method, row in cells:
            search = search_recipe_for(recipe, method, row)
            assert search.merge.method == method and not search.write_model
    elif path.stem.startswith("eval-"):
        from evomerge.evaluation import EvalConfig
        from evomerge.merge.recipe import validate_mapping

        config = validate_mapping(EvalConfig, yaml.safe_load(path.read_text()), str(path))
        assert config.prompt_sets()  # every named set is known (nothing is read)
        return  # an EvalConfig has no name
    else:
        recipe = load_search_recipe(path)
        assert recipe.pool.experts and recipe.search.steps
    assert recipe.name == path.stem


def test_real_recipes_fit_together(gpu_recipes_validate):
    """The llama3-8b set is one pipeline: the search reads what datagen writes, the report
    starts from the search, the report's eval section is the eval config."""
    from evomerge.evaluation import EvalConfig
    from evomerge.report import load_report_recipe

    folder = ROOT / "llama3-8b"
    datagen = load_datagen_recipe(folder / "datagen-llama3-8b.yaml")
    search = load_search_recipe(folder / "search-llama3-8b.yaml")
    report = load_report_recipe(folder / "table1-llama3-8b.yaml")
    config = EvalConfig(**yaml.safe_load((folder / "eval-llama3-8b.yaml").read_text()))
    out = f"runs/{datagen.name}"
    assert search.data.safety == f"{out}/safety.jsonl"
    assert search.data.domain == {d: f"{out}/domain-{d}.jsonl" for d in datagen.domain.experts}
    assert set(datagen.pool.values()) == set(search.pool.experts.values())
    assert datagen.domain.experts["biomed"] == search.pool.experts["biomed"]
    assert Path(report.search).resolve() == (folder / "search-llama3-8b.yaml").resolve()
    assert report.eval == config
    assert search.contamination.eval_sets and set(search.contamination.eval_sets) == set(config.sets)
    assert datagen.safety.judge.model == config.judge.model == "meta-llama/Llama-Guard-3-8B"
    assert not any(ref.startswith("zoo:") for ref in [*datagen.pool.values(), datagen.safety.generator])
