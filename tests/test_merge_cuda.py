"""The merge engine on a CUDA device: same candidates as the CPU reference, builds into bf16 models.

Skipped without CUDA (CI has none); run on a GPU machine with ``pytest -m gpu tests/test_merge_cuda.py``.
"""

from __future__ import annotations

import random
import zlib

import pytest
import torch
from test_merge_cache import ALL_METHODS, METHOD_OPTIONS, random_genome, random_pool

from evomerge.merge import Genome, StatePool, build, merge_uncached, prepare

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _to(pool: StatePool, device: str) -> StatePool:
    base = {n: t.to(device) for n, t in pool.base_state.items()}
    experts = {k: {n: t.to(device) for n, t in e.items()} for k, e in pool.expert_states.items()}
    return StatePool(base, experts, num_layers=pool.num_layers)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("method", ALL_METHODS)
def test_cuda_cached_build_equals_uncached(method, fused):
    """prepare/build on CUDA (eager and Triton-compiled kernels) vs the CPU reference."""
    rng = random.Random(zlib.crc32(method.encode()))
    n_experts = 1 if method == "slerp" else 3
    pool = random_pool(n_experts)
    gpu_pool = _to(pool, "cuda")
    # SVDs differ in the last bits between CPU and GPU solvers
    tol = 1e-4 if method in ("tsvm", "r_tsvm") else 1e-5
    for options in METHOD_OPTIONS[method]:
        cache = prepare(gpu_pool, method, options, device="cuda", fused=fused)
        for _ in range(4):
            groups = 1 if options.get("variant") == "original" else rng.choice([1, 2, 4])
            genome = random_genome(rng, n_experts, groups, method)
            out = build(cache, genome)
            ref = merge_uncached(pool, method, options, genome)
            for name, want in ref.items():
                assert out[name].device.type == "cuda"
                torch.testing.assert_close(out[name].cpu(), want, atol=tol, rtol=tol, msg=lambda m: f"{method} {options} {name}: {m}")


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "tsvm"])
def test_bf16_cache_builds_into_a_bf16_cuda_llama(method):
    """The benchmark's path: bf16 cache on the GPU, compiled kernels, a live bf16 LlamaForCausalLM."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=96, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    names = list(model.state_dict())
    # bf16-exact base and task vectors (as in test_merge_cache_dtype): both caches hold the same numbers
    g = torch.Generator().manual_seed(3)
    base = {n: torch.randn(t.shape, generator=g).bfloat16().float() for n, t in model.state_dict().items()}
    experts = {
        f"e{k}": {n: b + (50 * torch.randn(b.shape, generator=g)).round().clamp(-255, 255) / 1024 for n, b in base.items()} for k in range(2)
    }
    pool = StatePool(base, experts, num_layers=4)
    genome = Genome(((0.7, 0.4), (0.2, 1.1)), ((0.6, 0.3), (0.9, 0.5)), 1.0)
    want = build(prepare(pool, method, fused=False), genome)  # fp32 on the CPU
    cache = prepare(_to(pool, "cuda"), method, device="cuda", cache_dtype=torch.bfloat16)
    build(cache, genome, out=model)
    tol = 2e-2 if method == "tsvm" else 1e-6
    for name in names:
        p = model.state_dict()[name]
        assert p.dtype == torch.bfloat16 and p.device.type == "cuda"
        torch.testing.assert_close(p.float().cpu(), want[name], atol=tol, rtol=2**-7, msg=lambda m: f"{method} {name}: {m}")
    ids = torch.randint(0, 96, (2, 16), device="cuda")
    assert torch.isfinite(model(ids).logits.float()).all()
