"""Our TIES / task_arithmetic / linear weights equal mergekit 0.1.5's, DARE agrees in distribution.

mergekit is never an evomerge dependency: this test runs it in the benchmark-only
environment (``benchmarks/make_mergekit_env.sh``), found through ``MERGEKIT_PYTHON``
(default ``/tmp/mergekit-env/bin/python``), and skips when that is missing.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge.merge import load_recipe, write_merged_model

pytestmark = pytest.mark.slow
MERGEKIT_PYTHON = os.environ.get("MERGEKIT_PYTHON", "/tmp/mergekit-env/bin/python")


def _mergekit_yaml(cfg_path: Path, out: Path) -> None:
    exe = Path(MERGEKIT_PYTHON).with_name("mergekit-yaml")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([str(exe), str(cfg_path), str(out), "--no-copy-tokenizer", "--random-seed", "1"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def _merge_both(tmp_path: Path, cfg: dict) -> tuple[dict, dict]:
    """(evomerge output, mergekit-yaml output) for one mergekit config."""
    cfg_path = tmp_path / "cfg.yml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    _mergekit_yaml(cfg_path, tmp_path / "mk")
    write_merged_model(load_recipe(cfg_path), tmp_path / "ours")
    return load_file(tmp_path / "ours" / "model.safetensors"), load_file(tmp_path / "mk" / "model.safetensors")


@pytest.fixture(autouse=True)
def _need_mergekit(monkeypatch):
    if not Path(MERGEKIT_PYTHON).exists():
        pytest.skip(f"mergekit environment not found at {MERGEKIT_PYTHON}")
    monkeypatch.setenv("EVOMERGE_FUSED", "0")


@pytest.mark.parametrize(
    "method,params,model_params",
    [
        ("ties", {"normalize": True}, [{"weight": 0.6, "density": 0.29}, {"weight": 0.4, "density": 0.7}]),
        ("ties", {"normalize": False, "lambda": 0.8}, [{"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": 0.5}]),
        ("task_arithmetic", {"lambda": 1.3}, [{"weight": 0.7}, {"weight": -0.2}]),
        ("linear", {}, [{"weight": 0.3}, {"weight": 0.9}]),
        ("dare_ties", {}, [{"weight": 0.6, "density": 0.5}, {"weight": 0.4, "density": 0.7}]),
        ("ties", {"rescale": True}, [{"weight": 0.6, "density": 0.3}, {"weight": 0.4, "density": 0.7}]),
        ("ties", {"rescale": True, "normalize": False}, [{"weight": 1.0, "density": 0.2}, {"weight": 0.5, "density": 1.0}]),
        ("linear", {"lambda": 0.7}, [{"weight": 0.3}, {"weight": 0.9}]),
        ("breadcrumbs", {}, [{"weight": 0.6, "density": 0.5, "gamma": 0.05}, {"weight": 0.4, "density": 0.8, "gamma": 0.05}]),
        ("breadcrumbs_ties", {"normalize": True, "rescale": True, "gamma": 0.1}, [{"weight": 0.6, "density": 0.3}, {"weight": 0.4, "density": 0.7}]),
    ],
)
def test_same_weights_as_mergekit(micro_pool, tmp_path, method, params, model_params):
    cfg = {
        "merge_method": method,
        "base_model": str(micro_pool["base"]),
        "models": [
            {"model": str(micro_pool["expert_a"]), "parameters": model_params[0]},
            {"model": str(micro_pool["expert_b"]), "parameters": model_params[1]},
        ],
        "parameters": params,
        "dtype": "float32",
    }
    if method == "linear":
        del cfg["base_model"]
    ours, theirs = _merge_both(tmp_path, cfg)
    assert set(ours) == set(theirs)
    if method != "dare_ties":
        for name in theirs:
            torch.testing.assert_close(ours[name], theirs[name], atol=1e-6, rtol=1e-5)
        return
    base = load_file(micro_pool["base"] / "model.safetensors")
    d_ours = torch.cat([(ours[k] - base[k]).reshape(-1) for k in base])
    d_mk = torch.cat([(theirs[k] - base[k]).reshape(-1) for k in base])
    assert abs(float((d_ours != 0).float().mean()) - float((d_mk != 0).float().mean())) < 0.02
    assert float(d_ours.abs().mean()) == pytest.approx(float(d_mk.abs().mean()), rel=0.05)


@pytest.mark.parametrize("params", [{"t": 0.35}, {"t": 0.6, "lambda": 0.5}])
def test_slerp_matches_mergekit(micro_pool, tmp_path, params):
    cfg = {
        "merge_method": "slerp",
        "base_model": str(micro_pool["base"]),
        "models": [{"model": str(micro_pool["base"])}, {"model": str(micro_pool["expert_a"])}],
        "parameters": params,
        "dtype": "float32",
    }
    ours, theirs = _merge_both(tmp_path, cfg)
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("method,params", [("ties", {"density": 0.4}), ("task_arithmetic", {}), ("linear", {})])
def test_bfloat16_compute_dtype_is_close_to_mergekit(micro_pool, tmp_path, method, params):
    """mergekit computes in ``dtype: bfloat16``; evomerge rounds the inputs to it and computes
    in float32. The outputs then differ by bf16 rounding of mergekit's intermediates only."""
    cfg = {
        "merge_method": method,
        "base_model": str(micro_pool["base"]),
        "models": [
            {"model": str(micro_pool["expert_a"]), "parameters": {"weight": 0.6, **params}},
            {"model": str(micro_pool["expert_b"]), "parameters": {"weight": 0.4, **params}},
        ],
        "dtype": "bfloat16",
    }
    if method == "linear":
        del cfg["base_model"]
    ours, theirs = _merge_both(tmp_path, cfg)
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype == torch.bfloat16
        a, b = ours[name].float(), theirs[name].float()
        # mergekit rounds every intermediate to bf16: a few ulps of the tensor's largest
        # entries for sums; TIES also elects a different sign where a bf16 sum of
        # weighted deltas rounds across zero, so there only the mean difference is small
        if method != "ties":
            assert float((a - b).abs().max()) <= 2 ** -5 * float(b.abs().max()), name
        assert float((a - b).abs().mean()) <= 2 ** -8 * float(b.abs().max()), name


def _two_model_cfg(micro_pool, method, base="base", params=None, weights=(0.6, 0.4), models=("expert_a", "expert_b")):
    """mergekit's tests/test_basic_merges.py ``two_model_config`` (weights 0.6 / 0.4), in float32."""
    cfg = {
        "merge_method": method,
        "models": [{"model": str(micro_pool[m]), "parameters": {"weight": w}} for m, w in zip(models, weights)],
        "parameters": params or {},
        "dtype": "float32",
    }
    if base is not None:
        cfg["base_model"] = str(micro_pool[base])
    return cfg


# mergekit's own test configurations for the methods beyond TIES/DARE (tests/test_basic_merges.py)
MORE_CASES = {
    "sce": dict(params={"select_topk": 0.5}),
    "sce_all": dict(params={}),
    "multislerp": dict(params={}),
    "multislerp_no_base": dict(base=None, params={}),
    "model_stock": dict(params={}),
    "model_stock_filter_wise": dict(params={"filter_wise": True}),
    "karcher": dict(params={"max_iter": 5, "tol": 1e-5}),
    "karcher_no_base": dict(base=None, params={}),
    "ram": dict(params={}),
    "ram_epsilon": dict(params={"epsilon": 0.02}),
    "ramplus_tl": dict(params={}),
    "ramplus_tl_epsilon": dict(params={"epsilon": 0.02, "r": 0.5, "alpha": 0.5}),
    **{
        f"nuslerp_{'base' if b else 'nobase'}_{'rows' if r else 'cols'}_{'flat' if f else 'nf'}": dict(
            base="base" if b else None, params={"nuslerp_row_wise": r, "nuslerp_flatten": f})
        for b in (True, False) for r in (False, True) for f in (False, True)
    },
    "nuslerp_weights_sum_to_zero": dict(params={"nuslerp_row_wise": False, "nuslerp_flatten": False}, weights=(-0.5, 0.5)),
}


@pytest.mark.parametrize("case", sorted(MORE_CASES))
def test_more_methods_equal_mergekit(micro_pool, tmp_path, case):
    method = case.split("_no_base")[0].split("_filter")[0].split("_all")[0].split("_epsilon")[0]
    method = "nuslerp" if method.startswith("nuslerp") else method
    cfg = _two_model_cfg(micro_pool, method, **MORE_CASES[case])
    ours, theirs = _merge_both(tmp_path, cfg)
    assert set(ours) == set(theirs)
    worst = max(float((ours[n].float() - theirs[n].float()).abs().max()) for n in theirs)
    print(f"{case}: max abs diff {worst:.2e}")
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], atol=2e-6, rtol=1e-5, msg=lambda m: f"{case} {name}: {m}")


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_matches_mergekit_in_distribution(micro_pool, tmp_path, method):
    """mergekit's test_della_merge configuration (density 0.66, epsilon 0.05, lambda 0.5): the
    masks are random, so the kept fraction per tensor and the mean |delta| must agree."""
    cfg = _two_model_cfg(micro_pool, method, params={"density": 0.66, "epsilon": 0.05, "lambda": 0.5})
    ours, theirs = _merge_both(tmp_path, cfg)
    assert set(ours) == set(theirs)
    base = load_file(micro_pool["base"] / "model.safetensors")
    d_ours = torch.cat([(ours[k] - base[k]).reshape(-1) for k in base])
    d_mk = torch.cat([(theirs[k] - base[k]).reshape(-1) for k in base])
    print(f"{method}: nonzero {float((d_ours != 0).float().mean()):.4f} vs {float((d_mk != 0).float().mean()):.4f}, "
          f"mean |delta| {float(d_ours.abs().mean()):.5f} vs {float(d_mk.abs().mean()):.5f}")
    assert abs(float((d_ours != 0).float().mean()) - float((d_mk != 0).float().mean())) < 0.02
    assert float(d_ours.abs().mean()) == pytest.approx(float(d_mk.abs().mean()), rel=0.05)


def test_della_refuses_what_mergekit_refuses(micro_pool, tmp_path):
    """mergekit's test_della_invalid_epsilon: density 0.66 +/- epsilon 1.35 leaves (0, 1)."""
    from evomerge.errors import ConfigError
    from evomerge.merge.mergekit_compat import from_mergekit

    with pytest.raises(ConfigError, match="epsilon"):
        from_mergekit(_two_model_cfg(micro_pool, "della", params={"density": 0.66, "epsilon": 1.35, "lambda": 0.5}))


# --------------------------------------------------------------------------- filter: values and slices
@pytest.fixture
def pool4(tmp_path):
    """The micro models with 4 layers, so gradients and slices have room to vary."""
    from evomerge.testing import save_micro_model

    return {k: save_micro_model(tmp_path / k, seed=s, num_layers=4) for k, s in (("base", 0), ("expert_a", 1), ("expert_b", 2))}


ATTN_MLP = [{"filter": "self_attn", "value": 0.3}, {"filter": "mlp", "value": 0.7}, {"value": 0.5}]
FILTER_CASES = {
    # per-model filters, a density filter that falls through to the top-level density
    "ties": ("ties", {"normalize": True, "density": 0.6}, [
        {"weight": ATTN_MLP, "density": [{"filter": "mlp", "value": 0.4}, {"value": 0.8}]},
        {"weight": 0.4, "density": [{"filter": "o_proj", "value": 0.2}]}]),
    # a filtered gradient at the top level, a plain gradient per model
    "task_arithmetic": ("task_arithmetic", {"lambda": 0.9, "weight": [{"filter": "mlp", "value": [0.2, 1.0]}, {"value": 0.5}]},
                        [{}, {"weight": [1.0, 0.0, 0.5]}]),
    "linear": ("linear", {}, [{"weight": ATTN_MLP}, {"weight": [{"filter": "layernorm", "value": 2.0}, {"value": 1.0}]}]),
    "breadcrumbs_ties": ("breadcrumbs_ties", {"gamma": 0.05}, [
        {"weight": 0.6, "density": [{"filter": "self_attn", "value": 0.3}, {"value": 0.9}]}, {"weight": ATTN_MLP, "density": 0.7}]),
    "multislerp": ("multislerp", {}, [{"weight": ATTN_MLP}, {"weight": 0.5}]),
    "nuslerp": ("nuslerp", {}, [{"weight": [{"filter": "mlp", "value": [0.1, 0.9]}, {"value": 0.5}]}, {"weight": 0.5}]),
}


@pytest.mark.parametrize("case", sorted(FILTER_CASES))
def test_filter_values_equal_mergekit(pool4, tmp_path, case):
    method, params, model_params = FILTER_CASES[case]
    cfg = {"merge_method": method, "base_model": str(pool4["base"]), "parameters": params, "dtype": "float32",
           "models": [{"model": str(pool4[m]), "parameters": p} for m, p in zip(("expert_a", "expert_b"), model_params)]}
    if method == "linear":
        del cfg["base_model"]
    ours, theirs = _merge_both(tmp_path, cfg)
    assert set(ours) == set(theirs)
    worst = max(float((ours[n] - theirs[n]).abs().max()) for n in theirs)
    print(f"filters {case}: max abs diff {worst:.2e}")
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], atol=2e-6, rtol=1e-5, msg=lambda m: f"{case} {name}: {m}")


def _slices(pool4, ranges, models, params=None):
    return [{"sources": [{"model": str(pool4[m]), "layer_range": list(r), **({"parameters": p} if p else {})}
                         for m, p in models(i)], **({"parameters": params[i]} if params and params[i] else {})}
            for i, r in enumerate(ranges)]


SLICE_CASES = {
    # mergekit's examples/gradient-slerp.yml, one slice over all layers, filtered gradients of t
    "slerp_one_slice": ("slerp", {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                        {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]},
                        [(0, 4)], lambda i: [("base", None), ("expert_a", None)], None),
    # two slices: t restarts in each, the slice's t before the top-level one
    "slerp_two_slices": ("slerp", {"t": 0.2}, [(0, 2), (2, 4)], lambda i: [("base", None), ("expert_a", None)],
                         [{"t": [0.0, 1.0]}, {}]),
    # per-source weights in one slice, slice-level ones in the other, top-level density
    "ties_two_slices": ("ties", {"density": 0.5}, [(0, 1), (1, 4)],
                        lambda i: [("base", None), ("expert_a", {"weight": [0.2, 0.8]} if i else {"weight": 0.9}), ("expert_b", None)],
                        [{"weight": 0.3}, {"weight": ATTN_MLP, "density": [1.0, 0.3]}]),
    "linear_three_slices": ("linear", {}, [(0, 1), (1, 3), (3, 4)],
                            lambda i: [("expert_a", {"weight": 1.0 + i}), ("expert_b", {"weight": [0.5, 1.5]})], None),
}


@pytest.mark.parametrize("case", sorted(SLICE_CASES))
def test_aligned_slices_equal_mergekit(pool4, tmp_path, case):
    method, params, ranges, models, slice_params = SLICE_CASES[case]
    cfg = {"merge_method": method, "parameters": params, "dtype": "float32",
           "slices": _slices(pool4, ranges, models, slice_params)}
    if method != "linear":
        cfg["base_model"] = str(pool4["base"])
    ours, theirs = _merge_both(tmp_path, cfg)
    assert set(ours) == set(theirs)
    worst = max(float((ours[n] - theirs[n]).abs().max()) for n in theirs)
    print(f"slices {case}: max abs diff {worst:.2e}")
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], atol=2e-6, rtol=1e-5, msg=lambda m: f"{case} {name}: {m}")


# --------------------------------------------------------------------------- two-model methods, passthrough
TWO_MODEL_CASES = {
    # mergekit's test_nearswap_merge (t = 0.0001) and a t at the micro models' |tau| scale
    "nearswap": ("nearswap", {"t": 0.0001}),
    "nearswap_t_0.03": ("nearswap", {"t": 0.03}),
    "arcee_fusion": ("arcee_fusion", {}),  # mergekit's test_arcee_fusion_merge
}


@pytest.mark.parametrize("case", sorted(TWO_MODEL_CASES))
def test_two_model_methods_equal_mergekit(micro_pool, tmp_path, case):
    """mergekit's two_model_config with base_model = model_a (listed in models), in float32."""
    method, params = TWO_MODEL_CASES[case]
    cfg = _two_model_cfg(micro_pool, method, base="expert_a", params=params)
    ours, theirs = _merge_both(tmp_path, cfg)
    assert set(ours) == set(theirs)
    worst = max(float((ours[n] - theirs[n]).abs().max()) for n in theirs)
    base = load_file(micro_pool["expert_a"] / "model.safetensors")
    moved = sum(int((theirs[n] != base[n]).sum()) for n in theirs)
    print(f"{case}: max abs diff {worst:.2e} ({moved} entries moved)")
    assert moved > 0
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], atol=2e-6, rtol=1e-5, msg=lambda m: f"{case} {name}: {m}")


def _pt_slice(model, lo, hi, **params):
    return {"sources": [{"model": str(model), "layer_range": [lo, hi], **({"parameters": params} if params else {})}]}


PASSTHROUGH_CASES = {
    # mergekit's test_gpt2_copy / test_passthrough_scale / test_gpt2_stack forms
    "copy_bf16": lambda p: {"models": [{"model": str(p["base"])}], "dtype": "bfloat16"},
    "scale_filters": lambda p: {"models": [{"model": str(p["base"]), "parameters": {"scale": [
        {"filter": "o_proj", "value": 0}, {"filter": "down_proj", "value": 0}, {"value": 1}]}}]},
    "stack_twice_bf16": lambda p: {"slices": [_pt_slice(p["base"], 0, 4)] * 2, "dtype": "bfloat16"},
    # a frankenmerge: three models, dropped / repeated layers, scale per source, slice and top level, a gradient
    "franken": lambda p: {"dtype": "float32", "parameters": {"scale": [
        {"filter": "o_proj", "value": 0.5}, {"filter": "down_proj", "value": [0, 1]}, {"value": 1}]},
        "slices": [_pt_slice(p["base"], 0, 3), {**_pt_slice(p["expert_a"], 1, 4), "parameters": {"scale": 2.0}},
                   _pt_slice(p["expert_b"], 2, 3, scale=[{"filter": "layers.2.mlp", "value": -1}]),
                   _pt_slice(p["base"], 1, 2)]},
    "reorder_out_bf16": lambda p: {"base_model": str(p["expert_a"]), "dtype": "float32", "out_dtype": "bfloat16",
                                   "slices": [_pt_slice(p["expert_b"], 3, 4), _pt_slice(p["base"], 0, 3, scale=0.7)]},
}


@pytest.mark.parametrize("case", sorted(PASSTHROUGH_CASES))
def test_passthrough_equal_mergekit(pool4, tmp_path, case):
    import json

    cfg = {"merge_method": "passthrough", **PASSTHROUGH_CASES[case](pool4)}
    ours, theirs = _merge_both(tmp_path, cfg)
    assert set(ours) == set(theirs)
    worst = max(float((ours[n].float() - theirs[n].float()).abs().max()) for n in theirs)
    print(f"passthrough {case}: max abs diff {worst:.2e}, {len(theirs)} tensors")
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype, name
        assert torch.equal(ours[name], theirs[name]), f"{case} {name}"
    layers = [json.loads((tmp_path / d / "config.json").read_text())["num_hidden_layers"] for d in ("ours", "mk")]
    assert layers[0] == layers[1]
