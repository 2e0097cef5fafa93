"""What a CPU user's ``pip install torch==2.13.0 -e .`` gives: no Triton, and enough to merge.

Triton (~1 GB) is the ``gpu`` extra, never a base dependency; ``import fastmerge`` and a
CPU merge must not import it (nor anything else only the ``test`` extra brings), so the
base install stays sufficient for the README's ``fastmerge demo``.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# in the `test` extra (or nowhere), never in the base install: a CPU merge must not need them
NOT_IN_BASE = ("triton", "transformers", "safetensors", "matplotlib")


def _pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:           # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _name(requirement: str) -> str:
    """The project name of a PEP 508 requirement string, normalised (PEP 503)."""
    name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1)
    return re.sub(r"[-_.]+", "-", name).lower()


def _run(*code: str) -> subprocess.CompletedProcess:
    """Run the pieces of ``code`` in a fresh interpreter, as a user would: no
    TRITON_INTERPRET, no pytest, the repository's copy of fastmerge."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    script = "\n".join(textwrap.dedent(c) for c in code)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)


# A meta-path finder that refuses NOT_IN_BASE, as if only the base dependencies were
# installed (an ImportError, as a missing package gives).
_BLOCK = f"""
import importlib.abc, sys
class _NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {NOT_IN_BASE!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by test_install)")
sys.meta_path.insert(0, _NotInstalled())
"""


def test_base_dependencies_leave_out_triton_and_test_only_packages():
    project = _pyproject()["project"]
    base = {_name(r) for r in project["dependencies"]}
    assert not base & set(NOT_IN_BASE), f"base dependencies include {base & set(NOT_IN_BASE)}"
    assert "torch" in base
    extras = project["optional-dependencies"]
    triton = [r for r in extras["gpu"] if _name(r) == "triton"]
    assert triton, "the gpu extra must bring Triton"
    # the test extra runs the Triton kernels in the interpreter (CI's interpreter lane)
    assert triton == [r for r in extras["test"] if _name(r) == "triton"]
    assert {"transformers", "safetensors"} <= {_name(r) for r in extras["test"]}


def test_cpu_merge_imports_no_triton():
    proc = _run("""
        import sys
        import fastmerge
        assert "triton" not in sys.modules, "import fastmerge imported triton"
        import torch
        from fastmerge.backends import c_backend
        g = torch.Generator().manual_seed(0)
        base = {"w": torch.randn(64, 32, generator=g).half(), "b": torch.randn(32, generator=g)}
        models = [{k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(v.dtype)
                   for k, v in base.items()} for _ in range(2)]
        backends = ["auto", "torch"] + (["c"] if c_backend.unavailable_reason() is None else [])
        for backend in backends:
            merged, report = fastmerge.merge(base, models, method="ties_sv", density=0.5,
                                             slack=0.1, backend=backend, device="cpu",
                                             progress=False)
            assert merged["w"].dtype == torch.float16 and merged["w"].shape == (64, 32)
            assert "triton" not in sys.modules, f"backend={backend!r} imported triton"
        print("merged with", ", ".join(backends))
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "merged with auto, torch" in proc.stdout


def test_demo_runs_on_the_base_install():
    """The README's first command, ``fastmerge demo``, with NOT_IN_BASE made
    unimportable: what ``pip install torch==2.13.0 -e .`` leaves."""
    proc = _run(_BLOCK, """
        import sys
        from fastmerge.cli import main
        code = main(["demo", "--preset", "tiny"])
        assert "triton" not in sys.modules
        sys.exit(code)
    """)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
