"""A bf16/fp16 merge cache: half the memory, the same candidates up to bf16 rounding."""

from __future__ import annotations

import random
import zlib

import pytest
import torch
from test_merge_cache import ALL_METHODS as _ALL
from test_merge_cache import METHOD_OPTIONS, random_genome, random_pool

from evomerge.errors import EvomergeError
from evomerge.merge import Genome, StatePool, build, estimate_cache_bytes, prepare

# every method, della..karcher included: nuslerp and multislerp store task vectors (not
# the models) and della ranks the unrounded task vectors, so both caches hold the same numbers
ALL_METHODS = list(_ALL)

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _eager_kernels(monkeypatch):
    """Eager kernels keep these tests fast; the compiled ones run in test_merge_cuda.py."""
    monkeypatch.setenv("EVOMERGE_FUSED", "0")


def bf16_exact_pool(n_experts: int, layers: int = 4, seed: int = 0) -> StatePool:
    """Base and task vectors that bf16 holds exactly, so a bf16 cache stores the same values.

    Bases are bf16 numbers below 8; task vectors are multiples of 2^-10 below 0.25 (at most
    8 significant bits); their fp32 sums are exact, so ``expert - base`` gives the task
    vector back bit for bit. Quantised task vectors also give many magnitude ties.
    """
    g = torch.Generator().manual_seed(seed)
    ref = random_pool(n_experts, layers=layers)
    base = {n: torch.randn(t.shape, generator=g).clamp(-7.9, 7.9).bfloat16().float() for n, t in ref.base_state.items()}
    experts = {}
    for k in range(n_experts):
        experts[f"expert{k}"] = {
            n: b + (0.05 * torch.randn(b.shape, generator=g) * 1024).round().clamp(-255, 255) / 1024 for n, b in base.items()
        }
    return StatePool(base, experts, num_layers=layers)


def _options(method: str) -> list[dict]:
    return METHOD_OPTIONS[method]


@pytest.mark.parametrize("method", ALL_METHODS)
def test_bf16_cache_matches_fp32_cache(method):
    """Same stored values -> same candidates; TSVM only rounds its transformed vectors."""
    rng = random.Random(zlib.crc32(method.encode()))
    n_experts = {"slerp": 1, "nuslerp": 2}.get(method, 3)
    pool = bf16_exact_pool(n_experts)
    # TSVM stores rounded SVD products and karcher its rounded mean (a computed delta, not an
    # input: no pool makes it bf16-exact); every other method stores exactly the same numbers
    tol = {"atol": 2e-2, "rtol": 2**-8} if method in ("tsvm", "r_tsvm", "karcher") else {"atol": 1e-5, "rtol": 1e-5}
    for options in _options(method):
        full = prepare(pool, method, options)
        half = prepare(pool, method, options, cache_dtype=torch.bfloat16)
        assert all(p.base.dtype == torch.bfloat16 for p in half.plans)
        for _ in range(6):
            groups = 1 if options.get("variant") == "original" else rng.choice([1, 2, 4])
            genome = random_genome(rng, n_experts, groups, method)
            want, got = build(full, genome), build(half, genome)
            for name in want:
                torch.testing.assert_close(got[name], want[name], **tol, msg=lambda m: f"{method} {options} {name}: {m}")


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_cache_on_a_generic_pool(method, dtype):
    """Arbitrary fp32 weights: the candidate moves by about the rounding of what is stored.

    TIES picks its top-K from the stored values, so an entry at the trim threshold may
    swap with a neighbour of equal rounded magnitude: those few entries are allowed off.
    Breadcrumbs has two such edges (the outlier cut and the K-th entry), and this pool's
    quantised deltas make whole runs of magnitudes equal once rounded, so more may swap.
    """
    rng = random.Random(zlib.crc32(f"{method}{dtype}".encode()))
    n_experts = {"slerp": 1, "nuslerp": 2}.get(method, 3)
    pool = random_pool(n_experts)
    options = _options(method)[0]
    full = prepare(pool, method, options)
    half = prepare(pool, method, options, cache_dtype=dtype)
    rtol = 2**-7 if dtype == torch.bfloat16 else 2**-10
    for _ in range(4):
        genome = random_genome(rng, n_experts, rng.choice([1, 2]), method)
        want, got = build(full, genome), build(half, genome)
        for name in want:
            close = torch.isclose(got[name], want[name], rtol=rtol, atol=20 * rtol * 0.05)
            frac = close.float().mean().item()
            floor = 0.97 if method == "ties" else 0.85 if method.startswith("breadcrumbs") else 1.0
            assert frac >= floor, f"{method} {name}: {1 - frac:.1%} entries off"


def test_estimate_reflects_the_cache_dtype():
    pool = random_pool(3)
    specs = pool.tensor_specs()
    p = sum(t.numel() for t in pool.base_state.values())
    for method, options, per_elem in [("task_arithmetic", {}, (4 + 4 * 3, 2 + 2 * 3)), ("dare_ties", {}, (4 + 4 * 3 + 8, 2 + 2 * 3 + 8))]:
        cache = prepare(pool, method, options)
        opts = cache.options
        full = estimate_cache_bytes(specs, 3, method, opts)
        half = estimate_cache_bytes(specs, 3, method, opts, torch.bfloat16)
        assert full.base + full.state == per_elem[0] * p and half.base + half.state == per_elem[1] * p
        assert half.workspace == full.workspace  # scratch stays fp32
        assert "2*P + 2*T*P" in half.formula and "bfloat16" in half.formula and "4*P + 4*T*P" in full.formula
        # the estimate counts what prepare actually keeps (DARE adds T fp32 L1 norms per tensor)
        held = prepare(pool, method, options, cache_dtype=torch.bfloat16)
        small = 4 * 3 * len(held.plans)
        assert 0 <= held.nbytes - (half.base + half.state) <= small and 0 <= cache.nbytes - (full.base + full.state) <= small
        assert held.estimate.total == half.total


def test_default_cache_is_float32_and_bad_dtypes_are_refused():
    pool = random_pool(2)
    cache = prepare(pool, "ties")
    assert cache.cache_dtype == torch.float32 and all(p.base.dtype == torch.float32 for p in cache.plans)
    assert all(p.state.taus.dtype == torch.float32 for p in cache.plans)
    with pytest.raises(EvomergeError, match="cache_dtype"):
        prepare(pool, "ties", cache_dtype=torch.int8)


def test_bf16_cache_builds_into_a_bf16_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    base = {n: t.detach().float().clone() for n, t in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    # bf16-exact task vectors (see bf16_exact_pool): both caches hold the same numbers
    experts = {f"e{k}": {n: t + (10 * torch.randn(t.shape, generator=g)).round() / 1024 for n, t in base.items()} for k in range(2)}
    pool = StatePool(base, experts, num_layers=2)
    genome = Genome.from_values([0.7, 0.5], [0.6, 0.4])
    want = build(prepare(pool, "dare_ties"), genome)
    build(prepare(pool, "dare_ties", cache_dtype=torch.bfloat16), genome, out=model)
    for name, p in model.state_dict().items():
        assert p.dtype == torch.bfloat16
        torch.testing.assert_close(p.float(), want[name], atol=1e-6, rtol=2**-7)  # one bf16 rounding


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_one_launch_ties_path_matches_the_split_path(monkeypatch, cache_dtype):
    """The GPU's TIES path (one table per build, cut index inside the kernel), run on the CPU."""
    from evomerge.merge.methods import Ties

    rng = random.Random(7)
    pool = bf16_exact_pool(3)
    for options in [{}, {"normalize": False}, {"density_grid": 64}]:
        cache = prepare(pool, "ties", options, cache_dtype=cache_dtype)
        genomes = [random_genome(rng, 3, rng.choice([1, 2, 4]), "ties") for _ in range(6)]
        want = [{k: v.clone() for k, v in build(cache, g).items()} for g in genomes]
        monkeypatch.setattr(Ties, "one_launch_devices", ("cpu", "cuda"))
        for g, w in zip(genomes, want):
            got = build(cache, g)
            for name in w:
                torch.testing.assert_close(got[name], w[name], atol=0, rtol=0, msg=lambda m: f"{options} {name}: {m}")
        monkeypatch.setattr(Ties, "one_launch_devices", ("cuda",))
