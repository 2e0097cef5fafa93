"""breadcrumbs and breadcrumbs_ties (docs/spec.md §8b): the two-sided magnitude trim.

kept_i = t_i ≤ |τ_i| < h_i, with t_i the L_i-th largest |τ_i| (L_i = min(⌊d_i·|P|⌋ +
⌊γ_i·|P|⌋, |P|)) and h_i the (L_i − ⌊d_i·|P|⌋)-th largest (+inf when that rank is 0).
Hand-computed cases, the three backends bit for bit, the thresholds by sorting against
the pipeline's selection, and fastmerge.merge() / YAML end to end.
"""
from __future__ import annotations

import math

import pytest
import torch

import fastmerge
from fastmerge import methods, select
from fastmerge import reference as R
from fastmerge.backends import c_backend as C
from fastmerge.kernel_api import DROPPED_BY_SIGN, KEPT, PROTECTED, SELECTED, KernelConfig
from fastmerge.params import make_params
from tests.checks import merged_three_ways, assert_same, make_inputs, run
from tests.test_exactness import triton_merge

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
DTYPES = [F16, BF16, F32]
NAME = {F16: "fp16", BF16: "bf16", F32: "fp32"}
BC = ("breadcrumbs", "breadcrumbs_ties")
INF = math.inf
WEIGHTS = {1: (0.8,), 2: (0.6, -0.45), 3: (1.0, -0.3, 0.35)}
# (density, gamma) per model: between, gamma 0, d + gamma > 1, density 1 / 0 / tiny
KNOBS = {1: [((0.3,), (0.05,)), ((0.5,), (0.0,)), ((0.7,), (0.6,))],
         2: [((0.3, 0.5), (0.05, 0.1)), ((1.0, 0.2), (0.3, 0.0)), ((0.0, 0.9), (0.2, 0.2))],
         3: [((0.2, 0.4, 0.6), (0.01, 0.1, 0.5)), ((0.0004, 1.0, 0.3), (0.1, 0.0, 0.7))]}


def ids(name):
    return lambda v: f"{name}={NAME.get(v, v)}"


def sort_thresholds(base, models, density, gamma, population=None):
    a = R.task_vectors(base, models).abs()
    pairs = [R.breadcrumbs_thresholds_by_sort(a[i], density[i], gamma[i], population)
             for i in range(models.shape[0])]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def cfg_for(method, weights, t, h, *, normalize=None, elect="sum", scale=0.8):
    m = methods.METHODS[method]
    return m.kernel_config(weights, scale, m.normalize_default if normalize is None
                           else normalize, elect, t, h=h)


# ---------------------------------------------------------------------------------------
# hand-computed

def _one(tau, density, gamma, method="breadcrumbs", weights=(1.0,), normalize=None):
    models = torch.tensor(tau, dtype=F32).reshape(len(weights), -1)
    base = torch.zeros(models.shape[1], dtype=F32)
    t, h = sort_thresholds(base, models, density, gamma)
    cfg = cfg_for(method, weights, t, h, normalize=normalize, scale=1.0)
    out, counts = run(R.merge, base, models, cfg, F32)
    return t, h, out.tolist(), counts


def test_hand_computed_window():
    tau = [10., -9., 8., 7., -6., 5., 4., 3., 2., 1.]
    # K = 3, G = 2: t = 5th largest (6), h = 2nd largest (9): keep 8, 7, -6
    t, h, out, counts = _one(tau, (0.3,), (0.2,))
    assert (t, h) == ([6.0], [9.0])
    assert out == [0., 0., 8., 7., -6., 0., 0., 0., 0., 0.]
    assert counts[0, KEPT] == 3 and counts[0, SELECTED] == 3 and counts[0, PROTECTED] == 0
    # gamma 0: no upper cut (h = inf), the plain TIES trim (top 3)
    t, h, out, _ = _one(tau, (0.3,), (0.0,))
    assert (t, h) == ([8.0], [INF]) and out == [10., -9., 8.] + [0.] * 7
    # d + gamma > 1: as mergekit, the top is cut to |P| − K = 5 and the bottom 5 are kept
    t, h, out, _ = _one(tau, (0.5,), (0.7,))
    assert (t, h) == ([1.0], [6.0]) and out == [0.] * 5 + [5., 4., 3., 2., 1.]
    # density 1 keeps everything whatever gamma (mergekit returns the task vector)
    t, h, out, _ = _one(tau, (1.0,), (0.2,))
    assert (t, h) == ([0.0], [INF]) and out == tau
    # ⌊d·|P|⌋ = 0 keeps nothing
    for d in (0.0, 0.05):
        t, h, out, counts = _one(tau, (d,), (0.2,))
        assert (t, h) == ([INF], [INF]) and out == [0.] * 10 and counts[0, KEPT] == 0


def test_hand_computed_ties_at_both_cutoffs():
    tau = [4., 4., -4., 3., 3., 2., 2., -2., 1., 0.]
    # K = 3, G = 1 (L = 4): t = 4th largest = 3, h = 1st largest = 4: keep |τ| in [3, 4)
    t, h, out, counts = _one(tau, (0.3,), (0.1,))
    assert (t, h) == ([3.0], [4.0])
    assert out == [0., 0., 0., 3., 3., 0., 0., 0., 0., 0.]   # ties at h: all dropped
    # K = 2, G = 3 (L = 5): t = 3, h = 4 again; ties at t all kept
    t, h, out, _ = _one(tau, (0.2,), (0.3,))
    assert (t, h) == ([3.0], [4.0]) and out[3:5] == [3., 3.]


def test_hand_computed_breadcrumbs_ties():
    # two models, K = 2, G = 1 each (|P| = 5)
    tau = [[9., 3., -2., 1., 0.5],
           [-8., -4., 5., -1., 0.25]]
    t, h, out, counts = _one(sum(tau, []), (0.4, 0.4), (0.2, 0.2), method="breadcrumbs_ties",
                             weights=(1.0, 1.0))
    assert (t, h) == ([2.0, 4.0], [9.0, 8.0])
    # kept: m0 {3, -2}, m1 {-4, 5}. entry 1: 3 vs -4 → γ = −1, keep -4 (W = 1);
    # entry 2: -2 vs 5 → γ = +1, keep 5. breadcrumbs_ties' default normalize is False.
    assert out == [0., -4., 5., 0., 0.]
    assert counts[:, KEPT].tolist() == [2, 2] and counts[:, SELECTED].tolist() == [0, 2]
    assert counts[:, DROPPED_BY_SIGN].tolist() == [2, 0]
    _, _, out, _ = _one(sum(tau, []), (0.4, 0.4), (0.2, 0.2), method="breadcrumbs",
                        weights=(1.0, 1.0))
    assert out == [0., -1., 3., 0., 0.]                        # plain sum, no election


# ---------------------------------------------------------------------------------------
# thresholds: sorting vs the pipeline's selection (radix and bracketing)

@pytest.mark.parametrize("n", [1, 2, 3], ids=ids("n_models"))
def test_thresholds_selection_matches_sort(n):
    for kind, N in (("normal", 5000), ("grid", 3001), ("normal", 300_000)):
        base, models = make_inputs(n, N, BF16 if kind == "grid" else F16, seed=n, kind=kind)
        for density, gamma in KNOBS[n]:
            want = sort_thresholds(base, models, density, gamma)
            targets = select.Targets.breadcrumbs(density, gamma, N)
            radix = select.find_thresholds(C.histogram, lambda: [(base, models)], targets)
            assert [list(x) for x in radix] == [list(x) for x in want], (kind, density, gamma)
            if N > 100_000:
                br = select.bracket_thresholds(C.bracket, base, models, targets)
                assert br is None or [list(x) for x in br] == [list(x) for x in want]
            ref = select.find_thresholds(R.histogram, lambda: [(base, models)], targets) \
                if N < 10_000 else radix
            assert [list(x) for x in ref] == [list(x) for x in want]


def test_targets_ranks():
    tg = select.Targets.breadcrumbs((0.3, 0.5, 1.0, 0.0, 0.3), (0.2, 0.7, 0.5, 0.5, 0.0), 10)
    assert tg.ks == ((5, 2), (10, 5), (0, 0), (0, 0), (3, 0))
    assert tg.fixed == ((None, None), (None, None), (0.0, INF), (INF, INF), (None, INF))


# ---------------------------------------------------------------------------------------
# the three backends, bit for bit

@pytest.mark.parametrize("dtype", DTYPES, ids=ids("dtype"))
@pytest.mark.parametrize("n", [1, 2, 3], ids=ids("n_models"))
@pytest.mark.parametrize("method", BC)
def test_c_and_reference_bit_identical(method, n, dtype):
    base, models = make_inputs(n, 3000 + 37 * n, dtype, seed=n,
                               kind="grid" if n == 3 else "normal")
    for k, (density, gamma) in enumerate(KNOBS[n]):
        t, h = sort_thresholds(base, models, density, gamma)
        for normalize, elect in ((None, "sum"), (True, "count")):
            cfg = cfg_for(method, WEIGHTS[n], t, h, normalize=normalize, elect=elect)
            want = run(R.merge, base, models, cfg, dtype)
            assert_same(run(C.merge, base, models, cfg, dtype), want, f"C {cfg}")
            # the definition: kept_i = t_i ≤ |τ_i| < h_i
            a = R.task_vectors(base, models).abs()
            kept = (a >= torch.tensor(t).unsqueeze(1)) & (a < torch.tensor(h).unsqueeze(1))
            assert want[1][:, KEPT].tolist() == kept.sum(1).tolist()
            assert not want[1][:, PROTECTED].any()


@pytest.mark.interpreter
@pytest.mark.parametrize("n", [1, 2, 3], ids=ids("n_models"))
@pytest.mark.parametrize("method", BC)
def test_triton_bit_identical(method, n):
    k = BC.index(method)
    dtype = DTYPES[(n + k) % 3]
    base, models = make_inputs(n, 700, dtype, seed=20 + n, kind="grid" if n == 3 else "normal")
    for density, gamma in KNOBS[n][:2]:
        t, h = sort_thresholds(base, models, density, gamma)
        cfg = cfg_for(method, WEIGHTS[n], t, h, elect="count" if n == 2 else "sum")
        assert_same(run(triton_merge, base, models, cfg, dtype),
                    run(R.merge, base, models, cfg, dtype), f"Triton {cfg}")


def test_infinite_entries_and_upper_none():
    """h = +inf (nothing dropped from the top) keeps |τ| = inf; a finite h drops it."""
    base = torch.zeros(6)
    models = torch.tensor([[INF, 3.0, 2.0, 1.0, -INF, 0.5]])
    for h, kept in ((INF, 5), (3.0, 2)):
        cfg = cfg_for("breadcrumbs", (1.0,), [1.0], [h])
        got = [run(m, base, models, cfg, F32)[1][0, KEPT].item() for m in (R.merge, C.merge)]
        assert got == [kept, kept]


def test_kernel_config_and_params_checks():
    with pytest.raises(ValueError, match="upper"):
        KernelConfig(weights=(1.0,), h=(1.0,))
    cfg = KernelConfig(weights=(1.0,), t=(0.0,), h=(1.0,))
    assert not cfg.has_slack and cfg.h == (1.0,) and cfg.upper
    p = make_params("breadcrumbs", 2)
    assert p.gamma == (0.01, 0.01) and p.normalize is False and not p.spec.elect
    assert make_params("breadcrumbs_ties", 1).normalize is False
    with pytest.raises(fastmerge.ParameterError, match="gamma of model 1 must be in"):
        make_params("breadcrumbs", 2, gamma=[0.1, 1.5])
    with pytest.raises(fastmerge.ParameterError, match="gamma is only used by the breadcrumbs"):
        make_params("ties", 2, gamma=0.1)
    with pytest.raises(fastmerge.ParameterError, match="slack is only used"):
        make_params("breadcrumbs", 1, slack=0.1)
    with pytest.raises(fastmerge.ParameterError, match="scope 'model'"):
        make_params("breadcrumbs", 1, gamma=[[0.1, 0.2]], scope="model")


# ---------------------------------------------------------------------------------------
# fastmerge.merge() and YAML

def _bits(sd):
    return {k: (v.view(torch.int16) if v.is_floating_point() and v.element_size() == 2 else v)
            for k, v in sd.items()}


@pytest.mark.parametrize("scope", ["tensor", "model"])
@pytest.mark.parametrize("method", BC)
def test_merge_api_equals_reference(method, scope):
    from fastmerge.testing import PRESETS, state_dicts
    base, models = state_dicts(config=PRESETS["tiny"], n_models=2)
    kw = dict(density=[0.3, 0.5], gamma=[0.05, 0.0], weights=[1.0, 0.7], scope=scope)
    got = {be: fastmerge.merge(base, models, method=method, backend=be, progress=False, **kw)
           for be in ("torch", "c")}
    params = make_params(method, 2, **kw)
    names = [n for n, b in base.items() if b.is_floating_point() and b.dim() > 0]
    thresholds = None
    if scope == "model":
        tau = torch.cat([R.task_vectors(base[n].reshape(-1), torch.stack(
            [m[n].reshape(-1) for m in models])).abs() for n in names], dim=1)
        pairs = [R.breadcrumbs_thresholds_by_sort(tau[i], params.density[i], params.gamma[i])
                 for i in range(2)]
        thresholds = {"t": [p[0] for p in pairs], "h": [p[1] for p in pairs]}
        if method == "breadcrumbs_ties":
            thresholds["u"] = [INF, INF]                       # no slack: protects none
        for r in got.values():
            got_t = r.report["model_thresholds"]
            assert got_t == {k: [None if x == INF else x for x in v]
                             for k, v in thresholds.items()}
    for name in names:
        m = torch.stack([sd[name] for sd in models])
        want, counts, _ = R.merge_one(base[name], m, params, thresholds=thresholds, name=name)
        for be, r in got.items():
            assert torch.equal(_bits({name: r.state_dict[name]})[name],
                               _bits({name: want})[name]), (be, name)
    assert got["torch"].report["tensors"] == got["c"].report["tensors"]
    assert got["c"].report["parameters"]["gamma"] == [0.05, 0.0]


def test_yaml_config(tmp_path):
    import yaml

    from fastmerge.config import config_to_kwargs
    from fastmerge.testing import PRESETS, write_llama_family
    fam = write_llama_family(tmp_path / "fam", config=PRESETS["tiny"], n_models=2)
    doc = {"merge_method": "breadcrumbs_ties", "base_model": str(fam["base"]),
           "parameters": {"weight": 1.0, "density": 0.4},
           "models": [{"model": str(fam["models"][0]), "parameters": {"gamma": 0.02}},
                      {"model": str(fam["models"][1])}]}
    kw = config_to_kwargs(doc)
    assert kw["method"] == "breadcrumbs_ties" and kw["gamma"] == [0.02, 0.01]
    path = tmp_path / "bc.yml"
    path.write_text(yaml.safe_dump(doc))
    from fastmerge import cli
    assert cli.main(["merge", str(path), str(tmp_path / "out"), "--no-progress"]) == 0
    api = fastmerge.merge(fam["base"], fam["models"], method="breadcrumbs_ties", density=0.4,
                          weights=1.0, gamma=[0.02, 0.01], output=tmp_path / "api",
                          progress=False)
    assert api.report["parameters"]["normalize"] is False
    for f in sorted((tmp_path / "api").glob("*.safetensors")):
        assert f.read_bytes() == (tmp_path / "out" / f.name).read_bytes(), f.name
    # mergekit's default gamma and density (1.0: keep everything, as mergekit)
    kw = config_to_kwargs(dict(doc, merge_method="breadcrumbs",
                               parameters={"weight": 1.0},
                               models=[{"model": str(m)} for m in fam["models"]]))
    assert kw["gamma"] == [0.01, 0.01] and kw["density"] == [1.0, 1.0]
    with pytest.raises(fastmerge.ParameterError, match="'gamma' is only used by the methods"):
        config_to_kwargs(dict(doc, merge_method="ties"))


def test_same_ranks_as_a_sort_window():
    """Without ties, kept_i is exactly sort positions G_i + 1 .. G_i + K_i from the top
    (the window mergekit's magnitude_outliers keeps), also for d + γ > 1 (the K_i
    smallest) and γ·|P| < 1 (the top K_i; mergekit keeps nothing there, §8b)."""
    g = torch.Generator().manual_seed(5)
    N = 1000
    base = torch.zeros(N)
    models = torch.randperm(N, generator=g).float().add(1).mul(0.5).unsqueeze(0)  # distinct
    models[0, ::3] *= -1
    for d, gm in ((0.3, 0.01), (0.3, 0.0), (0.3, 0.0009), (0.6, 0.55), (0.001, 0.2)):
        t, h = sort_thresholds(base, models, (d,), (gm,))
        cfg = cfg_for("breadcrumbs", (1.0,), t, h, scale=1.0)
        out, counts = run(C.merge, base, models, cfg, F32)
        k, top = int(d * N), int(gm * N)
        top = min(top, N - k)
        order = models[0].abs().argsort(descending=True)
        want = torch.zeros(N, dtype=torch.bool)
        want[order[top:top + k]] = True
        assert torch.equal(out != 0, want), (d, gm)
        assert counts[0, KEPT] == k


def test_streamed_in_chunks_equals_whole(monkeypatch):
    """Thresholds by radix select over chunks (scope model over the whole checkpoint, and
    per tensor) and the merge chunk by chunk give the resident merge's bytes."""
    from fastmerge import pipeline
    from fastmerge.backends import torch_backend
    from fastmerge.testing import PRESETS, state_dicts
    base, models = state_dicts(config=PRESETS["tiny"], n_models=3)
    for scope in ("tensor", "model"):
        kw = dict(method="breadcrumbs_ties", density=[0.4, 0.2, 0.9], gamma=[0.02, 0.1, 0.3],
                  weights=[1.0, -0.5, 0.7], scope=scope, progress=False)
        whole = fastmerge.merge(base, models, backend="c", **kw)
        with monkeypatch.context() as mp:
            mp.setattr(pipeline, "DEFAULT_RESIDENT_BYTES", 0)
            for mod in (torch_backend, C):
                mp.setattr(mod, "CHUNK_ELEMS", 64, raising=False)
            streamed = fastmerge.merge(base, models, backend="c", **kw)
        want = _bits(whole.state_dict)
        assert all(torch.equal(_bits(streamed.state_dict)[k], want[k]) for k in want)
        assert streamed.report["tensors"] == whole.report["tensors"]


def test_c_module_needs_both_bounds():
    ext = C._module()
    f32 = C._code(torch.zeros(1), "x")
    with pytest.raises(ValueError, match="upper"):
        ext.merge(torch.zeros(4).numpy(), [torch.ones(4).numpy()], torch.zeros(4).numpy(),
                  1, 4, f32, f32, f32, True, ext.ELECT_NONE, False, (1.0,), None, None, 1.0,
                  torch.zeros(7, dtype=torch.int64).numpy(), h=(1.0,))


# ---------------------------------------------------------------------------------------
# slack (docs/spec.md §4a): breadcrumbs_ties protects each model's top s_i

SLACK = {1: (0.02,), 2: (0.05, 0.1), 3: (0.1, 0.0, 0.3)}


def slack_cfg(base, models, weights, density, gamma, slack, elect="sum", normalize=None,
              scale=0.8):
    a = R.task_vectors(base, models).abs()
    t, h = sort_thresholds(base, models, density, gamma)
    u = [R.thresholds_by_sort(a[i], 1.0, s)[1] for i, s in enumerate(slack)]
    m = methods.METHODS["breadcrumbs_ties"]
    return m.kernel_config(weights, scale, m.normalize_default if normalize is None
                           else normalize, elect, t, u, h=h)


def derive_slack(base, models, cfg):
    """kept, prot, sel, sel under plain TIES's γ, from §8b and §4a written out."""
    x = R.task_vectors(base, models)
    a = x.abs()
    n = x.shape[0]
    t, u, h = (torch.tensor(v).unsqueeze(1) for v in (cfg.t, cfg.u, cfg.h))
    prot = a >= u
    kept = ((a >= t) & (a < h)) | prot
    w = torch.tensor(cfg.weights, dtype=torch.float64).unsqueeze(1)
    sgn = torch.sign(w) * torch.sign(x.double())
    vote = sgn if cfg.elect == "count" else w * x.double()
    g_all = torch.zeros(x.shape[1], dtype=torch.float64)
    g_prot = torch.zeros(x.shape[1], dtype=torch.float64)
    for i in range(n):
        g_all = g_all + torch.where(kept[i], vote[i], 0.0)
        g_prot = g_prot + torch.where(prot[i], vote[i], 0.0)
    g_ties = torch.where(g_all >= 0, 1.0, -1.0)
    gamma = torch.where(prot.any(0), torch.where(g_prot >= 0, 1.0, -1.0), g_ties)
    return kept, prot, kept & (sgn == gamma), kept & (sgn == g_ties)


@pytest.mark.parametrize("dtype", DTYPES, ids=ids("dtype"))
@pytest.mark.parametrize("n", [1, 2, 3], ids=ids("n_models"))
def test_slack_c_and_reference_bit_identical(n, dtype):
    from fastmerge.kernel_api import IMPORTANT_DROPPED, TIES_IMPORTANT_DROPPED
    base, models = make_inputs(n, 3000 + 37 * n, dtype, seed=30 + n,
                               kind="grid" if n == 3 else "normal")
    for density, gamma in KNOBS[n]:
        slack = tuple(min(s, d) for s, d in zip(SLACK[n], density))
        for normalize, elect in ((None, "sum"), (True, "count")):
            cfg = slack_cfg(base, models, WEIGHTS[n], density, gamma, slack, elect, normalize)
            want = run(R.merge, base, models, cfg, dtype)
            assert_same(run(C.merge, base, models, cfg, dtype), want, f"C {cfg}")
            kept, prot, sel, sel_t = derive_slack(base, models, cfg)
            c = want[1]
            assert c[:, KEPT].tolist() == kept.sum(1).tolist()
            assert c[:, SELECTED].tolist() == sel.sum(1).tolist()
            assert c[:, PROTECTED].tolist() == prot.sum(1).tolist()
            assert c[:, IMPORTANT_DROPPED].tolist() == (prot & ~sel).sum(1).tolist()
            assert c[:, TIES_IMPORTANT_DROPPED].tolist() == (prot & ~sel_t).sum(1).tolist()


@pytest.mark.interpreter
@pytest.mark.parametrize("n", [1, 2, 3], ids=ids("n_models"))
def test_slack_triton_bit_identical(n):
    dtype = DTYPES[n % 3]
    base, models = make_inputs(n, 700, dtype, seed=40 + n, kind="grid" if n == 3 else "normal")
    density, gamma = KNOBS[n][0]
    slack = tuple(min(s, d) for s, d in zip(SLACK[n], density))
    cfg = slack_cfg(base, models, WEIGHTS[n], density, gamma, slack,
                    "count" if n == 2 else "sum")
    assert cfg.has_slack
    assert_same(run(triton_merge, base, models, cfg, dtype),
                run(R.merge, base, models, cfg, dtype), f"Triton {cfg}")


@pytest.mark.parametrize("merge", [pytest.param(R.merge, id="backend=torch"),
                                   pytest.param(C.merge, id="backend=c"),
                                   pytest.param(triton_merge, id="backend=triton",
                                                marks=pytest.mark.interpreter)])
def test_slack_by_hand(merge):
    """The outliers breadcrumbs drops from the top stay when protected: τ = 10..1,
    K = 3, G = 2 keeps {8, 7, −6}; s = 0.1 protects the top one (10), which the band
    drops; the second model's vote against it does not count (protected first)."""
    tau = [[10., -9., 8., 7., -6., 5., 4., 3., 2., 1.],
           [-1., 0., 0., 0., 0., 0., 0., 0., 0., 0.5]]
    models = torch.tensor(tau, dtype=F32)
    base = torch.zeros(10, dtype=F32)
    knobs = (base, models, (1.0, 3.0), (0.3, 1.0), (0.2, 0.0))
    cfg = slack_cfg(*knobs, (0.1, 0.0), scale=1.0)
    assert cfg.u == (10.0, INF) and cfg.h == (9.0, INF)
    out, counts = run(merge, base, models, cfg, F32)
    # entry 0: only model 0 protects it (vote +10 > 0): model 1's 3·(−1) is dropped by sign
    assert out.tolist() == [10., 0., 8., 7., -6., 0., 0., 0., 0., 1.5]
    assert counts[:, KEPT].tolist() == [4, 10] and counts[:, PROTECTED].tolist() == [1, 0]
    assert counts[:, SELECTED].tolist() == [4, 1]
    without = slack_cfg(*knobs, (0.0, 0.0), scale=1.0)
    assert run(merge, base, models, without, F32)[0].tolist() == \
        [-3., 0., 8., 7., -6., 0., 0., 0., 0., 1.5]


@pytest.mark.parametrize("scope", ["tensor", "model"])
def test_slack_merge_api(scope, monkeypatch):
    """fastmerge.merge() with slack: the reference's bytes on torch and C, whole and
    streamed; the report lists t, u and h."""
    from fastmerge.testing import PRESETS, state_dicts
    base, models = state_dicts(config=PRESETS["tiny"], n_models=2)
    kw = dict(method="breadcrumbs_ties", density=[0.3, 0.5], gamma=[0.05, 0.01],
              slack=[0.1, 0.02], weights=[1.0, 0.7], scope=scope, progress=False)
    got = merged_three_ways(monkeypatch, base, models, kw)
    params = make_params(n_models=2, **{k: v for k, v in kw.items() if k != "progress"})
    names = [n for n, b in base.items() if b.is_floating_point() and b.dim() > 0]
    thresholds = None
    if scope == "model":
        tau = torch.cat([R.task_vectors(base[n].reshape(-1), torch.stack(
            [m[n].reshape(-1) for m in models])).abs() for n in names], dim=1)
        thresholds = R.thresholds_by_sort_all(params.spec, tau, params.for_tensor(""))
        for r in got.values():
            assert r.report["model_thresholds"] == thresholds
    for name in names:
        m = torch.stack([sd[name] for sd in models])
        want, counts, _ = R.merge_one(base[name], m, params, thresholds=thresholds, name=name)
        for be, r in got.items():
            assert torch.equal(_bits({name: r.state_dict[name]})[name],
                               _bits({name: want})[name]), (be, name)
    rows = got["torch"].report["tensors"]
    assert all(set(row) >= {"t", "u", "h"} for row in rows)
    assert got["c"].report["tensors"] == rows == got["streamed"].report["tensors"]
    assert all(t["protected"] > 0 for t in got["c"].report["totals"])
    with pytest.raises(fastmerge.ParameterError, match="slack is only used by the methods"):
        make_params("breadcrumbs", 1, slack=0.01)
