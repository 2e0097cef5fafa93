"""fastmerge: fast, lean, exact merging of LLM checkpoints (TIES, TIES-SV, DARE, DELLA, ...).

    import fastmerge
    result = fastmerge.merge("base", ["ct", "sft"], method="ties_sv", density=0.2,
                             slack=0.05, output="merged")
    result.path, result.report

    state_dict, report = fastmerge.merge(base_sd, [ct_sd, sft_sd], method="ties")

help(fastmerge.merge) describes every parameter. The algebra is docs/spec.md's; backends
(Triton on CUDA, C on CPU, the PyTorch reference) are chosen in fastmerge.backends.
"""
__version__ = "0.2.0"

from .errors import (BackendUnavailable, FastmergeError, InputError, OutputError,  # noqa: E402
                     ParameterError)

_LAZY = ("merge", "MergeResult", "MergeInterrupted")


def __getattr__(name):
    """``merge``, ``MergeResult`` and ``MergeInterrupted`` load on first use, so
    ``import fastmerge`` (and ``fastmerge.cli``) can configure the process before PyTorch
    (and its OpenMP runtime) is imported."""
    if name in _LAZY:
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'fastmerge' has no attribute {name!r}")


def __dir__():
    """The lazily loaded names too, so ``dir(fastmerge)`` and tab completion show them."""
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["merge", "MergeResult", "MergeInterrupted", "FastmergeError", "ParameterError",
           "InputError", "OutputError", "BackendUnavailable", "__version__"]
