"""The torch.compile'd TIES/DARE/DELLA kernels agree with the eager ones and the uncached reference.

Slow: the first compile takes 10-30 s on a small CPU.
"""

from __future__ import annotations

import random

import pytest
import torch

from evomerge.merge import build, merge_uncached, prepare
from tests.test_merge_cache import random_genome, random_pool

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "method,options",
    [("ties", {}), ("ties", {"density_grid": None, "normalize": False}), ("dare_ties", {"rescale": "l1"}), ("dare_linear", {"normalize": True}),
     ("della", {}), ("della", {"normalize": False, "rescale": False, "epsilon": 0.05}), ("della_linear", {"normalize": True}),
     ("breadcrumbs_ties", {"normalize": True, "rescale": True}), ("breadcrumbs", {}), ("breadcrumbs", {"normalize": True, "rescale": True, "gamma": 0.1}),
     ("breadcrumbs_ties", {}), ("sce", {}), ("sce", {"select_topk": 0.5})],
)
def test_compiled_kernels_match_reference(method, options):
    torch.set_num_threads(1)
    rng = random.Random(7)
    pool = random_pool(3)
    compiled = prepare(pool, method, options, fused=True)
    eager = prepare(pool, method, options, fused=False)
    for _ in range(6):
        genome = random_genome(rng, 3, rng.choice([1, 2]), method)
        a, b = build(compiled, genome), build(eager, genome)
        ref = merge_uncached(pool, method, options, genome)
        for name in ref:
            torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(a[name], ref[name], atol=1e-6, rtol=1e-6)


def test_compiled_dare_l1_rescale_is_accurate_on_large_tensors():
    """A compiled fp32 sum over millions of entries drifted ~1%; the kernel accumulates in fp64."""
    torch.set_num_threads(1)
    from evomerge.merge import Genome, StatePool

    g = torch.Generator().manual_seed(0)
    base = {"emb": torch.randn(4000, 1024, generator=g) * 0.02}
    experts = {e: {"emb": base["emb"] + 2e-4 * torch.randn(4000, 1024, generator=g)} for e in ("a", "b")}
    pool = StatePool(base, experts)
    genome = Genome.from_values({"a": 0.6, "b": 0.4}, {"a": 0.66, "b": 0.5}, 1.0, ["a", "b"])
    compiled, eager = (build(prepare(pool, "dare_ties", {"rescale": "l1"}, fused=f), genome)["emb"] for f in (True, False))
    torch.testing.assert_close(compiled, eager, atol=1e-7, rtol=1e-6)


def test_compiled_della_with_kept_l1_table_matches_reference():
    """Big tensors: the rescale comes from prepare's kept-L1 table, not a sum in the kernel."""
    torch.set_num_threads(1)
    from evomerge.merge import Genome, StatePool

    g = torch.Generator().manual_seed(5)
    base = {"w": torch.randn(320, 256, generator=g), "v": torch.randn(64, generator=g)}
    experts = {f"e{k}": {n: t + 0.05 * torch.randn(t.shape, generator=g) for n, t in base.items()} for k in range(3)}
    pool = StatePool(base, experts)
    rng = random.Random(3)
    for method in ("della", "della_linear"):
        cache = prepare(pool, method, {}, fused=True)
        for _ in range(3):
            genome = Genome.from_values([rng.uniform(0.1, 1.5) for _ in range(3)], [rng.uniform(0.05, 0.95) for _ in range(3)], 1.0)
            out, ref = build(cache, genome), merge_uncached(pool, method, {}, genome)
            for name in ref:
                torch.testing.assert_close(out[name], ref[name], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_compiled_breadcrumbs_with_straddling_ties_matches_reference(method):
    """The compiled band compare plus the recomputed tied entries equal the reference."""
    torch.set_num_threads(1)
    from test_merge_cache import tied_pool

    from evomerge.merge import Genome

    pool = tied_pool()
    rng = random.Random(4)
    for options in ({"gamma": 0.1}, {"gamma": 0.02, "rescale": True, "normalize": True}):
        cache = prepare(pool, method, options, fused=True)
        for _ in range(4):
            genome = Genome.from_values([rng.uniform(0.1, 1.5) for _ in range(3)], [rng.uniform(0.05, 0.95) for _ in range(3)], 1.0)
            out, ref = build(cache, genome), merge_uncached(pool, method, options, genome)
            for name in ref:
                torch.testing.assert_close(out[name], ref[name], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", ["dare", "della"])
def test_compiled_mask_kernels_agree_on_both_word_forms(name):
    """The packed level words go in as int32 (AVX-512) or as a float32 view (AVX2 and
    others: F.level_words_arg); both forms give the same bits on any machine."""
    from evomerge.merge import fused as F
    from evomerge.merge import kernels as K

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(11)
    t, n = 3, 5000
    taus, base = torch.randn(t, n, generator=g), torch.randn(n, generator=g)
    words = K.level_words(t, n)
    for k in range(t):
        K.pack_level(words, k, torch.randint(0, 65536, (n,), generator=g, dtype=torch.int32))
    levels = torch.tensor([20000, 40000, 65535], dtype=torch.int32)
    dens, factors = torch.tensor([0.3, 0.6, 0.99]), torch.tensor([1.2, -0.7, 0.9])
    coeffs, l1, scale = torch.tensor([0.5, 0.8, 0.3]), taus.abs().sum(1), torch.tensor(0.9)
    outs = []
    for form in (words, words.view(torch.float32)):
        for ties, normalize, rescale in ((True, True, False), (False, False, True)):
            out = torch.empty(n)
            F.run(name, True, out, taus, base, form, levels, dens, factors, coeffs, l1, scale, ties, normalize, rescale)
            eager = torch.empty(n)
            F.run(name, False, eager, taus, base, form, levels, dens, factors, coeffs, l1, scale, ties, normalize, rescale)
            torch.testing.assert_close(out, eager, atol=1e-6, rtol=1e-6)
            outs.append(out)
    assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[3])
