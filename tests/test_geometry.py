"""SLERP, NuSLERP and model stock (docs/spec.md §8c): statistics, coefficients, combine.

The statistics pass (Gram entries per block, a fixed pairwise tree) and the combine pass
are checked bit for bit on every backend against the reference (fastmerge.geometry),
the reference against a plain loop that follows the spec's words, the coefficients
against the spec's formulas (exact endpoints, fallbacks), and the methods end to end:
fastmerge.merge() on every backend, streamed in chunks or whole, YAML with mergekit's
keys, and the report.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fastmerge
from fastmerge import geometry as G
from fastmerge.backends import c_backend as C
from fastmerge.kernel_api import GRAM_BLOCK
from fastmerge.params import make_params
from tests.checks import compile_for_sm90, make_inputs
from tests.test_exactness import _triton_module

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
DTYPES = [F16, BF16, F32]
NAME = {F16: "fp16", BF16: "bf16", F32: "fp32"}
TRITON = pytest.mark.interpreter


def _triton():
    _triton_module()
    from fastmerge.kernels import triton_gram
    return triton_gram


def triton_gram(base, models, on_base, seg, columns=False):
    if columns:      # the Triton backend's route: its pieces kernel on a transposed copy
        return G.columns_as_pieces(_triton().gram, base, models, on_base, seg)
    return _triton().gram(base, models, on_base, seg)


def triton_combine(base, models, out, coef, seg, columns=False, on_base=True):
    return _triton().combine(base, models, out, coef, seg, columns, on_base)


GRAMS = [pytest.param(C.gram, id="backend=c"),
         pytest.param(triton_gram, id="backend=triton", marks=TRITON)]
COMBINES = [pytest.param(C.combine, id="backend=c"),
            pytest.param(triton_combine, id="backend=triton", marks=TRITON)]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


# ---------------------------------------------------------------------------------------
# 1. the statistics pass: the reference follows the spec's words

def gram_by_loop(x: np.ndarray, seg: int) -> np.ndarray:
    """§8c step by step in plain Python floats: pieces of seg entries, blocks of 1024 from
    each piece's start, a pairwise tree per block; rows [Q, K]."""
    n, N = x.shape
    rows = []
    for p0 in range(0, N, seg):
        p1 = min(p0 + seg, N)
        for b0 in range(p0, p1, GRAM_BLOCK):
            b1 = min(b0 + GRAM_BLOCK, p1)
            row = []
            for k, l in G.pairs(n):
                v = [float(x[k, j]) * float(x[l, j]) for j in range(b0, b1)]
                v += [0.0] * (GRAM_BLOCK - len(v))
                while len(v) > 1:
                    v = [v[2 * m] + v[2 * m + 1] for m in range(len(v) // 2)]
                row.append(v[0])
            rows.append(row)
    return np.array(rows).reshape(-1, n * (n + 1) // 2)


@pytest.mark.parametrize("N,seg", [(3000, 3000), (2 * 1500 + 700, 1500), (9, 4), (1024, 1024)])
def test_reference_gram_is_the_spec_tree(N, seg):
    base, models = make_inputs(2, N, F32, seed=N)
    x = (models.float() - base.float()).numpy()
    got = G.gram(base, models, True, seg).numpy()
    assert got.shape == (G.gram_blocks(N, seg), 3)
    assert np.array_equal(got, gram_by_loop(x, seg))


@pytest.mark.parametrize("rows,cols", [(1030, 3), (7, 5), (2048, 1)])
def test_reference_column_gram_is_the_spec_tree(rows, cols):
    """Columns: block q of column c is the pieces tree over rows q·1024 … of that column."""
    base, models = make_inputs(2, rows * cols, F32, seed=rows + cols)
    x = (models.float() - base.float()).numpy().reshape(2, rows, cols)
    got = G.gram(base, models, True, cols, columns=True).numpy()
    for c in range(cols):
        assert np.array_equal(got[:, c], gram_by_loop(np.ascontiguousarray(x[:, :, c]), rows))


def test_tree_differs_from_a_sequential_sum():
    """The order is part of the definition: on data where it matters, a sequential fp64
    sum gives another value (so the tests above can tell the tree from other orders)."""
    x = torch.tensor([1.0, 0.0] + [2.0 ** -27] * 6 + [0.0] * 1016)    # squares: 1, 0, 2^-54…
    g = G.gram(None, x.unsqueeze(0), False, 1024)[0, 0].item()
    seq = 0.0
    for v in x.double().tolist():
        seq += v * v                     # 1 + 2^-54 rounds back to 1, six times
    assert seq == 1.0 and g == 1.0 + 2.0 ** -52    # the tree adds the small ones first
    for gram in (C.gram,):
        assert gram(None, x.unsqueeze(0), False, 1024)[0, 0].item() == g


def test_segment_sums_add_blocks_in_order():
    parts = np.array([[1.0], [2.0 ** -53], [2.0 ** -53], [3.0], [4.0], [5.0]])
    got = G.segment_sums(parts, 2)
    assert got[0, 0] == (((0.0 + 1.0) + 2.0 ** -53) + 2.0 ** -53)  # = 1.0: sequential
    assert got[1, 0] == 12.0


# ---------------------------------------------------------------------------------------
# 2. the backends' statistics and combine passes, bit for bit

CASES = [  # (n, N, seg, on_base)
    (2, 5000, 5000, False), (3, 3 * 1500 + 11, 1500, True), (2, 7, 3, True),
    (1, 2049, 2049, True), (4, 3 * 1030, 1030, False), (2, 2 * 1024, 1024, True),
    (2, 700, 1030, True),     # fewer entries than one segment (columns: 700 of 1030)
]


@pytest.mark.parametrize("gram", GRAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: NAME[d])
@pytest.mark.parametrize("n,N,seg,on_base", CASES)
def test_gram_bit_identical(gram, dtype, n, N, seg, on_base):
    base, models = make_inputs(n, N, dtype, seed=n * N + seg)
    b = base if on_base else None
    want = G.gram(b, models, on_base, seg)
    got = gram(b, models, on_base, seg).cpu()
    assert got.dtype == torch.float64 and torch.equal(got, want)


@pytest.mark.parametrize("gram", GRAMS)
def test_gram_zeros_grid_and_many_models(gram):
    base, models = make_inputs(8, 2100, BF16, seed=5, kind="grid")
    models[3] = base                                    # a zero task vector
    for on_base in (True, False):
        b = base if on_base else None
        assert torch.equal(gram(b, models, on_base, 700).cpu(), G.gram(b, models, on_base, 700))
    assert not G.gram(base, models, True, 2100)[:, G.pairs(8).index((3, 3))].any()


COLUMN_CASES = [  # (n, rows, cols, on_base): rows past one block, tiles of odd widths
    (2, 2500, 37, True), (3, 1024, 129, False), (1, 3000, 8, True), (2, 5, 7, True),
    (4, 1100, 30, False), (2, 1, 1, True),
]


@pytest.mark.parametrize("gram", GRAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: NAME[d])
@pytest.mark.parametrize("n,rows,cols,on_base", COLUMN_CASES)
def test_column_gram_bit_identical(gram, dtype, n, rows, cols, on_base):
    base, models = make_inputs(n, rows * cols, dtype, seed=rows * cols + n)
    models[0, ::5] = base[::5]                          # exact zeros of τ
    models[-1, 1::7] = -0.0                             # signed zeros of θ
    b = base if on_base else None
    want = G.gram(b, models, on_base, cols, columns=True)
    got = gram(b, models, on_base, cols, columns=True).cpu()
    assert got.shape == (G.blocks_per(rows), cols, n * (n + 1) // 2)
    assert got.dtype == torch.float64 and torch.equal(got, want)


def test_c_column_gram_many_models_and_threads():
    base, models = make_inputs(12, 1500 * 40, BF16, seed=9, kind="grid")   # 78 pairs: 24-wide tiles
    want = G.gram(base, models, True, 40, columns=True)
    for threads in (1, 2, 3):
        C.set_num_threads(threads)
        try:
            assert torch.equal(C.gram(base, models, True, 40, columns=True), want)
        finally:
            C.set_num_threads(0)
    with pytest.raises(ValueError, match="divide"):
        C.gram(base, models, True, 41, columns=True)


def test_c_gram_any_thread_count():
    base, models = make_inputs(3, 20000, F16, seed=2)
    want = G.gram(base, models, True, 20000)
    for threads in (1, 2, 3):
        C.set_num_threads(threads)
        try:
            assert torch.equal(C.gram(base, models, True, 20000), want)
        finally:
            C.set_num_threads(0)


def _coef(S, n, seed, kind="normal"):
    g = torch.Generator().manual_seed(seed)
    if kind == "cancel":       # c_0 v_0 + c_1 v_1 ≈ 0 where the vectors agree
        c = torch.rand(S, 1, generator=g, dtype=torch.float64) + 0.5
        return torch.cat([c, -c * (1 + 2.0 ** -40)] + [c] * (n - 2), 1)
    return torch.randn(S, n, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("combine", COMBINES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: NAME[d])
@pytest.mark.parametrize("n,N,seg,on_base", CASES)
@pytest.mark.parametrize("columns", [False, True], ids=["rows", "columns"])
def test_combine_bit_identical(combine, dtype, n, N, seg, on_base, columns):
    base, models = make_inputs(n, N, dtype, seed=N + n)
    b = base if on_base else None
    S = min(seg, N) if columns else -(-N // seg)
    for kind in ("normal", "cancel") if n >= 2 else ("normal",):
        coef = _coef(S, n, seed=S, kind=kind)
        # "cancel": models 0 and 1 equal, weighed c and ≈ −c
        vecs = models if kind == "normal" else torch.stack([models[0]] * 2 + list(models[2:]))
        want = torch.full((N,), 7.0, dtype=dtype)
        nf_want = G.combine(b, vecs, want, coef, seg, columns, on_base)
        got = torch.full((N,), 7.0, dtype=dtype)
        nf = combine(b, vecs, got, coef, seg, columns, on_base)
        assert torch.equal(bits(got), bits(want)), f"{kind}: outputs differ"
        assert torch.equal(nf.cpu(), nf_want)


def test_combine_out_dtype_differs_and_nonfinite_counted():
    base, models = make_inputs(2, 600, BF16, seed=9)
    models[1, 5] = float("inf")
    models[0, 7] = float("nan")
    coef = _coef(2, 2, seed=1)
    want = torch.empty(600, dtype=F32)
    got = torch.empty(600, dtype=F32)
    assert G.combine(base, models, want, coef, 300).tolist() == [1, 1]
    assert C.combine(base, models, got, coef, 300).tolist() == [1, 1]
    assert torch.equal(bits(got), bits(want))


def test_combine_refuses_bad_coefficients():
    base, models = make_inputs(2, 100, F16)
    out = torch.empty(100, dtype=F16)
    with pytest.raises(ValueError, match="coef"):
        C.combine(base, models, out, torch.tensor([[float("nan"), 1.0]]), 100)
    with pytest.raises(ValueError, match="segments"):
        C.combine(base, models, out, torch.ones(1, 2, dtype=torch.float64), 50)


def test_kernels_compile_for_sm90():
    compile_for_sm90("""
    from fastmerge.kernels import triton_gram as TG
    build(TG._gram_kernel, dict(base_ptr="*i16", models_ptr="*i16", out_ptr="*fp64", N="i32",
          seg="i32", bps="i32"), dict(ON_BASE=True, N_MODELS=3, BASE_BF16=True,
          MODELS_BF16=True, GB=1024), 4)
    build(TG._combine_kernel, dict(base_ptr="*fp16", models_ptr="*fp16", out_ptr="*fp16",
          coef_ptr="*fp64", nf_ptr="*i32", N="i32", seg="i32"), dict(ON_BASE=True,
          COLUMNS=False, N_MODELS=2, BASE_BF16=False, MODELS_BF16=False, OUT_BF16=False,
          OUT_F32=False, BLOCK=1024), 4)
    build(TG._combine_kernel, dict(base_ptr="*i16", models_ptr="*i16", out_ptr="*fp32",
          coef_ptr="*fp64", nf_ptr="*i32", N="i64", seg="i64"), dict(ON_BASE=False,
          COLUMNS=True, N_MODELS=3, BASE_BF16=True, MODELS_BF16=True, OUT_BF16=False,
          OUT_F32=True, BLOCK=1024), 4)
    """)


# ---------------------------------------------------------------------------------------
# 3. coefficients: the spec's formulas, endpoints and fallbacks

def test_slerp_coefficients_follow_the_formula():
    a = np.array([3.0, -1.0, 2.0])
    b = np.array([1.0, 2.0, 0.5])
    Gm = np.array([[a @ a, a @ b, b @ b]])
    for t in (0.0, 0.3, 1.0, 1.7):
        c, lerp, cos = G.slerp_coefficients(Gm, t)
        om = math.acos((a @ b) / (math.sqrt(a @ a) * math.sqrt(b @ b)))
        want = [math.sin(om - t * om) / math.sin(om), math.sin(t * om) / math.sin(om)]
        assert not lerp[0] and np.allclose(c[0], want, rtol=1e-15, atol=0)
    c, lerp, _ = G.slerp_coefficients(np.array([[4.0, 2.0 * 2.0 * 0.9999, 4.0]]), 0.25)
    assert lerp[0] and c[0].tolist() == [0.75, 0.25]                # near-parallel
    c, lerp, _ = G.slerp_coefficients(np.array([[1e-20, 1e-22, 1e-20]]), 0.25)
    assert not lerp[0]                                              # tiny norms: not divided
    c, lerp, _ = G.slerp_coefficients(np.array([[np.inf, np.nan, 1.0]]), 0.25)
    assert lerp[0] and c[0].tolist() == [0.75, 0.25]                # non-finite: lerp


def test_nuslerp_and_model_stock_coefficients():
    assert G.nuslerp_t(1.0, 3.0) == 0.75 and G.nuslerp_t(1.0, -1.0 + 1e-7) == 0.5
    c, lerp, _ = G.nuslerp_coefficients(np.array([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]]), 0.25)
    assert not lerp[0] and np.allclose(c[0], [math.sin(0.75 * math.pi / 2),
                                              math.sin(0.25 * math.pi / 2)], rtol=1e-15)
    assert lerp[1] and c[1].tolist() == [0.75, 0.25]
    # model stock: orthogonal task vectors: t = 0; equal ones: t = 1; cos = -1/(n-1): t = 0
    ortho = np.array([[1.0, 0.0, 1.0]])
    same = np.array([[4.0, 4.0, 4.0]])
    opposite = np.array([[1.0, -1.0, 1.0]])
    for Gm, t, odd in ((ortho, 0.0, False), (same, 1.0, False), (opposite, 0.0, True)):
        c, flag, _ = G.model_stock_coefficients(Gm, 2)
        assert c[0].tolist() == [t / 2, t / 2] and flag[0] == odd


# ---------------------------------------------------------------------------------------
# 4. end to end: fastmerge.merge() on every backend, chunks, YAML, report

def _family(n_models=2, dtype=F16, seed=0):
    from fastmerge.testing import PRESETS, state_dicts
    return state_dicts(config=PRESETS["tiny"], n_models=n_models, dtype=dtype, seed=seed)


def _bits_sd(sd):
    return {k: bits(v) if v.is_floating_point() else v for k, v in sd.items()}


def _same(a, b):
    ba, bb = _bits_sd(a.state_dict), _bits_sd(b.state_dict)
    assert ba.keys() == bb.keys()
    bad = [k for k in ba if not torch.equal(ba[k], bb[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"


METHOD_KW = {
    "slerp": dict(models=1, kw=dict(t=0.35)),
    "slerp_gradient": dict(models=1, kw=dict(t=[{"filter": "mlp", "value": [0.0, 1.0]},
                                                {"value": 0.6}]), method="slerp"),
    "nuslerp": dict(models=2, kw=dict(weights=[1.0, 2.0])),
    "nuslerp_rows": dict(models=2, kw=dict(weights=[0.5, 1.5], vectors="rows"),
                         method="nuslerp"),
    "nuslerp_columns_nobase": dict(models=2, kw=dict(weights=[1.0, 1.0], vectors="columns"),
                                   method="nuslerp", base=False),
    "model_stock": dict(models=3, kw={}),
    "model_stock_rows": dict(models=2, kw=dict(vectors="rows"), method="model_stock"),
}


# the Triton interpreter runs one program per statistics block (slow): the row and column
# cases of its kernels are covered by the kernel tests above
CASES_E2E = [pytest.param(c, b, id=f"{c}-{b}") for c in METHOD_KW for b in ("torch", "c")] + [
    pytest.param(c, "triton", id=f"{c}-triton", marks=TRITON)
    for c in ("slerp", "nuslerp_columns_nobase", "model_stock")]


@pytest.mark.parametrize("case,backend", CASES_E2E)
def test_merge_backends_and_chunks_agree(case, backend, monkeypatch):
    spec = METHOD_KW[case]
    method = spec.get("method", case)
    base, models = _family(spec["models"], dtype=BF16 if "rows" in case else F16, seed=1)
    base_arg = base if spec.get("base", True) else None
    kw = dict(method=method, progress=False, **spec["kw"])
    want = fastmerge.merge(base_arg, models, backend="torch", **kw)
    got = fastmerge.merge(base_arg, models, backend=backend, **kw)
    _same(got, want)
    assert got.report["tensors"] == want.report["tensors"]
    if backend == "c":       # streamed in tiny chunks: the same bytes and report
        from fastmerge import pipeline
        monkeypatch.setattr(pipeline, "DEFAULT_RESIDENT_BYTES", 0)
        monkeypatch.setattr(C, "CHUNK_ELEMS", 700, raising=False)
        streamed = fastmerge.merge(base_arg, models, backend="c", **kw)
        _same(streamed, want)
        assert streamed.report["tensors"] == want.report["tensors"]


EMPTY_SHAPES = [(0, 5), (5, 0), (0,)]


@pytest.mark.parametrize("backend", ["torch", "c", pytest.param("triton", marks=TRITON)])
@pytest.mark.parametrize("case", [c for c in METHOD_KW if "gradient" not in c])
def test_empty_tensors_merge_to_empty_tensors(case, backend):
    """A tensor with no entries (each shape of EMPTY_SHAPES, rows or columns) comes out
    empty, of its shape and dtype, beside a tensor with entries that merges as usual; as
    one vector, its report entry is that of an all-zero tensor (every norm 0)."""
    spec = METHOD_KW[case]
    g = torch.Generator().manual_seed(11)
    names = [f"model.layers.{i}.mlp.w.weight" for i in range(len(EMPTY_SHAPES))]

    def sd():
        out = {n: torch.zeros(s, dtype=F16) for n, s in zip(names, EMPTY_SHAPES)}
        out["model.layers.0.mlp.v.weight"] = torch.randn(6, 7, generator=g).half()
        return out
    base, models = sd(), [sd() for _ in range(spec["models"])]
    kw = dict(method=spec.get("method", case), progress=False, **spec["kw"])
    base_arg = base if spec.get("base", True) else None
    got = fastmerge.merge(base_arg, models, backend=backend, **kw)
    for n, shape in zip(names, EMPTY_SHAPES):
        v = got.state_dict[n]
        assert v.shape == shape and v.dtype == F16, n
    if backend != "torch":
        want = fastmerge.merge(base_arg, models, backend="torch", **kw)
        _same(got, want)
        assert got.report["tensors"] == want.report["tensors"]
    zeros = {n: torch.zeros(3, 4, dtype=F16) for n in names}
    zero_rep = fastmerge.merge(zeros if base_arg is not None else None,
                               [zeros] * spec["models"], backend="torch", **kw).report
    zero_entry = {z["name"]: z["geometry"] for z in zero_rep["tensors"]}
    if kw.get("vectors", "tensor") == "tensor":       # each tensor one vector
        for e in got.report["tensors"]:
            if e["name"] in names:
                assert e["geometry"] == zero_entry[e["name"]], e["name"]


def test_slerp_endpoints_are_the_inputs_bit_for_bit():
    base, models = _family(1, dtype=BF16, seed=2)
    for t, src in ((0.0, base), (1.0, models[0])):
        sd = fastmerge.merge(base, models, method="slerp", t=t, backend="c",
                             progress=False).state_dict
        for k, v in sd.items():
            assert torch.equal(bits(v), bits(src[k])) if v.is_floating_point() else True, k


def test_slerp_matches_a_direct_float64_evaluation():
    """The definition evaluated directly in NumPy float64 (norms by np.dot, a different
    summation order): fp32 outputs within the spec's one ulp."""
    base, models = _family(1, dtype=F32, seed=3)
    t = 0.4
    sd = fastmerge.merge(base, models, method="slerp", t=t, backend="c",
                         progress=False).state_dict
    for k, v in sd.items():
        if not v.is_floating_point() or v.dim() == 0:
            continue
        a = base[k].double().reshape(-1).numpy()
        b = models[0][k].double().reshape(-1).numpy()
        na, nb = math.sqrt(a @ a), math.sqrt(b @ b)
        cos = (a @ b) / (na * nb)
        if abs(cos) > 0.9995:
            want = (1 - t) * a + t * b
        else:
            om = math.acos(cos)
            want = (math.sin(om - t * om) * a + math.sin(t * om) * b) / math.sin(om)
        want = torch.from_numpy(want).float()
        got = v.reshape(-1)
        diff = (bits(got).long() - bits(want).long()).abs()
        assert int(diff.max()) <= 1, k


def test_model_stock_of_one_model_twice_is_base_plus_task_vector():
    """Two identical models: cos = 1, t = 1, θ = θ_b + τ = the model (bit for bit when
    the fp32 task vector is exact, as for these fp16 inputs)."""
    base, models = _family(1, dtype=F16, seed=4)
    sd = fastmerge.merge(base, [models[0], models[0]], method="model_stock", backend="c",
                         progress=False).state_dict
    for k, v in sd.items():
        if v.is_floating_point():
            assert torch.equal(v, models[0][k]), k


def test_report_geometry_entries():
    base, models = _family(2, seed=5)
    rep = fastmerge.merge(base, models, method="nuslerp", weights=[1, 1], vectors="rows",
                          backend="c", progress=False).report
    rows = [e for e in rep["tensors"] if "segments" in e["geometry"]]
    one = [e for e in rep["tensors"] if "coefficients" in e["geometry"]]
    assert rows and one
    g = rows[0]["geometry"]
    assert g["vectors"] == "rows" and g["segments"] > 1 and len(g["cos"]) == 3
    assert rep["parameters"]["vectors"] == "rows"
    assert "models" not in rows[0]                    # no per-model decisions to count


def test_parameter_errors():
    base, models = _family(2)
    merge = lambda *a, **k: fastmerge.merge(*a, progress=False, **k)   # noqa: E731
    with pytest.raises(fastmerge.ParameterError, match="exactly 1 model"):
        merge(base, models, method="slerp")
    with pytest.raises(fastmerge.ParameterError, match="at least 2 models"):
        merge(base, models[:1], method="model_stock")
    with pytest.raises(fastmerge.ParameterError, match="t is only used"):
        merge(base, models, method="ties", t=0.3)
    with pytest.raises(fastmerge.ParameterError, match="vectors must be one of"):
        merge(base, models[:1], method="slerp", vectors="rows")
    with pytest.raises(fastmerge.ParameterError, match="needs a base"):
        merge(None, models, method="model_stock")
    with pytest.raises(fastmerge.ParameterError, match="non-finite|finite"):
        make_params("slerp", 1, t=float("nan")).for_tensor("x")


def test_nonfinite_input_is_named():
    base, models = _family(1, dtype=F32, seed=6)
    name = next(k for k, v in models[0].items() if v.dim() == 2)
    models[0][name].view(-1)[3] = float("nan")
    with pytest.raises(fastmerge.InputError, match=f"{name}.*model 0"):
        fastmerge.merge(base, models, method="slerp", backend="c", progress=False)
    sd = fastmerge.merge(base, models, method="slerp", backend="c", allow_nonfinite=True,
                         progress=False).state_dict
    assert torch.isnan(sd[name].view(-1)[3])


# ---------------------------------------------------------------------------------------
# 5. YAML configs with mergekit's keys

def _yaml(tmp_path, doc):
    import yaml
    p = tmp_path / "cfg.yml"
    p.write_text(yaml.safe_dump(doc))
    return p


def test_yaml_configs_run_like_the_api(tmp_path):
    from fastmerge import cli
    from fastmerge.testing import PRESETS, write_llama_family
    fam = write_llama_family(tmp_path / "fam", config=PRESETS["tiny"], n_models=2)
    b, (m0, m1) = str(fam["base"]), [str(m) for m in fam["models"]]
    t_spec = [{"filter": "self_attn", "value": [0.0, 0.5, 1.0]}, {"value": 0.5}]
    cases = {
        "slerp": ({"merge_method": "slerp", "base_model": b,
                   "models": [{"model": b}, {"model": m0}], "parameters": {"t": t_spec}},
                  dict(base=b, models=[m0], method="slerp", t=t_spec)),
        "nuslerp": ({"merge_method": "nuslerp",
                     "models": [{"model": m0, "parameters": {"weight": 1.0}},
                                {"model": m1, "parameters": {"weight": 3.0}}],
                     "parameters": {"nuslerp_flatten": False}},
                    dict(base=None, models=[m0, m1], method="nuslerp", weights=[1.0, 3.0],
                         vectors="rows")),
        "model_stock": ({"merge_method": "model_stock", "base_model": b,
                         "models": [{"model": m0}, {"model": m1}],
                         "parameters": {"filter_wise": True}},
                        dict(base=b, models=[m0, m1], method="model_stock", vectors="rows")),
    }
    for name, (doc, api_kw) in cases.items():
        out = tmp_path / f"yaml-{name}"
        assert cli.main(["merge", str(_yaml(tmp_path, doc)), str(out), "--no-progress"]) == 0
        api = fastmerge.merge(api_kw.pop("base"), api_kw.pop("models"), progress=False,
                              output=tmp_path / f"api-{name}", **api_kw)
        for f in sorted(api.path.glob("*.safetensors")):
            assert f.read_bytes() == (out / f.name).read_bytes(), (name, f.name)


def test_yaml_errors(tmp_path):
    from fastmerge.config import config_to_kwargs
    with pytest.raises(fastmerge.ParameterError, match="slerp needs parameters.t"):
        config_to_kwargs({"merge_method": "slerp", "base_model": "a",
                          "models": [{"model": "b"}]})
    with pytest.raises(fastmerge.ParameterError, match="only used by slerp"):
        config_to_kwargs({"merge_method": "ties", "base_model": "a", "parameters": {"t": 0.5},
                          "models": [{"model": "b", "parameters": {"weight": 1}}]})
    with pytest.raises(fastmerge.ParameterError, match="filter_wise is only used by"):
        config_to_kwargs({"merge_method": "nuslerp", "parameters": {"filter_wise": True},
                          "models": [{"model": "b", "parameters": {"weight": 1}},
                                     {"model": "c", "parameters": {"weight": 1}}]})
    with pytest.raises(fastmerge.ParameterError, match="'weight' is required"):
        config_to_kwargs({"merge_method": "nuslerp",
                          "models": [{"model": "b"}, {"model": "c"}]})
    kw = config_to_kwargs({"merge_method": "model_stock", "base_model": "a",
                           "models": [{"model": "b"}, {"model": "c"}]})
    assert kw["method"] == "model_stock" and "vectors" not in kw


def test_yaml_slices_spelling_is_the_models_list(tmp_path):
    """The usual mergekit SLERP recipe: one slice whose sources cover every layer."""
    from fastmerge import cli
    from fastmerge.config import config_to_kwargs
    from fastmerge.testing import PRESETS, write_llama_family
    fam = write_llama_family(tmp_path / "fam", config=PRESETS["tiny"], n_models=1)
    b, m = str(fam["base"]), str(fam["models"][0])
    L = PRESETS["tiny"]["num_hidden_layers"]
    t_spec = [{"filter": "mlp", "value": [0.2, 0.9]}, {"value": 0.4}]
    sliced = {"merge_method": "slerp", "base_model": b, "parameters": {"t": 0.1},
              "slices": [{"sources": [{"model": b, "layer_range": [0, L]},
                                      {"model": m, "layer_range": [0, L]}],
                          "parameters": {"t": t_spec}}]}
    assert cli.main(["merge", str(_yaml(tmp_path, sliced)), str(tmp_path / "s"),
                     "--no-progress"]) == 0
    api = fastmerge.merge(b, [m], method="slerp", t=t_spec, output=tmp_path / "a",
                          progress=False)
    for f in sorted(api.path.glob("*.safetensors")):
        assert f.read_bytes() == (tmp_path / "s" / f.name).read_bytes(), f.name
    short = dict(sliced, slices=[{"sources": [{"model": b, "layer_range": [0, L - 1]},
                                              {"model": m, "layer_range": [0, L - 1]}]}])
    with pytest.raises(fastmerge.ParameterError, match="not the whole model"):
        fastmerge.merge(**config_to_kwargs(short), progress=False)
    two = dict(sliced, slices=sliced["slices"] * 2)
    with pytest.raises(fastmerge.ParameterError, match="2 slices"):
        config_to_kwargs(two)
    mixed = dict(sliced, slices=[{"sources": [{"model": b, "layer_range": [0, L]},
                                              {"model": m, "layer_range": [1, L]}]}])
    with pytest.raises(fastmerge.ParameterError, match="every source must cover"):
        config_to_kwargs(mixed)
