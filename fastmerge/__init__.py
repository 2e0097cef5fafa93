"""fastmerge: fast, lean, exact merging of LLM checkpoints (TIES, TIES-SV).

    import fastmerge
    result = fastmerge.merge("base", ["ct", "sft"], method="ties_sv", density=0.2,
                             slack=0.05, output="merged")

The algebra is SPEC.md's; backends (Triton on CUDA, C on CPU, the PyTorch reference)
are chosen in ``fastmerge.backends``.
"""
__version__ = "0.1.0"

from .errors import (BackendUnavailable, FastmergeError, InputError, OutputError,  # noqa: E402
                     ParameterError)
from .api import MergeResult, merge  # noqa: E402

__all__ = ["merge", "MergeResult", "FastmergeError", "ParameterError", "InputError",
           "OutputError", "BackendUnavailable", "__version__"]
