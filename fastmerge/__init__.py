"""fastmerge: fast, lean, exact merging of LLM checkpoints (TIES, TIES-SV).

    import fastmerge
    result = fastmerge.merge("base", ["ct", "sft"], method="ties_sv", density=0.2,
                             slack=0.05, output="merged")

The algebra is docs/spec.md's; backends (Triton on CUDA, C on CPU, the PyTorch reference)
are chosen in ``fastmerge.backends``.
"""
__version__ = "0.1.0"

from .errors import (BackendUnavailable, FastmergeError, InputError, OutputError,  # noqa: E402
                     ParameterError)


def __getattr__(name):
    """``merge`` and ``MergeResult`` load on first use, so ``import fastmerge.cli`` can
    configure the process before PyTorch (and its OpenMP runtime) is imported."""
    if name in ("merge", "MergeResult"):
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'fastmerge' has no attribute {name!r}")


__all__ = ["merge", "MergeResult", "FastmergeError", "ParameterError", "InputError",
           "OutputError", "BackendUnavailable", "__version__"]
