"""DELLA (docs/spec.md §8d): magnitude ranks within a row, the ranked random drop.

1. the rank stage: ranks by ascending |τ| with ties by index, rows of 1-D, 2-D and N-D
   tensors, the keep thresholds T = ⌊p·2^32⌋ by hand, the density edges;
2. statistics: the kept fraction matches density (within 5 σ), and the keep rate rises
   with the rank as p does;
3. merges bit-identical across reference / C / Triton (outputs and counters), equal to
   the spec written out, with rescale on / off, both elections, slack (§4a);
4. chunkings, C thread counts, Triton block sizes;
5. fastmerge.merge() whole / streamed / resumed on the torch and C backends, YAML.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import fastmerge
from fastmerge import della, methods, params, philox
from fastmerge import reference as R
from fastmerge.backends import c_backend as C
from fastmerge.kernel_api import (COUNTERS, DROPPED_BY_SIGN, IMPORTANT_DROPPED, KEPT,
                                  PROTECTED, SELECTED, TIES_IMPORTANT_DROPPED)
from fastmerge.params import make_params
from tests.checks import state_dict_of, chunked, assert_same_over_threads, merged_three_ways, assert_same, interrupt_at_shard, make_inputs, run
from tests.test_exactness import _triton_module, triton_merge

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
DTYPES = [F16, BF16, F32]
NAME = {F16: "fp16", BF16: "bf16", F32: "fp32"}
DELLA = ("della", "della_linear")
KEY = 0x243F6A8885A308D3
TWO32 = 1 << 32
INF = math.inf
TRITON = pytest.mark.interpreter
WEIGHTS = {1: (-0.75,), 2: (0.6, -0.45), 3: (1.0, -0.3, 0.35)}
DENSITY = {1: (0.3,), 2: (0.45, 1.0), 3: (0.7, 0.0, 0.35)}
EPSILON = {1: (0.2,), 2: (0.1, 0.15), 3: (0.25, 0.1, 0.0)}
SLACK = {1: (0.05,), 2: (0.1, 0.2), 3: (0.3, 0.0, 0.1)}
SHAPES = [(37, 53), (2011,), (5, 7, 9)]         # matrix rows, one row, rows along dim 1


def ids(name):
    return lambda v: f"{name}={NAME.get(v, v)}"


def brute_ranks(keys_row):
    """ρ(g) of the definition: #{h: key(h) < key(g) or (key(h) = key(g) and h < g)}."""
    k = keys_row.tolist()
    return [sum(1 for h in range(len(k)) if k[h] < k[g] or (k[h] == k[g] and h < g))
            for g in range(len(k))]


# ---------------------------------------------------------------------------------------
# 1. the rank stage

def test_ranks_by_definition_with_ties():
    g = torch.Generator().manual_seed(1)
    for shape in [(6, 9), (40,), (3, 5, 4)]:
        numel = math.prod(shape)
        keys = torch.randint(0, 4, (2, numel), generator=g)   # heavy ties
        rk = della.ranks(keys, shape)
        for i in range(2):
            t = keys[i].view(shape)
            r = rk[i].view(shape)
            if len(shape) == 1:
                rows = [(t, r)]
            elif len(shape) == 2:
                rows = [(t[a], r[a]) for a in range(shape[0])]
            else:                                      # rows run along dim 1
                rows = [(t[a, :, c], r[a, :, c]) for a in range(shape[0])
                        for c in range(shape[2])]
            for kr, rr in rows:
                assert rr.tolist() == brute_ranks(kr), shape


def test_keep_thresholds_by_hand():
    # one row of 5: ranks 0..4 by |τ|, p = 0.5 − 0.2 + q·0.4 = 0.3, 0.4, 0.5, 0.6, 0.7
    tau = torch.tensor([[3.0, -1.0, 5.0, 2.0, -4.0]])
    base = torch.zeros(5)
    T = della.keep_thresholds(base, tau, (5,), (0.5,), (0.2,))
    p = {0: 0.3, 1: 0.4, 2: 0.5, 3: 0.6, 4: 0.7}
    rank = [2, 0, 4, 1, 3]
    want = []
    for r in rank:
        q = r / 4
        want.append(math.floor(((0.5 - 0.2) + q * (2 * 0.2)) * TWO32))
        assert abs(want[-1] / TWO32 - p[r]) < 1e-9
    assert T[0].tolist() == want
    # a row of one entry keeps with probability d; d = 1 all, d = 0 none, whatever ε
    assert della.keep_thresholds(torch.zeros(3), torch.ones(1, 3), (3, 1), (0.5,),
                                 (0.2,)).tolist() == [[TWO32 // 2] * 3]
    T = della.keep_thresholds(base, torch.cat([tau, tau]), (5,), (1.0, 0.0), (0.3, 0.3))
    assert T[0].tolist() == [TWO32] * 5 and T[1].tolist() == [0] * 5
    # ε = 0: DARE's threshold everywhere
    assert della.keep_thresholds(base, tau, (5,), (0.3,), (0.0,)).tolist() == \
        [[philox.drop_threshold(0.3)] * 5]


def test_knob_rule_and_method_rows():
    assert params.della_refusal(0.5, 0.49) is None and params.della_refusal(1.0, 0.9) is None
    assert params.della_refusal(0.0, 0.5) is None
    assert "density ± epsilon" in params.della_refusal(0.1, 0.15)
    assert "density ± epsilon" in params.della_refusal(0.9, 0.1)
    for name, elect in (("della", True), ("della_linear", False)):
        m = methods.METHODS[name]
        assert m.ranked and m.drop and m.rescale_default and m.elect == elect
        assert m.normalize_default is elect and ("slack" in m.knobs) is elect
        assert "epsilon" in m.knobs and methods.ALIASES[name] == name
        with pytest.raises(ValueError, match="needs keep and key"):
            m.kernel_config((1.0,), 1.0, False, "sum", key=1)
    from fastmerge.backends import torch_backend, triton_backend
    for be in (torch_backend, triton_backend):
        assert be.CAPABILITIES.ranks is False          # the pipeline ranks, in torch
    assert C.CAPABILITIES.ranks is True                # the C fused pass ranks (§8d)
    with pytest.raises(ValueError, match="needs keep and key"):
        m.kernel_config((1.0,), 1.0, False, "sum", key=1, keep=torch.zeros(1, 3),
                        rank_keep=torch.zeros(1, 3))
    with pytest.raises(fastmerge.ParameterError, match="model 0: epsilon 0.15 with density 0.1"):
        make_params("della", 1, density=0.1)
    with pytest.raises(fastmerge.ParameterError, match="epsilon is only used by the DELLA"):
        make_params("dare_ties", 1, epsilon=0.1)
    with pytest.raises(fastmerge.ParameterError, match="slack is only used by the methods"):
        make_params("della_linear", 1, slack=0.1)
    p = make_params("della", 2, density=0.4, epsilon=[0.1, 0.2])
    assert p.epsilon == (0.1, 0.2) and p.normalize is True and p.rescale_used is True
    assert p.as_dict()["epsilon"] == [0.1, 0.2]


# ---------------------------------------------------------------------------------------
# 2. statistics

@pytest.mark.parametrize("density,epsilon", [(0.3, 0.2), (0.5, 0.45), (0.9, 0.05)])
def test_kept_fraction_matches_density(density, epsilon):
    """Over 128 rows of 2048 the kept fraction is d within 5 σ (σ² = Σ p(1 − p) / N²),
    and in each rank decile the keep rate is that decile's mean p within 5 σ."""
    rows, M = 128, 2048
    g = torch.Generator().manual_seed(3)
    models = torch.randn(1, rows * M, generator=g)
    base = torch.zeros(rows * M)
    T = della.keep_thresholds(base, models, (rows, M), (density,), (epsilon,))
    kept = philox.random_words(KEY, 0, 0, rows * M) < T[0]
    p = T[0].double() / TWO32
    N = rows * M
    sigma = math.sqrt(float((p * (1 - p)).sum())) / N
    assert abs(float(kept.double().mean()) - density) < 5 * sigma
    assert abs(float(p.mean()) - density) < 1e-6
    rk = della.ranks(models.abs().view(torch.int32), (rows, M))[0]
    for dec in range(10):
        sel = (rk * 10 // M) == dec
        pm = p[sel]
        s = math.sqrt(float((pm * (1 - pm)).sum())) / int(sel.sum())
        assert abs(float(kept[sel].double().mean()) - float(pm.mean())) < 5 * s
    lo, hi = p[rk == 0], p[rk == M - 1]
    assert torch.allclose(lo, torch.full_like(lo, density - epsilon), atol=1e-9)
    assert torch.allclose(hi, torch.full_like(hi, density + epsilon), atol=1e-9)


# ---------------------------------------------------------------------------------------
# 3. merges

def cfg_for(method, base, models, n, shape, *, rescale=None, normalize=None, elect="sum",
            offset=0, slack=False, density=None):
    m = methods.METHODS[method]
    density = density or DENSITY[n]
    keep = della.keep_thresholds(base, models, shape, density, EPSILON[n])
    u = None
    if slack and m.protects:
        a = R.task_vectors(base, models).abs()
        u = [R.thresholds_by_sort(a[i], 1.0, min(s, d) if d > 0 else 0.0)[1]
             for i, (s, d) in enumerate(zip(SLACK[n], density))]
    return m.kernel_config(WEIGHTS[n], 0.8, m.normalize_default if normalize is None
                           else normalize, elect, None, u, keep=keep, key=KEY,
                           rescale=rescale, offset=offset)


def derive(base, models, cfg, out_dtype):
    """θ of §8d (with §4a) written out from the spec: (out, kept, prot, sel, sel_t)."""
    x32 = models.float() - base.float()
    x = x32.double()
    n, N = x.shape
    T = cfg.keep
    prot = (torch.stack([x32[i].abs() >= u for i, u in enumerate(cfg.u)]) if cfg.u
            else torch.zeros(n, N, dtype=torch.bool))
    kept = torch.stack([philox.random_words(cfg.key, i, cfg.offset, N) < T[i]
                        for i in range(n)]) | prot
    w = torch.tensor(cfg.weights, dtype=torch.float64).unsqueeze(1)
    if cfg.rescale:
        c = torch.where(T != 0, w * TWO32 / torch.where(T != 0, T.double(), 1.0), 0.0)
    else:
        c = w.expand(n, N)
    c = torch.where(prot, w, c)
    sgn = torch.sign(w) * torch.sign(x)
    if cfg.elect == "none":
        sel = sel_t = kept
        W = torch.zeros(N, dtype=torch.float64)
        for i in range(n):
            W = W + cfg.weights[i]
    else:
        vote = sgn if cfg.elect == "count" else c * x
        G = torch.zeros(N, dtype=torch.float64)
        GP = torch.zeros(N, dtype=torch.float64)
        for i in range(n):
            G = G + torch.where(kept[i], vote[i], 0.0)
            GP = GP + torch.where(prot[i], vote[i], 0.0)
        g_t = torch.where(G >= 0, 1.0, -1.0)
        gamma = torch.where(prot.any(0), torch.where(GP >= 0, 1.0, -1.0), g_t)
        sel, sel_t = kept & (sgn == gamma), kept & (sgn == g_t)
        W = torch.zeros(N, dtype=torch.float64)
        for i in range(n):
            W = W + torch.where(sel[i], w[i], 0.0)
    D = torch.zeros(N, dtype=torch.float64)
    for i in range(n):
        D = D + torch.where(sel[i], c[i] * x[i], 0.0)
    m = torch.where(W != 0, D / torch.where(W != 0, W, 1.0), D) if cfg.normalize else D
    return R.round_once(base.double() + cfg.scale * m, out_dtype), kept, prot, sel, sel_t


MODES = [(None, None, "sum", False), (False, None, "sum", True), (True, True, "count", True),
         (None, False, "sum", True)]


@pytest.mark.parametrize("dtype", DTYPES, ids=ids("dtype"))
@pytest.mark.parametrize("n", [1, 2, 3], ids=ids("n_models"))
@pytest.mark.parametrize("method", DELLA)
def test_c_and_reference_equal_the_definition(method, n, dtype):
    shape = SHAPES[(n + DTYPES.index(dtype)) % 3]
    N = math.prod(shape)
    base, models = make_inputs(n, N, dtype, seed=n, kind="grid" if n == 3 else "normal")
    for rescale, normalize, elect, slack in MODES:
        cfg = cfg_for(method, base, models, n, shape, rescale=rescale, normalize=normalize,
                      elect=elect, offset=5, slack=slack)
        want = run(R.merge, base, models, cfg, dtype)
        assert_same(run(C.merge, base, models, cfg, dtype), want, f"C {method} {shape}")
        out, kept, prot, sel, sel_t = derive(base, models, cfg, dtype)
        assert torch.equal(want[0].view(torch.uint8), out.view(torch.uint8)), "reference vs spec"
        c = want[1]
        assert c[:, KEPT].tolist() == kept.sum(1).tolist()
        assert c[:, SELECTED].tolist() == sel.sum(1).tolist()
        if cfg.elect == "none":
            assert not c[:, DROPPED_BY_SIGN].any() and not c[:, PROTECTED].any()
        else:
            assert c[:, PROTECTED].tolist() == prot.sum(1).tolist()
            assert c[:, IMPORTANT_DROPPED].tolist() == (prot & ~sel).sum(1).tolist()
            assert c[:, TIES_IMPORTANT_DROPPED].tolist() == (prot & ~sel_t).sum(1).tolist()


@TRITON
@pytest.mark.parametrize("n", [1, 2, 3], ids=ids("n_models"))
@pytest.mark.parametrize("method", DELLA)
def test_triton_bit_identical(method, n):
    k = DELLA.index(method)
    dtype = DTYPES[(n + k) % 3]
    shape = SHAPES[n % 3] if n != 1 else (13, 50)
    base, models = make_inputs(n, math.prod(shape), dtype, seed=20 + n)
    rescale, normalize, elect, slack = MODES[(n + 2 * k) % len(MODES)]
    cfg = cfg_for(method, base, models, n, shape, rescale=rescale, normalize=normalize,
                  elect=elect, offset=4099, slack=slack)
    assert_same(run(triton_merge, base, models, cfg, dtype), run(R.merge, base, models, cfg, dtype),
                f"Triton {method}")


def test_epsilon_zero_is_dare():
    """ε = 0: every T is DARE's ⌊d·2^32⌋ and the kept sets are DARE's; the weights differ
    only in the rescale factor (2^32/T vs 1/d), so compare without rescale."""
    base, models = make_inputs(2, 999, F32, seed=4)
    m = methods.METHODS["della"]
    keep = della.keep_thresholds(base, models, (999,), (0.4, 0.7), (0.0, 0.0))
    cfg = m.kernel_config((1.0, 0.5), 1.0, True, "sum", keep=keep, key=KEY, rescale=False)
    dare = methods.METHODS["dare_ties"].kernel_config((1.0, 0.5), 1.0, True, "sum",
                                                      density=(0.4, 0.7), key=KEY,
                                                      rescale=False)
    for merge in (R.merge, C.merge):
        assert_same(run(merge, base, models, cfg, F32), run(R.merge, base, models, dare, F32),
                    "ε = 0")


def high_half_ties(cfg, N):
    """Per model, how many entries have hi = ⌊T / 2^16⌋ with T mod 2^16 ≠ 0 (where r's low
    half decides r < T, docs/spec.md §8a)."""
    T = cfg.keep
    return [int(((philox.random_words(cfg.key, i, cfg.offset, N) >> 16 == T[i] >> 16)
                 & (T[i] & 0xFFFF != 0)).sum()) for i in range(T.shape[0])]


@pytest.mark.parametrize("method", DELLA)
def test_low_half_decides_where_the_high_half_ties(method):
    """Per-entry thresholds T_i(g) = hi_i(g)·2^16 + (a random low half): at every entry the
    high half ties and r's low half decides. C and the reference equal the spec written out
    (outputs, kept counts); about half the entries are kept."""
    n, shape, dtype, offset = 2, (40, 50), BF16, 21
    N = math.prod(shape)
    base, models = make_inputs(n, N, dtype, seed=12)
    cfg = cfg_for(method, base, models, n, shape, offset=offset)
    g = torch.Generator().manual_seed(5)
    hi = torch.stack([philox.random_words(KEY, i, offset, N) >> 16 for i in range(n)])
    low = torch.randint(1, 1 << 16, (n, N), generator=g)
    cfg = dataclasses.replace(cfg, keep=(hi << 16) + low)
    assert high_half_ties(cfg, N) == [N] * n
    want = run(R.merge, base, models, cfg, dtype)
    assert_same(run(C.merge, base, models, cfg, dtype), want, f"C {method}")
    out, kept, *_ = derive(base, models, cfg, dtype)
    assert torch.equal(want[0].view(torch.uint8), out.view(torch.uint8)), "reference vs spec"
    assert want[1][:, KEPT].tolist() == kept.sum(1).tolist()
    assert all(0.4 * N < k < 0.6 * N for k in kept.sum(1).tolist())


def test_fused_rank_stage_meets_high_half_ties():
    """The C pass ranking rows itself (rank_keep) on rows long enough to meet some entries
    whose high half ties (a few per 2^16): the reference's bytes and counters."""
    n, shape, dtype = 2, (64, 4096), F16
    N = math.prod(shape)
    base, models = make_inputs(n, N, dtype, seed=14)
    per_entry, per_rank = rank_cfgs("della", base, models, shape, (0.3, 0.5), (0.2, 0.1),
                                    offset=6)
    assert min(high_half_ties(per_entry, N)) >= 1
    want = run(R.merge, base, models, per_entry, dtype)
    assert_same(run(C.merge, base, models, per_rank, dtype), want, "C fused rank stage")


# ---------------------------------------------------------------------------------------
# 4. chunkings, threads, blocks



@pytest.mark.parametrize("method", DELLA)
def test_chunking_and_threads_c_reference(method):
    n, shape, dtype = 3, (50, 100), BF16
    base, models = make_inputs(n, 5000, dtype, seed=7)
    cfg = cfg_for(method, base, models, n, shape, slack=True)
    whole = run(R.merge, base, models, cfg, dtype)
    for step in (1000, 37):
        assert_same(chunked(R.merge, base, models, cfg, dtype, step), whole, f"ref chunks {step}")
        assert_same(chunked(C.merge, base, models, cfg, dtype, step), whole, f"C chunks {step}")
    big_base, big_models = make_inputs(2, 70_000, F16, seed=8)      # several C work chunks
    cfg2 = cfg_for(method, big_base, big_models, 2, (70, 1000), offset=3)
    want = run(R.merge, big_base, big_models, cfg2, F16)
    assert_same_over_threads(big_base, big_models, cfg2, F16, want)


@TRITON
@pytest.mark.parametrize("method", DELLA)
def test_chunking_and_blocks_triton(method):
    T = _triton_module()
    base, models = make_inputs(2, 300, F16, seed=9)
    cfg = cfg_for(method, base, models, 2, (10, 30), offset=2, slack=True)
    want = run(R.merge, base, models, cfg, F16)
    assert_same(chunked(triton_merge, base, models, cfg, F16, 37), want, "Triton chunks 37")
    for block, programs in ((16, 3), (512, 1)):
        got = run(lambda b, m, o, c: T.merge(b, m, o, c, block=block, programs=programs),
                  base, models, cfg, F16)
        assert_same(got, want, f"Triton block {block}")


# ---------------------------------------------------------------------------------------
# 3a. the rank stage fused into the C pass (KernelConfig.rank_keep)

# (shape, kind, density, epsilon) per case; each runs for n = 1, 2, 3, 5 models (the
# first n knobs) on every dtype: rows on both sides of rank.c's insertion-sort length
# (48), odd lengths, 1-D, M = 1, rows longer than one radix digit's bins, heavy ties
# (grid), all-zero task vectors, |τ| over 40 binades (three radix digits), d = 0 and 1,
# ε = 0
RANK_CASES = {
    "odd-rows": ((37, 53), "normal", (0.45, 1.0, 0.3, 0.6, 0.5), (0.1, 0.15, 0.2, 0.3, 0.0)),
    "short-rows": ((9, 48), "grid", (0.3, 0.5, 0.0, 0.4, 0.7), (0.2, 0.3, 0.1, 0.35, 0.1)),
    "rows-49": ((7, 49), "wide", (0.6, 0.2, 0.5, 1.0, 0.4), (0.3, 0.1, 0.45, 0.1, 0.2)),
    "one-row": ((2011,), "normal", (0.4, 0.7, 0.5, 0.3, 0.55), (0.3, 0.2, 0.0, 0.25, 0.4)),
    "M=1": ((17, 1), "normal", (0.3, 0.8, 0.5, 0.6, 0.2), (0.2, 0.1, 0.3, 0.3, 0.1)),
    "long-rows": ((3, 4500), "wide", (0.5, 0.35, 0.65, 0.2, 0.9), (0.45, 0.3, 0.3, 0.15, 0.05)),
    "zeros": ((6, 300), "zeros", (0.5, 0.25, 0.3, 0.7, 0.4), (0.3, 0.2, 0.25, 0.2, 0.1)),
}


def rank_inputs(kind, n, N, dtype, seed):
    if kind == "zeros":                       # τ = 0 everywhere: one key per row
        base, _ = make_inputs(1, N, dtype, seed=seed)
        return base, base.unsqueeze(0).repeat(n, 1)
    return make_inputs(n, N, dtype, seed=seed, kind=kind)


def rank_cfgs(method, base, models, shape, density, epsilon, **kw):
    """(per-entry cfg: the torch rank stage, per-rank cfg: ranked in the pass)."""
    n = models.shape[0]
    m = methods.METHODS[method]
    args = (WEIGHTS_5[:n], 0.8, kw.pop("normalize", m.normalize_default), kw.pop("elect", "sum"),
            None, kw.pop("u", None))
    keep = della.keep_thresholds(base, models, shape, density[:n], epsilon[:n])
    table = della.rank_table(della.fused_row_length(shape), density[:n], epsilon[:n])
    return (m.kernel_config(*args, keep=keep, key=KEY, **kw),
            m.kernel_config(*args, rank_keep=table, key=KEY, **kw))


WEIGHTS_5 = (0.6, -0.45, 1.0, 0.3, -0.8)


@pytest.mark.parametrize("dtype", DTYPES, ids=ids("dtype"))
@pytest.mark.parametrize("case", RANK_CASES)
def test_c_fused_rank_stage_equals_torch_stage(case, dtype):
    """C with the rank stage in its pass (rank_keep) gives, bit for bit, the outputs and
    counters of the C pass and of the reference fed the torch stage's T (keep), for both
    methods, elections, rescale on / off and slack; and the test can fail: the same table
    reversed (the ranks read backwards) changes the output or the counters wherever T
    varies by rank (no slack, which may protect every entry)."""
    shape, kind, density, epsilon = RANK_CASES[case]
    N = math.prod(shape)
    for n in (1, 2, 3, 5):
        base, models = rank_inputs(kind, n, N, dtype, seed=n + 10 * DTYPES.index(dtype))
        for k, (method, (rescale, normalize, elect, slack)) in enumerate(
                (m, mode) for m in DELLA for mode in MODES):
            u = None
            if slack and method == "della":
                a = R.task_vectors(base, models).abs()
                u = [R.thresholds_by_sort(a[i], 1.0, 0.1 * (1 + i % 2))[1] for i in range(n)]
            per_entry, per_rank = rank_cfgs(method, base, models, shape, density, epsilon,
                                            rescale=rescale, normalize=normalize, elect=elect,
                                            u=u, offset=3 + 4 * k)
            want = run(C.merge, base, models, per_entry, dtype)
            what = f"{case} n={n} {method} {rescale, normalize, elect, slack}"
            assert_same(run(C.merge, base, models, per_rank, dtype), want, f"C fused: {what}")
            assert_same(run(R.merge, base, models, per_entry, dtype), want, f"reference: {what}")
            assert_same(run(R.merge, base, models, per_rank, dtype), want, f"ref table: {what}")
            T = per_entry.keep
            if bool((T != T[:, :1]).any()) and rescale is not False and u is None:
                flipped = dataclasses.replace(per_rank, rank_keep=per_rank.rank_keep.flip(1))
                out, counts = run(C.merge, base, models, flipped, dtype)
                assert not (torch.equal(out, want[0]) and torch.equal(counts, want[1])), what


@TRITON
def test_triton_backend_takes_the_rank_table():
    """The Triton backend (no Capabilities.ranks) given a per-rank table ranks in torch
    first (della.expand): the reference's bytes and counters."""
    from fastmerge.backends import triton_backend
    from tests.test_exactness import triton_device
    shape = (6, 50)
    base, models = make_inputs(2, 300, F16, seed=41)
    _, per_rank = rank_cfgs("della", base, models, shape, DENSITY[2], EPSILON[2],
                            offset=8)
    want = run(R.merge, base, models, per_rank, F16)
    dev = triton_device()
    out = torch.empty(300, dtype=F16, device=dev)
    counts = triton_backend.merge(base.to(dev), models.to(dev), out, per_rank)
    assert_same((out.cpu(), counts.cpu()), want, "Triton backend, rank table")


@pytest.mark.parametrize("method", DELLA)
def test_c_fused_rank_stage_chunks_and_threads(method):
    """Chunks of whole rows (each with its offset) and 1, 2, 3 threads (rows handed out in
    work chunks) give the whole tensor's result."""
    shape, n = (600, 130), 3
    N = math.prod(shape)
    base, models = make_inputs(n, N, BF16, seed=31)
    per_entry, per_rank = rank_cfgs(method, base, models, shape, DENSITY[3], EPSILON[3])
    want = run(C.merge, base, models, per_entry, BF16)
    for rows in (7, 600):
        step = rows * shape[1]
        out = torch.empty(N, dtype=BF16)
        counts = torch.zeros(n, len(COUNTERS), dtype=torch.int64)
        for start in range(0, N, step):
            piece = torch.empty(min(step, N - start), dtype=BF16)
            counts += C.merge(base[start:start + step], models[:, start:start + step].contiguous(),
                              piece, per_rank.at(start))
            out[start:start + step] = piece
        assert_same((out, counts), want, f"chunks of {rows} rows")
    assert_same_over_threads(base, models, per_rank, BF16, want)


def test_pipeline_ranks_in_the_c_pass(monkeypatch):
    """fastmerge.merge on the C backend ranks 1-D and 2-D tensors in the fused pass (the
    torch stage runs only for the N-D tensor), on the torch backend every tensor in torch;
    both give the same bytes and report."""
    from fastmerge import pipeline
    shapes = {"a.w": (40, 70), "a.b": (70,), "a.c": (4, 5, 6)}
    total = sum(math.prod(s) for s in shapes.values())
    base, models = make_inputs(2, total, F16, seed=5)

    def sd(x):
        return state_dict_of(x, shapes)
    ranked = []
    real = della.keep_thresholds

    def spy(b, m, shape, *a):
        ranked.append(tuple(shape))
        return real(b, m, shape, *a)
    monkeypatch.setattr(pipeline.della, "keep_thresholds", spy)
    kw = dict(method="della", density=[0.5, 0.3], epsilon=0.2, slack=[0.1, 0.05], seed=2,
              progress=False)
    got = {}
    for be in ("c", "torch"):
        ranked.clear()
        got[be] = fastmerge.merge(sd(base), [sd(m) for m in models], backend=be, **kw)
        assert sorted(ranked) == ([(4, 5, 6)] if be == "c" else sorted(shapes.values())), be
    assert got["c"].report["tensors"] == got["torch"].report["tensors"]
    for name in shapes:
        assert torch.equal(got["c"].state_dict[name].view(torch.int16),
                           got["torch"].state_dict[name].view(torch.int16)), name


def test_rank_keep_config_checks():
    from fastmerge.kernel_api import KernelConfig
    table = torch.zeros(2, 5, dtype=torch.int64)
    KernelConfig(weights=(1.0, 1.0), rank_keep=table, key=1)
    for kw, msg in [(dict(rank_keep=torch.zeros(3, 5, dtype=torch.int64)), "must be \\[2, M\\]"),
                    (dict(rank_keep=torch.zeros(2, 0, dtype=torch.int64)), "must be \\[2, M\\]"),
                    (dict(rank_keep=table, keep=torch.zeros(2, 5)), "give one"),
                    (dict(rank_keep=table, density=(0.5, 0.5)), "give one"),
                    (dict(rank_keep=table, on_base=False), "need a base")]:
        with pytest.raises(ValueError, match=msg):
            KernelConfig(weights=(1.0, 1.0), key=1, **kw)
    cfg = KernelConfig(weights=(1.0, 1.0), rank_keep=table, key=1)
    with pytest.raises(ValueError, match="do not divide"):
        della.expand(cfg, torch.zeros(7), torch.zeros(2, 7))


def test_c_module_checks():
    ext = C._module()
    base, models = make_inputs(2, 10, F32, seed=0)
    out = torch.empty(10)
    counts = torch.zeros(2, len(COUNTERS), dtype=torch.int64)

    def call(**kw):
        ext.merge(base.numpy(), models.numpy(), out.numpy(), 2, 10, ext.F32, ext.F32, ext.F32,
                  True, ext.ELECT_SUM, False, (1.0, 1.0), None, None, 1.0, counts.numpy(), **kw)
    call(keep=torch.full((2, 10), TWO32, dtype=torch.int64).numpy(), key=1, keep_rescale=True)
    call(rank_keep=torch.full((2, 5), TWO32, dtype=torch.int64).numpy(), rank_len=5, key=1)
    for kw, msg in [(dict(keep=torch.full((2, 10), TWO32 + 1, dtype=torch.int64).numpy()),
                     "keep\\[0\\]"),
                    (dict(keep=torch.zeros(2, 9, dtype=torch.int64).numpy()), "keep"),
                    (dict(keep=torch.zeros(2, 10, dtype=torch.int64).numpy(), drop=(1, 1)),
                     "replace one another"),
                    (dict(keep=torch.zeros(2, 10, dtype=torch.int64).numpy(),
                          rank_keep=torch.zeros(2, 5, dtype=torch.int64).numpy(), rank_len=5),
                     "replace one another"),
                    (dict(rank_keep=torch.zeros(2, 3, dtype=torch.int64).numpy(), rank_len=3),
                     "rows of rank_len"),
                    (dict(rank_keep=torch.zeros(2, 5, dtype=torch.int64).numpy(), rank_len=0),
                     "rows of rank_len"),
                    (dict(rank_keep=torch.zeros(2, 4, dtype=torch.int64).numpy(), rank_len=5),
                     "rank_keep"),
                    (dict(rank_keep=torch.full((2, 5), -1, dtype=torch.int64).numpy(),
                          rank_len=5), "rank_keep\\[0\\]")]:
        with pytest.raises(ValueError, match=msg):
            call(**kw)


# ---------------------------------------------------------------------------------------
# 5. fastmerge.merge(), resume, YAML

def _bits(sd):
    return {k: (v.view(torch.int16) if v.is_floating_point() and v.element_size() == 2 else v)
            for k, v in sd.items()}


@pytest.mark.parametrize("method", DELLA)
def test_merge_api_whole_streamed_and_reference(method, monkeypatch):
    from fastmerge.testing import PRESETS, state_dicts
    base, models = state_dicts(config=PRESETS["tiny"], n_models=2)
    kw = dict(method=method, density=[0.5, 0.3], epsilon=[0.2, 0.1], weights=[1.0, -0.7],
              seed=3, progress=False)
    if method == "della":
        kw["slack"] = [0.05, 0.1]
    got = merged_three_ways(monkeypatch, base, models, kw)
    params = make_params(n_models=2, **{k: v for k, v in kw.items() if k != "progress"})
    names = [n for n, b in base.items() if b.is_floating_point() and b.dim() > 0]
    total = torch.zeros(2, len(COUNTERS), dtype=torch.int64)
    for name in names:
        m = torch.stack([sd[name] for sd in models])
        want, counts, _ = R.merge_one(base[name], m, params, name=name)
        total += counts
        for be, r in got.items():
            assert torch.equal(_bits({name: r.state_dict[name]})[name],
                               _bits({name: want})[name]), (be, name)
    for r in got.values():
        assert [[row[c] for c in COUNTERS] for row in r.report["totals"]] == total.tolist()
        assert r.report["parameters"]["epsilon"] == [0.2, 0.1]
    N = got["c"].report["population"]
    if method == "della_linear":           # no slack: the kept fraction is d_i within 5 σ
        for i, d in enumerate(kw["density"]):
            assert abs(int(total[i, KEPT]) / N - d) < 5 * 0.5 / math.sqrt(N)
    assert got["c"].report["tensors"] == got["torch"].report["tensors"] == \
        got["streamed"].report["tensors"]
    other = fastmerge.merge(base, models, backend="c", **dict(kw, seed=4))
    want = _bits(got["c"].state_dict)
    assert not all(torch.equal(_bits(other.state_dict)[k], want[k]) for k in want)


def test_yaml_cli_and_resume(tmp_path, monkeypatch):
    """della from a mergekit YAML (epsilon per model and global): the API's bytes; a run
    interrupted after two shards and resumed gives the same bytes."""
    import yaml

    from fastmerge import cli
    from fastmerge.config import config_to_kwargs
    from fastmerge.testing import PRESETS, write_llama_family
    fam = write_llama_family(tmp_path / "fam", config=PRESETS["tiny"], n_models=2)
    doc = {"merge_method": "della", "base_model": str(fam["base"]),
           "parameters": {"weight": 1.0, "density": 0.4, "epsilon": 0.1, "lambda": 0.9},
           "models": [{"model": str(fam["models"][0]), "parameters": {"epsilon": 0.3}},
                      {"model": str(fam["models"][1])}]}
    kw = config_to_kwargs(doc)
    assert kw["method"] == "della" and kw["epsilon"] == [0.3, 0.1]
    path = tmp_path / "della.yml"
    path.write_text(yaml.safe_dump(doc))
    args = ["merge", str(path), str(tmp_path / "out"), "--no-progress", "--random-seed", "5",
            "--shard-size", "100KB"]
    assert cli.main(args) == 0
    api = fastmerge.merge(fam["base"], fam["models"], method="della", density=0.4,
                          epsilon=[0.3, 0.1], weights=1.0, scale=0.9, seed=5,
                          output=tmp_path / "api", shard_size="100KB", progress=False)
    assert api.report["parameters"]["normalize"] is True
    files = sorted((tmp_path / "api").glob("*.safetensors"))
    assert len(files) > 2
    for f in files:
        assert f.read_bytes() == (tmp_path / "out" / f.name).read_bytes(), f.name
    resumed = tmp_path / "resumed"
    with monkeypatch.context() as mp:
        interrupt_at_shard(mp, 2)
        assert cli.main([*args[:2], str(resumed), *args[3:]]) == 130
    assert cli.main([*args[:2], str(resumed), *args[3:], "--resume"]) == 0
    for f in files:
        assert f.read_bytes() == (resumed / f.name).read_bytes(), f.name
    with pytest.raises(fastmerge.ParameterError, match="'epsilon' is only used by the methods"):
        config_to_kwargs(dict(doc, merge_method="ties"))
    with pytest.raises(fastmerge.ParameterError, match="density ± epsilon"):
        fastmerge.merge(fam["base"], fam["models"], method="della", density=0.1,
                        weights=1.0, progress=False)


SMALL = {"model.layers.0.w": (3, 43), "model.layers.0.b": (129,), "model.layers.1.c": (2, 3, 5)}
NEW_MODES = [dict(method="dare_ties", density=[0.5, 0.3], slack=[0.1, 0.05]),
             dict(method="breadcrumbs_ties", density=[0.5, 0.3], gamma=0.1, slack=[0.1, 0.05]),
             dict(method="della", density=[0.5, 0.3], epsilon=0.2, slack=[0.1, 0.05],
                  elect="count"),
             dict(method="della_linear", density=[0.5, 0.3], epsilon=[0.1, 0.25])]


@pytest.mark.parametrize("backend", ["c", pytest.param("triton", marks=TRITON)])
@pytest.mark.parametrize("kw", NEW_MODES, ids=lambda kw: kw["method"])
def test_merge_on_every_backend(backend, kw):
    """fastmerge.merge() with slack and DELLA on the C and Triton backends (Triton under
    the interpreter here) gives the torch backend's bytes and report."""
    from tests.test_exactness import triton_device
    total = sum(math.prod(s) for s in SMALL.values())
    base, models = make_inputs(2, total, BF16, seed=12)

    def sd(x):
        return state_dict_of(x, SMALL)
    args = (sd(base), [sd(m) for m in models])
    kw = dict(kw, weights=[1.0, -0.6], seed=7, progress=False)
    want = fastmerge.merge(*args, backend="torch", **kw)
    device = triton_device() if backend == "triton" else "cpu"
    got = fastmerge.merge(*args, backend=backend, device=device, **kw)
    for name in SMALL:
        assert torch.equal(got.state_dict[name].cpu().view(torch.int16),
                           want.state_dict[name].view(torch.int16)), name
    strip = lambda r: {k: v for k, v in r.items() if k != "backend"}
    assert strip(got.report) == strip(want.report)
    assert any(t["kept"] for t in want.report["totals"])
