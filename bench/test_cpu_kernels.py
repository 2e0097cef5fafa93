"""Per-tensor CPU kernels under pytest-benchmark: the contenders of bench_cpu_kernels.py.

    python -m pytest bench/ --benchmark-only [--bench-shapes 4096x4096,11008x4096]

One fp16 tensor shape at a time (``--bench-shapes``, see conftest.py), a base and 2
fine-tunes, TIES-SV with density 0.2 and slack 0.05, exactly as bench_cpu_kernels.py
measures them (its functions are imported, not copied):

* ``c``: the C backend as the pipeline runs a tensor held in memory: exact thresholds by
  bracketing plus the fused merge pass; its parts ``c_thresholds`` (bracketing),
  ``c_thresholds_radix`` (3-pass radix select: streamed tensors and scope="model") and
  ``c_merge_pass``;
* ``reference``: the same merge on fastmerge.reference (backend "torch");
* ``incumbent``: TIES the way mergekit computes it (argsort top-k in the storage dtype).

Each shape's contenders form one pytest-benchmark group, so its table compares them side
by side. Every benchmark runs once untimed first (page faults, allocator, thread pools),
as the script's warm-up. Before timing, bracketing and radix select must give the same
thresholds. ``extra_info`` carries the shape and the bytes a merge moves (base + models
read once, output written once), for bandwidth figures (bench/make_tables.py).
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("pytest_benchmark", reason="the benchmark suite needs the bench extra: "
                    "pip install -e '.[bench]'")

import bench_cpu_kernels as B  # noqa: E402  (bench/ is on sys.path: conftest.py)

CONTENDERS = ["c", "c_thresholds", "c_thresholds_radix", "c_merge_pass", "reference",
              "incumbent"]
NEEDS_C = {"c", "c_thresholds", "c_thresholds_radix", "c_merge_pass"}


class Case:
    """One shape's tensors (B.make_tensors), flattened as the kernels take them, and the
    callables of every contender."""

    def __init__(self, shape: str):
        rows, cols = B.SHAPES.get(shape) or map(int, shape.lower().split("x"))
        self.shape = (rows, cols)
        self.base, self.models = B.make_tensors(rows, cols)
        self.flat_base = self.base.reshape(-1)
        self.flat_models = self.models.reshape(B.N_MODELS, -1)
        self.out = torch.empty_like(self.flat_base)
        self.numel = self.flat_base.numel()
        self.c_reason = B.c_backend.unavailable_reason()
        self.cfg = None
        if self.c_reason is None:
            t, u = self.c_thresholds()
            assert (t, u) == self.c_thresholds_radix(), "bracketing and radix select disagree"
            self.cfg = B.TIES_SV.kernel_config((1.0,) * B.N_MODELS, 1.0, True, "sum", t, u)

    def targets(self):
        return B.select.Targets.of([B.DENSITY] * B.N_MODELS, [B.SLACK] * B.N_MODELS,
                                   self.numel)

    # the contenders, as bench_cpu_kernels.bench_shape defines them
    def c(self):
        return B.fastmerge_ties_sv(B.c_backend, self.flat_base, self.flat_models, self.out)

    def c_thresholds(self):
        return B.thresholds(B.c_backend, self.flat_base, self.flat_models)

    def c_thresholds_radix(self):
        return B.select.find_thresholds(B.c_backend.histogram,
                                        lambda: [(self.flat_base, self.flat_models)],
                                        self.targets())

    def c_merge_pass(self):
        return B.c_backend.merge(self.flat_base, self.flat_models, self.out, self.cfg)

    def reference(self):
        return B.fastmerge_ties_sv(B.reference, self.flat_base, self.flat_models, self.out)

    def incumbent(self):
        return B.incumbent_ties(self.base, self.models)


@pytest.fixture(scope="module")
def case(shape):
    return Case(shape)


@pytest.mark.parametrize("contender", CONTENDERS)
def test_ties_sv_per_tensor(benchmark, case, shape, contender):
    if contender in NEEDS_C and case.c_reason:
        pytest.skip(f"C backend unavailable: {case.c_reason}")
    fn = getattr(case, contender)
    benchmark.group = f"ties_sv {shape} fp16, {B.N_MODELS} models"
    benchmark.extra_info.update(
        shape=list(case.shape), numel=case.numel, dtype="float16", n_models=B.N_MODELS,
        method="ties_sv", density=B.DENSITY, slack=B.SLACK, contender=contender,
        bytes_moved=(B.N_MODELS + 2) * case.numel * 2)
    if benchmark.enabled:
        fn()                        # warm-up, untimed
    benchmark(fn)
