"""DARE (docs/spec.md §8a): Philox4x32-10, the random drop, dare_linear and dare_ties.

1. Philox4x32-10 known answers (Random123's tests/kat_vectors) in the reference (Python
   ints and vectorised torch), the C kernels and the Triton kernels;
2. the stream r_i(g): the same words from every implementation, whatever the offset and
   the block size, across q = 2^32 (the counter's high word);
3. the drop threshold and the mask's statistics (keep fraction within 5 σ of d_i,
   models and keys independent);
4. merges bit-identical across reference / C / Triton (outputs and counters) for fp16 /
   bf16 / fp32, n = 1, 2, 3, 8, densities 0, 1 and between, rescale on and off, both
   methods and both elections, and equal to a derivation written from the spec;
5. independence from chunking (offsets), C thread counts and Triton block sizes;
6. edges by hand (density 0 and 1, rescaled votes flip the election), the method table,
   KernelConfig's and the C module's argument checks, the per-tensor key;
7. the Triton DARE kernel lowers for sm90 (no GPU needed).

Triton runs under TRITON_INTERPRET=1 on the CPU (tests/conftest.py), with small inputs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import types

import pytest
import torch

import fastmerge
from fastmerge import methods, philox
from fastmerge import reference as R
from fastmerge.backends import c_backend as C
from fastmerge.kernel_api import (COUNTERS, DROPPED_BY_SIGN, KEPT, SELECTED, KernelConfig)
from tests.checks import chunked, assert_same_over_threads, merged_three_ways, compile_for_sm90, assert_same, make_inputs, run
from tests.test_exactness import _triton_module, triton_merge

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
DTYPES = [F16, BF16, F32]
NAME = {F16: "fp16", BF16: "bf16", F32: "fp32"}
DARE = ("dare_linear", "dare_ties")
KEY = 0x243F6A8885A308D3
LAMBDA = 0.8
# per n: mixed-sign, non-dyadic weights; densities with 0, 1 and values between
WEIGHTS = {1: (-0.75,), 2: (0.6, -0.45), 3: (1.0, -0.3, 0.35),
           8: (0.5, -0.5, 0.3, -0.3, 1.25, -0.75, -0.5, 1.0)}
DENSITY = {1: (0.3,), 2: (0.45, 1.0), 3: (0.7, 0.0, 0.35),
           8: (0.3, 1.0, 0.0, 0.7, 0.45, 0.9, 0.15, 0.6)}
TRITON = pytest.mark.interpreter
INF = math.inf


def ids(name):
    return lambda v: f"{name}={NAME.get(v, v)}"


def cfg_for(method, n, *, rescale=None, normalize=None, elect="sum", density=None, key=KEY,
            offset=0, weights=None):
    m = methods.METHODS[method]
    return m.kernel_config(weights or WEIGHTS[n], LAMBDA,
                           m.normalize_default if normalize is None else normalize, elect,
                           density=density or DENSITY[n], rescale=rescale, key=key,
                           offset=offset)


# ---------------------------------------------------------------------------------------
# 1. Philox4x32-10 known answers

# Random123 (github.com/DEShawResearch/random123, tests/kat_vectors at commit 9545ff64):
# "philox4x32 R  counter[4]  key[2]  ->  output[4]"
KAT = [
    (10, (0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    (10, (0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (10, (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    (7, (0, 0, 0, 0), (0, 0), (0x5F6FB709, 0x0D893F64, 0x4F121F81, 0x4F730A48)),
    (7, (0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x5207DDC2, 0x45165E59, 0x4D8EE751, 0x8C52F662)),
    (7, (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0x4DFCCABA, 0x190A87F0, 0xC47362BA, 0xB6B5242A)),
]
KAT10 = [k for k in KAT if k[0] == 10]


def _key64(key):
    return key[0] | key[1] << 32


@pytest.mark.parametrize("rounds,ctr,key,want", KAT)
def test_philox_known_answers_reference(rounds, ctr, key, want):
    assert philox.philox4x32(ctr, key, rounds) == want
    got = philox.philox4x32_torch(*(torch.tensor([c]) for c in ctr), key, rounds)
    assert tuple(int(w) for w in got) == want
    assert philox.split_key(_key64(key)) == key


def test_philox_known_answers_c():
    for _, ctr, key, want in KAT10:
        assert C.philox4x32_10(ctr, key) == want


@TRITON
def test_philox_known_answers_triton():
    T = _triton_module()
    device = "cpu" if _interpreted() else "cuda"
    for _, ctr, key, want in KAT10:
        assert T.philox4x32_10(ctr, _key64(key), device=device) == [want]


def _interpreted():
    from fastmerge.backends import triton_interpreted
    return triton_interpreted()


# ---------------------------------------------------------------------------------------
# 2. the stream r_i(g)

def definition_words(key, model, offset, n):
    """r_model(g) written out from the spec, two scalar Philox calls per entry: the 16-bit
    half g mod 8 (low half of word k first) of stream 0's call is the high half of r, of
    stream 1's the low half."""
    k = philox.split_key(key)

    def half(g, stream):
        word = philox.philox4x32(((g >> 3) & 0xFFFFFFFF, g >> 35, model, stream), k)[(g & 7) // 2]
        return word & 0xFFFF if g % 2 == 0 else word >> 16

    return [half(g, 0) * 65536 + half(g, 1) for g in range(offset, offset + n)]


STREAMS = [(0, 0, 41), (KEY, 3, 1), (KEY, 7, 2), (1, 1, 8 * (1 << 32) - 9)]


@pytest.mark.parametrize("key,model,offset", [s[:3] for s in STREAMS])
def test_stream_reference_matches_definition(key, model, offset):
    got = philox.random_words(key, model, offset, 23)
    assert got.tolist() == definition_words(key, model, offset, 23)


@pytest.fixture(params=["avx512", "avx2", "scalar"])
def philox_variant(request):
    """Each Philox variant of the C kernels this CPU runs (kernels/c/philox.c), in turn."""
    before = C.use_philox()
    try:
        C.use_philox(request.param)
    except ValueError:
        pytest.skip(f"this CPU / build has no {request.param} Philox variant")
    try:
        yield request.param
    finally:
        C.use_philox(before)


def test_stream_c_matches_reference(philox_variant):
    assert C.use_philox() == philox_variant
    for key, model, offset in [(0, 0, 0), (KEY, 2, 1), (KEY, 5, 2), (KEY, 1, 3), (7, 63, 1001),
                               (2**64 - 1, 0, 8 * (1 << 32) - 300), (KEY, 1, 2**61 + 3)]:
        for n in (1, 3, 255, 256, 257, 1000):
            want = philox.random_words(key, model, offset, n)
            assert torch.equal(C.dare_words(key, model, offset, n), want), (key, model, offset, n)


@TRITON
@pytest.mark.parametrize("block", [16, 64, 256])
def test_stream_triton_matches_reference(block):
    T = _triton_module()
    device = "cpu" if _interpreted() else "cuda"
    for key, model, offset, n in [(KEY, 0, 0, 300), (KEY, 3, 1, 77), (9, 7, 8 * (1 << 32) - 6, 50),
                                  (2**64 - 1, 2, 2**61 + 2, 33)]:
        got = T.dare_words(key, model, offset, n, block=block, device=device).cpu()
        assert torch.equal(got, philox.random_words(key, model, offset, n)), (key, offset, n)


# ---------------------------------------------------------------------------------------
# 3. threshold and statistics

def test_drop_threshold_exact():
    assert philox.drop_threshold(0.0) == 0
    assert philox.drop_threshold(1.0) == 1 << 32
    assert philox.drop_threshold(0.5) == 1 << 31
    assert philox.drop_threshold(2.0**-32) == 1
    assert philox.drop_threshold(2.0**-33) == 0
    assert philox.drop_threshold(1 - 2.0**-53) == (1 << 32) - 1
    assert philox.drop_threshold(0.1) == math.floor(0.1 * 2**32) == 429496729
    for bad in (-0.0 - 1e-300, 1.0000001, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            philox.drop_threshold(bad)


def _within_5_sigma(count, n, p, what):
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(count - n * p) <= 5 * sigma, f"{what}: {count} vs {n * p:.1f} ± 5·{sigma:.1f}"


@pytest.mark.parametrize("density", [0.05, 0.3, 0.5, 0.9])
def test_keep_fraction_and_independence(density):
    N = 1 << 18
    T = philox.drop_threshold(density)
    p = T / 2**32
    masks = [philox.keep_mask(KEY, i, 12345, N, T) for i in range(3)]
    for i, k in enumerate(masks):
        _within_5_sigma(int(k.sum()), N, p, f"model {i} keeps")
    for i, j in ((0, 1), (0, 2), (1, 2)):            # models independent
        _within_5_sigma(int((masks[i] & masks[j]).sum()), N, p * p, f"models {i}, {j}")
    other = philox.keep_mask(KEY + 1, 0, 12345, N, T)  # another key (tensor) is independent
    _within_5_sigma(int((masks[0] & other).sum()), N, p * p, "keys")
    half = philox.keep_mask(KEY, 0, 12345 + N // 2, N // 2, T)   # a chunk: the same entries
    assert torch.equal(half, masks[0][N // 2:])


def test_words_are_uniform():
    r = philox.random_words(KEY, 0, 0, 1 << 18)
    top = torch.bincount(r >> 28, minlength=16)        # 16 bins of the top 4 bits
    for b in range(16):
        _within_5_sigma(int(top[b]), r.numel(), 1 / 16, f"bin {b}")
    low = torch.bincount(r & 15, minlength=16)         # and the low 4 bits
    for b in range(16):
        _within_5_sigma(int(low[b]), r.numel(), 1 / 16, f"low bin {b}")


# ---------------------------------------------------------------------------------------
# 4. merges: bit-identical across backends, and equal to the spec's derivation

def derive(base, models, cfg, out_dtype):
    """θ of docs/spec.md §8a written out from the spec, apart from fastmerge.reference:
    (out, kept, sel)."""
    x32 = models.float() - base.float()
    x = x32.double()
    n, N = x.shape
    kept = [torch.tensor(definition_words(cfg.key, i, cfg.offset, N)) < math.floor(d * 2**32)
            if N <= 64 else philox.random_words(cfg.key, i, cfg.offset, N) < math.floor(d * 2**32)
            for i, d in enumerate(cfg.density)]
    w = cfg.weights
    c = [(w[i] / cfg.density[i] if cfg.density[i] > 0 else 0.0) if cfg.rescale else w[i]
         for i in range(n)]
    sgn = [math.copysign(1.0, w[i]) * (w[i] != 0) * torch.sign(x[i]) for i in range(n)]
    if cfg.elect == "none":
        sel = kept
        W = torch.zeros(N, dtype=torch.float64)
        for i in range(n):
            W = W + w[i]
    else:
        G = torch.zeros(N, dtype=torch.float64)
        for i in range(n):
            vote = sgn[i] if cfg.elect == "count" else c[i] * x[i]
            G = G + torch.where(kept[i], vote, 0.0)
        gamma = torch.where(G >= 0, 1.0, -1.0)
        sel = [kept[i] & (sgn[i] == gamma) for i in range(n)]
        W = torch.zeros(N, dtype=torch.float64)
        for i in range(n):
            W = W + torch.where(sel[i], torch.tensor(w[i], dtype=torch.float64), 0.0)
    D = torch.zeros(N, dtype=torch.float64)
    for i in range(n):
        D = D + torch.where(sel[i], c[i] * x[i], 0.0)
    m = torch.where(W != 0, D / torch.where(W != 0, W, 1.0), D) if cfg.normalize else D
    theta = base.double() + cfg.scale * m
    return R.round_once(theta, out_dtype), torch.stack(kept), torch.stack(sel)


def _inputs(n, N, dtype, seed):
    return make_inputs(n, N, dtype, seed=seed, kind="grid" if n == 3 else "normal")


MODES = [  # (rescale, normalize, elect): defaults, each switched, count election
    (None, None, "sum"), (False, None, "sum"), (True, True, "sum"), (None, None, "count")]


@pytest.mark.parametrize("dtype", DTYPES, ids=ids("dtype"))
@pytest.mark.parametrize("n", [1, 2, 3, 8], ids=ids("n_models"))
@pytest.mark.parametrize("method", DARE)
def test_c_and_reference_bit_identical(method, n, dtype, philox_variant):
    base, models = _inputs(n, 2000 + 37 * n, dtype, seed=n)
    for rescale, normalize, elect in MODES:
        cfg = cfg_for(method, n, rescale=rescale, normalize=normalize, elect=elect, offset=5)
        want = run(R.merge, base, models, cfg, dtype)
        assert_same(run(C.merge, base, models, cfg, dtype), want, f"C {cfg}")
        out, kept, sel = derive(base, models, cfg, dtype)
        assert torch.equal(want[0].view(torch.uint8), out.view(torch.uint8)), "reference vs spec"
        assert want[1][:, KEPT].tolist() == kept.sum(1).tolist()
        assert want[1][:, SELECTED].tolist() == sel.sum(1).tolist()
        if cfg.elect == "none":
            assert not want[1][:, DROPPED_BY_SIGN].any()


@TRITON
@pytest.mark.parametrize("n", [1, 2, 3, 8], ids=ids("n_models"))
@pytest.mark.parametrize("method", DARE)
def test_triton_bit_identical(method, n):
    k = DARE.index(method)
    dtype = DTYPES[(n + k) % 3]
    base, models = _inputs(n, 700 if n < 8 else 300, dtype, seed=20 + n)
    rescale, normalize, elect = MODES[(n + 2 * k) % len(MODES)]
    cfg = cfg_for(method, n, rescale=rescale, normalize=normalize, elect=elect, offset=4099)
    assert_same(run(triton_merge, base, models, cfg, dtype), run(R.merge, base, models, cfg, dtype),
                f"Triton {cfg}")


def test_rescale_and_normalize_matter():
    """The modes really differ (so the tests above compare different things)."""
    base, models = make_inputs(3, 3000, F32, seed=5)
    outs = {}
    for rescale, normalize, elect in MODES:
        cfg = cfg_for("dare_ties", 3, rescale=rescale, normalize=normalize, elect=elect,
                      density=(0.5, 0.8, 0.3))
        outs[(rescale, normalize, elect)] = run(R.merge, base, models, cfg, F32)[0]
    vals = list(outs.values())
    assert all(not torch.equal(a, b) for i, a in enumerate(vals) for b in vals[i + 1:])


def tie_densities(key, n, N, offset):
    """Densities that make the high half of r decide nothing at one entry e_i per model:
    T_i = hi_i(e_i)·2^16 + (lo_i(e_i) + 1, lo_i(e_i), 0) for models 0, 1, 2 (kept by its
    low half, dropped by it, dropped with T mod 2^16 = 0). Returns (densities, T, entries)."""
    dens, ts, ents = [], [], []
    for i in range(n):
        r = philox.random_words(key, i, offset, N)
        e = next(j for j in range(7 * i + 3, N) if 0 < int(r[j]) & 0xFFFF < 0xFFFF)
        hi, lo = int(r[e]) >> 16, int(r[e]) & 0xFFFF
        T = (hi << 16) + (lo + 1, lo, 0)[i % 3]
        dens.append(T / 2**32)                      # exact: T < 2^32 fits an fp64
        ts.append(T)
        ents.append(e)
    return tuple(dens), ts, ents


@pytest.mark.parametrize("method", DARE)
def test_low_half_decides_where_the_high_half_ties(method, philox_variant):
    """Where hi = ⌊T / 2^16⌋ the kernels draw r's low half (stream 1) to decide r < T:
    C (each Philox variant) equals the reference and the spec written out, and the
    decisive entries go the way their low halves say (a kernel that decided by the high
    half alone would drop the first)."""
    n, N, dtype, offset = 3, 3000, F16, 13
    base, models = _inputs(n, N, dtype, seed=9)
    density, T, ents = tie_densities(KEY, n, N, offset)
    assert [philox.drop_threshold(d) for d in density] == T        # the densities give T
    for rescale, normalize, elect in MODES[:2]:
        cfg = cfg_for(method, n, density=density, offset=offset, rescale=rescale,
                      normalize=normalize, elect=elect)
        want = run(R.merge, base, models, cfg, dtype)
        assert_same(run(C.merge, base, models, cfg, dtype), want, f"C {cfg}")
        out, kept, _ = derive(base, models, cfg, dtype)
        assert torch.equal(want[0].view(torch.uint8), out.view(torch.uint8)), "reference vs spec"
        assert [bool(kept[i, e]) for i, e in enumerate(ents)] == [True, False, False]


# ---------------------------------------------------------------------------------------
# 5. chunking, threads, block sizes



@pytest.mark.parametrize("method", DARE)
def test_chunking_and_threads_c_reference(method):
    n, N, dtype = 3, 5000, BF16
    base, models = make_inputs(n, N, dtype, seed=7)
    cfg = cfg_for(method, n, density=(0.4, 0.75, 1.0))
    whole = run(R.merge, base, models, cfg, dtype)
    for step in (1000, 37):
        assert_same(chunked(R.merge, base, models, cfg, dtype, step), whole, f"ref chunks {step}")
        assert_same(chunked(C.merge, base, models, cfg, dtype, step), whole, f"C chunks {step}")
    big_base, big_models = make_inputs(2, 70_001, F16, seed=8)      # several C work chunks
    cfg2 = cfg_for(method, 2, offset=3)
    want = run(R.merge, big_base, big_models, cfg2, F16)
    assert_same_over_threads(big_base, big_models, cfg2, F16, want)


@TRITON
@pytest.mark.parametrize("method", DARE)
def test_chunking_and_blocks_triton(method):
    T = _triton_module()
    n, N, dtype = 2, 300, F16
    base, models = make_inputs(n, N, dtype, seed=9)
    cfg = cfg_for(method, n, offset=2)
    want = run(R.merge, base, models, cfg, dtype)
    assert_same(chunked(triton_merge, base, models, cfg, dtype, 37), want, "Triton chunks 37")
    if not _interpreted():
        return
    for block, programs in ((16, 3), (64, 2), (512, 1)):
        got = run(lambda b, m, o, c: T.merge(b, m, o, c, block=block, programs=programs),
                  base, models, cfg, dtype)
        assert_same(got, want, f"Triton block {block}")


# ---------------------------------------------------------------------------------------
# 6. edges, by hand

ALL_MERGES = [pytest.param(R.merge, id="backend=torch"), pytest.param(C.merge, id="backend=c"),
              pytest.param(triton_merge, id="backend=triton", marks=TRITON)]


@pytest.mark.parametrize("merge", ALL_MERGES)
@pytest.mark.parametrize("method", DARE)
def test_density_zero_and_one(merge, method):
    base, models = make_inputs(2, 600, F16, seed=11)
    for normalize in (False, True):
        # d = 0: nothing kept, m = 0, θ = θ_b exactly
        cfg0 = cfg_for(method, 2, density=(0.0, 0.0), normalize=normalize)
        out, counts = run(merge, base, models, cfg0, F16)
        assert torch.equal(out.view(torch.int16), base.view(torch.int16))
        assert not counts[:, [KEPT, SELECTED, DROPPED_BY_SIGN]].any()
        # d = 1: every entry kept, c_i = w_i: task arithmetic / TIES without a trim
        cfg1 = cfg_for(method, 2, density=(1.0, 1.0), normalize=normalize, rescale=True)
        plain = methods.METHODS["task_arithmetic" if method == "dare_linear" else "ties"]
        ref_cfg = plain.kernel_config(WEIGHTS[2], LAMBDA, normalize, "sum", t=(0.0, 0.0))
        out1, counts1 = run(merge, base, models, cfg1, F16)
        want1, want_counts = run(R.merge, base, models, ref_cfg, F16)
        assert torch.equal(out1.view(torch.int16), want1.view(torch.int16))
        assert counts1[:, KEPT].tolist() == [600, 600]
        if method == "dare_ties":
            assert torch.equal(counts1, want_counts)


def _entries_where(key, density, N=64):
    """Model 0's kept entries among 0..N-1 with that density."""
    return philox.keep_mask(key, 0, 0, N, philox.drop_threshold(density))


@pytest.mark.parametrize("merge", ALL_MERGES)
@pytest.mark.parametrize("rescale", [True, False], ids=ids("rescale"))
def test_rescaled_votes_decide_the_election(merge, rescale):
    """w = (1, 1), d = (0.25, 1), τ = (1, −2) at every entry, θ_b = 0.5, λ = 0.5.
    Where model 0 is kept, rescaled votes 4·1 − 2 = 2 elect +1 (D = 4·1 = 4); unscaled
    votes 1 − 2 = −1 elect −1 (D = −2). Where it is dropped: γ = −1, D = −2. W = 1."""
    N = 64
    base = torch.full((N,), 0.5, dtype=F32)
    models = torch.stack([base + 1.0, base - 2.0])
    cfg = methods.METHODS["dare_ties"].kernel_config((1.0, 1.0), 0.5, True, "sum",
                                                     density=(0.25, 1.0), rescale=rescale,
                                                     key=KEY)
    kept0 = _entries_where(KEY, 0.25, N)
    assert 0 < int(kept0.sum()) < N
    out, counts = run(merge, base, models, cfg, F32)
    m = torch.where(kept0 & rescale, 4.0, -2.0)         # D / W, W = 1
    assert torch.equal(out, (0.5 + 0.5 * m).float())
    k0 = int(kept0.sum())
    assert counts[:, KEPT].tolist() == [k0, N]
    assert counts[:, SELECTED].tolist() == ([k0, N - k0] if rescale else [0, N])
    assert counts[:, DROPPED_BY_SIGN].tolist() == ([0, k0] if rescale else [k0, 0])


def test_model_order_matters():
    """The counter holds the model's index: the same model at another position draws
    another mask (documented: DARE is not invariant under reordering the models)."""
    T = philox.drop_threshold(0.5)
    first, second = (philox.keep_mask(KEY, i, 0, 1000, T) for i in (0, 1))
    assert not torch.equal(first, second)


# ---------------------------------------------------------------------------------------
# the method table, KernelConfig, the C module, the per-tensor key

def test_method_rows():
    for name, elect in (("dare_linear", False), ("dare_ties", True)):
        m = methods.METHODS[name]
        assert m.needs_base and m.drop and not m.thresholds and m.elect == elect
        assert m.knobs == (("weights", "density", "slack", "scale") if elect
                           else ("weights", "density", "scale"))
        assert m.protects == elect
        assert m.normalize_default is False and m.rescale_default is True
        assert m.available and methods.ALIASES[name] == name
        cfg = m.kernel_config((1.0, 2.0), 0.5, False, "sum", density=(0.5, 0.25), key=3)
        assert cfg.rescale and cfg.drops and cfg.t is None and cfg.u is None
        assert cfg.elect == ("sum" if elect else "none") and cfg.counts
        assert cfg.vote_weights == (2.0, 8.0) and cfg.drop_thresholds == (1 << 31, 1 << 30)
        assert m.kernel_config((1.0,), 1, False, "sum", density=(0.5,), key=3,
                               rescale=False).vote_weights == (1.0,)
        with pytest.raises(ValueError, match="needs density and key"):
            m.kernel_config((1.0,), 1.0, False, "sum", density=(0.5,))
    ties = methods.METHODS["ties"].kernel_config((1.0,), 1.0, True, "sum", t=(0.0,),
                                                 density=(0.5,), key=1)
    assert not ties.drops and ties.vote_weights == (1.0,)       # other methods ignore them
    assert "dare_ties" in methods.names()


def test_kernel_config_checks():
    ok = dict(weights=(1.0, 1.0), density=(0.5, 0.5), key=1)
    cfg = KernelConfig(**ok, offset=10)
    assert cfg.at(10) is cfg and cfg.at(99).offset == 99 and cfg.at(99).key == 1
    assert KernelConfig(weights=(1.0,), density=(0.0,), rescale=True).vote_weights == (0.0,)
    assert KernelConfig(**ok, u=(1.0, INF), elect="sum").has_slack     # slack with a drop
    bad = [dict(ok, t=(0.0, 0.0)), dict(ok, u=(1.0, 1.0)), dict(ok, h=(1.0, 1.0)),
           dict(ok, density=(0.5,)),
           dict(ok, density=(1.5, 0.5)), dict(ok, key=-1), dict(ok, key=2**64), dict(ok, key=1.0),
           dict(ok, offset=-1), dict(weights=(1.0,), rescale=True)]
    for kw in bad:
        with pytest.raises(ValueError):
            KernelConfig(**kw)


def test_c_module_checks():
    ext = C._module()
    base, models = make_inputs(2, 10, F32, seed=0)
    out = torch.empty(10)
    counts = torch.zeros(2, len(COUNTERS), dtype=torch.int64)

    def call(**kw):
        args = dict(t=None, u=None, elect=ext.ELECT_NONE)
        args.update(kw)
        ext.merge(base.numpy(), models.numpy(), out.numpy(), 2, 10, ext.F32, ext.F32, ext.F32,
                  True, args.pop("elect"), False, (1.0, 1.0), args.pop("t"), args.pop("u"), 1.0,
                  counts.numpy(), **args)
    call(drop=(0, 1 << 32), key=2**64 - 1, offset=5)
    call(drop=(7, 8), elect=ext.ELECT_SUM)              # an election needs no t with a drop
    for kw, msg in [(dict(drop=(0, (1 << 32) + 1)), "drop\\[1\\]"), (dict(drop=(0,)), "drop"),
                    (dict(drop=(1, 1), t=(0.0, 0.0)), "excludes"), (dict(key=-1), "key"),
                    (dict(key=2**64), "key"), (dict(drop=(1, 1), offset=-1), "offset"),
                    (dict(vote_weights=(1.0, float("nan"))), "vote_weights")]:
        with pytest.raises(ValueError, match=msg):
            call(**kw)


def test_tensor_key():
    name = "model.layers.0.mlp.down_proj.weight"
    want = int.from_bytes(hashlib.sha256(f"42:{name}".encode()).digest()[:8], "little")
    assert philox.tensor_key(42, name) == want
    assert philox.tensor_key(42, name) != philox.tensor_key(43, name)
    assert philox.tensor_key(42, name) != philox.tensor_key(42, name.replace("0", "1"))
    with pytest.raises(ValueError):
        philox.tensor_key("42", name)


def test_merge_one_with_key():
    """reference.merge_one builds the DARE flags from the knobs and the tensor's key."""
    knobs = types.SimpleNamespace(weights=WEIGHTS[2], density=DENSITY[2], slack=(0.0, 0.0),
                                  scale=LAMBDA)
    params = types.SimpleNamespace(method="dare_ties", spec=methods.METHODS["dare_ties"],
                                   trims=False, selects=False, normalize=False, elect="sum",
                                   seed=5,
                                   rescale=None, for_tensor=lambda name: knobs)
    base, models = make_inputs(2, 24 * 5, BF16, seed=3)
    out, counts, _ = R.merge_one(base.reshape(24, 5), models.reshape(2, 24, 5), params, name="w")
    cfg = cfg_for("dare_ties", 2, key=philox.tensor_key(5, "w"))
    want = run(R.merge, base, models, cfg, BF16)
    assert_same((out.reshape(-1), counts), want, "merge_one")


# ---------------------------------------------------------------------------------------
# 7. the Triton DARE kernel lowers for sm90

_SM90_BODY = """
    dsig = dict(base_ptr="*i16", models_ptr="*i16", out_ptr="*fp16", w_ptr="*fp64",
                par_ptr="*fp32", drp_ptr="*i64", keep_ptr="*i64", cnt_ptr="*i32", N="i32",
                n_programs="i32", qbase="i64", shift="i32")
    for elect, out_f32, bf16, slack, ranked in ((0, False, True, False, False),
                                                (1, True, False, False, False),
                                                (2, False, True, False, False),
                                                (1, False, True, True, False),
                                                (1, False, True, True, True),
                                                (0, True, False, False, True)):
        build(T._merge_drop_kernel, dsig, dict(ELECT=elect, SLACK=slack, NORMALIZE=True,
              RANKED=ranked, RESCALE=True, N_MODELS=3, NM=4,
              BASE_BF16=bf16, MODELS_BF16=bf16, OUT_BF16=False, OUT_F32=out_f32, BLOCK=1024,
              ITERS=8), 4, needs=("mul.hi.u32",))
    build(T._philox_kernel, dict(ctr_ptr="*i64", rk_ptr="*i64", out_ptr="*i64", M="i32"),
          dict(BLOCK=16), 1)
    build(T._dare_words_kernel, dict(out_ptr="*i64", rk_ptr="*i64", N="i32", qbase="i64",
          shift="i32", model="i32"), dict(BLOCK=256), 4)
"""


def test_dare_kernel_compiles_for_sm90():
    compile_for_sm90(_SM90_BODY)


# ---------------------------------------------------------------------------------------
# through fastmerge.merge(), the YAML config and the CLI

def _bits(sd):
    return {k: (v.view(torch.int16) if v.is_floating_point() and v.element_size() == 2 else v)
            for k, v in sd.items()}


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_merge_streamed_in_chunks_equals_whole_tensors(method, monkeypatch):
    """The pipeline gives each chunk its global offset: a merge streamed in chunks of 64
    entries equals the same merge on whole tensors, on the reference and C backends, and
    the seed changes the drop."""
    from fastmerge import pipeline
    from fastmerge.backends import torch_backend
    from fastmerge.testing import PRESETS, state_dicts
    base, models = state_dicts(config=PRESETS["tiny"], n_models=2)
    kw = dict(method=method, density=[0.5, 0.3], weights=[1.0, 0.7], seed=3, progress=False)
    whole = {be: fastmerge.merge(base, models, backend=be, **kw) for be in ("torch", "c")}
    monkeypatch.setattr(pipeline, "DEFAULT_RESIDENT_BYTES", 0)
    for mod in (pipeline, torch_backend, C):
        monkeypatch.setattr(mod, "CHUNK_ELEMS" if mod is not pipeline else "DEFAULT_CHUNK_ELEMS",
                            64, raising=False)
    streamed = fastmerge.merge(base, models, backend="c", **kw)
    want = _bits(whole["torch"].state_dict)
    for got in (whole["c"], streamed):
        assert _bits(got.state_dict).keys() == want.keys()
        assert all(torch.equal(_bits(got.state_dict)[k], want[k]) for k in want)
        assert got.report["tensors"] == whole["torch"].report["tensors"]
    other = fastmerge.merge(base, models, backend="c", **dict(kw, seed=4))
    assert not all(torch.equal(_bits(other.state_dict)[k], want[k]) for k in want)
    assert whole["c"].report["parameters"]["seed"] == 3
    assert whole["c"].report["parameters"]["rescale"] is True


def test_yaml_dare_with_rescale_and_cli_seed(tmp_path):
    """dare_ties from a mergekit YAML (rescale under parameters), seeded from the CLI's
    --random-seed: the same bytes as the API call with that seed."""
    import yaml

    from fastmerge import cli
    from fastmerge.config import config_to_kwargs
    from fastmerge.testing import PRESETS, write_llama_family
    fam = write_llama_family(tmp_path / "fam", config=PRESETS["tiny"], n_models=2)
    doc = {"merge_method": "dare_ties", "base_model": str(fam["base"]),
           "parameters": {"rescale": False, "weight": 1.0, "density": 0.4},
           "models": [{"model": str(m)} for m in fam["models"]]}
    kw = config_to_kwargs(doc)
    assert kw["method"] == "dare_ties" and kw["rescale"] is False
    cfg = tmp_path / "dare.yml"
    cfg.write_text(yaml.safe_dump(doc))
    assert cli.main(["merge", str(cfg), str(tmp_path / "out"), "--random-seed", "7",
                     "--no-progress"]) == 0
    fastmerge.merge(fam["base"], fam["models"], method="dare_ties", density=0.4,
                    rescale=False, seed=7, output=tmp_path / "api", progress=False)
    for f in sorted((tmp_path / "api").glob("*.safetensors")):
        assert f.read_bytes() == (tmp_path / "out" / f.name).read_bytes(), f.name
    with pytest.raises(fastmerge.ParameterError, match="rescale is only used by the DARE"):
        fastmerge.merge(fam["base"], fam["models"], method="ties", rescale=True,
                        progress=False)


# ---------------------------------------------------------------------------------------
# 8. slack (docs/spec.md §4a): dare_ties protects each model's top s_i

def slack_u(base, models, slack):
    """u_i of §4 by sorting (+inf when ⌊s_i·N⌋ = 0)."""
    a = R.task_vectors(base, models).abs()
    return [R.thresholds_by_sort(a[i], 1.0, s)[1] for i, s in enumerate(slack)]


def derive_slack(base, models, cfg, out_dtype):
    """θ of §8a with §4a's protection, written out from the spec: (out, kept, prot, sel,
    sel under plain TIES's γ)."""
    x32 = models.float() - base.float()
    x = x32.double()
    n, N = x.shape
    prot = torch.stack([x32[i].abs() >= u for i, u in enumerate(cfg.u)])
    kept = torch.stack([philox.random_words(cfg.key, i, cfg.offset, N) < math.floor(d * 2**32)
                        for i, d in enumerate(cfg.density)]) | prot
    w = cfg.weights
    c = [(w[i] / cfg.density[i] if cfg.density[i] > 0 else 0.0) if cfg.rescale else w[i]
         for i in range(n)]
    f = [torch.where(prot[i], torch.tensor(w[i], dtype=torch.float64),
                     torch.tensor(c[i], dtype=torch.float64)) for i in range(n)]  # prot.: w_i
    sgn = [math.copysign(1.0, w[i]) * (w[i] != 0) * torch.sign(x[i]) for i in range(n)]
    G = torch.zeros(N, dtype=torch.float64)
    GP = torch.zeros(N, dtype=torch.float64)
    for i in range(n):
        vote = sgn[i] if cfg.elect == "count" else f[i] * x[i]
        G = G + torch.where(kept[i], vote, 0.0)
        GP = GP + torch.where(prot[i], vote, 0.0)
    g_ties = torch.where(G >= 0, 1.0, -1.0)
    gamma = torch.where(prot.any(0), torch.where(GP >= 0, 1.0, -1.0), g_ties)
    sel = torch.stack([kept[i] & (sgn[i] == gamma) for i in range(n)])
    sel_t = torch.stack([kept[i] & (sgn[i] == g_ties) for i in range(n)])
    W = torch.zeros(N, dtype=torch.float64)
    D = torch.zeros(N, dtype=torch.float64)
    for i in range(n):
        W = W + torch.where(sel[i], torch.tensor(w[i], dtype=torch.float64), 0.0)
        D = D + torch.where(sel[i], f[i] * x[i], 0.0)
    m = torch.where(W != 0, D / torch.where(W != 0, W, 1.0), D) if cfg.normalize else D
    theta = base.double() + cfg.scale * m
    return R.round_once(theta, out_dtype), kept, prot, sel, sel_t


SLACK = {1: (0.1,), 2: (0.2, 0.05), 3: (0.3, 0.0, 0.1),
         8: (0.1, 0.3, 0.0, 0.2, 0.05, 0.4, 0.15, 0.0)}


def slack_cfg(base, models, n, slack=None, **kw):
    u = slack_u(base, models, slack or SLACK[n])
    return dataclasses.replace(cfg_for("dare_ties", n, **kw), u=tuple(u))


@pytest.mark.parametrize("dtype", DTYPES, ids=ids("dtype"))
@pytest.mark.parametrize("n", [1, 2, 3, 8], ids=ids("n_models"))
def test_slack_c_and_reference_equal_the_definition(n, dtype):
    from fastmerge.kernel_api import (IMPORTANT_DROPPED, PROTECTED,
                                      TIES_IMPORTANT_DROPPED)
    base, models = _inputs(n, 2000 + 37 * n, dtype, seed=40 + n)
    density = tuple(min(1.0, d + 0.4) if d == 0 else d for d in DENSITY[n])  # s_i <= d_i
    for rescale, normalize, elect in MODES:
        cfg = slack_cfg(base, models, n, rescale=rescale, normalize=normalize, elect=elect,
                        offset=5, density=density)
        assert cfg.has_slack
        want = run(R.merge, base, models, cfg, dtype)
        assert_same(run(C.merge, base, models, cfg, dtype), want, f"C {cfg}")
        out, kept, prot, sel, sel_t = derive_slack(base, models, cfg, dtype)
        assert torch.equal(want[0].view(torch.uint8), out.view(torch.uint8)), "reference vs spec"
        c = want[1]
        assert c[:, KEPT].tolist() == kept.sum(1).tolist()
        assert c[:, SELECTED].tolist() == sel.sum(1).tolist()
        assert c[:, PROTECTED].tolist() == prot.sum(1).tolist()
        assert c[:, IMPORTANT_DROPPED].tolist() == (prot & ~sel).sum(1).tolist()
        assert c[:, TIES_IMPORTANT_DROPPED].tolist() == (prot & ~sel_t).sum(1).tolist()
        for i, s in enumerate(SLACK[n]):           # the top ⌊s_i·N⌋ (ties kept): protected
            assert c[i, PROTECTED] >= int(s * models.shape[1])
    if n > 1:   # the election really changed somewhere (sum mode, default knobs)
        cfg = slack_cfg(base, models, n, density=density)
        _, _, prot, sel, sel_t = derive_slack(base, models, cfg, dtype)
        assert (prot & ~sel_t).sum() > (prot & ~sel).sum()


@TRITON
@pytest.mark.parametrize("n", [1, 2, 3, 8], ids=ids("n_models"))
def test_slack_triton_bit_identical(n):
    dtype = DTYPES[n % 3]
    base, models = _inputs(n, 700 if n < 8 else 300, dtype, seed=50 + n)
    density = tuple(max(d, s) for d, s in zip(DENSITY[n], SLACK[n]))
    rescale, normalize, elect = MODES[n % len(MODES)]
    cfg = slack_cfg(base, models, n, rescale=rescale, normalize=normalize, elect=elect,
                    offset=4099, density=density)
    assert_same(run(triton_merge, base, models, cfg, dtype),
                run(R.merge, base, models, cfg, dtype), f"Triton {cfg}")
    assert_same(chunked(triton_merge, base, models, cfg, dtype, 37),
                run(R.merge, base, models, cfg, dtype), "Triton chunks 37")


def test_slack_chunking_and_threads_c():
    n, N, dtype = 3, 5000, BF16
    base, models = make_inputs(n, N, dtype, seed=17)
    cfg = slack_cfg(base, models, n, density=(0.4, 0.75, 1.0), slack=(0.1, 0.2, 0.3))
    whole = run(R.merge, base, models, cfg, dtype)
    for step in (1000, 37):
        assert_same(chunked(R.merge, base, models, cfg, dtype, step), whole, f"ref chunks {step}")
        assert_same(chunked(C.merge, base, models, cfg, dtype, step), whole, f"C chunks {step}")
    big_base, big_models = make_inputs(2, 70_001, F16, seed=18)
    cfg2 = slack_cfg(big_base, big_models, 2, offset=3)
    want = run(R.merge, big_base, big_models, cfg2, F16)
    assert_same_over_threads(big_base, big_models, cfg2, F16, want)


@pytest.mark.parametrize("merge", ALL_MERGES)
def test_slack_by_hand(merge):
    """One model, w = 0.5, d = 0.25 (rescale: c = 2), τ = 1..64 with entries 60..63
    protected (u = 61: the top 4 of 64 with s = 1/16). A protected entry is kept whatever
    the draw and weighs w = 0.5, never w / d; the others are DARE's."""
    from fastmerge.kernel_api import PROTECTED
    N = 64
    base = torch.zeros(N, dtype=F32)
    models = torch.arange(1, N + 1, dtype=F32).unsqueeze(0)
    m = methods.METHODS["dare_ties"]
    u = slack_u(base, models, (4 / 64,))
    assert u == [61.0]
    cfg = m.kernel_config((0.5,), 1.0, False, "sum", None, u, density=(0.25,), key=KEY)
    kept = _entries_where(KEY, 0.25, N)
    assert not kept[60:].all()                     # the draw drops some protected entry
    out, counts = run(merge, base, models, cfg, F32)
    want = torch.where(kept, 2.0 * models[0], 0.0)
    want[60:] = 0.5 * models[0, 60:]
    assert torch.equal(out, want)
    assert counts[0, PROTECTED] == 4 and counts[0, KEPT] == int((kept[:60]).sum()) + 4
    # d = 0 keeps only the protected entries, s = 0 (u = inf) is plain DARE
    cfg0 = m.kernel_config((0.5,), 1.0, False, "sum", None, u, density=(0.0625,), key=KEY)
    cfg0 = dataclasses.replace(cfg0, density=(0.0,))
    out0, _ = run(merge, base, models, cfg0, F32)
    assert torch.equal(out0, torch.where(torch.arange(N) >= 60, 0.5 * models[0], 0.0))
    plain = m.kernel_config((0.5,), 1.0, False, "sum", None, [INF], density=(0.25,), key=KEY)
    assert not plain.has_slack
    assert torch.equal(run(merge, base, models, plain, F32)[0],
                       torch.where(kept, 2.0 * models[0], 0.0))


def test_slack_params_and_yaml(tmp_path):
    from fastmerge.config import config_to_kwargs
    from fastmerge.params import make_params
    assert make_params("dare_ties", 2, slack=[0.1, 0.0], density=0.5).selects
    assert not make_params("dare_ties", 2, density=0.5).selects
    with pytest.raises(fastmerge.ParameterError, match="slack is only used by the methods"):
        make_params("dare_linear", 2, slack=0.1)
    with pytest.raises(fastmerge.ParameterError, match="slack of model 0 must be in"):
        make_params("dare_ties", 1, slack=0.3, density=0.2)
    doc = {"merge_method": "dare_ties", "base_model": "b",
           "parameters": {"weight": 1.0, "density": 0.4, "slack": 0.05},
           "models": [{"model": "m0", "parameters": {"slack": 0.1}}, {"model": "m1"}]}
    assert config_to_kwargs(doc)["slack"] == [0.1, 0.05]


@pytest.mark.parametrize("scope", ["tensor", "model"])
def test_slack_merge_api(scope, monkeypatch):
    """fastmerge.merge() with slack on the torch and C backends, whole and streamed in
    chunks: the reference's bytes, u_i in the report, the protected counters."""
    from fastmerge.params import make_params
    from fastmerge.testing import PRESETS, state_dicts
    base, models = state_dicts(config=PRESETS["tiny"], n_models=2)
    kw = dict(method="dare_ties", density=[0.5, 0.3], slack=[0.1, 0.02], weights=[1.0, -0.7],
              seed=3, scope=scope, progress=False)
    got = merged_three_ways(monkeypatch, base, models, kw)
    params = make_params(n_models=2, **{k: v for k, v in kw.items() if k != "progress"})
    names = [n for n, b in base.items() if b.is_floating_point() and b.dim() > 0]
    thresholds = None
    if scope == "model":
        tau = torch.cat([R.task_vectors(base[n].reshape(-1), torch.stack(
            [m[n].reshape(-1) for m in models])).abs() for n in names], dim=1)
        thresholds = {"u": [R.thresholds_by_sort(tau[i], 1.0, s)[1]
                            for i, s in enumerate(kw["slack"])]}
        for r in got.values():
            assert r.report["model_thresholds"] == thresholds
    total = torch.zeros(2, len(COUNTERS), dtype=torch.int64)
    for name in names:
        m = torch.stack([sd[name] for sd in models])
        want, counts, (t, u) = R.merge_one(base[name], m, params, thresholds=thresholds,
                                           name=name)
        total += counts
        for be, r in got.items():
            assert torch.equal(_bits({name: r.state_dict[name]})[name],
                               _bits({name: want})[name]), (be, name)
    assert total[:, 1].min() > 0                              # both models protect
    rows = got["torch"].report["tensors"]
    assert all(row["u"] and "t" not in row for row in rows)
    assert got["c"].report["tensors"] == rows == got["streamed"].report["tensors"]
    for r in got.values():
        assert [[row[c] for c in COUNTERS] for row in r.report["totals"]] == total.tolist()
