"""Exactness at the edges, on every backend (docs/spec.md §5-§7, §10).

1. cancellation: θ_b + λ·m (or Σ w_i θ_i) cancels exactly or nearly, with non-dyadic
   weights, for every method, dtype and backend: the spec's bar (counters identical,
   outputs within 1 ulp of the reference, no other allowance); a plain fp32 evaluation
   must fail that bar on the same inputs (so they really are cancellation-heavy);
2. negative weights: selection on sign(w_i·x_i) (§6) and the W = 0 fallback m = D (§7),
   on hand-computed cases;
3. mixed-sign weights on random inputs for 1, 2, 3 and 8 models, reaching W = 0, D ≠ 0;
4. the streamed pipeline at k·chunk − 1, k·chunk, k·chunk + 1 and 1 entries;
5. protected-first election changes results on make_inputs' random data.

Triton runs under TRITON_INTERPRET=1 on the CPU (tests/conftest.py), with small blocks.
"""
from __future__ import annotations

import pytest
import torch

import fastmerge
from fastmerge import backends, pipeline
from fastmerge import reference as R
from fastmerge.backends import c_backend as C
from fastmerge.kernel_api import (COUNTERS, DROPPED_BY_SIGN, IMPORTANT_DROPPED, KEPT,
                                  PROTECTED, SELECTED, TIES_IMPORTANT_DROPPED)
from fastmerge.params import make_params
from tests.checks import (SIGMA, SIGMA_STEPS, WEIGHTS, assert_ulp_close, check_merge,
                          make_inputs, mode_cfg, thresholds_checked, ties_cfg, ulp)

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
DTYPES = [F16, BF16, F32]
NAME = {F16: "fp16", BF16: "bf16", F32: "fp32"}
INF = float("inf")
LAUNCH = dict(block=256, programs=2)          # Triton: several blocks, interpreter-sized


def ids(name):
    return lambda v: f"{name}={NAME.get(v, v)}"


# ---------------------------------------------------------------------------------------
# backends

def _triton_module():
    pytest.importorskip("triton")
    if not backends.triton_interpreted() and not torch.cuda.is_available():
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    from fastmerge.kernels import triton_merge as T   # noqa: PLC0415
    return T


def triton_merge(base, models, out, cfg):
    """The Triton fused pass on CPU tensors (interpreter), or on the GPU and back."""
    T = _triton_module()
    if backends.triton_interpreted():
        return T.merge(base, models, out, cfg, **LAUNCH)
    dev = torch.device("cuda")
    o = out.to(dev)
    counts = T.merge(None if base is None else base.to(dev), models.to(dev), o, cfg, **LAUNCH)
    out.copy_(o.cpu())
    return counts.cpu()


MERGES = {"c": C.merge, "triton": triton_merge}
BACKEND_PARAMS = [pytest.param("c", id="backend=c"),
                  pytest.param("triton", id="backend=triton", marks=pytest.mark.interpreter)]


def triton_device() -> str:
    _triton_module()
    return "cpu" if backends.triton_interpreted() else "cuda"


def thresholds(base, models, density, slack):
    """Exact (t, u) (reference histogram, checked against sorting)."""
    return thresholds_checked(R.histogram, base, models, density, slack)


# ---------------------------------------------------------------------------------------
# 1. cancellation

CANCEL_WEIGHTS = (0.5, 0.3, 0.2)      # not dyadic: fp32 rounds every w_i·x_i
LAMBDA = 0.8                          # λ·Σ w_i = 0.8: θ_b + λ·τ = 0 for τ = −1.25·θ_b
N_CANCEL = {"c": 4099, "triton": 512}

# (method, elect, slack): every method, TIES with sum and count election, with slack
CANCEL_MODES = [("linear", "sum", 0.0), ("task_arithmetic", "sum", 0.0), ("ties", "sum", 0.0),
                ("ties", "count", 0.0), ("ties", "sum", 0.1), ("ties", "count", 0.1)]


_MANTISSA = {F16: 10, BF16: 7, F32: 23}


def cancel_inputs(N: int, dtype: torch.dtype, seed: int = 0):
    """(base, models [3, N]) in ``dtype`` where the merged value cancels to (near) zero.

    Entry kinds (about a fifth each). Kinds 1-4 are built on a lattice: θ_b = B·u and
    θ_i = Θ_i·u with integers B, Θ_i (|·| < 2^(mantissa+1)) and u a power of two, so every
    input is exact in ``dtype`` and the real-valued result is a chosen small multiple of u:
    0. θ_b ~ N(0, 0.02²), θ_i = θ_b + k_i·1e-3 with k_i ∈ [−20, 20], ~25% of k_i = 0:
       θ_b and λ·Σ w_i τ_i are the same size, so the result is near 0 in places;
    1. τ_i ≈ −1.25·θ_b with 25B + 10T_0 + 6T_1 + 4T_2 = k ∈ [−5, 4]: θ_b + λ·Σ w_i τ_i
       = k·u/25 in real numbers (λ = 0.8, w = 0.5, 0.3, 0.2), at most a fifth of one
       ulp of θ_b (u is that ulp);
    2. as 1 with k = 0: only fp64's rounding of 0.3, 0.2, 0.8 and of the products
       and sums is left (a result ~2^-55·|θ_b| or 0);
    3. τ_0 = τ_1 = −1.25·θ_b (±u on τ_0), τ_2 small and of the other sign: TIES elects
       models 0 and 1, whose disjoint mean cancels θ_b (to 0 or ±0.5u);
    4. 5Θ_0 + 3Θ_1 + 2Θ_2 = k ∈ [−2, 2]: Σ w_i θ_i / Σ w_i = k·u/10 ('linear').
    """
    g = torch.Generator().manual_seed(seed)
    mant = _MANTISSA[dtype]
    lo, hi = 1 << mant, 1 << (mant + 1)

    def ints(a, b, shape=(N,)):
        return torch.randint(a, b, shape, generator=g, dtype=torch.int64)

    def signs():
        return ints(0, 2) * 2 - 1

    kind = ints(0, 5)
    u = torch.ldexp(torch.ones(N, dtype=torch.float64), ints(-7, 5) - mant)  # |θ_b|: 2^-7..32
    B = ints(lo, hi)
    B3 = ints(lo, hi - lo // 4) & ~3                  # room for θ_2 = θ_b + T_2 (kind 3)
    B = torch.where(kind == 2, B & ~1, torch.where(kind == 3, B3, B)) * signs()
    T = torch.zeros(3, N, dtype=torch.int64)
    # kinds 1, 2: T_1, T_2 ≈ −1.25B, T_0 solves 10·T_0 = k − S, S = 25B + 6T_1 + 4T_2
    T[1] = -(5 * B).div(4, rounding_mode="floor") + ints(-3, 4)
    T[2] = -(5 * B).div(4, rounding_mode="floor") + ints(-3, 4)
    S = 25 * B + 6 * T[1] + 4 * T[2]
    for _ in range(5):                    # kind 2: S ≡ 0 (mod 10), B even, so k = 0
        shift = (kind == 2) & (S % 10 != 0)
        T[2] += shift.long()
        S += 4 * shift.long()
    k = (S + 5) % 10 - 5
    T[0] = (k - S).div(10, rounding_mode="floor")
    assert torch.equal(10 * T[0], k - S)
    # kind 3: T_0 = T_1 = −1.25B (B ≡ 0 mod 4), T_0 moved by −1, 0 or 1; T_2 against them
    quarter = -(5 * B) // 4
    k3 = [quarter + ints(-1, 2), quarter, torch.sign(B) * ints(1, lo // 8 + 1)]
    theta = B + T
    for i in range(3):
        theta[i] = torch.where(kind == 3, B + k3[i], theta[i])
    # kind 4: Θ_2 ≈ −Θ_1, Θ_0 solves 5·Θ_0 = k − (3Θ_1 + 2Θ_2)
    t1 = ints(lo, hi - 4) * signs()
    t2 = -t1 + ints(-3, 4)
    s4 = 3 * t1 + 2 * t2
    t0 = (((s4 + 2) % 5 - 2) - s4).div(5, rounding_mode="floor")
    for i, row in enumerate((t0, t1, t2)):
        theta[i] = torch.where(kind == 4, row, theta[i])
    assert theta.abs().max() < hi and B.abs().max() < hi
    lattice_base = (B.double() * u).to(dtype)
    lattice = (theta.double() * u).to(dtype)
    assert torch.equal(lattice.double(), theta.double() * u)         # exact in dtype
    # kind 0: the plain random case
    b0 = (0.02 * torch.randn(N, generator=g, dtype=torch.float64)).to(dtype)
    steps = ints(-20, 21, (3, N)).double()
    steps[torch.rand(3, N, generator=g) < 0.25] = 0
    grid = (b0.double() + steps * 1e-3).to(dtype)
    base = torch.where(kind == 0, b0, lattice_base)
    models = torch.where(kind == 0, grid, lattice)
    return base, models


def cancel_cfg(method, elect, slack, base, models):
    if method != "ties":
        return mode_cfg(method, CANCEL_WEIGHTS, scale=LAMBDA)
    t, u = thresholds(base, models, 0.7, slack)
    return mode_cfg("ties", CANCEL_WEIGHTS, tuple(t), tuple(u), LAMBDA, True, elect == "count")


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids("dtype"))
@pytest.mark.parametrize("method,elect,slack", CANCEL_MODES,
                         ids=lambda v: f"{v}" if not isinstance(v, float) else f"slack={v}")
def test_cancellation_every_method_dtype_backend(backend, dtype, method, elect, slack):
    base, models = cancel_inputs(N_CANCEL[backend], dtype, seed=DTYPES.index(dtype))
    cfg = cancel_cfg(method, elect, slack, base, models)
    check_merge(MERGES[backend], None if method == "linear" else base, models, cfg, dtype)


def _near_zero_both_signs(out: torch.Tensor, scale: torch.Tensor):
    """Counts of outputs > 0 and < 0 below a quarter of one ulp of the operands' size
    (``scale``: θ_b, or max_i |θ_i| for 'linear') in the output dtype: cancelled results."""
    o = out.double()
    tiny = o.abs() < ulp(scale, out.dtype) / 4
    return int((tiny & (o > 0)).sum()), int((tiny & (o < 0)).sum())


def fp32_task_arithmetic(base, models, out, cfg):
    """What the spec forbids: task arithmetic evaluated in fp32 (w_i, λ as fp32)."""
    tau = models.float() - base.float()
    acc = torch.zeros_like(tau[0])
    for w, row in zip(cfg.weights, tau):
        acc = acc + torch.tensor(w, dtype=F32) * row
    out.copy_((base.float() + torch.tensor(cfg.scale, dtype=F32) * acc).to(out.dtype))
    return torch.zeros(len(cfg.weights), len(COUNTERS), dtype=torch.int64)


@pytest.mark.parametrize("dtype", DTYPES, ids=ids("dtype"))
def test_fp32_evaluation_fails_on_cancellation_inputs(dtype):
    """The inputs above really cancel: the reference's task arithmetic has results near
    zero of both signs, and a backend evaluating it in fp32 is > 1 ulp off (for fp32
    outputs, in places with the wrong sign)."""
    base, models = cancel_inputs(4099, dtype, seed=DTYPES.index(dtype))
    cfg = mode_cfg("task_arithmetic", CANCEL_WEIGHTS, scale=LAMBDA)
    want = torch.empty_like(base)
    R.merge(base, models, want, cfg)
    pos, neg = _near_zero_both_signs(want, base)
    assert pos > 100 and neg > 100, (pos, neg)
    with pytest.raises(AssertionError, match="beyond 1.0 ulp"):
        check_merge(fp32_task_arithmetic, base, models, cfg, dtype)
    got = torch.empty_like(base)
    fp32_task_arithmetic(base, models, got, cfg)
    if dtype == F32:
        assert (got.double() * want.double() < 0).sum() > 10


@pytest.mark.parametrize("dtype", DTYPES, ids=ids("dtype"))
def test_cancellation_reaches_every_method(dtype):
    """Every method's reference output has cancelled results of both signs."""
    base, models = cancel_inputs(4099, dtype, seed=2)
    for method, elect, slack in CANCEL_MODES:
        cfg = cancel_cfg(method, elect, slack, base, models)
        out = torch.empty_like(base)
        R.merge(None if method == "linear" else base, models, out, cfg)
        scale = models.abs().amax(0) if method == "linear" else base
        pos, neg = _near_zero_both_signs(out, scale)
        assert pos > 20 and neg > 20, (method, elect, slack, pos, neg)


def _state_dicts(dtype, seed, sizes):
    """base and 3 model state dicts built from cancel_inputs (a 2-D and a 1-D tensor)."""
    (rows, cols), n1 = sizes
    base, models = cancel_inputs(rows * cols + n1, dtype, seed=seed)
    split = rows * cols

    def sd(x):
        return {"layers.0.w": x[:split].reshape(rows, cols).clone(), "norm": x[split:].clone()}
    return sd(base), [sd(m) for m in models]


API_MODES = [("linear", "sum"), ("task_arithmetic", "sum"), ("ties", "sum"), ("ties", "count"),
             ("ties_sv", "sum"), ("ties_sv", "count")]


def _api_kwargs(method, elect):
    kw = dict(method=method, weights=list(CANCEL_WEIGHTS), elect=elect, progress=False)
    if method != "linear":
        kw["scale"] = LAMBDA
    if method.startswith("ties"):
        kw["density"] = 0.7
    if method == "ties_sv":
        kw["slack"] = [0.1, 0.05, 0.1]
    return kw


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids("dtype"))
@pytest.mark.parametrize("method,elect", API_MODES, ids=lambda v: v)
def test_cancellation_through_merge_api(backend, dtype, method, elect):
    sizes = ((40, 96), 129) if backend == "c" else ((8, 48), 129)
    base_sd, model_sds = _state_dicts(dtype, DTYPES.index(dtype), sizes)
    kw = _api_kwargs(method, elect)
    want, want_report = fastmerge.merge(base_sd, model_sds, backend="torch", device="cpu", **kw)
    device = "cpu" if backend == "c" else triton_device()
    got, report = fastmerge.merge(base_sd, model_sds, backend=backend, device=device, **kw)
    assert list(got) == list(want)
    for name in want:
        assert_ulp_close(got[name].cpu(), want[name], what=name)
    assert report["backend"] == backend and want_report["backend"] == "torch"
    assert {k: v for k, v in report.items() if k != "backend"} == \
        {k: v for k, v in want_report.items() if k != "backend"}


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("method", ["ties_sv", "dare_ties", "breadcrumbs_ties", "della"])
def test_a_slack_past_the_nonzero_share_protects_only_nonzero_entries(backend, method):
    """The SFT model changes 10 % of a tensor; a slack of 0.5 would put u at 0 and protect
    its zeros (docs/spec.md §4: u_i ≥ 2^-126). Only its nonzero entries are protected, on
    every backend as in the reference, and where it is zero the CT model's entries are
    elected as without its slack."""
    g = torch.Generator().manual_seed(7)
    n = 64 * 96
    base = (0.02 * torch.randn(n, generator=g)).half()
    ct = (base.float() + 0.003 * torch.randn(n, generator=g)).half()
    sft = base.clone()
    hit = torch.randperm(n, generator=g)[: n // 10]
    sft[hit] = (base[hit].float() + 0.001 * torch.randn(len(hit), generator=g)).half()
    nonzero = int((sft.float() - base.float() != 0).sum())
    sd = lambda x: {"w": x.view(64, 96)}                                  # noqa: E731
    kw = dict(method=method, density=[0.6, 0.6], slack=[0.0, 0.5], progress=False)
    if method == "breadcrumbs_ties":
        kw["gamma"] = 0.01
    want, report = fastmerge.merge(sd(base), [sd(ct), sd(sft)], backend="torch",
                                   device="cpu", **kw)
    assert report["tensors"][0]["u"][1] == 2.0 ** -126
    assert report["tensors"][0]["models"][1]["protected"] == nonzero
    device = "cpu" if backend == "c" else triton_device()
    got, got_report = fastmerge.merge(sd(base), [sd(ct), sd(sft)], backend=backend,
                                      device=device, **kw)
    assert torch.equal(got["w"].cpu(), want["w"])
    assert got_report["tensors"] == report["tensors"]
    if method == "ties_sv":      # where the SFT model is zero, its slack changes nothing
        plain, _ = fastmerge.merge(sd(base), [sd(ct), sd(sft)], backend="torch",
                                   device="cpu", **{**kw, "slack": [0.0, 0.0]})
        zero = (sft.float() == base.float()).view(64, 96)
        assert torch.equal(want["w"][zero], plain["w"][zero])


# ---------------------------------------------------------------------------------------
# 2. negative weights, by hand (docs/spec.md §5-§7)

HB, HL = 0.25, 0.5            # θ_b and λ of the hand-computed cases: θ = θ_b + λ·m

# (id, weights, u, elect, τ per model, hand-computed (sel, D, W), plain TIES's sel)
# every entry is kept (t = 0); D = Σ w_i·sel_i·τ_i, W = Σ w_i·sel_i.
HAND = [
    # w·τ = 3, −2: G = 1 ≥ 0 → γ = +1; sign(1·3) = +1 selected, sign(−1·2) = −1 not
    ("votes_3_-2", (1.0, -1.0), None, "sum", (3.0, 2.0), ((1, 0), 3.0, 1.0), None),
    # count: votes +1, −1 → G = 0 → γ = +1: the same
    ("votes_3_-2_count", (1.0, -1.0), None, "count", (3.0, 2.0), ((1, 0), 3.0, 1.0), None),
    # w·τ = −3, −2: G = −5 → γ = −1; both agree; D = −3 + (−1)(2) = −5, W = 1 − 1 = 0 → m = D
    ("W0_two_models", (1.0, -1.0), None, "sum", (-3.0, 2.0), ((1, 1), -5.0, 0.0), None),
    # w·τ = 1, −4: G = −3 → γ = −1; only the negated model agrees: D = −4, W = −1 → m = 4
    ("negated_model_wins", (1.0, -1.0), None, "sum", (1.0, 4.0), ((0, 1), -4.0, -1.0), None),
    # count: votes +1, −1 → G = 0 → γ = +1: model 0 selected, D = 1, W = 1
    ("negated_model_count", (1.0, -1.0), None, "count", (1.0, 4.0), ((1, 0), 1.0, 1.0), None),
    # model 0 protects |τ_0| ≥ 1: G = 1 → γ = +1 (plain TIES: γ_T = −1, selects model 1)
    ("protected_first", (1.0, -1.0), (1.0, INF), "sum", (1.0, 4.0), ((1, 0), 1.0, 1.0), (0, 1)),
    # three models: w·τ = 2, 3, −2: G = 3 → γ = +1; sel (1, 1, 0); D = 2 + 3 = 5, W = 0 → m = D
    ("W0_three_models", (1.0, -1.0, 2.0), None, "sum", (2.0, -3.0, -1.0), ((1, 1, 0), 5.0, 0.0),
     None),
    # count: votes +1, +1, −1 → G = 1 → γ = +1: the same
    ("W0_three_models_count", (1.0, -1.0, 2.0), None, "count", (2.0, -3.0, -1.0),
     ((1, 1, 0), 5.0, 0.0), None),
    # a zero weight selects nothing: w·τ = −1, 0 → γ = −1; D = −1, W = 1
    ("zero_weight", (1.0, 0.0), None, "sum", (-1.0, 5.0), ((1, 0), -1.0, 1.0), None),
]

HAND_MERGES = [pytest.param(R.merge, id="backend=torch"), pytest.param(C.merge, id="backend=c"),
               pytest.param(triton_merge, id="backend=triton", marks=pytest.mark.interpreter)]


@pytest.mark.parametrize("merge", HAND_MERGES)
@pytest.mark.parametrize("dtype", [F16, F32], ids=ids("dtype"))
@pytest.mark.parametrize("normalize", [True, False], ids=ids("normalize"))
@pytest.mark.parametrize("case", HAND, ids=lambda c: c[0])
def test_negative_weights_hand_computed(case, normalize, dtype, merge):
    _, weights, u, elect, tau, (sel, D, W), ties_sel = case
    n = len(weights)
    base = torch.full((1,), HB, dtype=dtype)
    models = torch.tensor([[HB + x] for x in tau], dtype=dtype)
    cfg = mode_cfg("ties", weights, (0.0,) * n, u or (INF,) * n, HL, normalize,
                   elect == "count")
    m = D / W if normalize and W != 0 else D
    out = torch.full((1,), 7.0, dtype=dtype)
    counts = merge(base, models, out, cfg)
    assert out.item() == HB + HL * m, (out.item(), HB + HL * m)
    prot = [u is not None and abs(x) >= ui for x, ui in zip(tau, u or (INF,) * n)]
    ties_sel = ties_sel or sel
    want = torch.zeros(n, len(COUNTERS), dtype=torch.int64)
    for i in range(n):
        want[i, KEPT] = 1
        want[i, PROTECTED] = prot[i]
        want[i, SELECTED] = sel[i]
        want[i, DROPPED_BY_SIGN] = not sel[i] and tau[i] != 0
        want[i, IMPORTANT_DROPPED] = prot[i] and not sel[i]
        want[i, TIES_IMPORTANT_DROPPED] = prot[i] and not ties_sel[i]
    assert counts.cpu().tolist() == want.tolist()


# ---------------------------------------------------------------------------------------
# 3. mixed-sign weights on random inputs

MIXED_WEIGHTS = {1: (-0.75,), 2: (0.6, -0.6), 3: (1.0, -0.3, 0.3),
                 8: (0.5, -0.5, 0.3, -0.3, 1.25, -0.75, -0.5, 1.0)}
N_MIXED = {"c": 3001, "triton": 512}


def derive(base, models, cfg):
    """(sel, D, W) of docs/spec.md §5-§7 in fp64, written out here, apart from the reference."""
    x32 = models.float() - base.float()
    x, a = x32.double(), x32.abs()
    n = x.shape[0]
    kept = [(a[i] >= cfg.t[i]) & (cfg.t[i] != INF) for i in range(n)]
    prot = [(a[i] >= cfg.u[i]) & (cfg.u[i] != INF) for i in range(n)]
    w = cfg.weights
    sgn = [(1 if w[i] > 0 else -1 if w[i] < 0 else 0) * torch.sign(x[i]) for i in range(n)]
    vote = sgn if cfg.elect == "count" else [w[i] * x[i] for i in range(n)]
    g_kept = g_prot = torch.zeros_like(x[0])
    for i in range(n):
        g_kept = g_kept + torch.where(kept[i], vote[i], 0.0)
        g_prot = g_prot + torch.where(prot[i], vote[i], 0.0)
    any_prot = torch.stack(prot).any(0)
    gamma = torch.where(torch.where(any_prot, g_prot, g_kept) >= 0, 1.0, -1.0)
    sel = [kept[i] & (sgn[i] == gamma) for i in range(n)]
    D = W = torch.zeros_like(x[0])
    for i in range(n):
        D = D + torch.where(sel[i], w[i] * x[i], 0.0)
        W = W + sel[i].double() * w[i]                # w_i·sel_i, in fp64
    return torch.stack(sel), D, W


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("n", [1, 2, 3, 8], ids=ids("n_models"))
@pytest.mark.parametrize("elect", ["sum", "count"], ids=ids("elect"))
@pytest.mark.parametrize("slack", [0.0, 0.1], ids=ids("slack"))
@pytest.mark.parametrize("normalize", [True, False], ids=ids("normalize"))
def test_mixed_sign_weights(backend, n, elect, slack, normalize):
    dtype = F16 if backend == "triton" else DTYPES[n % 3]
    base, models = make_inputs(n, N_MIXED[backend], dtype, seed=10 + n)
    t, u = thresholds(base, models, 0.5, slack)
    weights = MIXED_WEIGHTS[n]
    cfg = mode_cfg("ties", weights, tuple(t), tuple(u), 0.75, normalize, elect == "count")
    out, _ = check_merge(MERGES[backend], base, models, cfg, dtype)
    sel, D, W = derive(base, models, cfg)
    neg = torch.tensor([w < 0 for w in weights])
    assert sel[neg].any(), "no negatively weighted entry selected"
    if n >= 2:
        fallback = (W == 0) & (D != 0)
        assert int(fallback.sum()) >= 5, "the W = 0 fallback (m = D) is not reached"
    # the reference (checked above against the backend) against this file's derivation
    m = torch.where(W != 0, D / torch.where(W != 0, W, 1.0), D) if normalize else D
    assert_ulp_close(out, (base.double() + 0.75 * m).to(dtype), what="derived θ")


# ---------------------------------------------------------------------------------------
# 4. the streamed pipeline at chunk boundaries

CHUNK = 64


@pytest.mark.parametrize("step", [1, 2, 7, CHUNK])
def test_chunk_ranges_tile_exactly(step):
    sizes = {0, 1, 2} | {k * step + d for k in (1, 2, 3) for d in (-1, 0, 1)}
    for n in sorted(s for s in sizes if s >= 0):
        ranges = pipeline.chunk_ranges(n, step)
        if n == 0:
            assert ranges == [(0, 0)]
            continue
        pos = 0
        for start, count in ranges:
            assert start == pos and 0 < count <= step, (n, step, ranges)
            pos += count
        assert pos == n, f"chunk_ranges({n}, {step}) covers {pos} entries: {ranges}"
        assert len(ranges) == -(-n // step)


STREAM_SIZES = {"t1": (1,), "t63": (63,), "t64": (64,), "t65": (65,), "t127": (127,),
                "t128": (128,), "t129": (129,), "m129": (3, 43), "t193": (193,)}


def _stream_state_dicts(dtype):
    total = sum(torch.Size(s).numel() for s in STREAM_SIZES.values())
    base, models = make_inputs(2, total, dtype, seed=3)

    def sd(x):
        out, pos = {}, 0
        for name, shape in STREAM_SIZES.items():
            k = torch.Size(shape).numel()
            out[name] = x[pos:pos + k].reshape(shape).clone()
            pos += k
        return out
    return sd(base), [sd(m) for m in models]


STREAM_MODES = [dict(method="task_arithmetic", weights=[1.0, 0.5], scale=0.8),
                dict(method="ties_sv", weights=[1.0, -0.5], density=0.6, slack=0.2),
                dict(method="ties_sv", density=0.6, slack=0.2, scope="model", elect="count")]


@pytest.mark.parametrize("backend", [pytest.param("torch", id="backend=torch"), *BACKEND_PARAMS])
@pytest.mark.parametrize("kw", STREAM_MODES,
                         ids=lambda kw: f"{kw['method']}-{kw.get('scope', 'tensor')}")
def test_streamed_merge_at_chunk_boundaries(backend, kw, monkeypatch):
    dtype = BF16
    base_sd, model_sds = _stream_state_dicts(dtype)
    # resident (one chunk per tensor) on the reference backend
    want, want_report = fastmerge.merge(base_sd, model_sds, backend="torch", device="cpu",
                                        progress=False, **kw)
    # and the spec's definition tensor by tensor, independent of the pipeline
    params = make_params(kw["method"], 2, **{k: v for k, v in kw.items() if k != "method"})
    thr = None
    if kw.get("scope") == "model":
        tau = torch.cat([R.task_vectors(base_sd[k].reshape(-1), torch.stack(
            [sd[k].reshape(-1) for sd in model_sds])).abs() for k in STREAM_SIZES], dim=1)
        pairs = [R.thresholds_by_sort(tau[i], 0.6, 0.2) for i in range(2)]
        thr = ([p[0] for p in pairs], [p[1] for p in pairs])
    for name in STREAM_SIZES:
        ref, _, _ = R.merge_one(base_sd[name], torch.stack([sd[name] for sd in model_sds]),
                                params, thresholds=thr)
        assert torch.equal(want[name].view(torch.int16), ref.view(torch.int16)), name

    # streamed: nothing resident, chunks of 64 entries
    from fastmerge.backends import torch_backend
    monkeypatch.setattr(pipeline, "DEFAULT_RESIDENT_BYTES", 0)
    monkeypatch.setattr(pipeline, "DEFAULT_CHUNK_ELEMS", CHUNK)
    monkeypatch.setattr(torch_backend, "CHUNK_ELEMS", CHUNK)
    monkeypatch.setattr(C, "CHUNK_ELEMS", CHUNK, raising=False)
    calls = []
    real = pipeline.chunk_ranges

    def spy(n, step):
        calls.append((n, step))
        return real(n, step)
    monkeypatch.setattr(pipeline, "chunk_ranges", spy)
    device = triton_device() if backend == "triton" else "cpu"
    if backend == "triton":
        from fastmerge.backends import triton_backend
        monkeypatch.setattr(triton_backend, "CHUNK_ELEMS", CHUNK, raising=False)
    got, report = fastmerge.merge(base_sd, model_sds, backend=backend, device=device,
                                  progress=False, **kw)
    assert {(1, CHUNK), (127, CHUNK), (128, CHUNK), (129, CHUNK)} <= set(calls), calls
    for name in STREAM_SIZES:
        assert_ulp_close(got[name].cpu(), want[name], what=name)
        if backend == "torch":
            assert torch.equal(got[name].view(torch.int16), want[name].view(torch.int16)), name
    assert {k: v for k, v in report.items() if k != "backend"} == \
        {k: v for k, v in want_report.items() if k != "backend"}


# ---------------------------------------------------------------------------------------
# 5. protected-first election on make_inputs' random data

def test_make_inputs_weighted_sigmas_differ():
    """w_i·σ_i differ between models (equal ones made protected-first a no-op)."""
    products = [WEIGHTS[i] * SIGMA * SIGMA_STEPS[i % len(SIGMA_STEPS)] for i in range(8)]
    assert len(set(products)) == len(products)
    base, models = make_inputs(3, 20000, F32, seed=0)
    tau = R.task_vectors(base, models).double()
    spread = [float(w * tau[i].std()) for i, w in enumerate(WEIGHTS[:3])]
    assert min(abs(a - b) / max(a, b) for a in spread for b in spread if a != b) > 0.1


@pytest.mark.parametrize("merge", [pytest.param(C.merge, id="backend=c"),
                                   pytest.param(triton_merge, id="backend=triton",
                                                marks=pytest.mark.interpreter)])
@pytest.mark.parametrize("n", [2, 3], ids=ids("n_models"))
@pytest.mark.parametrize("dtype", [F16, BF16], ids=ids("dtype"))
def test_slack_changes_the_election_on_random_data(merge, n, dtype):
    N = 4000 if merge is C.merge else 1024
    base, models = make_inputs(n, N, dtype, seed=n)
    t, u = thresholds(base, models, 0.3, 0.05)
    out_sv, c_sv = check_merge(merge, base, models, ties_cfg(n, t, u), dtype)
    out_ties, c_ties = check_merge(merge, base, models, ties_cfg(n, t, [INF] * n), dtype)
    assert (c_sv[:, IMPORTANT_DROPPED] != c_sv[:, TIES_IMPORTANT_DROPPED]).any(), c_sv
    assert (c_sv[:, IMPORTANT_DROPPED] <= c_sv[:, TIES_IMPORTANT_DROPPED]).all(), c_sv
    differ = out_sv.view(torch.int16) != out_ties.view(torch.int16)
    assert differ.any(), "TIES-SV equals plain TIES everywhere"
    assert not torch.equal(c_sv[:, SELECTED], c_ties[:, SELECTED])
