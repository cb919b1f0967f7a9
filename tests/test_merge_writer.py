"""Materialising merges: model folder contents, mergekit YAML in and out, atomicity, CLI errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge.cli import main
from evomerge.merge import Genome, merge_uncached
from evomerge.merge.mergekit_compat import from_mergekit, to_mergekit
from evomerge.merge.recipe import MergeRecipe
from evomerge.merge.writer import load_recipe, write_merged_model
from evomerge.pool import Pool, load_model

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _eager_kernels(monkeypatch):
    """Eager kernels keep these tests fast; test_merge_fused.py checks the compiled ones."""
    monkeypatch.setenv("EVOMERGE_FUSED", "0")


def _recipe(micro_pool, method="ties", **extra) -> dict:
    data = {
        "base": str(micro_pool["base"]),
        "experts": {"a": str(micro_pool["expert_a"]), "b": str(micro_pool["expert_b"])},
        "method": method,
        "genome": {"weights": {"a": 0.6, "b": 0.4}, "densities": {"a": 0.5, "b": 0.3}, "scale": 1.0},
    }
    data.update(extra)
    return data


def _write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_cli_merge_writes_complete_folder(micro_pool, tmp_path):
    recipe = _write_yaml(tmp_path / "r.yaml", _recipe(micro_pool, options={"density_grid": None}))
    out = tmp_path / "merged"
    assert main(["merge", str(recipe), "--out", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "README.md", "mergekit_config.yml", "evomerge_recipe.yaml", "tokenizer.json"} <= names
    card = (out / "README.md").read_text()
    assert "base_model_relation: merge" in card and "ties" in card and str(micro_pool["expert_a"]) in card
    mk = yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert mk["merge_method"] == "ties" and mk["models"][0]["parameters"] == {"weight": 0.6, "density": 0.5}
    pool = Pool.from_refs(micro_pool["base"], {"a": str(micro_pool["expert_a"]), "b": str(micro_pool["expert_b"])})
    ref = merge_uncached(pool, "ties", {"density_grid": None}, Genome.from_values([0.6, 0.4], [0.5, 0.3]))
    written = load_file(out / "model.safetensors")
    assert set(written) == set(ref)
    for name, want in ref.items():
        torch.testing.assert_close(written[name], want, atol=1e-6, rtol=1e-6)
    model = load_model(str(out))  # loads as a normal HF model
    assert sum(p.numel() for p in model.parameters()) > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]  # no temp leftovers


def test_genome_file_overrides_recipe(micro_pool, tmp_path):
    recipe = _write_yaml(tmp_path / "r.yaml", _recipe(micro_pool, method="task_arithmetic"))
    genome = _write_yaml(tmp_path / "g.yaml", {"weights": {"a": 1.0, "b": 0.0}, "scale": 1.0})
    out = tmp_path / "m"
    assert main(["merge", str(recipe), "--genome", str(genome), "--out", str(out)]) == 0
    written = load_file(out / "model.safetensors")
    expert = load_file(micro_pool["expert_a"] / "model.safetensors")
    for name, want in expert.items():
        torch.testing.assert_close(written[name], want, atol=1e-6, rtol=0)


def test_tsvm_folder_has_no_mergekit_yaml(micro_pool, tmp_path):
    recipe = MergeRecipe.from_dict(_recipe(micro_pool, method="r_tsvm", options={"beta": 0.2, "weight_mode": "inverse"}))
    out = write_merged_model(recipe, tmp_path / "m")
    assert not (out / "mergekit_config.yml").exists()
    assert "Not expressible in mergekit" in (out / "README.md").read_text()


def test_bad_recipe_field_is_named(micro_pool, tmp_path, capsys):
    data = _recipe(micro_pool)
    data["methd"] = "ties"
    recipe = _write_yaml(tmp_path / "r.yaml", data)
    assert main(["merge", str(recipe), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "r.yaml" in err and "methd" in err
    data = _recipe(micro_pool, options={"normalise": True})
    assert main(["merge", str(_write_yaml(tmp_path / "r2.yaml", data)), "--out", str(tmp_path / "m")]) == 2
    assert "normalise" in capsys.readouterr().err
    data = _recipe(micro_pool)
    data["genome"]["weights"] = {"a": 0.5, "zz": 0.5}
    assert main(["merge", str(_write_yaml(tmp_path / "r3.yaml", data)), "--out", str(tmp_path / "m")]) == 2
    assert "zz" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_failure_while_writing_leaves_nothing(micro_pool, tmp_path, monkeypatch):
    import safetensors.torch

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    recipe = MergeRecipe.from_dict(_recipe(micro_pool))
    with pytest.raises(RuntimeError, match="disk full"):
        write_merged_model(recipe, tmp_path / "outs" / "m")
    assert [p.name for p in (tmp_path / "outs").iterdir()] == []


def test_mergekit_yaml_input(micro_pool, tmp_path):
    cfg = {
        "merge_method": "ties",
        "base_model": str(micro_pool["base"]),
        "models": [
            {"model": str(micro_pool["expert_a"]), "parameters": {"weight": 0.6, "density": 0.29}},
            {"model": str(micro_pool["expert_b"]), "parameters": {"weight": 0.4, "density": 0.7}},
            {"model": str(micro_pool["base"])},
        ],
        "parameters": {"normalize": True, "int8_mask": True},
        "dtype": "float32",
    }
    path = _write_yaml(tmp_path / "mk.yml", cfg)
    recipe = load_recipe(path)
    assert recipe.method == "ties" and recipe.options == {"normalize": True, "density_grid": None, "rescale": False}
    assert list(recipe.experts) == ["expert_a", "expert_b"]
    out = tmp_path / "m"
    assert main(["merge", str(path), "--out", str(out)]) == 0
    pool = Pool.from_refs(micro_pool["base"], {"expert_a": str(micro_pool["expert_a"]), "expert_b": str(micro_pool["expert_b"])})
    ref = merge_uncached(pool, "ties", {"density_grid": None}, Genome.from_values([0.6, 0.4], [0.29, 0.7]))
    written = load_file(out / "model.safetensors")
    for name, want in ref.items():
        torch.testing.assert_close(written[name], want, atol=1e-6, rtol=1e-6)


_MK = {"merge_method": "ties", "base_model": "b", "models": [{"model": "x", "parameters": {"weight": 1}}]}


def test_mergekit_trivial_tokenizer_and_ignored_lambda(caplog):
    """``tokenizer: {source: base}`` is what evomerge does anyway; mergekit's linear/slerp
    drop ``lambda`` unread, so evomerge ignores it too, with a warning."""
    assert from_mergekit({**_MK, "tokenizer": {"source": "base"}}, "c").method == "ties"
    recipe = from_mergekit({**_MK, "merge_method": "linear", "parameters": {"lambda": 0.5}}, "c")
    assert recipe.genome.scale == 1.0
    assert "lambda is ignored" in caplog.text
    ties = from_mergekit({**_MK, "parameters": {"rescale": True, "lambda": 0.5}, "dtype": "bfloat16", "out_dtype": "float32"}, "c")
    assert ties.options["rescale"] is True and ties.genome.scale == 0.5
    assert (ties.compute_dtype, ties.dtype) == ("bfloat16", "float32")


@pytest.mark.parametrize(
    "cfg,match",
    [
        ({"merge_method": "della"}, "della"),
        ({"merge_method": "passthrough", "slices": []}, "passthrough.*changes the layer count.*evomerge merge"),
        ({"merge_method": "ram", "models": ["x"]}, "ram' needs base_model"),
        ({"merge_method": "ties", "slices": []}, "slices"),
        ({"merge_method": "ties", "base_model": "b", "slices": [{"sources": [{"model": "b", "layer_range": [0, 2]}, {"model": "x", "layer_range": [2, 4]}]}]},
         r"slices\[0\].sources\[1\].layer_range \[2, 4\] differs from \[0, 2\]: .*change the architecture"),
        ({"merge_method": "ties", "base_model": "b", "slices": [{"sources": [{"model": "b", "layer_range": [0, 2]}]},
                                                                {"sources": [{"model": "b", "layer_range": [0, 2]}]}]},
         r"slices\[1\] takes layers \[0, 2\] where layer 2 comes next"),
        ({"merge_method": "ties", "base_model": "b", "slices": [{"sources": [{"model": "b", "layer_range": [0, 2]}], "residual_weight": 0.1}]},
         r"slices\[0\].residual_weight is not supported"),
        ({"merge_method": "ties", "base_model": "b", "models": [{"model": "x", "parameters": {"weight": [0.1, 0.2]}}]}, "gradient lists need"),
        ({"merge_method": "ties", "base_model": "b", "models": [{"model": "x", "parameters": {"weight": [{"filter": "mlp", "value": 1}]}}]}, "filter"),
        ({"merge_method": "della", "base_model": "b", "models": [{"model": "x", "parameters": {"weight": 1, "density": 0.9, "epsilon": 0.2}}]}, "epsilon"),
        ({"merge_method": "nuslerp", "base_model": "b", "models": [{"model": "x", "parameters": {"weight": 1}}]}, "exactly two"),
        ({"merge_method": "ties", "base_model": "b", "models": [{"model": "x"}]}, "no 'weight'"),
        ({"merge_method": "ties", "base_model": "b", "models": [{"model": "x", "parameters": {"weight": 1}}], "parameters": {"gamma": 1}}, "gamma"),
        ({**_MK, "tokenizer": {"source": "union"}}, "tokenizer.source 'union'"),
        ({**_MK, "tokenizer": {"source": "base", "tokens": {"<x>": {"source": "b"}}}}, "tokenizer.tokens"),
        ({**_MK, "chat_template": "chatml"}, "chat_template"),
        ({**_MK, "tokenizer_source": "union"}, "tokenizer_source 'union'"),
        ({**_MK, "merge_method": "linear", "parameters": {"rescale": True}}, "rescale has no meaning"),
        ({**_MK, "parameters": {"rescale": True}, "options": 1}, "options"),
    ],
)
def test_mergekit_yaml_errors_name_the_field(cfg, match):
    """Every mergekit feature evomerge does not reproduce is refused by name."""
    from evomerge.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        from_mergekit(cfg, "cfg.yml")


@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear", "task_arithmetic", "linear", "slerp", "breadcrumbs", "breadcrumbs_ties"])
def test_mergekit_round_trip(micro_pool, method):
    experts = {"a": str(micro_pool["expert_a"])} if method == "slerp" else {"a": str(micro_pool["expert_a"]), "b": str(micro_pool["expert_b"])}
    recipe = MergeRecipe(base=str(micro_pool["base"]), experts=experts, method=method, options={"rescale": "l1"} if "dare" in method else {})
    genome = Genome.from_values([0.3] if method == "slerp" else [0.7, 0.4], None if method == "slerp" else [0.5, 0.75])
    text, why = to_mergekit(recipe, genome)
    assert text, why
    back = from_mergekit(yaml.safe_load(text), "exported")
    assert back.method == method
    g2 = back.genome.to_genome(list(back.experts))
    if method == "linear":  # mergekit linear has no base: the first model becomes the reference
        assert list(back.experts.values()) == list(experts.values())
        return
    assert list(back.experts.values()) == list(experts.values())
    assert g2.weights == genome.weights
    if method != "slerp" and method not in ("task_arithmetic",):
        assert g2.densities == genome.densities


def test_layer_granularity_in_recipe(micro_pool, tmp_path):
    data = _recipe(micro_pool, method="task_arithmetic")
    data["genome"] = {"weights": {"a": [1.0, 0.0], "b": [0.0, 1.0]}, "scale": 1.0}
    out = write_merged_model(MergeRecipe.from_dict(data), tmp_path / "m")
    written = load_file(out / "model.safetensors")
    ea = load_file(micro_pool["expert_a"] / "model.safetensors")
    eb = load_file(micro_pool["expert_b"] / "model.safetensors")
    name0, name1 = "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"
    torch.testing.assert_close(written[name0], ea[name0], atol=1e-6, rtol=0)
    torch.testing.assert_close(written[name1], eb[name1], atol=1e-6, rtol=0)
    assert not (out / "mergekit_config.yml").exists()  # per-group genomes need mergekit slices
    spec = MergeRecipe.from_dict(_recipe(micro_pool)).genome.model_copy(update={"layer_granularity": 1})
    assert spec.to_genome(["a", "b"], num_layers=2).n_groups == 2


def test_merge_explain_prints_groups_and_writes_nothing(micro_pool, tmp_path, capsys):
    cfg = {
        "merge_method": "ties",
        "base_model": str(micro_pool["base"]),
        "models": [
            {"model": str(micro_pool["expert_a"]), "parameters": {"weight": 0.6, "density": 0.3}},
            {"model": str(micro_pool["expert_b"]), "parameters": {"weight": 0.4, "density": 0.7}},
        ],
        "parameters": {"rescale": True, "lambda": 0.9},
        "dtype": "bfloat16",
    }
    path = _write_yaml(tmp_path / "mk.yml", cfg)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["merge", str(path), "--explain", "--out", str(tmp_path / "never")]) == 0
    out = capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert "method: ties" in out and "rescale=True" in out
    assert "rounded to bfloat16" in out and "output dtype: bfloat16" in out
    assert "scale (lambda): 0.9" in out
    assert "weights expert_a=0.6, expert_b=0.4; densities expert_a=0.3, expert_b=0.7" in out
    assert "embeddings" in out and "lm_head" in out
