"""Hand-checkable vectors of merge_methods.md section 7, run through the cached path."""

from __future__ import annotations

import math

import pytest
import torch

from evomerge.merge import Genome, StatePool, build, merge_uncached, prepare
from evomerge.merge import fused as F
from evomerge.merge import kernels as K

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _eager_kernels(monkeypatch):
    """Eager kernels keep these tests fast; test_merge_fused.py checks the compiled ones."""
    monkeypatch.setenv("EVOMERGE_FUSED", "0")

T1 = [[3, -9, 8], [11, -1, 5], [-7, 12, 2], [-4, 10, -6]]
T2 = [[-5, 10, 8], [9, 2, -12], [7, -3, -1], [11, -6, 4]]
T3 = [[6, -2, -9], [-8, 12, -7], [1, -4, 11], [10, -3, 5]]


def _pool(*taus, name: str = "w") -> StatePool:
    taus = [torch.tensor(t, dtype=torch.float32) for t in taus]
    base = torch.zeros_like(taus[0])
    return StatePool({name: base}, {f"e{i}": {name: t} for i, t in enumerate(taus)})


def _merge(pool: StatePool, method: str, options: dict, weights, densities=None, scale: float = 1.0) -> torch.Tensor:
    cache = prepare(pool, method, options)
    out = build(cache, Genome.from_values(list(weights), None if densities is None else list(densities), scale))
    return out["w"]


def close(a, b, atol=1e-5):
    torch.testing.assert_close(a.double(), torch.tensor(b, dtype=torch.float64), atol=atol, rtol=0)


# --------------------------------------------------------------------------- TIES 7.2 / 7.3
@pytest.mark.parametrize("grid", [1024, None])
@pytest.mark.parametrize(
    "weights,normalize,expected",
    [
        ((1, 1, 1), True, [[0, 10, 8], [10, 12, -9.5], [7, 12, 11], [10.5, 10, 0]]),
        ((1, 1, 1), False, [[0, 10, 16], [20, 12, -19], [7, 12, 11], [21, 10, 0]]),
        ((1, 0.5, 2), True, [[0, -9, -9], [-8, 12, -8], [-7, 12, 11], [10.2, 10, 0]]),
        ((1, 0.5, 2), False, [[0, -9, -18], [-16, 24, -20], [-7, 12, 22], [25.5, 10, 0]]),
    ],
)
def test_ties_mergekit_vectors(grid, weights, normalize, expected):
    pool = _pool(T1, T2, T3)
    got = _merge(pool, "ties", {"normalize": normalize, "density_grid": grid}, weights, [0.5] * 3)
    close(got, expected)


@pytest.mark.parametrize("grid", [1024, None])
def test_ties_rescale_keeps_each_l1_norm(grid):
    """mergekit ``rescale: true``: every tau here has L1 78, the kept half (7..12) has 57,
    so each trimmed delta is scaled by 78/57 before the usual TIES consensus."""
    pool = _pool(T1, T2, T3)
    got = _merge(pool, "ties", {"rescale": True, "density_grid": grid}, (1, 0.5, 2), [0.5] * 3)
    want = torch.tensor([[0, -9, -9], [-8, 12, -8], [-7, 12, 11], [10.2, 10, 0]], dtype=torch.float64) * 78 / 57
    close(got, want.tolist())
    # density 1 keeps everything: no rescale
    close(_merge(pool, "ties", {"rescale": True, "density_grid": grid}, (1,) * 3, [1.0] * 3),
          _merge(pool, "ties", {"density_grid": grid}, (1,) * 3, [1.0] * 3).tolist())


def test_breadcrumbs_vectors():
    """n = 12, d = 0.5 -> K = 6, gamma = 0.1 -> int(1.2) = 1 outlier dropped: each expert
    keeps magnitudes 6..11 (12 is the outlier, 1..5 are too small)."""
    pool = _pool(T1, T2, T3)
    opts = {"gamma": 0.1}
    close(_merge(pool, "breadcrumbs", opts, (1, 1, 1), [0.5] * 3), [[6, 1, 7], [12, 0, -7], [0, 0, 11], [21, 4, -6]])
    close(_merge(pool, "breadcrumbs_ties", opts, (1, 1, 1), [0.5] * 3), [[6, 10, 16], [20, 0, -7], [7, 0, 11], [21, 10, -6]])
    # normalize divides by sum c; rescale: L1 78 over the kept 6+..+11 = 51
    close(_merge(pool, "breadcrumbs", {**opts, "normalize": True}, (1, 1, 2), [0.5] * 3),
          ((torch.tensor([[6, 1, 7], [12, 0, -7], [0, 0, 11], [21, 4, -6]]) + torch.tensor([[6, 0, -9], [-8, 0, -7], [0, 0, 11], [10, 0, 0]])) / 4).tolist())
    close(_merge(pool, "breadcrumbs", {**opts, "rescale": True}, (1, 1, 1), [0.5] * 3),
          (torch.tensor([[6, 1, 7], [12, 0, -7], [0, 0, 11], [21, 4, -6]], dtype=torch.float64) * 78 / 51).tolist())


@pytest.mark.parametrize("n,density,gamma,band", [(100, 0.5, 0.1, (10, 60)), (100, 0.9, 0.2, (10, 100)), (100, 0.001, 0.01, (1, 1)),
                                                 (100, 1.0, 0.1, (0, 100)), (35, 0.5, 0.1, (3, 20)), (10, 0.5, 0.01, (0, 5))])
def test_breadcrumbs_band_matches_mergekit_counts(n, density, gamma, band):
    """Kept ranks as mergekit 0.1.5's magnitude_outliers keeps them (probed on 1..n)."""
    from evomerge.merge.methods import breadcrumbs_band

    assert breadcrumbs_band(n, density, gamma) == band


def test_ties_scale_and_weight_invariance():
    pool = _pool(T1, T2, T3)
    base = _merge(pool, "ties", {}, (1, 0.5, 2), [0.5] * 3)
    close(_merge(pool, "ties", {}, (1, 0.5, 2), [0.5] * 3, scale=2.0), (2 * base).tolist())
    close(_merge(pool, "ties", {}, (3, 1.5, 6), [0.5] * 3), base.tolist())


def test_ties_original_vector():
    got = _merge(_pool(T1, T2, T3), "ties", {"variant": "original"}, (1, 1, 1), [0.5] * 3)
    close(got, [[6, 10, 8], [10, 12, -9.5], [7, 12, 11], [10.5, 10, -6]])


@pytest.mark.parametrize("variant,expected", [("mergekit", [-2, -3, 5]), ("original", [-2, -3, -5])])
def test_ties_zero_sign_rule(variant, expected):
    got = _merge(_pool([-3, -2, 5], [-1, -4, -5]), "ties", {"variant": variant}, (1, 1), (1, 1))
    close(got, expected)


def test_ties_density_float_edge_exact_mode():
    x = torch.arange(1, 101, dtype=torch.float32)
    pool = StatePool({"w": torch.zeros(100)}, {"a": {"w": x}})
    got = _merge(pool, "ties", {"density_grid": None, "normalize": False}, (1,), (0.29,))
    assert int((got != 0).sum()) == 28 == int(0.29 * 100)


def test_ties_ties_in_magnitude_take_lowest_index_first():
    # 10 equal magnitudes, keep 3: the first three in flat order (stable argsort rule)
    x = torch.tensor([1.0] * 10 + [5.0, -7.0])
    mask = K.topk_mask(x, 5 / 12)
    assert mask.tolist() == [True, True, True] + [False] * 7 + [True, True]


# --------------------------------------------------------------------------- DARE 7.4
U1 = [[0.10, 0.60, 0.35], [0.80, 0.45, 0.05], [0.55, 0.20, 0.95], [0.30, 0.70, 0.15]]
U2 = [[0.05, 0.40, 0.85], [0.20, 0.65, 0.10], [0.90, 0.30, 0.45], [0.15, 0.75, 0.35]]
U3 = [[0.65, 0.10, 0.30], [0.95, 0.55, 0.40], [0.20, 0.85, 0.70], [0.60, 0.05, 0.90]]


@pytest.fixture
def fixed_uniform(monkeypatch):
    from evomerge.merge import fused

    keys = [K.tensor_key(0, f"e{i}", "w") for i in range(3)]
    fields = {(k & 0xFFFFFFFF, k >> 32): torch.tensor(u).reshape(-1) for k, u in zip(keys, (U1, U2, U3))}

    def fake(idx, key_lo, key_hi):
        return fields[(int(key_lo), int(key_hi))][idx]

    monkeypatch.setattr(fused, "hash_uniform", fake)


@pytest.mark.parametrize(
    "method,options,expected",
    [
        ("dare_linear", {}, [[11, -5, -6.5], [18, 28, -31.5], [2.5, 24, 27.5], [39, -7.5, -12]]),
        ("dare_ties", {}, [[21, -5, -22.5], [18, 30, -41.5], [2.5, 24, 27.5], [47, -7.5, -12]]),
        ("dare_ties", {"normalize": True}, [[7, -2.5, -11.25], [36, 15, -16.6], [1.25, 24, 13.75], [18.8, -3.75, -12]]),
        (
            "dare_linear",
            {"rescale": "l1"},
            [
                [16.073992, -5.114754, -7.016393],
                [9.486486, 28.688525, -20.550288],
                [2.557377, 24, 28.131148],
                [29.168365, -7.672131, -12],
            ],
        ),
    ],
)
def test_dare_vectors(fixed_uniform, method, options, expected):
    got = _merge(_pool(T1, T2, T3), method, options, (1, 0.5, 2), (0.5, 0.25, 0.8))
    close(got, expected, atol=1e-5)


def test_dare_masks_nest_and_repeat():
    x = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
    pool = StatePool({"w": torch.zeros_like(x)}, {"a": {"w": x}})
    cache = prepare(pool, "dare_linear", {"rescale": "none"})
    kept = [build(cache, Genome.from_values([1.0], [d]))["w"] != 0 for d in (0.1, 0.3, 0.5, 0.9)]
    for small, big in zip(kept, kept[1:]):
        assert bool((small <= big).all()) and int(small.sum()) < int(big.sum())
    again = build(cache, Genome.from_values([1.0], [0.3]))["w"] != 0
    assert torch.equal(again, kept[1])
    assert abs(float(kept[2].float().mean()) - 0.5) < 0.05
    assert torch.equal(build(cache, Genome.from_values([1.0], [1.0]))["w"], x)
    assert float(build(cache, Genome.from_values([1.0], [0.0]))["w"].abs().sum()) == 0.0


def test_dare_hash_matches_the_unsigned_32bit_formula():
    """The int32-lane hash is bit-identical to the unsigned one it replaced."""
    mask = 0xFFFFFFFF

    def mix(x: int) -> int:
        x ^= x >> 16
        x = (x * 0x7FEB352D) & mask
        x ^= x >> 15
        x = (x * 0x5BD1E995) & mask
        return x ^ (x >> 16)

    key = (1 << 63) - 12345  # both key halves have the top bit set
    u = K.keyed_uniform(key, torch.empty(1000))
    want = [(mix(((i + (key >> 32)) ^ (key & mask)) & mask) >> 8) / 2**24 for i in range(1000)]
    assert u.tolist() == want


def test_packed_levels_round_trip_for_every_expert_and_bit_pattern():
    """Two 16-bit levels per int32 word, read back bit-exactly, also through the float32
    view the fused kernels receive (some words are NaN patterns as floats)."""
    levels = [torch.tensor([0, 1, 0x7FFF, 0x8000, 0xFFFF, 12345]), torch.tensor([0xFFFF, 0x8000, 0, 1, 0xFF80, 7]),
              torch.tensor([0x7F80, 0xFFC0, 3, 0xFFFF, 0, 0x8001])]
    words = K.level_words(3, 6)
    for k, v in enumerate(levels):
        K.pack_level(words, k, v)
    assert words.shape == (2, 6)
    for k, v in enumerate(levels):
        assert F.unpack_level(words, k).tolist() == v.tolist()
        assert F.unpack_level(words.view(torch.float32).clone(), k).tolist() == v.tolist()


@pytest.mark.parametrize("capability,dtype", [("AVX512", torch.int32), ("AVX2", torch.float32), ("DEFAULT", torch.float32)])
def test_level_words_go_to_the_kernels_in_the_form_this_cpu_loads_fastest(monkeypatch, capability, dtype):
    """AVX-512 code loads int32 vectors directly; AVX2 code loads them through a scalar
    copy, so there the kernels get a float32 view of the same bits (benchmarks/RESULTS.md)."""
    monkeypatch.setattr(F, "_cpu_capability", lambda: capability)
    words = K.level_words(3, 6)
    K.pack_level(words, 1, torch.arange(6))
    arg = F.level_words_arg(words)
    assert arg.dtype == dtype and arg.data_ptr() == words.data_ptr()
    assert F.unpack_level(arg, 1).tolist() == list(range(6))


def test_keep_flag_multiplies_like_the_select_it_replaces():
    """The kernels multiply by a 0/1 float flag instead of ``where(level < g, x, 0)``
    (faster in inductor's CPU code, benchmarks/RESULTS.md); for finite values they agree,
    at the cut levels 0, 1, 65535 and 65536 too, with either word form."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 9, generator=g)
    v = [torch.tensor([0, 1, 2, 65534, 65535, 0, 7, 65535, 1]), torch.tensor([65535, 0, 1, 2, 3, 65534, 9, 8, 0])]
    words = K.level_words(2, 9)
    for k in range(2):
        K.pack_level(words, k, v[k])
    for form in (words, words.view(torch.float32)):
        for k in range(2):
            for cut in (0, 1, 2, 65535, 65536):
                flag = F.keep_flag(form, k, torch.tensor(cut, dtype=torch.int32))
                assert flag.dtype == torch.float32 and set(flag.tolist()) <= {0.0, 1.0}
                assert torch.equal(x[k] * flag, torch.where(v[k] < cut, x[k], 0.0))


def test_dare_quantiles_give_the_full_field_mask_at_the_snapped_density():
    u = torch.tensor([0.0, 0.5 - 2**-24, 0.5, 0.8, 1 - 2**-24])
    q = K.dare_quantiles(u)
    assert q.tolist() == [0, 32767, 32768, 52428, 65535]
    assert [K.dare_level(d) for d in (-0.1, 0.0, 0.5, 0.8, 1.0, 2.0)] == [0, 0, 32768, 52429, 65536, 65536]
    field = K.keyed_uniform(K.tensor_key(0, "a", "w"), torch.empty(5000))
    q = K.dare_quantiles(field)
    for d in (0.0, 1e-6, 0.3, 0.8, 0.99999, 1.0):
        g = K.dare_level(d)
        assert torch.equal(q < g, field < g / K.DARE_GRID)


# --------------------------------------------------------------------------- TSVM 7.5 / 7.6
C60, S60 = math.cos(math.pi / 3), math.sin(math.pi / 3)
TS1 = [[3, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]]
TS2 = [[0, 2 * C60, 0], [0, 2 * S60, 0], [0, 0, 0], [0, 0, 0]]


@pytest.mark.parametrize("storage", ["dense", "factored"])
@pytest.mark.parametrize(
    "weights,expected",
    [
        ((1, 1), [[2.8977775, 0.5176381, 0], [-0.7764571, 1.9318517, 0], [0, 0, 0], [0, 0, 0]]),
        ((1, 0.5), [[2.8977775, 0.2588190, 0], [-0.7764571, 0.9659258, 0], [0, 0, 0], [0, 0, 0]]),
    ],
)
def test_tsvm_vector(storage, weights, expected):
    got = _merge(_pool(TS1, TS2), "tsvm", {"storage": storage}, weights)
    close(got, expected)
    sv = torch.linalg.svdvals(got.double())
    assert sorted(sv.tolist())[-2:] == pytest.approx(sorted([3.0, 2.0 * weights[1]]), abs=1e-5)


def test_tsvm_single_task_is_task_arithmetic():
    torch.manual_seed(0)
    tau = torch.randn(7, 5)
    bias = torch.randn(5)
    pool = StatePool({"w": torch.zeros(7, 5), "b": torch.zeros(5)}, {"a": {"w": tau, "b": bias}})
    out = build(prepare(pool, "tsvm"), Genome.from_values([0.7], scale=1.3))
    torch.testing.assert_close(out["w"], 0.91 * tau, atol=1e-5, rtol=0)
    torch.testing.assert_close(out["b"], 0.91 * bias, atol=1e-6, rtol=0)


def _E(i, j, shape=(6, 4)):
    e = torch.zeros(shape)
    e[i, j] = 1
    return e


def test_tsvm_orthogonal_tasks_sum_and_null_directions():
    t1 = 2 * _E(0, 0) + _E(1, 1)
    t2 = 3 * _E(2, 2) + 0.5 * _E(3, 3)
    got = _merge(_pool(t1.tolist(), t2.tolist()), "tsvm", {}, (1, 1))
    torch.testing.assert_close(got, t1 + t2, atol=1e-5, rtol=0)
    t2p = 3 * _E(2, 2)
    got = _merge(_pool(t1.tolist(), t2p.tolist()), "tsvm", {"drop_null_directions": True}, (1, 1))
    torch.testing.assert_close(got, t1 + t2p, atol=1e-5, rtol=0)


def test_tsvm_permutation_and_transpose_equivariance():
    torch.manual_seed(1)
    a, b, c = (torch.randn(8, 6) for _ in range(3))
    m1 = _merge(_pool(a.tolist(), b.tolist(), c.tolist()), "tsvm", {}, (0.7, -1.3, 2.1))
    m2 = _merge(_pool(c.tolist(), a.tolist(), b.tolist()), "tsvm", {}, (2.1, 0.7, -1.3))
    mt = _merge(_pool(a.t().tolist(), b.t().tolist(), c.t().tolist()), "tsvm", {}, (0.7, -1.3, 2.1))
    torch.testing.assert_close(m1, m2, atol=1e-5, rtol=0)
    torch.testing.assert_close(m1, mt.t(), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- R-TSVM 7.7
R1 = [[0] * 11 + [6], [1, -1] * 6]
R2 = [[0] * 11 + [2], [1] * 5 + [7] + [1] * 6]
RTSVM_EXPECTED = [
    [-0.072456, 0.148188, -0.072456, 0.148188, -0.072456, 0.375385, -0.072456, 0.148188, -0.072456, 0.148188, -0.072456, 2.954872],
    [0.544712, 0.490312, 0.544712, 0.490312, 0.544712, 3.595386, 0.544712, 0.490312, 0.544712, 0.490312, 0.544712, -0.164093],
]
TSVM_EXPECTED = [
    [-0.156282, 0.297284, -0.156282, 0.297284, -0.156282, 0.720290, -0.156282, 0.297284, -0.156282, 0.297284, -0.156282, 6.066328],
    [1.063502, 0.954318, 1.063502, 0.954318, 1.063502, 7.007777, 1.063502, 0.954318, 1.063502, 0.954318, 1.063502, -0.361234],
]


@pytest.mark.parametrize("storage", ["dense", "factored"])
def test_rtsvm_vector(storage):
    pool = _pool(R1, R2)
    close(_merge(pool, "r_tsvm", {"storage": storage}, (1, 1)), RTSVM_EXPECTED, atol=5e-6)
    close(_merge(pool, "tsvm", {"storage": storage}, (1, 1)), TSVM_EXPECTED, atol=5e-6)


@pytest.mark.parametrize(
    "settings,expected",
    [
        ({}, (0.4868330, 0.5131670)),
        ({"norm": "l1"}, (0.4285714, 0.5714286)),
        ({"keep": "raw"}, (0.4518030, 0.5481970)),
        ({"keep": "raw", "norm": "l1"}, (0.4, 0.6)),
        ({"weight_mode": "inverse"}, (0.5131670, 0.4868330)),
        ({"weight_norm": "mean"}, (2 * 0.4868330, 2 * 0.5131670)),
    ],
)
def test_rtsvm_weights(settings, expected):
    taus = [torch.tensor(R1, dtype=torch.float32), torch.tensor(R2, dtype=torch.float32)]
    w = K.outlier_weights(taus, K.RtsvmSettings(**settings))
    assert w.tolist() == pytest.approx(list(expected), abs=1e-6)


@pytest.mark.parametrize("s,k0,expected", [(0, 1365, 1228), (0.5, 1365, 1296), (0.9, 1365, 1351), (1, 1365, 1365), (0, 341, 306), (0.5, 341, 323), (0.9, 341, 337), (1, 341, 341)])
def test_rtsvm_rank_formula(s, k0, expected):
    tau = torch.ones(k0, 2000)
    tau.view(-1)[: int(round(s * tau.numel()))] = 0
    assert K.sparsity_rank([tau], K.RtsvmSettings()) == expected


def test_rtsvm_invariants():
    torch.manual_seed(2)
    a, b = torch.randn(6, 24), torch.randn(6, 24)
    a[0, 0] = 40.0  # a 3-sigma outlier (rows need >= 11 entries) so w differs from 1/T
    pool = _pool(a.tolist(), b.tolist())
    taus = [a, b]
    w = K.outlier_weights(taus, K.RtsvmSettings())
    assert float(w.sum()) == pytest.approx(1.0) and abs(float(w[0] - w[1])) > 0.01
    r0 = _merge(pool, "r_tsvm", {"beta": 0.0}, (0.7, 1.4))
    ts = _merge(pool, "tsvm", {}, (0.7 * float(w[0]), 1.4 * float(w[1])))
    torch.testing.assert_close(r0, ts, atol=1e-5, rtol=0)
    single = _pool(a.tolist())
    torch.testing.assert_close(_merge(single, "r_tsvm", {"beta": 0.0}, (1.0,)), a, atol=1e-4, rtol=0)
    # sparse layers: k_l = k0, so both orders agree
    sparse = [torch.zeros(6, 24), torch.zeros(6, 24)]
    sparse[0][:3, :3], sparse[1][3:6, 3:6] = torch.randn(3, 3), torch.randn(3, 3)
    sp = _pool(sparse[0].tolist(), sparse[1].tolist())
    o1 = _merge(sp, "r_tsvm", {"order": "orth_then_trunc", "zero_tol": 10.0}, (1, 1))
    o2 = _merge(sp, "r_tsvm", {"order": "trunc_then_orth", "zero_tol": 10.0}, (1, 1))
    torch.testing.assert_close(o1, o2, atol=1e-5, rtol=0)
    # linear in c
    l1 = _merge(pool, "r_tsvm", {}, (0.7, -1.3))
    l2 = _merge(pool, "r_tsvm", {}, (1.4, -2.6))
    torch.testing.assert_close(2 * l1, l2, atol=1e-5, rtol=0)


def test_rtsvm_weight_1d_treats_vectors_as_one_row():
    a = torch.tensor([0.0] * 11 + [6.0])  # spike: outlier mass 5.5 (centred)
    b = torch.tensor([1.0, -1.0] * 6)  # no outlier
    pool = StatePool({"v": torch.zeros(12)}, {"a": {"v": a}, "b": {"v": b}})
    plain = build(prepare(pool, "r_tsvm"), Genome.from_values([1.0, 1.0]))["v"]
    torch.testing.assert_close(plain, (a + b) / 2)
    weighted = build(prepare(pool, "r_tsvm", {"weight_1d": True}), Genome.from_values([1.0, 1.0]))["v"]
    torch.testing.assert_close(weighted, a)  # all the weight goes to the model with outliers


def test_reference_agrees_on_vectors():
    pool = _pool(T1, T2, T3)
    g = Genome.from_values([1, 0.5, 2], [0.5, 0.5, 0.5])
    close(merge_uncached(pool, "ties", {}, g)["w"], [[0, -9, -9], [-8, 12, -8], [-7, 12, 11], [10.2, 10, 0]])


def test_dare_l1_rescale_preserves_l1_on_large_tensors():
    """fp32 vector_norm(ord=1) was ~1-4% low on multi-million-entry tensors; sums are fp64 now."""
    g = torch.Generator().manual_seed(0)
    tau = torch.randn(4000, 1024, generator=g) * 2e-4
    pool = StatePool({"w": torch.zeros_like(tau)}, {"a": {"w": tau}})
    out = build(prepare(pool, "dare_linear", {"rescale": "l1"}), Genome.from_values([1.0], [0.66]))["w"]
    before, after = tau.abs().sum(dtype=torch.float64), out.abs().sum(dtype=torch.float64)
    assert float(after / before) == pytest.approx(1.0, abs=1e-5)


# --------------------------------------------------------------------------- mergekit's other methods
S2 = math.sqrt(2.0)


def test_model_stock_vectors():
    # cos(tau1, tau2) = 1/sqrt(2): t = 2c / (1 + c) = 2 (sqrt(2) - 1); merge = t * mean(tau)
    t = 2 * (S2 - 1)
    close(_merge(_pool([2, 0], [1, 1]), "model_stock", {}, (0.5, 0.5)), [1.5 * t, 0.5 * t])
    close(_merge(_pool([1, 1], [-1, 1]), "model_stock", {}, (0.5, 0.5)), [0, 0])  # orthogonal: the base
    # filter_wise: row 0 as above, row 1 orthogonal -> 0
    got = _merge(_pool([[2, 0], [1, 1]], [[1, 1], [-1, 1]]), "model_stock", {"filter_wise": True}, (0.5, 0.5))
    close(got, [[1.5 * t, 0.5 * t], [0, 0]])


@pytest.mark.parametrize("weights,t", [((1, 1), 0.5), ((1, 3), 0.75), ((-0.5, 0.5), 0.5)])
def test_nuslerp_vectors(weights, t):
    # orthogonal unit task vectors: theta = pi/2, slerp = sin((1-t) pi/2) tau0 + sin(t pi/2) tau1
    got = _merge(_pool([1, 0], [0, 1]), "nuslerp", {}, weights)
    close(got, [math.sin((1 - t) * math.pi / 2), math.sin(t * math.pi / 2)])


def test_nuslerp_row_and_column_wise():
    tau0, tau1 = [[1, 0], [0, 2]], [[0, 1], [0, 2]]
    # rows: row 0 orthogonal (slerp at t = 0.5), row 1 colinear (lerp)
    h = math.sin(math.pi / 4)
    close(_merge(_pool(tau0, tau1), "nuslerp", {"flatten": False}, (1, 1)), [[h, h], [0, 2]])
    # columns: column 0 = (1, 0) vs (0, 0): zero vector, angle pi/2; column 1 = (0, 2) vs (1, 2)
    c1 = torch.tensor([0.0, 2.0]), torch.tensor([1.0, 2.0])
    th = math.acos(float(c1[0] @ c1[1]) / (2 * math.sqrt(5)))
    col1 = (math.sin(th / 2) * (c1[0] + c1[1]) / math.sin(th)).tolist()
    got = _merge(_pool(tau0, tau1), "nuslerp", {"flatten": False, "row_wise": True}, (1, 1))
    close(got, [[h * 1, col1[0]], [0, col1[1]]])


def test_multislerp_vector():
    # unit vectors (1,0), (0,1), equal weights: the normalised mean (1,1)/sqrt(2), times the mean norm 3
    got = _merge(_pool([2, 0], [0, 4]), "multislerp", {}, (0.5, 0.5))
    close(got, [3 / S2, 3 / S2])
    got = _merge(_pool([2, 0], [0, 4]), "multislerp", {}, (1, 1))  # normalize_weights: the same
    close(got, [3 / S2, 3 / S2])


def test_karcher_vector():
    # inputs base = 0 (norm 0: no direction), (2,0), (0,4) with weights 1/3: the direction is the
    # spherical midpoint (1,1)/sqrt(2), the scale (0 + 2 + 4) / 3 = 2
    close(_merge(_pool([2, 0], [0, 4]), "karcher", {}, (0.5, 0.5)), [S2, S2])
    # the mean of equal-norm inputs at 0 and 90 degrees and the base direction
    pool = StatePool({"w": torch.tensor([1.0, 0.0])}, {"a": {"w": torch.tensor([0.0, 1.0])}})
    close(build(prepare(pool, "karcher"), Genome.from_values([1.0]))["w"], [1 / S2, 1 / S2])


@pytest.mark.parametrize("topk,expected", [(1.0, [39 / 19, 2, -2]), (0.5, [0, 2, 0])])
def test_sce_vectors(topk, expected):
    # tau1 = (3, -1, 0), tau2 = (1, 2, -2): elected signs (+, +, -); weights mean squares 10/3 : 3;
    # select_topk 0.5 keeps the int(3 * 0.5) = 1 highest-variance entry (index 1)
    close(_merge(_pool([3, -1, 0], [1, 2, -2]), "sce", {"select_topk": topk}, (1, 1)), expected)


def test_della_rank_fraction_and_keep_probabilities():
    close(K.della_rank_fraction(torch.tensor([[3.0, -1.0, 2.0], [0.5, 0.1, -4.0]])), [1, 0, 0.5, 0.5, 0, 1])
    close(K.della_rank_fraction(torch.tensor([7.0])), [0.5])
    g = torch.Generator().manual_seed(0)
    tau = torch.randn(64, 4096, generator=g)
    pool = StatePool({"w": torch.zeros_like(tau)}, {"e": {"w": tau}})
    cache = prepare(pool, "della_linear", {"epsilon": 0.2, "rescale": False})
    out = build(cache, Genome.from_values([1.0], [0.5]))["w"]
    kept = out != 0
    r = K.della_rank_fraction(tau).view_as(tau)
    assert abs(float(kept.float().mean()) - 0.5) < 0.005
    # keep probability d - eps + 2 eps r: 0.5 - 0.2 + 0.4 * r, i.e. about 0.32 / 0.68 in the bottom / top tenth
    assert abs(float(kept[r < 0.1].float().mean()) - 0.32) < 0.01
    assert abs(float(kept[r > 0.9].float().mean()) - 0.68) < 0.01
    torch.testing.assert_close(out[kept], tau[kept])
    # rescale: the pruned delta keeps its L1 norm; density 1 keeps everything
    resc = build(prepare(pool, "della_linear", {"epsilon": 0.2}), Genome.from_values([1.0], [0.5]))["w"]
    assert float(resc.abs().sum()) == pytest.approx(float(tau.abs().sum()), rel=1e-5)
    torch.testing.assert_close(build(cache, Genome.from_values([1.0], [1.0]))["w"], tau)


def test_della_masks_repeat_and_nest():
    g = torch.Generator().manual_seed(1)
    tau = torch.randn(8, 256, generator=g)
    pool = StatePool({"w": torch.zeros_like(tau)}, {"e": {"w": tau}})
    cache = prepare(pool, "della", {"rescale": False, "epsilon": 0.1})
    lo = build(cache, Genome.from_values([1.0], [0.3]))["w"] != 0
    hi = build(cache, Genome.from_values([1.0], [0.6]))["w"] != 0
    again = build(prepare(pool, "della", {"rescale": False, "epsilon": 0.1}), Genome.from_values([1.0], [0.3]))["w"] != 0
    assert torch.equal(lo, again) and bool((hi | ~lo).all())  # same mask on every prepare; lower density nests


def test_breadcrumbs_float32_steps_match_nextafter():
    """The band's thresholds are the float32 neighbours of the cut magnitudes, computed on
    the host without torch calls: they must equal ``torch.nextafter`` everywhere,
    including zero, subnormals, the largest float and infinity."""
    import math
    import random

    from evomerge.merge.methods import _f32_step

    rng = random.Random(0)
    vals = [0.0, 1e-45, 1.2e-38, 3.4028234663852886e38, math.inf, 1.0, 0.5]
    vals += [float(torch.tensor(rng.random() * 10 ** rng.randint(-44, 37), dtype=torch.float32)) for _ in range(2000)]
    for v in vals:
        for up in (True, False):
            want = torch.nextafter(torch.tensor(v, dtype=torch.float32), torch.tensor(math.inf if up else -math.inf))
            assert _f32_step(v, up) == want.item(), (v, up)
