"""Shared helpers for the merge benchmarks: random Llama-shaped pools and timers."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def llama_shapes(hidden: int, intermediate: int, layers: int, vocab: int, kv_heads_ratio: int = 1) -> dict[str, tuple[int, ...]]:
    """Tensor names/shapes of a LlamaForCausalLM checkpoint (untied lm_head)."""
    kv = hidden // kv_heads_ratio
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.weight": (kv, hidden),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (intermediate, hidden),
            p + "mlp.up_proj.weight": (intermediate, hidden),
            p + "mlp.down_proj.weight": (hidden, intermediate),
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        }
    shapes |= {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    return shapes


def random_states(shapes: dict[str, tuple[int, ...]], n_experts: int, seed: int = 0, noise: float = 0.01):
    g = torch.Generator().manual_seed(seed)
    base = {n: torch.randn(s, generator=g) * 0.02 for n, s in shapes.items()}
    experts = {f"expert{k}": {n: t + noise * torch.randn(t.shape, generator=g) * 0.02 for n, t in base.items()} for k in range(n_experts)}
    return base, experts


def timeit(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    """Median wall seconds of ``fn`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(nbytes: int, repeats: int = 3) -> float:
    """Bytes per second (read + written) of a plain ``dst.copy_(src)`` moving ``nbytes`` in total."""
    n = nbytes // 8  # float32 elements: copy reads 4n and writes 4n bytes
    src = torch.randn(n)
    dst = torch.empty(n)
    t = timeit(lambda: dst.copy_(src), repeats=repeats)
    return 8 * n / t


def interleaved(fn, nbytes: int, repeats: int) -> tuple[float, float]:
    """Median build seconds and the median ratio of build to copy throughput, each build
    timed right after a plain copy of ``nbytes`` (so load that changes over the run moves
    both); one warm-up build first."""
    n = nbytes // 8  # float32 elements: the copy reads 4n and writes 4n bytes
    src, dst = torch.randn(n), torch.empty(n)
    fn()
    times, ratios = [], []
    for _ in range(max(repeats, 5)):
        t0 = time.perf_counter()
        dst.copy_(src)
        t1 = time.perf_counter()
        fn()
        t2 = time.perf_counter()
        times.append(t2 - t1)
        ratios.append((t1 - t0) / (t2 - t1))  # same bytes: throughput ratio = time ratio
    return statistics.median(times), statistics.median(ratios)
