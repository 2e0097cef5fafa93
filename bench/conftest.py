"""pytest configuration of the benchmark suite (bench/test_*.py), run with pytest-benchmark:

    pip install -e ".[bench]"
    python -m pytest bench/ --benchmark-only
    python -m pytest bench/ --benchmark-only --bench-shapes 4096x4096,11008x4096
    python -m pytest bench/ --benchmark-only --benchmark-autosave          # then, later:
    python -m pytest bench/ --benchmark-only --benchmark-compare           # vs the last save
    python -m pytest bench/ --benchmark-only --benchmark-json out.json     # machine-readable

Not part of the test run: pyproject's testpaths is tests/, so a plain ``python -m pytest``
never collects bench/. The end-to-end scripts (bench_e2e_cpu.py, ...) stay scripts.
"""
from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
# the suite imports the scripts' functions (bench_cpu_kernels.py) and the repository's
# fastmerge, whatever pytest's import mode and wherever it is started from
for p in (str(BENCH.parent), str(BENCH)):
    if p not in sys.path:
        sys.path.insert(0, p)

#: small enough that the suite takes about a minute on 2 cores; the Llama-2-7B shapes of
#: bench/README.md are --bench-shapes 4096x4096,11008x4096
DEFAULT_SHAPES = "1024x1024,2048x1024"


def pytest_addoption(parser):
    group = parser.getgroup("fastmerge benchmarks")
    group.addoption("--bench-shapes", default=DEFAULT_SHAPES, metavar="ROWSxCOLS,...",
                    help=f"tensor shapes to benchmark (default {DEFAULT_SHAPES})")
    group.addoption("--bench-threads", type=int, default=0, metavar="N",
                    help="threads for the C kernels and torch (default: all cores)")


def pytest_generate_tests(metafunc):
    if "shape" in metafunc.fixturenames:
        names = [s.strip() for s in metafunc.config.getoption("--bench-shapes").split(",")
                 if s.strip()]
        metafunc.parametrize("shape", names, scope="module")


def pytest_configure(config):
    threads = config.getoption("--bench-threads", 0)
    if threads:
        import torch

        from fastmerge.backends import c_backend
        torch.set_num_threads(threads)
        if c_backend.unavailable_reason() is None:
            c_backend.set_num_threads(threads)
