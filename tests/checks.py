"""Assertions shared by the backend tests: exact counts, outputs within one ulp.

The spec's bar (docs/spec.md §10): thresholds and counters equal, outputs within one
unit in the last place of the output dtype of the reference (the fp64 definition rounded
once), with no other allowance — also where θ_b + λ·m cancels to (near) zero.
"""
from __future__ import annotations

import math

import torch

_MANTISSA = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23}
_EMIN = {torch.float16: -14, torch.bfloat16: -126, torch.float32: -126}


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Unit in the last place of ``dtype`` at magnitude |x| (fp64 result)."""
    _, e = torch.frexp(x.double().abs())
    exp = torch.clamp(e - 1, min=_EMIN[dtype])
    return torch.ldexp(torch.ones_like(x, dtype=torch.float64), exp - _MANTISSA[dtype])


def assert_ulp_close(actual: torch.Tensor, expected: torch.Tensor, *, max_ulps: float = 1.0,
                     what: str = "output") -> None:
    """|actual − expected| <= max_ulps · ulp (docs/spec.md §10), no other allowance."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    a, e = actual.detach().cpu().double().reshape(-1), expected.detach().cpu().double().reshape(-1)
    both_nan = torch.isnan(a) & torch.isnan(e)
    tol = max_ulps * ulp(torch.maximum(a.abs(), e.abs()), expected.dtype)
    diff = (a - e).abs()
    bad = ~both_nan & ~(diff <= tol) & ~(a == e)
    if bad.any():
        idx = bad.nonzero().flatten()
        rows = "\n".join(f"  [{int(i)}] got {a[i].item()!r} want {e[i].item()!r} "
                         f"(diff {diff[i].item():.3g}, tol {tol[i].item():.3g})" for i in idx[:8])
        raise AssertionError(f"{what}: {len(idx)} of {a.numel()} entries beyond "
                             f"{max_ulps} ulp ({expected.dtype}):\n{rows}")


def assert_counts_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "counts"):
    """Counter tables [n_models, n_counters] must be identical."""
    from fastmerge.kernel_api import COUNTERS
    a, e = actual.cpu().to(torch.int64), expected.cpu().to(torch.int64)
    if not torch.equal(a, e):
        rows = [f"  model {i} {c}: got {int(a[i, j])} want {int(e[i, j])}"
                for i in range(e.shape[0]) for j, c in enumerate(COUNTERS) if a[i, j] != e[i, j]]
        raise AssertionError(f"{what} differ:\n" + "\n".join(rows))


def thresholds_checked(histogram, base, models, density: float, slack: float):
    """(t, u) found by ``histogram`` through select.find_thresholds, asserted equal to
    the reference histogram's and to sorting (docs/spec.md §3-§4)."""
    from fastmerge import reference as R
    from fastmerge.select import Targets, find_thresholds
    n, N = models.shape
    dens, slk = [density] * n, [slack] * n
    t, u = find_thresholds(histogram, lambda: [(base, models)], Targets.of(dens, slk, N))
    assert (t, u) == find_thresholds(R.histogram, lambda: [(base, models)], Targets.of(dens, slk, N))
    abs_tau = R.task_vectors(base, models).abs()
    by_sort = [R.thresholds_by_sort(abs_tau[i], density, slack) for i in range(n)]
    assert (t, u) == ([x[0] for x in by_sort], [x[1] for x in by_sort]), "thresholds differ"
    return t, u


SIGMA = 0.002                    # make_inputs' σ_i = SIGMA·SIGMA_STEPS[i % 3]: 0.002, 0.003,
SIGMA_STEPS = (1.0, 1.5, 2.0)    # 0.004; w_i·σ_i all differ for WEIGHTS (n <= 8)


def make_inputs(n, N, dtype, seed=0, kind="normal", base_dtype=None):
    """Test inputs for the backend suites: (base, models [n, N]) in ``dtype``.

    normal: θ_b ~ N(0, 0.02²), τ_i ~ N(0, σ_i²), ~3% exact zeros (θ_i = θ_b), with
            σ_i = SIGMA·SIGMA_STEPS[i % 3] chosen so that w_i·σ_i differ between models
            for the WEIGHTS (else each model's top-s_i votes weigh the same and the
            protected-first election never changes a sum-mode election).
    grid:   everything on a 2^-6 grid: |τ| takes 9 values (heavy ties at the
            thresholds, G exactly 0 in places) and every fp32 sum is exact.
    wide:   |τ| over ~40 binades (level-0 digits far below the dense window).
    """
    g = torch.Generator().manual_seed(seed)
    bdt = base_dtype or dtype
    if kind == "grid":
        base = torch.randint(-64, 65, (N,), generator=g).double() / 64
        tau = torch.randint(-8, 9, (n, N), generator=g).double() / 64
        return base.to(bdt), (base + tau).to(dtype)
    base = (0.02 * torch.randn(N, generator=g, dtype=torch.float64)).to(bdt)
    sigma = torch.tensor([SIGMA * SIGMA_STEPS[i % len(SIGMA_STEPS)] for i in range(n)],
                         dtype=torch.float64)
    tau = sigma.unsqueeze(1) * torch.randn(n, N, generator=g, dtype=torch.float64)
    if kind == "wide":
        tau = tau * torch.exp2(torch.randint(-20, 8, (n, N), generator=g).double())
    models = (base.double() + tau).to(dtype)
    zeros = torch.rand(n, N, generator=g) < 0.03
    models[zeros] = base.to(dtype).expand(n, N)[zeros]
    return base, models


WEIGHTS = (1.0, 0.5, 1.25, 2.0, 0.75, 1.5, 0.25, 1.0)   # dyadic: fp32 sums are exact


def mode_cfg(method, weights, t=None, u=None, scale=1.0, normalize=None, elect_count=False):
    """The KernelConfig of ``method`` ('ties' takes slack thresholds ``u`` too, as
    'ties_sv'), built by the method table as the pipeline builds it."""
    from fastmerge import methods
    m = methods.get("ties_sv" if method == "ties" else method)
    return m.kernel_config(weights, scale, m.normalize_default if normalize is None else normalize,
                           "count" if elect_count else "sum", t, u)


def ties_cfg(n, t, u, *, elect_count=False, normalize=True, scale=1.0, weights=None):
    """A TIES(-SV) KernelConfig for n models with the dyadic WEIGHTS unless given."""
    return mode_cfg("ties", tuple(weights or WEIGHTS[:n]), t, u, scale, normalize, elect_count)


def check_merge(merge, base, models, cfg, out_dtype):
    """Run ``merge`` (a backend's fused pass) and the reference: counts equal, outputs
    within one ulp, every output entry written; return (out, counts)."""
    from fastmerge import reference as R
    N = models.shape[1]
    expected = torch.empty(N, dtype=out_dtype)
    want = R.merge(base, models, expected, cfg)
    actual = torch.full((N,), 7.0, dtype=out_dtype)   # garbage: every entry must be written
    got = merge(base, models, actual, cfg)
    assert got.dtype == torch.int64 and got.shape == want.shape
    assert_counts_equal(got, want)
    assert_ulp_close(actual, expected)
    return actual, got


# -- lowering Triton kernels for an H100 without a GPU ------------------------------------

_SM90_PROLOGUE = """
import os
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastmerge.kernels import triton_merge as T

def build(fn, sig, consts, warps, fma=False, needs=()):
    sig = dict(sig, **{k: "constexpr" for k in consts})
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]]
             for k, v in sig.items() if v.startswith("*") or k == "N"}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": warps, "enable_fp_fusion": False})
    ptx = k.asm["ptx"]
    divs = [line.split()[0] for line in ptx.splitlines() if line.strip().startswith("div")]
    assert all(d.startswith(("div.rn.", "div.s", "div.u")) for d in divs), divs
    assert fma or "fma.rn" not in ptx, f"FMA contraction in {fn.__name__}"
    for s in needs:
        assert s in ptx, f"{fn.__name__}: no {s} in the PTX"
    return k
"""


def compile_for_sm90(body: str) -> None:
    """Run ``body`` (calls of ``build(fn, signature, constexprs, num_warps, fma=False,
    needs=())``) in a fresh interpreter without TRITON_INTERPRET: each kernel is lowered to
    PTX/SASS for sm90 (no GPU needed), with correctly rounded divisions and, unless
    ``fma``, no FMA contraction. Skips when this Triton has no NVIDIA backend."""
    import os
    import subprocess
    import sys
    import textwrap

    import pytest
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = _SM90_PROLOGUE + textwrap.dedent(body) + "\nprint('compiled')\n"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]


# -- bit-exact comparisons and interruptions shared by several suites ---------------------

def run(merge, base, models, cfg, out_dtype):
    """(out, counters) of one fused pass; ``out`` starts as garbage, so every entry must
    be written."""
    out = torch.full((models.shape[1],), 7.0, dtype=out_dtype)
    counts = merge(base, models, out, cfg)
    return out, counts.cpu()


def assert_same(a, b, what):
    """Two (out, counters) pairs identical bit for bit."""
    (oa, ca), (ob, cb) = a, b
    assert torch.equal(oa.view(-1).view(torch.uint8), ob.view(-1).view(torch.uint8)), \
        f"{what}: outputs differ in {int((oa.double() != ob.double()).sum())} entries"
    assert torch.equal(ca, cb), f"{what}: counters differ\n{ca}\n{cb}"


def chunked(merge, base, models, cfg, out_dtype, step):
    """(out, counters) of [0, N) merged in chunks of ``step`` entries, each with its offset
    in the tensor (and its slice of DELLA's per-entry thresholds ``cfg.keep``)."""
    import dataclasses

    from fastmerge.kernel_api import COUNTERS
    N = models.shape[1]
    out = torch.full((N,), 7.0, dtype=out_dtype)
    counts = torch.zeros(models.shape[0], len(COUNTERS), dtype=torch.int64)
    for start in range(0, N, step):
        stop = min(N, start + step)
        piece = torch.empty(stop - start, dtype=out_dtype)
        c = cfg.at(cfg.offset + start)
        if cfg.keep is not None:
            c = dataclasses.replace(c, keep=cfg.keep[:, start:stop].contiguous())
        counts += merge(base[start:stop].contiguous(), models[:, start:stop].contiguous(),
                        piece, c).cpu()
        out[start:stop] = piece
    return out, counts


def state_dict_of(x: torch.Tensor, shapes: dict) -> dict:
    """The flat ``x`` cut into tensors of ``shapes`` (name -> shape), in order."""
    out, pos = {}, 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        out[name] = x[pos:pos + n].reshape(shape).clone()
        pos += n
    return out


def assert_same_over_threads(base, models, cfg, out_dtype, want) -> None:
    """The C backend's pass on 1, 2 and 3 threads gives ``want`` bit for bit."""
    from fastmerge.backends import c_backend as C
    try:
        for threads in (1, 2, 3):
            C.set_num_threads(threads)
            assert_same(run(C.merge, base, models, cfg, out_dtype), want, f"{threads} threads")
    finally:
        C.set_num_threads(0)


def merged_three_ways(monkeypatch, base, models, kw) -> dict:
    """``fastmerge.merge(base, models, **kw)`` on the torch and C backends with tensors
    held in memory, and on C streamed in chunks of 64 entries: {"torch", "c", "streamed"}."""
    import fastmerge
    from fastmerge import pipeline
    from fastmerge.backends import c_backend, torch_backend
    got = {be: fastmerge.merge(base, models, backend=be, **kw) for be in ("torch", "c")}
    with monkeypatch.context() as mp:
        mp.setattr(pipeline, "DEFAULT_RESIDENT_BYTES", 0)
        for mod in (torch_backend, c_backend):
            mp.setattr(mod, "CHUNK_ELEMS", 64, raising=False)
        got["streamed"] = fastmerge.merge(base, models, backend="c", **kw)
    return got


def interrupt_at_shard(monkeypatch, k: int) -> None:
    """Ctrl-C in the merge's main thread when shard ``k`` is about to start: shards
    0..k-1 are complete (as a real KeyboardInterrupt between two tensors)."""
    from fastmerge import output as output_mod
    real = output_mod.CheckpointWriter.begin

    def begin(self, task):
        if self.shard_of[task.name] == k and self._current != k:
            self._drain()
            raise KeyboardInterrupt
        return real(self, task)

    monkeypatch.setattr(output_mod.CheckpointWriter, "begin", begin)
