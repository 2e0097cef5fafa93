"""The Triton backend: fused GPU kernels (kernels/triton_merge.py, fastmerge.kernels.triton_merge).

Same contract and signatures as fastmerge.reference (see fastmerge.kernel_api). Runs on
CUDA tensors, and on CPU tensors when TRITON_INTERPRET=1 (Triton's interpreter, for
tests without a GPU). Triton and the kernels are imported on first use, never when
fastmerge is imported; ``unavailable_reason()`` says why the backend cannot be used.
"""
from __future__ import annotations

import torch

from .. import della, geometry
from ..kernel_api import Capabilities
from ..reference import model_matrix
from . import triton_interpreted

CAPABILITIES = Capabilities(max_models=8)    # triton_merge.MAX_MODELS
NAME = "triton"


def DEVICES(device=None) -> tuple[str, ...]:
    return ("cpu", "cuda") if triton_interpreted() else ("cuda",)


def unavailable_reason() -> str | None:
    """None when Triton imports and there is a GPU (or the interpreter is on), else why not."""
    try:
        import triton  # noqa: F401, PLC0415  (imported on first use, on purpose)
    except ImportError as exc:
        return (f"triton cannot be imported ({exc}); install the GPU extra: "
                'pip install "fastmerge[gpu]" (from a checkout: pip install -e ".[gpu]")')
    if not torch.cuda.is_available() and not triton_interpreted():
        return ("no CUDA device is available (set TRITON_INTERPRET=1 to run the Triton "
                "kernels on the CPU, slowly, e.g. for tests)")
    return None


def _kernels():
    from ..kernels import triton_merge  # noqa: PLC0415  (imported on first use, on purpose)
    return triton_merge


def histogram(base: torch.Tensor, models: torch.Tensor, prefixes: torch.Tensor,
              level: int) -> torch.Tensor:
    """Radix-select histogram of kernel_api's contract: int64 [n, 2, NBINS] (on the device)."""
    return _kernels().histogram(base, model_matrix(models), prefixes, level)


def merge(base, models: torch.Tensor, out: torch.Tensor, cfg) -> torch.Tensor:
    """Fused merge pass of kernel_api's contract: writes ``out``, returns int64 [n, 7].
    DELLA's per-rank table (cfg.rank_keep) is ranked in torch first (no ``ranks``)."""
    models = model_matrix(models)
    return _kernels().merge(base, models, out, della.expand(cfg, base, models))


def gram(base, models, on_base: bool, seg: int, columns: bool = False) -> torch.Tensor:
    """The statistics pass of kernel_api's contract (docs/spec.md §8c): fp64 [Q, K]
    ([Q, seg, K] for ``columns``: the pieces kernel on a transposed copy of the chunk)."""
    from ..kernels import triton_gram  # noqa: PLC0415
    if columns:
        return geometry.columns_as_pieces(triton_gram.gram, base, models, on_base, seg)
    return triton_gram.gram(base, model_matrix(models), on_base, seg)


def combine(base, models, out: torch.Tensor, coef: torch.Tensor, seg: int,
            columns: bool = False, on_base: bool = True) -> torch.Tensor:
    """The combine pass of kernel_api's contract (docs/spec.md §8c): writes ``out``,
    returns int64 [n] non-finite counts."""
    from ..kernels import triton_gram  # noqa: PLC0415
    return triton_gram.combine(base, model_matrix(models), out, coef, seg, columns, on_base)
