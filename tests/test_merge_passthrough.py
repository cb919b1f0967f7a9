"""mergekit's passthrough (frankenmerges) for ``evomerge merge``: layers copied and renumbered,
``scale`` filters and gradients, --explain, refusals by name (exit 2, nothing written), and
``evomerge search`` refusing it. Equality with mergekit: tests/test_merge_vs_mergekit.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge.cli import main
from evomerge.errors import ConfigError
from evomerge.merge import load_recipe, write_merged_model
from evomerge.merge.mergekit_compat import from_mergekit
from evomerge.merge.passthrough import PassthroughPlan, read_passthrough
from evomerge.testing import save_micro_model

torch.set_num_threads(1)
Q, OPROJ, DOWN = "self_attn.q_proj.weight", "self_attn.o_proj.weight", "mlp.down_proj.weight"


@pytest.fixture
def two(tmp_path):
    return {k: save_micro_model(tmp_path / k, seed=s, num_layers=4) for k, s in (("a", 0), ("b", 1))}


def _w(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def _cfg(tmp_path: Path, cfg: dict) -> Path:
    path = tmp_path / "pt.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _src(model: Path, lo: int, hi: int, **params) -> dict:
    return {"sources": [{"model": str(model), "layer_range": [lo, hi], **({"parameters": params} if params else {})}]}


def test_slices_stack_drop_reorder_and_renumber(two, tmp_path):
    """a's layers 2-3, then b's 0-1, then a's 0: 5 layers; embeddings from a (first slice),
    final norm and lm_head from a (last slice); every tensor an exact copy."""
    cfg = {"merge_method": "passthrough", "slices": [_src(two["a"], 2, 4), _src(two["b"], 0, 2), _src(two["a"], 0, 1)]}
    out = tmp_path / "franken"
    assert main(["merge", str(_cfg(tmp_path, cfg)), "--out", str(out)]) == 0
    got, a, b = _w(out), _w(two["a"]), _w(two["b"])
    where = {0: (a, 2), 1: (a, 3), 2: (b, 0), 3: (b, 1), 4: (a, 0)}
    for j, (src, i) in where.items():
        for suffix in (Q, OPROJ, DOWN, "input_layernorm.weight"):
            assert torch.equal(got[f"model.layers.{j}.{suffix}"], src[f"model.layers.{i}.{suffix}"]), (j, suffix)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(got[name], a[name])
    assert len(got) == 3 + 5 * 9 and not any(".layers.5." in n for n in got)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 5
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "README.md", "mergekit_config.yml", "tokenizer.json"} <= names
    again = load_recipe(out / "mergekit_config.yml")  # the config itself: mergekit-yaml reproduces it
    assert isinstance(again, PassthroughPlan) and again.num_layers == 5
    assert "passthrough" in (out / "README.md").read_text()
    from evomerge.pool import load_model

    model = load_model(str(out))
    assert len(model.model.layers) == 5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".franken")]


def test_scale_filters_and_gradients_by_hand(two, tmp_path):
    """mergekit's test_passthrough_scale plus a gradient: the source's setting first, then the
    slice's, then the top level; filters match the input tensor names; gradients run over
    each slice's layers (t = 0, 1/2, 1 over three layers); embeddings and head at t = 0."""
    cfg = {"merge_method": "passthrough",
           "parameters": {"scale": [{"filter": "o_proj", "value": 0}, {"filter": "down_proj", "value": [0, 1]}, {"value": 1}]},
           "slices": [_src(two["a"], 0, 3),
                      {**_src(two["b"], 1, 4, scale=[{"filter": "layers.2.", "value": 3.0}]), "parameters": {"scale": [{"filter": "q_proj", "value": -1}]}}]}
    out = write_merged_model(load_recipe(_cfg(tmp_path, cfg)), tmp_path / "m")
    got, a, b = _w(out), _w(two["a"]), _w(two["b"])
    for j in range(3):  # slice 0: a's layers 0-2, t = j / 2
        assert torch.equal(got[f"model.layers.{j}.{OPROJ}"], torch.zeros_like(a[f"model.layers.{j}.{OPROJ}"]))
        torch.testing.assert_close(got[f"model.layers.{j}.{DOWN}"], a[f"model.layers.{j}.{DOWN}"] * (j / 2), atol=0, rtol=0)
        assert torch.equal(got[f"model.layers.{j}.{Q}"], a[f"model.layers.{j}.{Q}"])
    # slice 1: b's layers 1-3; b's layer 2 (output 4) takes the source's 3.0 everywhere
    assert torch.equal(got[f"model.layers.4.{OPROJ}"], 3.0 * b[f"model.layers.2.{OPROJ}"])
    assert torch.equal(got[f"model.layers.3.{Q}"], -b[f"model.layers.1.{Q}"])  # the slice's filter
    assert torch.equal(got[f"model.layers.5.{OPROJ}"], torch.zeros_like(b[f"model.layers.3.{OPROJ}"]))  # top level
    assert torch.equal(got[f"model.layers.5.{DOWN}"], b[f"model.layers.3.{DOWN}"])  # t = 1
    assert torch.equal(got["lm_head.weight"], b["lm_head.weight"]) and torch.equal(got["model.norm.weight"], b["model.norm.weight"])


def test_one_model_copy_with_dtype(two, tmp_path):
    """mergekit's test_gpt2_copy form: one model, cast to dtype."""
    cfg = {"merge_method": "passthrough", "models": [{"model": str(two["a"])}], "dtype": "bfloat16"}
    out = write_merged_model(load_recipe(_cfg(tmp_path, cfg)), tmp_path / "m")
    got, a = _w(out), _w(two["a"])
    assert set(got) == set(a)
    for name, want in a.items():
        assert got[name].dtype == torch.bfloat16 and torch.equal(got[name], want.to(torch.bfloat16))
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4


def test_explain_lists_slices_and_writes_nothing(two, tmp_path, capsys):
    cfg = {"merge_method": "passthrough", "parameters": {"scale": [{"filter": "o_proj", "value": 0}]},
           "slices": [_src(two["a"], 0, 4), _src(two["a"], 0, 4)], "dtype": "bfloat16"}
    path = _cfg(tmp_path, cfg)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["merge", str(path), "--explain", "--out", str(tmp_path / "never")]) == 0
    text = capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert "method: passthrough" in text and "num_hidden_layers: 8" in text
    assert f"slices[1]: layers 0-3 of {two['a']} -> output layers 4-7 (36 tensors): scale 0 on 4, unscaled 32" in text
    assert "cast to bfloat16" in text and "nothing was written" in text


@pytest.mark.parametrize("edit,match", [
    (lambda a, b: {"slices": [{"sources": [{"model": a, "layer_range": [0, 2]}, {"model": b, "layer_range": [0, 2]}]}]},
     r"slices\[0\].sources names 2 models: mergekit's passthrough takes exactly one"),
    (lambda a, b: {"slices": [_src(a, 2, 6)]}, r"slices\[0\].sources\[0\].layer_range \[2, 6\] ends past the 4 layers"),
    (lambda a, b: {"slices": [_src(a, 3, 1)]}, r"slices\[0\].sources\[0\].layer_range must be \[start, end\)"),
    (lambda a, b: {"slices": [_src(a, 0, 2, weight=0.5)]}, r"slices\[0\].sources\[0\].parameters.weight is not supported for 'passthrough'"),
    (lambda a, b: {"slices": [_src(a, 0, 2)], "parameters": {"scale": "big"}}, r"parameters.scale: only scalar values"),
    (lambda a, b: {"slices": [{**_src(a, 0, 2), "residual_weight": 0.1}]}, r"slices\[0\].residual_weight is not supported"),
    (lambda a, b: {"models": [{"model": a}, {"model": b}]}, r"passthrough' with 'models' takes exactly one model \(got 2\)"),
    (lambda a, b: {"models": [{"model": a}], "base_model": b}, r"base_model .* is not models\[0\]"),
    (lambda a, b: {"slices": [_src(a, 0, 2)], "tokenizer_source": "union"}, r"tokenizer_source 'union'"),
    (lambda a, b: {"slices": []}, r"'slices' must be a non-empty list"),
])
def test_bad_passthrough_configs_exit_2_and_write_nothing(two, tmp_path, capsys, edit, match):
    path = _cfg(tmp_path, {"merge_method": "passthrough", **edit(str(two["a"]), str(two["b"]))})
    out = tmp_path / "never"
    assert main(["merge", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "Traceback" not in err
    import re

    assert re.search(match, err), err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]


def test_layers_of_another_shape_are_refused(tmp_path):
    a = save_micro_model(tmp_path / "a", seed=0, num_layers=2)
    wide = save_micro_model(tmp_path / "wide", seed=1, num_layers=2, intermediate_size=48)
    path = _cfg(tmp_path, {"merge_method": "passthrough", "slices": [_src(a, 0, 2), _src(wide, 0, 2)]})
    with pytest.raises(ConfigError, match=r"slices\[1\]: .*mlp.*has shape .*stacked layers must share the architecture"):
        write_merged_model(load_recipe(path), tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_genome_is_refused_for_passthrough(two, tmp_path, capsys):
    path = _cfg(tmp_path, {"merge_method": "passthrough", "models": [str(two["a"])]})
    genome = tmp_path / "g.yml"
    genome.write_text(yaml.safe_dump({"weights": {"a": 1.0}}))
    assert main(["merge", str(path), "--genome", str(genome), "--out", str(tmp_path / "never")]) == 2
    assert "passthrough has no genome" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_search_refuses_passthrough_by_name(micro_search):
    from evomerge.search.recipe import recipe_from_dict

    with pytest.raises(ConfigError, match="merge method 'passthrough' cannot be searched: it stacks, drops or reorders"):
        recipe_from_dict({**micro_search, "merge": {"method": "passthrough"}}, "s.yml")
    with pytest.raises(ConfigError, match=r"s.yml: a mergekit config \(merge_method: passthrough\) is not a search recipe: .*cannot be searched"):
        recipe_from_dict({"merge_method": "passthrough", "models": ["x"]}, "s.yml")
    with pytest.raises(ConfigError, match="passthrough.*evomerge merge"):
        from_mergekit({"merge_method": "passthrough", "models": ["x"]}, "c.yml")


def test_read_passthrough_needs_no_tensors(two):
    plan = read_passthrough({"merge_method": "passthrough", "slices": [_src(two["a"], 1, 3), _src(two["b"], 0, 4)]}, "c")
    assert plan.num_layers == 6 and plan.models == [str(two["a"]), str(two["b"])] and plan.config_model == str(two["a"])
    plan = read_passthrough({"merge_method": "passthrough", "base_model": str(two["b"]), "slices": [_src(two["a"], 0, 1)]}, "c")
    assert plan.config_model == str(two["b"])  # as mergekit: config.json from base_model when given
