"""Random merges, each backend against the reference: every method with random knobs,
shapes, dtypes and inputs (docs/spec.md §10's bar: counters and thresholds equal,
outputs within one ulp, the same errors).

A seed fixes the whole case, so a failure names a case that can be rerun alone. The
knobs cover the edges the targeted tests cover one at a time, here in combination:
density 0 and 1, weights 0 and negative, slack, gamma, epsilon, t at its ends, both
elections and scopes, normalize on and off, an output dtype, models of other dtypes than
the base; inputs with exact zeros, ties, a model that cancels another, empty tensors, 1-D
and 3-D tensors, and (with allow_nonfinite) infinities, NaN and magnitudes from 1e-45
to 1e38. Streaming in small chunks must not change a byte.
"""
from __future__ import annotations

import random

import pytest
import torch

import fastmerge
from fastmerge import methods, pipeline
from fastmerge.backends import c_backend
from tests.checks import assert_ulp_close

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _shapes(r: random.Random) -> dict:
    out = {}
    for layer in range(r.randint(1, 2)):
        out[f"model.layers.{layer}.mlp.up_proj.weight"] = (r.randint(1, 40), r.randint(1, 70))
        out[f"model.layers.{layer}.input_layernorm.weight"] = (r.randint(1, 50),)
    if r.random() < 0.3:
        out["model.layers.0.conv.weight"] = (r.randint(1, 5), r.randint(1, 9), r.randint(1, 4))
    if r.random() < 0.3:
        out["model.layers.1.empty.weight"] = r.choice([(0, 5), (4, 0), (0,)])
    return out


def _delta(r: random.Random, g: torch.Generator, shape, extreme: bool) -> torch.Tensor:
    d = 0.01 * torch.randn(shape, generator=g)
    if r.random() < 0.2:                                  # exact zeros and ties
        d = torch.round(d * 100) / 100 * (torch.rand(shape, generator=g) < 0.5)
    if extreme and r.random() < 0.5:
        exp = torch.randint(-45, 39, shape, generator=g).double()
        d = (torch.randn(shape, generator=g).double() * 10.0 ** exp).float()
        for bad, every in ((float("nan"), 7), (float("inf"), 5), (-float("inf"), 11)):
            if r.random() < 0.3:
                d.view(-1)[::every] = bad
    return d


def case(seed: int) -> tuple[dict, list, dict]:
    """(base, models, merge keywords) of random case ``seed``."""
    r = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    name = r.choice(sorted(methods.METHODS))
    spec = methods.METHODS[name]
    lo, hi = spec.models
    n = r.randint(lo, hi or 4)
    dt = r.choice(DTYPES)
    extreme = r.random() < 0.25
    base = {k: (0.05 * torch.randn(s, generator=g)).to(dt) for k, s in _shapes(r).items()}
    mixed = r.random() < 0.3
    models = []
    for i in range(n):
        m = {}
        for k, v in base.items():
            d = _delta(r, g, v.shape, extreme)
            if i > 0 and r.random() < 0.1:                # cancels model 0's task vector
                d = -(models[0][k].float() - v.float())
            m[k] = (v.float() + d).to(r.choice(DTYPES) if mixed else dt)
        models.append(m)
    kw = dict(method=name, progress=False, seed=r.randint(0, 2**31 - 1),
              allow_nonfinite=extreme and r.random() < 0.8)
    knobs = spec.knobs
    if "weights" in knobs:
        kw["weights"] = [r.choice([1.0, 0.5, 0.3, -0.5, 2.0, 0.0]) for _ in range(n)]
    if "density" in knobs:
        kw["density"] = [r.choice([0.0, 0.1, 0.2, 0.33, 0.5, 0.9, 1.0]) for _ in range(n)]
    if "epsilon" in knobs:       # DELLA: density ± epsilon inside (0, 1)
        kw["density"] = [r.choice([0.0, 0.3, 0.5, 0.6, 1.0]) for _ in range(n)]
        kw["epsilon"] = [r.choice([0.0, 0.1, 0.25]) for _ in range(n)]
    if "gamma" in knobs:         # breadcrumbs: density + gamma <= 1
        kw["gamma"] = [r.choice([0.0, 0.01, 0.1, 0.3]) for _ in range(n)]
        kw["density"] = [d if d == 1 else min(d, 1 - gm)
                         for d, gm in zip(kw["density"], kw["gamma"])]
    if "slack" in knobs and r.random() < 0.6:
        kw["slack"] = [min(r.choice([0.0, 0.05, 0.1]), d) for d in kw["density"]]
    if "scale" in knobs and r.random() < 0.5:
        kw["scale"] = r.choice([0.5, 1.0, 1.7])
    if "t" in knobs:
        kw["t"] = r.choice([0.0, 0.3, 0.5, 0.77, 1.0])
    if spec.elect:
        kw["elect"] = r.choice(["sum", "count"])
    if "density" in knobs and r.random() < 0.3:
        kw["scope"] = "model"
    if r.random() < 0.3:
        kw["normalize"] = r.choice([True, False])
    if r.random() < 0.3:
        kw["dtype"] = r.choice(["float16", "bfloat16", "float32"])
    if len(spec.vectors) > 1 and r.random() < 0.7:
        kw["vectors"] = r.choice(list(spec.vectors))
    return base, models, kw


def _run(base, models, kw, backend):
    """(state dict, report) or the error's type and message."""
    try:
        res = fastmerge.merge(base, models, backend=backend, **kw)
    except fastmerge.FastmergeError as e:
        return type(e).__name__, str(e)
    return res.state_dict, res.report


def _agree(got, want, where: str):
    if isinstance(want[0], str) or isinstance(got[0], str):
        assert got == want, f"{where}: {got} != {want}"
        return
    assert got[0].keys() == want[0].keys(), where
    for k in want[0]:
        assert_ulp_close(got[0][k], want[0][k], what=f"{where}: {k}")
    assert got[1]["tensors"] == want[1]["tensors"], where
    assert got[1].get("totals") == want[1].get("totals"), where
    assert got[1].get("model_thresholds") == want[1].get("model_thresholds"), where


@pytest.mark.parametrize("block", range(8))
def test_c_backend_agrees_with_the_reference(block, monkeypatch):
    for seed in range(50 * block, 50 * block + 50):
        base, models, kw = case(seed)
        want = _run(base, models, kw, "torch")
        where = f"case {seed} ({kw})"
        _agree(_run(base, models, kw, "c"), want, where)
        if seed % 5 == 0:                       # streamed in small chunks: the same bytes
            with monkeypatch.context() as m:
                m.setattr(pipeline, "DEFAULT_RESIDENT_BYTES", 0)
                m.setattr(c_backend, "CHUNK_ELEMS", random.Random(seed).choice([1, 7, 300]),
                          raising=False)
                _agree(_run(base, models, kw, "c"), want, where + ", in chunks")


@pytest.mark.interpreter
@pytest.mark.parametrize("block", range(2))
def test_triton_backend_agrees_with_the_reference(block):
    for seed in range(1000 + 20 * block, 1000 + 20 * block + 20):
        base, models, kw = case(seed)
        _agree(_run(base, models, kw, "triton"), _run(base, models, kw, "torch"),
               f"case {seed} ({kw})")
