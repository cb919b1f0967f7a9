"""Cached build vs uncached recompute, in-place builds into live models, memory checks."""

from __future__ import annotations

import random
import zlib

import pytest
import torch

from evomerge.merge import CacheTooLargeError, Genome, MergeBuildError, StatePool, build, merge_uncached, prepare
from evomerge.pool import Pool, load_model

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _eager_kernels(monkeypatch):
    """Eager kernels keep these tests fast; test_merge_fused.py checks the compiled ones."""
    monkeypatch.setenv("EVOMERGE_FUSED", "0")

ALL_METHODS = ["task_arithmetic", "linear", "ties", "dare_linear", "dare_ties", "slerp", "tsvm", "r_tsvm", "breadcrumbs", "breadcrumbs_ties",
               "della", "della_linear", "model_stock", "sce", "nuslerp", "multislerp", "karcher"]
METHOD_OPTIONS = {
    "task_arithmetic": [{}, {"normalize": True}],
    "linear": [{}, {"normalize": False}],
    "ties": [{}, {"normalize": False}, {"density_grid": None}, {"variant": "original"}, {"rescale": True},
             {"rescale": True, "density_grid": None, "normalize": False}],
    "dare_linear": [{}, {"rescale": "l1", "normalize": True}, {"rescale": "none"}],
    "dare_ties": [{}, {"normalize": True, "rescale": "l1"}],
    "slerp": [{}],
    "breadcrumbs": [{}, {"normalize": True, "rescale": True, "gamma": 0.1}],
    "breadcrumbs_ties": [{}, {"normalize": True, "rescale": True, "gamma": 0.05}],
    "della": [{}, {"normalize": False, "rescale": False, "epsilon": 0.05, "seed": 3}],
    "della_linear": [{}, {"normalize": True, "epsilon": 0.3}],
    "model_stock": [{}, {"filter_wise": True}],
    "sce": [{}, {"select_topk": 0.5}, {"select_topk": 0.0}],
    "nuslerp": [{}, {"flatten": False}, {"flatten": False, "row_wise": True}, {"on_task_vectors": False, "flatten": False}],
    "multislerp": [{}, {"normalize_weights": False}, {"on_task_vectors": False}],
    "karcher": [{}, {"max_iter": 3}],
    "tsvm": [{"storage": "dense"}, {"storage": "factored"}, {"exclude": ["*embed*"]}],
    "r_tsvm": [{"storage": "dense"}, {"storage": "factored", "order": "trunc_then_orth", "norm": "l1", "weight_1d": True}],
}


def random_pool(n_experts: int, seed: int = 0, layers: int = 4) -> StatePool:
    """Llama-like names and shapes, experts = base + small structured noise, a few bf16-like ties."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"model.embed_tokens.weight": (40, 16), "model.norm.weight": (16,), "lm_head.weight": (40, 16)}
    for i in range(layers):
        shapes[f"model.layers.{i}.self_attn.q_proj.weight"] = (16, 16)
        shapes[f"model.layers.{i}.mlp.up_proj.weight"] = (24, 16)
        shapes[f"model.layers.{i}.input_layernorm.weight"] = (16,)
    base = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    experts = {}
    for k in range(n_experts):
        e = {}
        for n, s in shapes.items():
            delta = 0.05 * torch.randn(s, generator=g)
            delta = (delta * 64).round() / 64  # quantised deltas: many exact magnitude ties
            e[n] = base[n] + delta
        experts[f"expert{k}"] = e
    return StatePool(base, experts, num_layers=layers)


def random_genome(rng: random.Random, n_experts: int, groups: int, method: str) -> Genome:
    lo = -0.5 if method in ("task_arithmetic", "tsvm", "r_tsvm", "dare_linear") else 0.05
    weights = [[rng.uniform(lo, 1.5) for _ in range(n_experts)] for _ in range(groups)]
    if method == "slerp":
        weights = [[rng.uniform(0, 1)] for _ in range(groups)]
    dens = [[rng.choice([rng.uniform(0.01, 1.0), 1.0, 0.0, 0.5]) for _ in range(n_experts)] for _ in range(groups)]
    return Genome(tuple(map(tuple, weights)), tuple(map(tuple, dens)), rng.uniform(0.3, 2.0))


@pytest.mark.parametrize("method", ALL_METHODS)
def test_cached_build_equals_uncached(method):
    rng = random.Random(zlib.crc32(method.encode()))  # str hash() changes per process
    n_experts = {"slerp": 1, "nuslerp": 2}.get(method, 3)
    pool = random_pool(n_experts)
    for options in METHOD_OPTIONS[method]:
        cache = prepare(pool, method, options)
        out = None
        for trial in range(12):
            groups = 1 if options.get("variant") == "original" else rng.choice([1, 2, 4])
            genome = random_genome(rng, n_experts, groups, method)
            out = build(cache, genome, out=out)  # reuse the same output dict: in-place
            ref = merge_uncached(pool, method, options, genome)
            for name, want in ref.items():
                torch.testing.assert_close(out[name], want, atol=1e-6, rtol=1e-6, msg=lambda m: f"{method} {options} {name}: {m}")


def test_layer_groups_apply_to_their_layers():
    pool = random_pool(2, layers=4)
    cache = prepare(pool, "task_arithmetic")
    g = Genome(((1.0, 0.0), (0.0, 1.0)))  # layers 0-1 take expert0, layers 2-3 and lm_head expert1
    out = build(cache, g)
    e0, e1 = pool.expert_states["expert0"], pool.expert_states["expert1"]
    torch.testing.assert_close(out["model.layers.1.mlp.up_proj.weight"], e0["model.layers.1.mlp.up_proj.weight"])
    torch.testing.assert_close(out["model.layers.2.mlp.up_proj.weight"], e1["model.layers.2.mlp.up_proj.weight"])
    torch.testing.assert_close(out["model.embed_tokens.weight"], e0["model.embed_tokens.weight"])
    torch.testing.assert_close(out["lm_head.weight"], e1["lm_head.weight"])


def test_module_groups_apply_to_their_modules():
    """A per-module genome: [embeddings, attn 0, mlp 0, attn 1, mlp 1, head] for 2 layers."""
    pool = random_pool(2, layers=2)
    cache = prepare(pool, "task_arithmetic")
    rows = ((1.0, 0.0), (0.0, 1.0), (1.0, 0.0), (0.5, 0.5), (0.0, 1.0), (0.0, 0.0))
    out = build(cache, Genome(rows, modules=True))
    base, e0, e1 = pool.base_state, pool.expert_states["expert0"], pool.expert_states["expert1"]
    expect = {
        "model.embed_tokens.weight": e0, "model.layers.0.self_attn.q_proj.weight": e1,
        "model.layers.0.input_layernorm.weight": e1, "model.layers.0.mlp.up_proj.weight": e0,
        "model.layers.1.mlp.up_proj.weight": e1, "lm_head.weight": base, "model.norm.weight": base,
    }
    for name, source in expect.items():
        torch.testing.assert_close(out[name], source[name], msg=name)
    half = base["model.layers.1.self_attn.q_proj.weight"] + 0.5 * (
        e0["model.layers.1.self_attn.q_proj.weight"] + e1["model.layers.1.self_attn.q_proj.weight"]
        - 2 * base["model.layers.1.self_attn.q_proj.weight"])
    torch.testing.assert_close(out["model.layers.1.self_attn.q_proj.weight"], half)
    with pytest.raises(MergeBuildError, match="per-module genome needs 6 groups"):
        build(cache, Genome(rows[:4], modules=True))
    assert Genome(rows, modules=True).to_dict(["expert0", "expert1"])["modules"] is True


@pytest.mark.parametrize("method", ALL_METHODS)
def test_merging_a_model_with_itself_returns_it(method):
    pool = random_pool(1)
    x = pool.expert_states["expert0"]
    n = 1 if method == "slerp" else 2  # nuslerp, model_stock: exactly / at least 2
    same = StatePool(x, {f"copy{k}": x for k in range(n)}, num_layers=4)  # base == experts: tau = 0
    genome = Genome.from_values([0.6] * n, [0.5] * n, scale=1.7)
    out = build(prepare(same, method), genome)
    rtol = 1e-6 if method == "karcher" else 0  # the Karcher mean renormalises: a few fp32 ulps
    for name, want in x.items():
        torch.testing.assert_close(out[name], want, atol=1e-6, rtol=rtol)
    # identical experts over a different base: weighted means give the expert back
    twins = StatePool(pool.base_state, {"a": x, "b": x}, num_layers=4)
    for m, opts in [("task_arithmetic", {"normalize": True}), ("linear", {}), ("ties", {}), ("dare_linear", {"normalize": True})]:
        out = build(prepare(twins, m, opts), Genome.from_values([0.3, 0.9], [1.0, 1.0]))
        for name, want in x.items():
            torch.testing.assert_close(out[name], want, atol=1e-5, rtol=0)


def test_consecutive_in_place_builds_leave_no_stale_values(tmp_path):
    from evomerge.testing import save_micro_model

    paths = [save_micro_model(tmp_path / f"m{i}", seed=i) for i in range(3)]
    pool = Pool.from_refs(paths[0], {"a": str(paths[1]), "b": str(paths[2])})
    model = load_model(str(paths[0]))
    for method, genomes in {
        "ties": [Genome.from_values([0.2, 1.0], [0.1, 0.9]), Genome.from_values([1.0, 0.3], [0.7, 0.2])],
        "dare_ties": [Genome.from_values([0.5, 0.5], [0.3, 0.3]), Genome.from_values([0.9, 0.1], [0.8, 0.6])],
        "tsvm": [Genome.from_values([0.5, 1.5]), Genome.from_values([-0.2, 0.4], scale=2.0)],
    }.items():
        cache = prepare(pool, method)
        build(cache, genomes[0], out=model)
        build(cache, genomes[1], out=model)
        fresh = build(cache, genomes[1])
        ref = merge_uncached(pool, method, {}, genomes[1])
        state = model.state_dict()
        for name, want in fresh.items():
            torch.testing.assert_close(state[name], want, atol=0, rtol=0)
            torch.testing.assert_close(state[name], ref[name], atol=1e-6, rtol=1e-6)


def test_build_into_bf16_model_casts(tmp_path):
    from evomerge.testing import micro_llama, save_micro_model

    paths = [save_micro_model(tmp_path / f"m{i}", seed=i) for i in range(2)]
    pool = Pool.from_refs(paths[0], {"a": str(paths[1])})
    model = micro_llama(seed=5).to(torch.bfloat16)
    cache = prepare(pool, "task_arithmetic")
    build(cache, Genome.from_values([1.0]), out=model)
    expert = load_model(str(paths[1]))
    for name, p in expert.state_dict().items():
        assert model.state_dict()[name].dtype == torch.bfloat16
        torch.testing.assert_close(model.state_dict()[name].float(), p, atol=1e-6, rtol=2**-7)  # one bf16 ulp


def test_build_errors_name_the_culprit():
    pool = random_pool(2)
    cache = prepare(pool, "ties")
    with pytest.raises(MergeBuildError, match="needs densities"):
        build(cache, Genome.from_values([0.5, 0.5]))
    with pytest.raises(MergeBuildError, match="3 experts per group, the cache has 2"):
        build(cache, Genome.from_values([0.5, 0.5, 0.5], [1, 1, 1]))
    out = build(cache, Genome.from_values([0.5, 0.5], [1, 1]))
    out.pop("lm_head.weight")
    with pytest.raises(MergeBuildError, match="no tensor 'lm_head.weight'"):
        build(cache, Genome.from_values([0.5, 0.5], [1, 1]), out=out)


def test_memory_estimate_refuses_with_formula():
    pool = random_pool(3)
    with pytest.raises(CacheTooLargeError) as err:
        prepare(pool, "tsvm", {"storage": "dense"}, memory_limit=1000)
    msg = str(err.value)
    assert "4*P + dense 4*T*P" in msg and "P=" in msg and "T=3" in msg and "factored" in msg
    # auto storage switches to the factored form when dense does not fit
    dense = prepare(pool, "tsvm", {"storage": "dense"})
    limit = dense.estimate.total - 1
    auto = prepare(pool, "tsvm", {"storage": "auto"}, memory_limit=limit)
    assert auto.options.storage == "factored" and auto.estimate.total <= limit


def test_non_float_tensors_are_copied_from_the_base():
    pool = random_pool(2)
    pool.base_state["model.position_ids"] = torch.arange(10)
    for e in pool.expert_states.values():
        e["model.position_ids"] = torch.arange(10) * 7  # ignored: non-float tensors are not merged
    out = build(prepare(pool, "ties"), Genome.from_values([0.5, 0.5], [0.5, 0.5]))
    assert out["model.position_ids"].dtype == torch.int64
    assert torch.equal(out["model.position_ids"], torch.arange(10))


def test_genome_values_by_name_and_groups():
    g = Genome.from_values({"b": 0.2, "a": 0.8}, {"a": [0.1, 0.2], "b": [0.3, 0.4]}, 1.5, ["a", "b"])
    assert g.weights == ((0.8, 0.2), (0.8, 0.2)) and g.densities == ((0.1, 0.3), (0.2, 0.4)) and g.scale == 1.5
    assert Genome.from_values(**{k: v for k, v in g.to_dict(["a", "b"]).items() if k != "scale"}, expert_names=["a", "b"]).weights == g.weights


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_kept_l1_table_equals_uncached(method):
    """Tensors of >= 65536 entries take DELLA's rescale from the kept-L1 table built in prepare."""
    g = torch.Generator().manual_seed(5)
    base = {"w": torch.randn(320, 256, generator=g), "v": torch.randn(64, generator=g)}
    experts = {f"e{k}": {n: t + 0.05 * torch.randn(t.shape, generator=g) for n, t in base.items()} for k in range(3)}
    pool = StatePool(base, experts)
    rng = random.Random(11)
    for options in ({}, {"normalize": True, "epsilon": 0.3}):
        cache = prepare(pool, method, options)
        assert cache.plans[0].state.kept_l1 is not None and cache.plans[1].state.kept_l1 is None
        for _ in range(4):
            genome = Genome.from_values([rng.uniform(0.1, 1.5) for _ in range(3)], [rng.uniform(0.05, 0.95) for _ in range(3)], 1.0)
            out, ref = build(cache, genome), merge_uncached(pool, method, options, genome)
            for name in ref:
                torch.testing.assert_close(out[name], ref[name], atol=1e-6, rtol=1e-6)


def tied_pool() -> StatePool:
    """Three experts whose deltas take a handful of distinct magnitudes (multiples of 1/64)."""
    g = torch.Generator().manual_seed(2)
    base = {"w": torch.randn(96, 700, generator=g), "v": torch.randn(300, generator=g)}
    experts = {f"e{k}": {n: t + torch.randint(-3, 4, t.shape, generator=g).float() / 64 for n, t in base.items()} for k in range(3)}
    return StatePool(base, experts)


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs_heavy_ties_equal_uncached(method):
    """Deltas with a handful of distinct magnitudes: runs of equal |tau| straddle both cuts
    (the outlier cut and the K-th entry) for most densities, and mergekit's argsort decides."""
    pool = tied_pool()
    rng = random.Random(4)
    for options in ({"gamma": 0.1}, {"gamma": 0.02, "rescale": True, "normalize": True}):
        cache = prepare(pool, method, options)
        for _ in range(5):
            genome = Genome.from_values([rng.uniform(0.1, 1.5) for _ in range(3)], [rng.uniform(0.05, 0.95) for _ in range(3)], 1.0)
            out, ref = build(cache, genome), merge_uncached(pool, method, options, genome)
            for name in ref:
                torch.testing.assert_close(out[name], ref[name], atol=1e-6, rtol=1e-6)
