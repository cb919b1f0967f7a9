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
        from evomerge.report import METHOD_FREE_ROWS, load_report_recipe, plan, search_recipe_for

        recipe = load_report_recipe(path)
        cells = plan(recipe)
        free = [r for r in recipe.rows if r in METHOD_FREE_ROWS]  # LM-Cocktail: once, whatever the method
        assert len(cells) == len(recipe.methods) * (len(recipe.rows) - len(free)) + len(free)
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


def test_every_density_method_gets_density_genes():
    """A method that reads densities must have them in its search genome (della included)."""
    from evomerge.merge.methods import get_method

    # the search genome reads uses_density from the method itself (evomerge/search/space.py)
    for name in ("ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"):
        assert get_method(name).uses_density, name
    for name in ("linear", "task_arithmetic", "model_stock", "karcher"):
        assert not get_method(name).uses_density, name


@pytest.mark.parametrize("method,params,options", [
    ("della", {"density": 0.5, "epsilon": 0.1}, {"normalize": True, "rescale": True, "epsilon": 0.1}),
    ("della_linear", {"rescale": False}, {"normalize": False, "rescale": False, "epsilon": 0.15}),
    ("model_stock", {"filter_wise": True}, {"filter_wise": True}),
    ("sce", {"select_topk": 0.5, "int8_mask": True}, {"select_topk": 0.5}),
    ("nuslerp", {"nuslerp_row_wise": True}, {"row_wise": True, "flatten": True, "on_task_vectors": True}),
    ("multislerp", {}, {"normalize_weights": True, "eps": 1e-8, "on_task_vectors": True}),
    ("karcher", {"max_iter": 5}, {"max_iter": 5, "tol": 1e-5}),
])
def test_mergekit_configs_of_the_other_methods(method, params, options):
    from evomerge.merge.mergekit_compat import from_mergekit

    cfg = {"merge_method": method, "base_model": "b", "parameters": params,
           "models": [{"model": "x", "parameters": {"weight": 0.6}}, {"model": "y", "parameters": {"weight": 0.4}}]}
    recipe = from_mergekit(cfg)
    assert recipe.options == options and recipe.base == "b" and list(recipe.experts.values()) == ["x", "y"]
    weights = recipe.genome.weights
    if method in ("model_stock", "karcher"):
        assert weights == {"x": 0.5, "y": 0.5}  # mergekit ignores the weights: the plain average
    elif method == "sce":
        assert weights == {"x": 1.0, "y": 1.0}
    else:
        assert weights == {"x": 0.6, "y": 0.4}


def test_mergekit_nuslerp_without_base_interpolates_the_models():
    from evomerge.merge.mergekit_compat import from_mergekit

    cfg = {"merge_method": "nuslerp", "models": [{"model": "x", "parameters": {"weight": 0.6}},
                                                 {"model": "y", "parameters": {"weight": 0.4}}]}
    recipe = from_mergekit(cfg)
    assert recipe.base == "x" and list(recipe.experts.values()) == ["x", "y"]
    assert recipe.options["on_task_vectors"] is False


def test_mergekit_gradient_lists_become_a_per_module_genome(micro_pool):
    import json

    from evomerge.errors import ConfigError
    from evomerge.merge.mergekit_compat import from_mergekit, gradient_value

    n = json.loads((micro_pool["base"] / "config.json").read_text())["num_hidden_layers"]
    cfg = {"merge_method": "ties", "base_model": str(micro_pool["base"]),
           "models": [{"model": str(micro_pool["expert_a"]), "parameters": {"weight": [0, 0.5, 1], "density": 0.5}},
                      {"model": str(micro_pool["expert_b"]), "parameters": {"weight": 0.4, "density": [1, 0.2]}}]}
    g = from_mergekit(cfg).genome
    assert g.modules is True
    ts = [i / (n - 1) for i in range(n)]
    # embeddings and head at t = 0, both blocks of layer i at t = i / (n - 1)
    assert g.weights["expert_a"] == [0.0] + [gradient_value((0, 0.5, 1), t) for t in ts for _ in (0, 1)] + [0.0]
    assert g.weights["expert_b"] == [0.4] * (2 * n + 2)
    assert g.densities["expert_b"][1] == 1.0 and g.densities["expert_b"][-2] == pytest.approx(0.2)
    assert gradient_value((0, 0.5, 1), 0.75) == 0.75 and gradient_value((0, 1, 0), 0.25) == 0.5
    cfg["models"][0]["parameters"]["weight"] = [{"filter": "self_attn", "value": 0.3}, {"value": 0.5}]
    cfg["models"][1]["parameters"]["density"] = 0.2
    cfg["base_model"] = "org/not-a-folder"
    with pytest.raises(ConfigError, match="'filter:' values need a local base_model folder"):
        from_mergekit(cfg)


def _row_of(genome, name: str, num_layers: int) -> int:
    from evomerge.merge.cache import genome_group

    return genome_group(name, genome, num_layers)


def test_mergekit_filter_values_by_hand(micro_pool):
    """mergekit: the first filter that is a substring of the tensor name wins, the entry
    without a filter takes the rest (layer norms included), per model and parameter."""
    from evomerge.merge.mergekit_compat import from_mergekit

    cfg = {"merge_method": "ties", "base_model": str(micro_pool["base"]),
           "models": [{"model": str(micro_pool["expert_a"]), "parameters": {
                          "weight": [{"filter": "self_attn", "value": 0.3}, {"filter": "mlp", "value": 0.7}, {"value": 0.5}],
                          "density": 0.5}},
                      {"model": str(micro_pool["expert_b"]), "parameters": {
                          "weight": 0.4, "density": [{"filter": "mlp", "value": 0.2}]}}],
           "parameters": {"density": 0.9}}  # expert_b's density outside the MLPs falls through to here
    recipe = from_mergekit(cfg)
    spec = recipe.genome
    assert spec.filters == ["self_attn", "mlp"] and spec.modules is False
    assert spec.weights == {"expert_a": [0.3, 0.7, 0.5], "expert_b": [0.4, 0.4, 0.4]}
    assert spec.densities == {"expert_a": [0.5, 0.5, 0.5], "expert_b": [0.9, 0.2, 0.9]}
    g = spec.to_genome(list(recipe.experts))
    want = {"model.layers.1.self_attn.q_proj.weight": (0.3, 0.9), "model.layers.0.mlp.down_proj.weight": (0.7, 0.2),
            "model.layers.0.input_layernorm.weight": (0.5, 0.9), "model.layers.1.post_attention_layernorm.weight": (0.5, 0.9),
            "model.embed_tokens.weight": (0.5, 0.9), "lm_head.weight": (0.5, 0.9), "model.norm.weight": (0.5, 0.9)}
    for name, (wa, db) in want.items():
        row = _row_of(g, name, 2)
        assert (g.weights[row][0], g.densities[row][1]) == (wa, db), name


def test_mergekit_filtered_gradients_and_refused_orders(micro_pool):
    import json

    from evomerge.errors import ConfigError
    from evomerge.merge.mergekit_compat import from_mergekit

    n = json.loads((micro_pool["base"] / "config.json").read_text())["num_hidden_layers"]
    cfg = {"merge_method": "linear", "models": [
        {"model": str(micro_pool["expert_a"]), "parameters": {"weight": [{"filter": "self_attn", "value": [0, 1]}, {"value": 0.5}]}},
        {"model": str(micro_pool["expert_b"]), "parameters": {"weight": 1.0}}]}
    recipe = from_mergekit(cfg)
    g = recipe.genome.to_genome(list(recipe.experts))
    assert g.modules and g.filters == ("self_attn",) and g.n_slots == 2 * n + 2
    for i in range(n):  # layer i's attention projections at t = i / (n - 1); its norms take the default
        assert g.weights[_row_of(g, f"model.layers.{i}.self_attn.o_proj.weight", n)][0] == pytest.approx(i / (n - 1))
        assert g.weights[_row_of(g, f"model.layers.{i}.input_layernorm.weight", n)][0] == 0.5
    # opposite orders of nested filters: every MLP tensor name contains 'proj', so 'mlp' goes first
    cfg["models"][0]["parameters"]["weight"] = [{"filter": "proj", "value": 1}, {"filter": "mlp", "value": 2}, {"value": 0}]
    cfg["models"][1]["parameters"]["weight"] = [{"filter": "mlp", "value": 3}, {"filter": "proj", "value": 4}, {"value": 0}]
    recipe = from_mergekit(cfg, "cfg.yml")
    g = recipe.genome.to_genome(list(recipe.experts))
    assert g.filters == ("mlp", "proj") and not g.modules
    assert g.weights[_row_of(g, "model.layers.0.mlp.up_proj.weight", n)] == (1.0, 3.0)
    assert g.weights[_row_of(g, "model.layers.0.self_attn.q_proj.weight", n)] == (1.0, 4.0)
    assert g.weights[_row_of(g, "model.norm.weight", n)] == (0.0, 0.0)
    # overlapping filters, neither inside the other, in opposite orders: no one order fits both
    cfg["models"][0]["parameters"]["weight"] = [{"filter": "layers.0.", "value": 1}, {"filter": "mlp", "value": 2}, {"value": 0}]
    cfg["models"][1]["parameters"]["weight"] = [{"filter": "mlp", "value": 3}, {"filter": "layers.0.", "value": 4}, {"value": 0}]
    with pytest.raises(ConfigError, match=r"cfg.yml: models\[1\].parameters.weight: tensors .* one order everywhere"):
        from_mergekit(cfg, "cfg.yml")
    cfg["models"][1]["parameters"]["weight"] = [{"filter": "mlp", "value": 3}]  # nothing for the rest: mergekit requires one
    with pytest.raises(ConfigError, match=r"models\[1\] \(.*\) has no 'weight' for tensor 'model.layers.0.input_layernorm.weight'"):
        from_mergekit(cfg, "cfg.yml")


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
