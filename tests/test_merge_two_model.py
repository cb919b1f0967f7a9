"""mergekit's two-model methods nearswap and arcee_fusion, and RAM (ram, ramplus_tl): by hand, cached == uncached, the
mergekit config reader and its refusals. Equality with mergekit: tests/test_merge_vs_mergekit.py."""

from __future__ import annotations

import random

import pytest
import torch
from test_merge_cache import random_pool

from evomerge.errors import ConfigError
from evomerge.merge import Genome, StatePool, build, merge_uncached, prepare
from evomerge.merge.mergekit_compat import from_mergekit

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _eager_kernels(monkeypatch):
    monkeypatch.setenv("EVOMERGE_FUSED", "0")


def _pool(base: list[float], expert: list[float]) -> StatePool:
    name = "model.layers.0.mlp.up_proj.weight"
    return StatePool({name: torch.tensor([base])}, {"x": {name: torch.tensor([expert])}}, num_layers=1)


def test_nearswap_by_hand():
    """w = clamp(t / |a - b|, 0, 1): |tau| = 0.05 < t takes the expert whole, 0.2 moves half
    way, 1.0 a tenth; tau = 0 stays (the 1e-6 floor)."""
    pool = _pool([0.0, 1.0, 2.0, 3.0], [0.05, 1.2, 1.0, 3.0])
    out = build(prepare(pool, "nearswap"), Genome.from_values([0.1]))
    torch.testing.assert_close(out["model.layers.0.mlp.up_proj.weight"], torch.tensor([[0.05, 1.1, 1.9, 3.0]]))
    half = build(prepare(pool, "nearswap"), Genome.from_values([0.1], scale=0.5))
    torch.testing.assert_close(half["model.layers.0.mlp.up_proj.weight"], torch.tensor([[0.025, 1.05, 1.95, 3.0]]))


def test_arcee_fusion_by_hand():
    """One row, so one KL for all entries: importance ~ |tau|. Sorted |tau| = [1, 2, 3, 4, 100]:
    quartiles at indices int(q * 4) = 1, 2, 3 -> 2, 3, 4; threshold 3 + 1.5 * 2 = 6: only the
    entry that moved by 100 is fused."""
    base = [0.0, 0.0, 0.0, 0.0, 0.0]
    tau = [1.0, -2.0, 3.0, 100.0, 4.0]
    out = build(prepare(_pool(base, tau), "arcee_fusion"), Genome.from_values([1.0]))
    torch.testing.assert_close(out["model.layers.0.mlp.up_proj.weight"], torch.tensor([[0.0, 0.0, 0.0, 100.0, 0.0]]))


@pytest.mark.parametrize("method", ["nearswap", "arcee_fusion", "ram", "ramplus_tl"])
def test_cached_build_equals_uncached(method):
    rng = random.Random(7)
    pool = random_pool(1)
    cache = prepare(pool, method)
    out = None
    kept = []
    for _ in range(8):
        groups = rng.choice([1, 2, 4])
        w = [[rng.choice([rng.uniform(0.0, 0.1), 0.0, 1.0, -0.1])] for _ in range(groups)]
        genome = Genome(tuple(map(tuple, w)), None, rng.uniform(0.3, 2.0))
        out = build(cache, genome, out=out)
        ref = merge_uncached(pool, method, {}, genome)
        for name, want in ref.items():
            torch.testing.assert_close(out[name], want, atol=1e-6, rtol=1e-6, msg=lambda m: f"{method} {name}: {m}")
        kept.append(sum(int((out[n] != pool.base_state[n]).sum()) for n in out))
    assert 0 < max(kept)  # something moved


def test_arcee_fusion_keeps_a_minority():
    pool = random_pool(1)
    out = build(prepare(pool, "arcee_fusion"), Genome.from_values([1.0]))
    moved = sum(int((out[n] != pool.base_state[n]).sum()) for n in out)
    total = sum(t.numel() for t in out.values())
    assert 0 < moved < 0.5 * total  # only the outliers of importance are fused


_TWO = {"base_model": "a", "models": [{"model": "a", "parameters": {"weight": 0.6}}, {"model": "b", "parameters": {"weight": 0.4}}]}


def test_mergekit_configs_read(caplog):
    """mergekit's own test configs: base listed in models, weights 0.6 / 0.4 (ignored, as
    mergekit ignores them), nearswap's t the expert's weight (scalar, filtered or per slice)."""
    ns = from_mergekit({"merge_method": "nearswap", **_TWO, "parameters": {"t": 0.0001}}, "c")
    assert ns.method == "nearswap" and list(ns.experts.values()) == ["b"] and ns.base == "a"
    assert ns.genome.weights == {"b": 0.0001} and "weights are ignored" in caplog.text
    af = from_mergekit({"merge_method": "arcee_fusion", **_TWO}, "c")
    assert af.method == "arcee_fusion" and af.genome.weights == {"b": 1.0} and af.options == {}


@pytest.mark.parametrize("cfg,match", [
    ({"merge_method": "nearswap", **_TWO}, r"c.yml: nearswap needs parameters.t"),
    ({"merge_method": "nearswap", "models": _TWO["models"], "parameters": {"t": 0.1}}, r"nearswap' needs base_model"),
    ({"merge_method": "nearswap", "base_model": "a", "models": ["b", "c"], "parameters": {"t": 0.1}},
     r"nearswap needs base_model plus exactly one other model, got 2"),
    ({"merge_method": "nearswap", "base_model": "a", "models": [{"model": "b", "parameters": {"t": 0.1}}]},
     r"models\[0\] \(b\): parameter 't' is not supported for 'nearswap'"),
    ({"merge_method": "arcee_fusion", "models": ["a", "b"]}, r"arcee_fusion' needs base_model"),
    ({"merge_method": "arcee_fusion", **_TWO, "parameters": {"density": 0.5}}, r"parameters.density is not supported for 'arcee_fusion'"),
    ({"merge_method": "ram", "models": ["a", "b"]}, r"ram' needs base_model"),
    ({"merge_method": "ramplus_tl", **_TWO, "parameters": {"density": 0.5}}, r"parameters.density is not supported for 'ramplus_tl'"),
])
def test_bad_two_model_configs_name_the_field(cfg, match):
    with pytest.raises(ConfigError, match=match):
        from_mergekit(cfg, "c.yml")


def _three(base: list[float], a: list[float], b: list[float]) -> StatePool:
    name = "model.layers.0.mlp.up_proj.weight"
    return StatePool({name: torch.tensor([base])}, {"a": {name: torch.tensor([a])}, "b": {name: torch.tensor([b])}},
                     num_layers=1)


def test_ram_by_hand():
    """Deltas a = [1, 0, 2, 0], b = [3, 0, 0, 1e-6]: entry 0 is changed by both (mean 2),
    entry 2 only by a (2), entry 3's 1e-6 is below epsilon (nothing moves)."""
    pool = _three([0.0] * 4, [1.0, 0.0, 2.0, 0.0], [3.0, 0.0, 0.0, 1e-6])
    out = build(prepare(pool, "ram"), Genome.from_values([0.5, 0.5]))
    torch.testing.assert_close(out["model.layers.0.mlp.up_proj.weight"], torch.tensor([[2.0, 0.0, 2.0, 0.0]]))


def test_ramplus_boosts_unique_entries_by_the_overlap_ratio():
    """a changes entries 0 (shared) and 2 (unique): rho_a = 1/1, capped at alpha = 0.2, so its
    unique entry is scaled by 1 + r * 0.2 = 1.1 (r = 0.5); b has no unique entry."""
    pool = _three([0.0] * 3, [1.0, 0.0, 2.0], [3.0, 0.0, 0.0])
    out = build(prepare(pool, "ramplus_tl", {"r": 0.5}), Genome.from_values([0.5, 0.5]))
    torch.testing.assert_close(out["model.layers.0.mlp.up_proj.weight"], torch.tensor([[2.0, 0.0, 2.2]]))


def test_ram_configs_read():
    ram = from_mergekit({"merge_method": "ramplus_tl", **_TWO, "parameters": {"r": 0.3, "epsilon": 1e-3}}, "c")
    assert ram.method == "ramplus_tl" and ram.options == {"r": 0.3, "alpha": 0.2, "epsilon": 1e-3}
