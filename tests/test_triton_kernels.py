"""The Triton kernels (kernels/triton_merge.py) against the reference, on the CPU interpreter.

docs/spec.md §10's bar: histograms, thresholds and counters identical to fastmerge.reference,
outputs within one ulp of the output dtype (plus the fp32 evaluation error at the
operands' size, see tests/checks.py). Weights are dyadic (0.5, 1.25, ...) so fp32 and
fp64 elections agree. TRITON_INTERPRET=1 is set before Triton is imported; the launchers'
``block`` / ``programs`` / ``window`` overrides make small inputs span several blocks,
grid-stride iterations and both histogram paths (dense window and sparse atomics).
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import inspect  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from fastmerge import reference as R  # noqa: E402
from fastmerge.kernel_api import (DIGIT_BITS, NBINS, NONFINITE, NONFINITE_BIN,  # noqa: E402
                                  SHIFT)
from fastmerge.kernels import triton_merge as T  # noqa: E402
from fastmerge.select import RadixSelect, Targets  # noqa: E402
from tests import checks  # noqa: E402
from tests.checks import (compile_for_sm90, make_inputs, mode_cfg,  # noqa: E402
                          thresholds_checked, ties_cfg)

pytestmark = [pytest.mark.interpreter,
              # NaN / inf inputs on purpose: numpy warns inside the interpreter
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")]

if not isinstance(T._merge_kernel, triton.runtime.interpreter.InterpretedFunction):
    pytest.skip("fastmerge.kernels.triton_merge was imported before TRITON_INTERPRET=1 was set "
                "(run this file on its own: pytest -m interpreter)", allow_module_level=True)

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
DTYPES = [F16, BF16, F32]
NAME = {F16: "fp16", BF16: "bf16", F32: "fp32"}
INF = float("inf")
SMALL = dict(block=256, programs=2)                      # several blocks and iterations


def ids(name):
    return lambda v: f"{name}={NAME.get(v, v)}"


# ---------------------------------------------------------------------------------------
# inputs and checks

def thresholds(base, models, density, slack, **launch):
    """(t, u) by the Triton histogram (launch overrides passed through); checked against
    the reference histogram and against sorting."""
    return thresholds_checked(lambda b, m, p, lv: T.histogram(b, m, p, lv, **launch),
                              base, models, density, slack)




def check_merge(base, models, cfg, out_dtype, **launch):
    return checks.check_merge(lambda b, m, o, c: T.merge(b, m, o, c, **launch),
                              base, models, cfg, out_dtype)


def reference_prefixes(base, models, density, slack):
    """The (level, prefixes) sequence RadixSelect asks for, driven by the reference."""
    n, N = models.shape
    sel = RadixSelect.of(Targets.of([density] * n, [slack] * n, N))
    steps = []
    while not sel.done:
        steps.append((sel.level, sel.prefixes()))
        sel.update(R.histogram(base, models, sel.prefixes(), sel.level))
    return steps


# ---------------------------------------------------------------------------------------
# histogram

@pytest.mark.parametrize("dtype", DTYPES, ids=ids("dtype"))
@pytest.mark.parametrize("kind", ["normal", "grid", "wide"], ids=ids("data"))
@pytest.mark.parametrize("n", [1, 3], ids=ids("n_models"))
def test_histogram_equals_reference_every_level(dtype, kind, n):
    base, models = make_inputs(n, 1000, dtype, seed=n, kind=kind)
    steps = reference_prefixes(base, models, 0.2, 0.05)
    assert [lv for lv, _ in steps] == [0, 1, 2]
    for level, prefixes in steps:
        got = T.histogram(base, models, prefixes, level, **SMALL)
        assert got.dtype == torch.int64 and got.shape == (n, 2, NBINS)
        assert torch.equal(got, R.histogram(base, models, prefixes, level)), f"level {level}"


@pytest.mark.parametrize("window", [32, 128], ids=ids("window"))
@pytest.mark.parametrize("level", [0, 1, 2], ids=ids("level"))
def test_histogram_dense_and_sparse_paths(window, level):
    """Both slots at once; hot bins and zeros; prefixes that match many, few or no entries."""
    base, models = make_inputs(2, 3001, F16, seed=7, kind="wide")
    models[0, ::5] = base[::5]                                   # many τ = 0
    keys = R.abs_keys(R.task_vectors(base, models))
    hi = SHIFT[level] + DIGIT_BITS[level]
    common = [int(torch.mode(keys[i] >> hi).values) for i in range(2)]
    prefixes = torch.tensor([[common[0], 12345 if level else -1],
                             [-1 if level else 0, common[1]]], dtype=torch.int32)
    for block in (256, 1024):
        got = T.histogram(base, models, prefixes, level, block=block, programs=3, window=window)
        assert torch.equal(got, R.histogram(base, models, prefixes, level))


@pytest.mark.parametrize("N", [1, 17, 257, 1000], ids=ids("N"))
def test_histogram_odd_sizes(N):
    base, models = make_inputs(2, N, BF16, seed=N)
    prefixes = torch.tensor([[0, -1], [0, -1]], dtype=torch.int32)
    assert torch.equal(T.histogram(base, models, prefixes, 0, **SMALL),
                       R.histogram(base, models, prefixes, 0))


def test_histogram_empty_and_all_slots_off():
    base, models = torch.empty(0, dtype=F16), torch.empty(2, 0, dtype=F16)
    on = torch.zeros(2, 2, dtype=torch.int32)
    empty = T.histogram(base, models, on, 0)
    assert torch.equal(empty, torch.zeros(2, 2, NBINS, dtype=torch.int64))
    base, models = make_inputs(2, 100, F16)
    off = torch.full((2, 2), -1, dtype=torch.int32)
    assert not T.histogram(base, models, off, 1).any()


def test_histogram_nonfinite_land_in_nonfinite_bins():
    """Finite keys exactly; NaN/inf keys in bins >= NONFINITE_BIN (NaN payloads may differ)."""
    base, models = make_inputs(2, 600, F32, seed=3)
    models[0, :7] = float("nan")
    models[1, 10:13] = INF
    base[20] = -INF
    prefixes = torch.tensor([[0, -1], [0, -1]], dtype=torch.int32)
    got = T.histogram(base, models, prefixes, 0, **SMALL)
    want = R.histogram(base, models, prefixes, 0)
    assert torch.equal(got[:, :, :NONFINITE_BIN], want[:, :, :NONFINITE_BIN])
    assert torch.equal(got[:, :, NONFINITE_BIN:].sum(-1), want[:, :, NONFINITE_BIN:].sum(-1))
    assert got[:, 0, NONFINITE_BIN:].sum(-1).tolist() == [8, 4]


@pytest.mark.parametrize("dtype", DTYPES, ids=ids("dtype"))
@pytest.mark.parametrize("density,slack", [(0.2, 0.05), (0.0, 0.0), (1.0, 0.1), (0.001, 0.001),
                                           (0.9, 0.0)], ids=lambda v: f"{v}")
def test_thresholds_bit_identical(dtype, density, slack):
    base, models = make_inputs(3, 1000, dtype, seed=11, kind="grid" if density == 0.9 else "normal")
    thresholds(base, models, density, slack, **SMALL)


# ---------------------------------------------------------------------------------------
# merge: TIES / TIES-SV

@pytest.mark.parametrize("dtype,out_dtype", [(F16, F16), (BF16, BF16), (F32, F32), (F16, F32),
                                             (BF16, F16), (F32, BF16)],
                         ids=lambda v: NAME[v])
@pytest.mark.parametrize("slack", [0.0, 0.05], ids=ids("slack"))
def test_ties_dtypes(dtype, out_dtype, slack):
    base, models = make_inputs(3, 1000, dtype, seed=1)
    t, u = thresholds(base, models, 0.2, slack)
    check_merge(base, models, ties_cfg(3, t, u), out_dtype, **SMALL)


@pytest.mark.parametrize("n", [1, 2, 3, 8], ids=ids("n_models"))
@pytest.mark.parametrize("elect", ["sum", "count"], ids=ids("elect"))
@pytest.mark.parametrize("normalize", [True, False], ids=ids("normalize"))
@pytest.mark.parametrize("slack", [0.0, 0.1], ids=ids("slack"))
def test_ties_modes(n, elect, normalize, slack):
    base, models = make_inputs(n, 777, F16, seed=n, kind="grid" if elect == "count" else "normal")
    t, u = thresholds(base, models, 0.3, slack)
    check_merge(base, models, ties_cfg(n, t, u, elect_count=elect == "count",
                                       normalize=normalize, scale=0.75), F16, **SMALL)


@pytest.mark.parametrize("N", [1, 17, 1000, 1025], ids=ids("N"))
def test_ties_odd_sizes_default_launch(N):
    base, models = make_inputs(2, N, BF16, seed=N)
    t, u = thresholds(base, models, 0.2, 0.05)
    check_merge(base, models, ties_cfg(2, t, u), BF16)


@pytest.mark.parametrize("density", [0.0, 1.0], ids=ids("density"))
def test_ties_density_edges(density):
    base, models = make_inputs(2, 500, F32, seed=5)
    t, u = thresholds(base, models, density, 0.0)
    assert t == ([INF] * 2 if density == 0 else [0.0] * 2)
    _, counts = check_merge(base, models, ties_cfg(2, t, u), F32, **SMALL)
    assert counts[:, 0].tolist() == ([0, 0] if density == 0 else [500, 500])


def test_ties_threshold_ties_and_zeros():
    """Grid data: many |τ| equal to t_i (all kept), exact zeros (never selected / dropped)."""
    base, models = make_inputs(3, 999, F16, seed=2, kind="grid")
    t, u = thresholds(base, models, 0.25, 0.05)
    abs_tau = R.task_vectors(base, models).abs()
    assert all(int((abs_tau[i] == t[i]).sum()) > 10 for i in range(3))
    _, counts = check_merge(base, models, ties_cfg(3, t, u, weights=(1.0, 1.0, 1.0)), F16, **SMALL)
    assert (counts[:, 0] > 0.25 * 999).all()       # every tie at t_i is kept


def test_slack_flips_the_election():
    """Model 0's protected entry is out-voted under TIES, kept under TIES-SV."""
    base = torch.zeros(8, dtype=F32)
    models = torch.tensor([[1.0, 0.5, -0.25, 0.125, 0.0, 0.75, -1.0, 0.0625],
                           [-0.75, -0.5, 0.25, 0.125, 0.5, -0.5, 0.5, 0.0]], dtype=F32)
    w = (1.0, 2.0)                       # G_ties(entry 0) = 1 - 1.5 < 0
    plain = ties_cfg(2, [0.0, 0.0], [INF, INF], weights=w)
    sv = ties_cfg(2, [0.0, 0.0], [1.0, INF], weights=w)      # protects only |τ_0| >= 1
    out_plain, c_plain = check_merge(base, models, plain, F32)
    out_sv, c_sv = check_merge(base, models, sv, F32)
    assert out_plain[0] == -0.75 and out_sv[0] == 1.0
    # model 0 protects entries 0 and 6; plain TIES drops both, TIES-SV neither
    assert c_sv[0, :2].tolist() == [8, 2]                  # kept, protected
    assert c_sv[0, 4] == 0 and c_sv[0, 5] == 2             # important / ties_important_dropped


def test_ties_base_dtype_differs_and_weights():
    base, models = make_inputs(3, 600, BF16, seed=4, base_dtype=F32)
    t, u = thresholds(base, models, 0.2, 0.05)
    check_merge(base, models, ties_cfg(3, t, u, weights=(0.5, 1.25, 2.0), scale=1.5), F16,
                **SMALL)


@pytest.mark.parametrize("slack", [0.0, 0.1], ids=ids("slack"))
@pytest.mark.parametrize("elect", ["sum", "count"], ids=ids("elect"))
def test_ties_nonfinite(slack, elect):
    """NaN / ±inf τ: counted by `nonfinite`, everything else as the reference has it."""
    base, models = make_inputs(3, 700, F32, seed=9)
    t, u = thresholds(base, models, 0.2, slack)
    models[0, 3], models[1, 3], models[2, 40] = INF, -INF, float("nan")
    models[0, 300], base[500] = float("nan"), INF
    _, counts = check_merge(base, models, ties_cfg(3, t, u, elect_count=elect == "count"), F32,
                            **SMALL)
    assert counts[:, NONFINITE].tolist() == [3, 2, 2]


# ---------------------------------------------------------------------------------------
# merge: linear / task arithmetic

@pytest.mark.parametrize("mode", ["linear", "task_arithmetic"], ids=ids("mode"))
@pytest.mark.parametrize("normalize", [True, False], ids=ids("normalize"))
@pytest.mark.parametrize("dtype,out_dtype", [(F16, F16), (BF16, F32), (F32, BF16)],
                         ids=lambda v: NAME[v])
def test_linear_and_task_arithmetic(mode, normalize, dtype, out_dtype):
    base, models = make_inputs(3, 1000, dtype, seed=6)
    cfg = mode_cfg(mode, (1.0, 0.5, 1.25), (0.0,) * 3, (INF,) * 3, 0.5, normalize)
    check_merge(None if mode == "linear" else base, models, cfg, out_dtype, **SMALL)


def test_task_arithmetic_zero_weight_sum_does_not_divide():
    base, models = make_inputs(2, 300, F32, seed=8)
    cfg = mode_cfg("task_arithmetic", (1.0, -1.0), (0.0,) * 2, (INF,) * 2, 1.0, True)
    check_merge(base, models, cfg, F32)


@pytest.mark.parametrize("mode", ["linear", "task_arithmetic"], ids=ids("mode"))
def test_nonfinite_counter_sum_modes(mode):
    base, models = make_inputs(2, 500, F16, seed=10)
    models[0, 5], models[1, 6], models[1, 7] = INF, float("nan"), -INF
    cfg = mode_cfg(mode, (1.0, 0.5), (0.0,) * 2, (INF,) * 2, 1.0, True)
    _, counts = check_merge(None if mode == "linear" else base, models, cfg, F16, **SMALL)
    assert counts[:, NONFINITE].tolist() == [1, 2] and not counts[:, :NONFINITE].any()


def test_empty_tensor_launches_nothing():
    base, models, out = torch.empty(0, dtype=F16), torch.empty(3, 0, dtype=F16), torch.empty(0)
    counts = T.merge(base, models, out, ties_cfg(3, [0.0] * 3, [INF] * 3))
    assert counts.shape == (3, 7) and counts.dtype == torch.int64 and not counts.any()


def test_rejects_bad_arguments():
    base, models = make_inputs(2, 10, F16)
    with pytest.raises(ValueError, match="1 to 8"):
        T.merge(base, models.new_zeros(9, 10), torch.empty(10),
                ties_cfg(9, [0.0] * 9, [INF] * 9, weights=[1.0] * 9))
    with pytest.raises(ValueError, match="entries"):
        T.merge(base, models, torch.empty(11), ties_cfg(2, [0.0] * 2, [INF] * 2))
    with pytest.raises(ValueError, match="dtype"):
        T.histogram(base.double(), models, torch.zeros(2, 2, dtype=torch.int32), 0)


# ---------------------------------------------------------------------------------------
# rounding, int64 offsets, GPU compilation

def _halfway_cases():
    """fp32 values at, just below and just above every kind of bf16 / fp16 rounding tie."""
    g = torch.Generator().manual_seed(0)
    hi = torch.randint(0, 1 << 16, (3000,), generator=g, dtype=torch.int64) << 16
    bits = torch.cat([hi | 0x8000, hi | 0x7FFF, hi | 0x8001, hi, hi | 0x18000,
                      torch.tensor([0x7F7F8000, 0xFF7F8000, 0x7F7FFFFF, 0x00008000, 0x80018000,
                                    0x7F800000, 0x7FC00000, 0x7FA00001, 0xFFFFFFFF])])
    f32 = (bits & 0xFFFFFFFF).to(torch.int64)
    f32 = torch.where(f32 >= 1 << 31, f32 - (1 << 32), f32).to(torch.int32).view(F32)
    # fp16 ties: an fp16 value plus half of its ulp (and the neighbours)
    h = torch.randint(0, 1 << 16, (3000,), generator=g).to(torch.int16).view(F16).float()
    h = h[torch.isfinite(h)].double()
    _, e = torch.frexp(h)
    half_ulp = torch.ldexp(torch.ones_like(h), torch.clamp(e - 1, min=-14) - 11)
    ties16 = torch.cat([h + half_ulp, h - half_ulp, h + 0.999 * half_ulp]).float()
    return torch.cat([f32, ties16, torch.tensor([65519.0, 65520.0, -65520.0, 2.0 ** -25])])


@pytest.mark.parametrize("out_dtype", [BF16, F16], ids=ids("out"))
def test_output_rounding_is_nearest_even(out_dtype):
    """The kernel's own fp32 → bf16/fp16 rounding, bit for bit against torch (not the
    interpreter's conversion: its fp32 → bf16 cast truncates)."""
    x = _halfway_cases()
    cfg = mode_cfg("linear", (1.0,), (0.0,), (INF,), 1.0, False)
    out = torch.empty(x.numel(), dtype=out_dtype)
    T.merge(None, x.unsqueeze(0).contiguous(), out, cfg, block=1024)
    want = x.to(out_dtype)
    nan = torch.isnan(want.float())
    assert torch.equal(torch.isnan(out.float()), nan)
    same = out.view(torch.int16) == want.view(torch.int16)
    bad = (~same & ~nan).nonzero().flatten()
    assert bad.numel() == 0, [(x[i].item(), out[i].item(), want[i].item()) for i in bad[:5]]


@triton.jit
def _offsets_probe(out_ptr, blk, N, BLOCK: tl.constexpr):
    tl.store(out_ptr + tl.arange(0, BLOCK), T._offsets(blk, BLOCK))
    rows = T._row_offsets(tl.arange(0, 8), N)
    tl.store(out_ptr + BLOCK + tl.arange(0, 8), rows)


@triton.jit
def _int32_probe(out_ptr, blk, BLOCK: tl.constexpr):
    tl.store(out_ptr + tl.arange(0, BLOCK), (blk * BLOCK + tl.arange(0, BLOCK)).to(tl.int64))


def test_offsets_are_int64():
    """Block and row offsets past 2**31 are exact (the interpreter does wrap int32 math,
    as the control kernel shows), and both kernels take their offsets from these helpers."""
    blk, N, block = 3_000_000, (1 << 30) + 3, 1024
    out = torch.zeros(block + 8, dtype=torch.int64)
    _offsets_probe[(1,)](out, blk, N, BLOCK=block)
    assert torch.equal(out[:block], blk * block + torch.arange(block))
    assert torch.equal(out[block:], torch.arange(8) * N)
    wrapped = torch.zeros(block, dtype=torch.int64)
    _int32_probe[(1,)](wrapped, blk, BLOCK=block)
    assert int(wrapped[0]) != blk * block                    # int32 would have wrapped
    for kernel, rows in ((T._histogram_kernel, T._histogram_kernel), (T._merge_kernel, T._load_x)):
        assert "_offsets(pid + it * n_programs, BLOCK)" in inspect.getsource(kernel.fn)
        assert "_row_offsets(" in inspect.getsource(rows.fn)


_SM90_BODY = """
    hsig = dict(base_ptr="*fp16", models_ptr="*fp16", prefix_ptr="*i32", hist_ptr="*i64",
                N="i32", n_programs="i32", n_replicas="i32")
    build(T._histogram_kernel, hsig, dict(SHIFT=9, BITS=11, N_MODELS=3, BASE_BF16=False,
          MODELS_BF16=False, BLOCK=2048, ITERS=8, WB=128, DENSE_MIN=256, NB=2048), 8, fma=True)
    msig = dict(base_ptr="*i16", models_ptr="*i16", out_ptr="*fp16", w_ptr="*fp64",
                par_ptr="*fp32", cnt_ptr="*i32", N="i32", n_programs="i32")
    for on_base, trim, elect, slack, out_f32, upper in ((False, False, 0, False, False, False),
                                                       (True, False, 0, False, True, False),
                                                       (True, True, 1, False, False, False),
                                                       (True, True, 1, True, True, False),
                                                       (True, True, 2, True, False, False),
                                                       (True, True, 0, False, False, True),
                                                       (True, True, 1, False, True, True),
                                                       (True, True, 2, True, False, True)):
        build(T._merge_kernel, msig, dict(ON_BASE=on_base, TRIM=trim, ELECT=elect,
              SLACK=slack, NORMALIZE=True, N_MODELS=3, NM=4, BASE_BF16=True, MODELS_BF16=True,
              OUT_BF16=False, OUT_F32=out_f32, BLOCK=1024, ITERS=8, UPPER=upper), 4)
"""


def test_kernels_compile_for_sm90():
    """Lower both kernels to SASS for an H100 (no GPU needed): catches what only the
    compiler rejects, and checks the division is the correctly rounded one."""
    compile_for_sm90(_SM90_BODY)
