"""The C CPU backend (fastmerge._cmerge via fastmerge.backends.c_backend) against the reference.

docs/spec.md §10's bar: histograms, thresholds and counters identical to fastmerge.reference,
outputs within one ulp of the output dtype (plus the fp32 evaluation error at the
operands' size, see tests/checks.py). Inputs use dyadic weights (0.5, 1.25, ...) so that
fp32 and fp64 elections cannot differ by rounding. Every case is small: the whole file
runs in seconds.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from fastmerge import reference as R
from fastmerge.backends import c_backend as C
from fastmerge.kernel_api import COUNTERS, NBINS
from fastmerge.select import RadixSelect, Targets, find_thresholds
from tests import checks
from tests.checks import WEIGHTS, make_inputs, mode_cfg, thresholds_checked, ties_cfg

_reason = C.unavailable_reason()
if _reason and os.environ.get("FASTMERGE_REQUIRE_EXTENSION", "") not in ("", "0"):
    raise RuntimeError(f"FASTMERGE_REQUIRE_EXTENSION is set but {_reason}")
pytestmark = pytest.mark.skipif(_reason is not None, reason=f"C backend unavailable: {_reason}")

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
DTYPES = [F16, BF16, F32]
NAME = {F16: "fp16", BF16: "bf16", F32: "fp32"}
INF = float("inf")


def ids(name):
    return lambda v: f"{name}={NAME.get(v, v)}"


@pytest.fixture(params=[1, 2], ids=ids("threads"))
def threads(request):
    """Run the kernels with 1 and with 2 threads; restore the default afterwards."""
    C.set_num_threads(request.param)
    yield request.param
    C.set_num_threads(0)


# ---------------------------------------------------------------------------------------
# inputs

def thresholds(base, models, density, slack):
    """(t, u) by the C histogram; checked against the reference and sorting."""
    return thresholds_checked(C.histogram, base, models, density, slack)


def check_merge(base, models, cfg, out_dtype):
    return checks.check_merge(C.merge, base, models, cfg, out_dtype)


# ---------------------------------------------------------------------------------------
# histograms and thresholds

@pytest.mark.parametrize("dtype", DTYPES, ids=ids("dtype"))
@pytest.mark.parametrize("kind", ["normal", "grid"], ids=ids("data"))
@pytest.mark.parametrize("n", [1, 3], ids=ids("n_models"))
def test_histograms_along_radix_select(dtype, kind, n, threads):
    """Every level's histogram equals the reference's on the prefixes select really asks for."""
    base, models = make_inputs(n, 5003, dtype, seed=n, kind=kind)
    sel = RadixSelect.of(Targets.of([0.2] * n, [0.05] * n, 5003))
    while not sel.done:
        prefixes = sel.prefixes()
        hist = C.histogram(base, models, prefixes, sel.level)
        assert hist.dtype == torch.int64 and hist.shape == (n, 2, NBINS)
        assert torch.equal(hist, R.histogram(base, models, prefixes, sel.level)), \
            f"level {sel.level} histogram differs"
        sel.update(hist)


@pytest.mark.parametrize("level", [0, 1, 2], ids=ids("level"))
@pytest.mark.parametrize("dtype", DTYPES, ids=ids("dtype"))
def test_histogram_arbitrary_prefixes(level, dtype, threads):
    """Slots off (-1), both slots on, equal prefixes, prefixes that match nothing."""
    base, models = make_inputs(4, 4099, dtype, seed=level)
    keys = R.abs_keys(R.task_vectors(base, models))
    high = keys >> (R.SHIFT[level] + R.DIGIT_BITS[level])
    common = [int(torch.mode(high[i]).values) for i in range(4)]
    prefixes = torch.tensor([[common[0], -1], [-1, common[1]], [common[2], common[2]],
                             [common[3], (1 << 31) - 1]])
    assert torch.equal(C.histogram(base, models, prefixes, level),
                       R.histogram(base, models, prefixes, level))


@pytest.mark.parametrize("N", [0, 1, 17, 1023, 1025, 4099], ids=ids("N"))
def test_histogram_sizes(N, threads):
    base, models = make_inputs(2, N, F16, seed=N)
    prefixes = torch.tensor([[0, 0], [0, -1]])
    assert torch.equal(C.histogram(base, models, prefixes, 0),
                       R.histogram(base, models, prefixes, 0))


@pytest.mark.parametrize("dtype", DTYPES, ids=ids("dtype"))
@pytest.mark.parametrize("kind", ["normal", "grid"], ids=ids("data"))
@pytest.mark.parametrize("density,slack", [(0.0, 0.0), (0.2, 0.0), (0.2, 0.05), (0.5, 0.5),
                                           (1.0, 0.1), (1.0, 0.0), (0.001, 0.0002)],
                         ids=lambda v: str(v))
def test_thresholds_exact(dtype, kind, density, slack):
    """find_thresholds over the C histogram == over the reference == by sorting."""
    base, models = make_inputs(3, 6007, dtype, seed=7, kind=kind)
    t, u = thresholds(base, models, density, slack)
    ref = find_thresholds(R.histogram, lambda: [(base, models)], Targets.of([density] * 3, [slack] * 3, 6007))
    assert (t, u) == ref


def test_thresholds_streamed_over_chunks():
    """scope='model': histograms summed over chunks give the population's exact thresholds."""
    base, models = make_inputs(2, 9000, BF16, seed=3)
    chunks = lambda: [(base[a:b], models[:, a:b]) for a, b in [(0, 1), (1, 4000), (4000, 9000)]]
    assert find_thresholds(C.histogram, chunks, Targets.of([0.3, 0.1], [0.02, 0.0], 9000)) == \
        find_thresholds(R.histogram, lambda: [(base, models)], Targets.of([0.3, 0.1], [0.02, 0.0], 9000))


# ---------------------------------------------------------------------------------------
# bracketing pass

def bounds_around(base, models, quantiles, off=()):
    """int64 [n, 2, 2]: slot j of model i brackets the keys between two sorted positions
    (quantiles[j] = (lo_q, hi_q), 1.0 = the largest key); (i, j) in ``off``: slot off."""
    keys = R.abs_keys(R.task_vectors(base, models)).sort(dim=1).values
    n, N = keys.shape
    bounds = torch.full((n, 2, 2), -1, dtype=torch.int64)
    for i in range(n):
        for j, (qlo, qhi) in enumerate(quantiles):
            if (i, j) not in off and N:
                pick = lambda q: int(keys[i, min(N - 1, int(q * N))])
                bounds[i, j] = torch.tensor([pick(qlo), pick(qhi)])
    return bounds


def check_bracket(base, models, bounds, cap):
    """Counts equal the reference's; the candidates are keys inside (all of them when they
    fit, else exactly cap of them); returns the counts."""
    got, cand = C.bracket(base, models, bounds, cap)
    want, everything = R.bracket(base, models, bounds, models.shape[1])
    assert torch.equal(got, want), f"(above, inside) differ:\n{got}\n{want}"
    for i in range(models.shape[0]):
        for j in range(2):
            inside = int(got[i, j, 1])
            mine = cand[i, j, :min(inside, cap)].sort(descending=True).values
            full = everything[i, j, :inside]
            if inside <= cap:
                assert torch.equal(mine, full), f"model {i} slot {j}: candidates differ"
            else:
                assert torch.isin(mine, full).all(), f"model {i} slot {j}: a key not inside"
    return got


@pytest.mark.parametrize("dtype", DTYPES, ids=ids("dtype"))
@pytest.mark.parametrize("kind", ["normal", "grid", "wide"], ids=ids("data"))
@pytest.mark.parametrize("n", [1, 3, 8], ids=ids("n_models"))
def test_bracket_equals_reference(dtype, kind, n, threads):
    base, models = make_inputs(n, 70001, dtype, seed=n, kind=kind)
    bounds = bounds_around(base, models, [(0.78, 0.82), (0.9, 1.0)], off={(0, 1)})
    check_bracket(base, models, bounds, 70001)


@pytest.mark.parametrize("N", [0, 1, 17, 1023, 1025, 4099], ids=ids("N"))
@pytest.mark.parametrize("cap", [0, 3, 100000], ids=ids("cap"))
def test_bracket_sizes_and_caps(N, cap, threads):
    """Odd sizes; candidates beyond cap are counted but not stored (and nothing overruns)."""
    base, models = make_inputs(2, N, BF16, seed=N)
    check_bracket(base, models, bounds_around(base, models, [(0.0, 0.5), (0.5, 1.0)]), cap)


def test_bracket_edges_ties_and_nonfinite(threads):
    """Whole key range, a single key value (all its ties), zeros, NaN and inf keys."""
    base, models = make_inputs(3, 5000, F16, seed=5, kind="grid")
    models[0, :7] = float("nan")
    models[1, 7:9] = float("inf")
    keys = R.abs_keys(R.task_vectors(base, models))
    tie = int(keys[2].median())
    bounds = torch.tensor([[[0, (1 << 32) - 1], [0, 0]],
                           [[0x7F800000, 0x7F800000], [tie, tie]],
                           [[tie, tie], [-1, 5]]])
    got = check_bracket(base, models, bounds, 5000)
    assert int(got[0, 0, 1]) == 5000 and int(got[1, 0, 1]) == 2


@pytest.mark.parametrize("bad,match", [
    ({"bounds": np.array([0, 1, 2, 1] * 2, np.int64)}, "lo <= hi"),
    ({"bounds": np.array([0, 1 << 32, 0, 1] * 2, np.int64)}, "2\\*\\*32"),
    ({"bounds": np.array([-2, 1, 0, 1] * 2, np.int64)}, "-1 \\(slot off\\)"),
    ({"bounds": np.zeros(7, np.int64)}, "bounds: 8 items"),
    ({"cand": np.zeros((2, 2, 5), np.float32)}, "int32 buffer"),
    ({"cand": np.zeros((2, 2, 4), np.int32)}, "cand: 20 items"),
    ({"counts": np.zeros(8, np.float64)}, "int64 buffer"), ({"cap": -1}, "cap must be"),
], ids=lambda v: next(iter(v)) if isinstance(v, dict) else None)
def test_bracket_rejects_bad_arguments(bad, match):
    ext, base, models, _, _ = _ext_args()
    kw = dict(base=base, models=models, n=2, N=10, base_dtype=ext.F32, models_dtype=ext.F32,
              bounds=np.array([0, 1] * 4, np.int64), cand=np.zeros((2, 2, 5), np.int32), cap=5,
              counts=np.zeros(8, np.int64))
    kw.update(bad)
    with pytest.raises(ValueError, match=match):
        ext.bracket(**kw)


# ---------------------------------------------------------------------------------------
# the fused merge

@pytest.mark.parametrize("N", [0, 1, 17, 255, 257, 1000, 1023, 1024, 1025, 4099], ids=ids("N"))
@pytest.mark.parametrize("dtype", DTYPES, ids=ids("dtype"))
@pytest.mark.parametrize("n", [2, 3], ids=ids("n_models"))   # 2: the fused loop, 3: general
def test_merge_sizes(N, dtype, n, threads):
    base, models = make_inputs(n, N, dtype, seed=N)
    t, u = thresholds(base, models, 0.2, 0.05) if N else ([INF] * n, [INF] * n)
    check_merge(base, models, ties_cfg(n, t, u), dtype)


@pytest.mark.parametrize("mode", ["ties", "task_arithmetic", "linear"], ids=ids("mode"))
@pytest.mark.parametrize("in_dtype", DTYPES, ids=ids("in"))
@pytest.mark.parametrize("out_dtype", DTYPES, ids=ids("out"))
def test_merge_dtypes(mode, in_dtype, out_dtype):
    base, models = make_inputs(3, 3001, in_dtype, seed=11)
    t, u = thresholds(base, models, 0.2, 0.05)
    cfg = mode_cfg(mode, WEIGHTS[:3], tuple(t), tuple(u))
    check_merge(None if mode == "linear" else base, models, cfg, out_dtype)


def test_merge_mixed_base_dtype():
    """Base stored in another dtype than the models (fp32 base, bf16 models)."""
    base, models = make_inputs(2, 2000, BF16, seed=5, base_dtype=F32)
    t, u = thresholds(base, models, 0.3, 0.1)
    check_merge(base, models, ties_cfg(2, t, u), BF16)


@pytest.mark.parametrize("n", range(1, 9), ids=ids("n_models"))
@pytest.mark.parametrize("elect", ["sum", "count"], ids=ids("elect"))
@pytest.mark.parametrize("normalize", [True, False], ids=ids("normalize"))
@pytest.mark.parametrize("slack", [0.0, 0.05], ids=ids("slack"))
def test_merge_ties_options(n, elect, normalize, slack):
    base, models = make_inputs(n, 2047, BF16, seed=n)
    t, u = thresholds(base, models, 0.25, slack)
    cfg = ties_cfg(n, t, u, elect_count=elect == "count", normalize=normalize)
    check_merge(base, models, cfg, BF16)


@pytest.mark.parametrize("n", [9, 13, 64], ids=ids("n_models"))
def test_merge_many_models(n):
    base, models = make_inputs(n, 1500, F16, seed=n, kind="grid")
    t, u = thresholds(base, models, 0.3, 0.05)
    check_merge(base, models, ties_cfg(n, t, u, weights=[WEIGHTS[i % 8] for i in range(n)]), F16)


@pytest.mark.parametrize("dtype", DTYPES, ids=ids("dtype"))
@pytest.mark.parametrize("density", [0.0, 0.1, 0.3, 1.0], ids=ids("density"))
@pytest.mark.parametrize("slack", [0.0, 0.1], ids=ids("slack"))
@pytest.mark.parametrize("elect", ["sum", "count"], ids=ids("elect"))
@pytest.mark.parametrize("n", [2, 4], ids=ids("n_models"))
def test_merge_ties_at_threshold_and_zeros(dtype, density, slack, elect, n, threads):
    """Grid data: |τ| ties at t and u (all tied entries kept), many τ == 0 (θ_i == θ_b)."""
    base, models = make_inputs(n, 3001, dtype, seed=2, kind="grid")
    t, u = thresholds(base, models, density, min(slack, density))
    _, counts = check_merge(base, models, ties_cfg(n, t, u, elect_count=elect == "count"), dtype)
    if 0 < density < 1:
        assert (counts[:, COUNTERS.index("kept")] > int(density * 3001)).any(), "no ties at t"


@pytest.mark.parametrize("mode", ["ties", "task_arithmetic", "linear"], ids=ids("mode"))
@pytest.mark.parametrize("scale", [0.5, 1.0, 2.7, -1.0], ids=ids("scale"))
@pytest.mark.parametrize("normalize", [True, False], ids=ids("normalize"))
def test_merge_scale_and_modes(mode, scale, normalize):
    base, models = make_inputs(3, 2500, F16, seed=4)
    t, u = thresholds(base, models, 0.2, 0.02)
    cfg = mode_cfg(mode, (0.5, 1.25, 1.0), tuple(t), tuple(u), scale, normalize)
    check_merge(None if mode == "linear" else base, models, cfg, F16)


@pytest.mark.parametrize("weights", [(0.5, 1.25), (1.0, 0.0), (0.75, -0.25), (1.0, -1.0)],
                         ids=lambda w: "w=" + ",".join(map(str, w)))
@pytest.mark.parametrize("mode", ["ties", "task_arithmetic", "linear"], ids=ids("mode"))
def test_merge_weights(weights, mode):
    """Per-model weights, including a zero weight and weights that sum to zero."""
    base, models = make_inputs(2, 2000, F32, seed=9, kind="grid")
    t, u = thresholds(base, models, 0.4, 0.1)
    cfg = mode_cfg(mode, weights, tuple(t), tuple(u))
    check_merge(None if mode == "linear" else base, models, cfg, F32)


def test_slack_flips_election():
    """TIES-SV: model 0's protected entry wins the election that plain TIES gives to model 1.

    Entry 0: τ_0 = +1/8 (model 0's largest, protected), τ_1 = −3/8 (kept, not protected:
    model 1's protected entries are its ±1 elsewhere). Plain TIES elects −, TIES-SV elects +.
    """
    N = 64
    base = torch.zeros(N, dtype=F16)
    models = torch.zeros(2, N, dtype=F16)
    models[0, 0], models[1, 0] = 0.125, -0.375
    models[0, 1:9] = 0.0625
    models[1, 1:9] = 1.0
    t, u = [0.0625, 0.375], [0.125, 1.0]
    for slack, winner in [(True, 0.125), (False, -0.375)]:
        cfg = ties_cfg(2, t, u if slack else [INF, INF], weights=[1.0, 1.0])
        out, counts = check_merge(base, models, cfg, F16)
        assert float(out[0]) == winner
        c = dict(zip(COUNTERS, counts[0].tolist()))
        if slack:   # model 0 keeps its protected entry; plain TIES would have dropped it
            assert (c["protected"], c["important_dropped"], c["ties_important_dropped"]) == (1, 0, 1)
        else:
            assert (c["protected"], c["dropped_by_sign"]) == (0, 1)


@pytest.mark.parametrize("mode", ["ties", "task_arithmetic", "linear"], ids=ids("mode"))
@pytest.mark.parametrize("dtype", DTYPES, ids=ids("dtype"))
@pytest.mark.parametrize("slack", [False, True], ids=ids("slack"))
@pytest.mark.parametrize("n", [2, 3], ids=ids("n_models"))
def test_merge_nonfinite_counted(mode, dtype, slack, n, threads):
    """NaN / ±inf in models and base: counted per model, propagated as the reference does."""
    base, models = make_inputs(n, 3000, dtype, seed=1)
    t, u = thresholds(base, models, 0.2, 0.05)
    models[0, 5], models[1, 5], models[n - 1, 1500] = float("nan"), INF, -INF
    models[1, 2999], base[2100] = float("nan"), INF
    cfg = mode_cfg(mode, WEIGHTS[:n], tuple(t), tuple(u) if slack else (INF,) * n)
    _, counts = check_merge(None if mode == "linear" else base, models, cfg, dtype)
    want = {2: [1, 3], 3: [1, 2, 1]}[n] if mode == "linear" else {2: [2, 4], 3: [2, 3, 2]}[n]
    assert counts[:, COUNTERS.index("nonfinite")].tolist() == want


def test_threads_are_deterministic():
    base, models = make_inputs(4, 50_001, BF16, seed=12)
    t, u = thresholds(base, models, 0.2, 0.05)
    cfg = ties_cfg(4, t, u)
    results = []
    for nt in (1, 2, 3):
        C.set_num_threads(nt)
        out = torch.empty(50_001, dtype=BF16)
        results.append((out, C.merge(base, models, out, cfg),
                        C.histogram(base, models, torch.tensor([[0, -1]] * 4), 0)))
    C.set_num_threads(0)
    for out, counts, hist in results[1:]:
        assert torch.equal(out.view(torch.int16), results[0][0].view(torch.int16))
        assert torch.equal(counts, results[0][1]) and torch.equal(hist, results[0][2])


def test_models_as_sequence_and_in_place():
    """models may be a list of 1-D tensors (no stacking); out may be the base itself."""
    base, models = make_inputs(3, 3000, F16, seed=6)
    t, u = thresholds(base, models, 0.2, 0.05)
    cfg = ties_cfg(3, t, u)
    expected = torch.empty(3000, dtype=F16)
    want = C.merge(base, models, expected, cfg)
    assert torch.equal(C.merge(base, list(models), torch.empty_like(expected), cfg), want)
    assert torch.equal(C.histogram(base, list(models), torch.tensor([[0, 0]] * 3), 0),
                       C.histogram(base, models, torch.tensor([[0, 0]] * 3), 0))
    in_place = base.clone()
    assert torch.equal(C.merge(in_place, models, in_place, cfg), want)
    assert torch.equal(in_place.view(torch.int16), expected.view(torch.int16))


# ---------------------------------------------------------------------------------------
# argument validation: a clear ValueError, never a crash or a stray write

def _ext_args(N=10, n=2):
    ext = C._module()
    base = np.zeros(N, np.float32)
    models = np.zeros((n, N), np.float32)
    out = np.zeros(N, np.float32)
    counts = np.zeros((n, 7), np.int64)
    return ext, base, models, out, counts


@pytest.mark.parametrize("bad,match", [
    ({"n": 0}, "n \\(number of models\\)"), ({"n": 65}, "n \\(number of models\\)"),
    ({"N": -1}, "N \\(entries"), ({"N": 11}, "items expected"),
    ({"models_dtype": 7}, "unknown dtype"), ({"out_dtype": -1}, "unknown dtype"),
    ({"models_dtype": 1}, "items of 2 bytes"), ({"elect": 3}, "elect must be"),
    ({"weights": (1.0,)}, "2 values expected"), ({"weights": (1.0, float("nan"))}, "finite"),
    ({"t": None}, "needs trim thresholds"), ({"t": 5}, "sequence"),
    ({"t": (0.1, 0.0)}, r"t\[0\] = 0.1: must be an fp32 value"),
    ({"t": (-1.0, 0.0)}, "must be an fp32 value >= 0"),
    ({"u": (float("nan"), 0.0)}, "not NaN"), ({"scale": float("inf")}, "scale = inf"),
    ({"elect": 0}, "slack thresholds u need a sign election"),
    ({"on_base": False}, "base must be None"),
    ({"counts": np.zeros((2, 6), np.int64)}, "counts: 14 items"),
    ({"counts": np.zeros((2, 7), np.float64)}, "int64 buffer"),
    ({"base": None}, "on_base needs a base"), ({"threads": -1}, "threads"),
    ({"out": np.zeros(10, np.float64)}, "items of 4 bytes"),
], ids=lambda v: next(iter(v)) if isinstance(v, dict) else None)
def test_merge_rejects_bad_arguments(bad, match):
    ext, base, models, out, counts = _ext_args()
    kw = dict(base=base, models=models, out=out, n=2, N=10, base_dtype=ext.F32,
              models_dtype=ext.F32, out_dtype=ext.F32, on_base=True, elect=ext.ELECT_SUM,
              normalize=True, weights=(1.0, 1.0), t=(0.0, 0.0), u=(INF, INF), scale=1.0,
              counts=counts)
    kw.update(bad)
    with pytest.raises(ValueError, match=match):
        ext.merge(**kw)


def test_merge_rejects_overlaps_and_readonly():
    ext, base, models, out, counts = _ext_args(N=10)
    kw = dict(n=2, N=10, base_dtype=ext.F32, models_dtype=ext.F32, out_dtype=ext.F32,
              on_base=True, elect=ext.ELECT_SUM, normalize=True, weights=(1.0, 1.0),
              t=(0.0, 0.0), u=(INF, INF), scale=1.0, counts=counts)
    shifted = np.zeros(11, np.float32)
    with pytest.raises(ValueError, match="partially overlaps"):
        ext.merge(base=shifted[:10], models=models, out=shifted[1:], **kw)
    readonly = np.zeros(10, np.float32)
    readonly.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        ext.merge(base=base, models=models, out=readonly, **kw)
    with pytest.raises(ValueError, match="C-contiguous"):
        ext.merge(base=np.zeros(20, np.float32)[::2], models=models, out=out, **kw)
    with pytest.raises(ValueError, match="sequence of 3 buffers"):
        ext.merge(base=base, models=[base, base, base], out=out, **kw)


@pytest.mark.parametrize("bad,match", [
    ({"level": 3}, "level must be"), ({"prefixes": np.zeros(4, np.float32)}, "prefixes"),
    ({"prefixes": np.zeros(3, np.int64)}, "prefixes"),
    ({"prefixes": np.array([0, -2, 0, 0])}, "must be >= 0 or -1"),
    ({"out": np.zeros((2, 2, 2047), np.int64)}, "out: 8192 items"),
    ({"out": np.zeros((2, 2, NBINS), np.float64)}, "int64 buffer"),
    ({"base_dtype": 3}, "unknown dtype"),
], ids=lambda v: next(iter(v)) if isinstance(v, dict) else None)
def test_histogram_rejects_bad_arguments(bad, match):
    ext, base, models, _, _ = _ext_args()
    kw = dict(base=base, models=models, n=2, N=10, base_dtype=ext.F32, models_dtype=ext.F32,
              prefixes=np.zeros(4, np.int64), level=0, out=np.zeros((2, 2, NBINS), np.int64))
    kw.update(bad)
    with pytest.raises(ValueError, match=match):
        ext.histogram(**kw)


def test_outputs_must_not_overlap_inputs():
    """histogram's out, bracket's cand / counts and merge's counts: no aliasing allowed."""
    ext = C._module()
    base, models = np.zeros(10, np.float32), np.zeros((2, 10), np.float32)
    kw = dict(n=2, N=10, base_dtype=ext.F32, models_dtype=ext.F32)
    bounds = np.array([0, 1] * 4, np.int64)
    with pytest.raises(ValueError, match="counts: overlaps another buffer"):
        ext.bracket(base=base, models=models, bounds=bounds, cand=np.zeros(4, np.int32), cap=1,
                    counts=bounds, **kw)
    cand = np.zeros(16, np.int32)
    with pytest.raises(ValueError, match="counts: overlaps another buffer"):
        ext.bracket(base=base, models=models, bounds=bounds, cand=cand[:4], cap=1,
                    counts=cand.view(np.int64), **kw)
    counts = np.zeros((2, 7), np.int64)
    with pytest.raises(ValueError, match="counts: overlaps another buffer"):
        ext.merge(base=counts.view(np.float32)[0, :10], models=models, out=np.zeros(10, np.float32),
                  out_dtype=ext.F32, on_base=True, elect=ext.ELECT_SUM, normalize=True,
                  weights=(1.0, 1.0), t=(0.0, 0.0), u=(INF, INF), scale=1.0, counts=counts, **kw)
    hist = np.zeros((2, 2, NBINS), np.int64)
    with pytest.raises(ValueError, match="out: overlaps another buffer"):
        ext.histogram(base=hist.view(np.float32).reshape(-1)[:10], models=models,
                      prefixes=np.zeros(4, np.int64), level=0, out=hist, **kw)


def test_backend_rejects_bad_tensors():
    base, models = make_inputs(2, 100, F16)
    cfg = ties_cfg(2, [0.0, 0.0], [INF, INF])
    with pytest.raises(ValueError, match="contiguous"):
        C.merge(base, models, torch.empty(200, dtype=F16)[::2], cfg)
    with pytest.raises(ValueError, match="not supported"):
        C.merge(base.double(), models, torch.empty(100, dtype=F16), cfg)
    with pytest.raises(ValueError, match="weights for"):
        C.merge(base, models, torch.empty(100, dtype=F16), ties_cfg(3, [0.0] * 3, [INF] * 3))


def test_backend_registry_contract():
    from fastmerge.backends import load
    assert load("c") is C and C.NAME == "c" and C.DEVICES("cpu") == ("cpu",)
    assert C.unavailable_reason() is None


# ---------------------------------------------------------------------------------------
# the kernels' own fp16 / bf16 <-> fp32 conversions, exhaustively against torch

def _convert(src: torch.Tensor, dst_dtype: torch.dtype) -> torch.Tensor:
    ext = C._module()
    codes = {F32: ext.F32, F16: ext.F16, BF16: ext.BF16}
    dst = torch.empty(src.numel(), dtype=dst_dtype)
    ext.convert(C._buffer(src, "src"), codes[src.dtype], C._buffer(dst, "dst"),
                codes[dst_dtype], src.numel())
    return dst


def _assert_same_bits(actual: torch.Tensor, expected: torch.Tensor, src: torch.Tensor, what):
    """Bit-identical, except that NaN only has to stay NaN (torch's NaN payloads vary by path)."""
    int_t = torch.int32 if actual.dtype == F32 else torch.int16
    a, e = actual.view(int_t), expected.view(int_t)
    nan_a, nan_e = torch.isnan(actual.float()), torch.isnan(expected.float())
    assert torch.equal(nan_a, nan_e), f"{what}: NaN-ness differs at {(nan_a != nan_e).nonzero()[:5]}"
    bad = (a != e) & ~nan_e
    if bad.any():
        i = bad.nonzero().flatten()[:5]
        src_bits = src.view(torch.int32 if src.dtype == F32 else torch.int16)
        raise AssertionError(f"{what}: {int(bad.sum())} mismatches, e.g. src bits "
                             f"{[hex(int(x) & 0xFFFFFFFF) for x in src_bits[i]]}: got "
                             f"{[hex(int(x) & 0xFFFF_FFFF) for x in a[i]]} want "
                             f"{[hex(int(x) & 0xFFFF_FFFF) for x in e[i]]}")


@pytest.mark.parametrize("dtype", [F16, BF16], ids=ids("dtype"))
def test_widening_all_bit_patterns(dtype):
    src = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(dtype)
    got = _convert(src, F32)
    _assert_same_bits(got, src.float(), src, f"{NAME[dtype]} -> fp32")
    if dtype == F16:   # NaN is quieted, sign and payload kept (as x86 F16C does)
        assert ((got.view(torch.int32)[torch.isnan(got)] & 0x00400000) != 0).all()


def _halfway_cases(dtype) -> torch.Tensor:
    """fp32 values exactly between two neighbouring finite ``dtype`` values (and ±1 ulp)."""
    pos = torch.arange(0x7F80 if dtype == BF16 else 0x7C00, dtype=torch.int32)
    lo = pos.to(torch.int16).view(dtype).double()
    hi = (pos + 1).to(torch.int16).view(dtype).double()
    if dtype == F16:
        hi[-1] = 65536.0          # past the largest finite fp16: the halfway point rounds to inf
    else:
        hi[-1] = 2.0 ** 128
    mid = ((lo + hi) / 2).to(F32)
    assert torch.equal(mid.double(), (lo + hi) / 2), "halfway points must be exact in fp32"
    mid_bits = mid.view(torch.int32)
    near = torch.cat([mid_bits, mid_bits - 1, mid_bits + 1])
    near = near[(near & 0x7FFFFFFF) <= 0x7F800000]
    return torch.cat([near, near | torch.tensor(-(2 ** 31), dtype=torch.int32)]).view(F32)


@pytest.mark.parametrize("dtype", [F16, BF16], ids=ids("dtype"))
def test_narrowing_halfway_cases(dtype):
    src = _halfway_cases(dtype)
    _assert_same_bits(_convert(src, dtype), src.to(dtype), src, f"fp32 -> {NAME[dtype]} halfway")


@pytest.mark.parametrize("dtype", [F16, BF16], ids=ids("dtype"))
def test_narrowing_random_and_special_bit_patterns(dtype):
    g = torch.Generator().manual_seed(2024)
    rand = torch.randint(-(2 ** 31), 2 ** 31, (2_000_000,), generator=g, dtype=torch.int64)
    specials = torch.tensor([0, 0x00000001, 0x007FFFFF, 0x00800000, 0x33000000, 0x33000001,
                             0x337FFFFF, 0x38800000, 0x387FFFFF, 0x477FEFFF, 0x477FF000,
                             0x477FFFFF, 0x47800000, 0x7F7FFFFF, 0x7F7F8000, 0x7F800000,
                             0x7F800001, 0x7FC00000, 0x7FFFFFFF], dtype=torch.int64)
    bits = torch.cat([rand, specials, specials | (1 << 31)])
    bits = torch.where(bits >= 2 ** 31, bits - 2 ** 32, bits).to(torch.int32)
    src = bits.view(F32)
    _assert_same_bits(_convert(src, dtype), src.to(dtype), src, f"fp32 -> {NAME[dtype]}")


def test_fp32_round_trip_is_identity():
    g = torch.Generator().manual_seed(1)
    src = torch.randint(-(2 ** 31), 2 ** 31 - 1, (100_000,), generator=g,
                        dtype=torch.int64).to(torch.int32).view(F32)
    assert torch.equal(_convert(src, F32).view(torch.int32), src.view(torch.int32))


# ---------------------------------------------------------------------------------------
# the merge's output rounding: fp64 -> fp16 / bf16 / fp32, rounded once

def _doubles_near_every_rounding_boundary() -> torch.Tensor:
    """fp64 values over ~300 binades, values on the fp16 and bf16 halfway grids (normal and
    subnormal) and their fp64 neighbours (where rounding through fp32 goes wrong), and
    specials: overflow edges, ±0, ±inf, NaN, fp64 subnormals."""
    g = torch.Generator().manual_seed(7)
    f64 = torch.float64
    up, down = torch.tensor(float("inf"), dtype=f64), torch.tensor(-float("inf"), dtype=f64)
    parts = [torch.randn(200_000, generator=g, dtype=f64)
             * torch.exp2(torch.randint(-160, 140, (200_000,), generator=g).double())]
    for mant, emin in ((10, -24), (7, -133)):
        grid = torch.round(torch.randn(50_000, generator=g, dtype=f64) * 2 ** (mant + 1)) / 2 ** (mant + 1)
        sub = torch.randint(0, 4096, (20_000,), generator=g).double() * 2.0 ** (emin - 1)
        for x in [grid * 2.0 ** sh for sh in (-30, -10, -3, 0, 5, 14)] + [sub, -sub]:
            parts += [x, torch.nextafter(x, up), torch.nextafter(x, down)]
    parts.append(torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 65504.0,
                               65519.99, 65520.0, 3.3961e38, 3.4e38, 1e300, -1e300, 2 ** -14,
                               2 ** -126, 2 ** -133, 2 ** -134, 2 ** -25, 5e-324], dtype=f64))
    return torch.cat(parts).contiguous()


@pytest.mark.parametrize("dtype", [F16, BF16, F32], ids=ids("dtype"))
def test_fp64_output_rounding_is_one_rounding(dtype):
    """The kernels' fp64 -> dtype store equals the reference's round_once bit for bit, and
    for fp16 also numpy's direct fp64 -> fp16 conversion (an independent single rounding;
    torch's own .to(float16) rounds twice, through fp32, and differs on the halfway cases)."""
    ext = C._module()
    x = _doubles_near_every_rounding_boundary()
    got = torch.empty(x.numel(), dtype=dtype)
    ext.convert(x.numpy(), ext.F64, C._buffer(got, "dst"),
                {F32: ext.F32, F16: ext.F16, BF16: ext.BF16}[dtype], x.numel())
    _assert_same_bits(got, R.round_once(x, dtype), x.float(), f"fp64 -> {NAME[dtype]}")
    if dtype == F16:
        with np.errstate(over="ignore"):                 # overflow to inf is expected
            direct = torch.from_numpy(x.numpy().astype(np.float16))
        _assert_same_bits(got, direct, x.float(), "fp64 -> fp16 (numpy)")
        assert not torch.equal(x.to(F16).view(torch.int16), direct.view(torch.int16))
