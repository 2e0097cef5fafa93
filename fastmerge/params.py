"""Merge parameters: validation and per-model broadcasting (SPEC §2-§7).

Everything here runs before any file is opened, so a bad value fails fast with a
message that names it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence, Union

from .errors import ParameterError

METHODS = ("linear", "task_arithmetic", "ties", "ties_sv")
TRIM_METHODS = ("ties", "ties_sv")
ELECTS = ("sum", "count")
SCOPES = ("tensor", "model")
DTYPES = ("float16", "bfloat16", "float32")
DTYPE_ALIASES = {
    "fp16": "float16", "half": "float16", "float16": "float16",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "fp32": "float32", "float": "float32", "float32": "float32",
}

Knob = Union[float, int, Sequence[float]]


def _per_model(name: str, value: Knob, n: int) -> tuple[float, ...]:
    """Broadcast a number to n models, or check a list has exactly n finite numbers."""
    if isinstance(value, bool):
        raise ParameterError(f"{name} must be a number or one number per model, got {value!r}")
    if isinstance(value, (int, float)):
        values = (float(value),) * n
    else:
        try:
            values = tuple(float(v) for v in value)
        except (TypeError, ValueError):
            raise ParameterError(
                f"{name} must be a number or one number per model, got {value!r}") from None
        if len(values) != n:
            raise ParameterError(
                f"{name} has {len(values)} values but there are {n} models: {list(value)!r}")
    for v in values:
        if not math.isfinite(v):
            raise ParameterError(f"{name} must be finite, got {v!r}")
    return values


def canonical_dtype(dtype) -> str | None:
    """Map 'fp16' / torch.float16 / 'bfloat16' ... to one of DTYPES (None stays None)."""
    if dtype is None:
        return None
    key = str(dtype).replace("torch.", "").lower()
    if key not in DTYPE_ALIASES:
        raise ParameterError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPE_ALIASES[key]


@dataclass(frozen=True)
class MergeParams:
    """Validated parameters of one merge; every per-model knob has one value per model."""

    method: str
    n_models: int
    weights: tuple[float, ...]
    density: tuple[float, ...]
    slack: tuple[float, ...]
    scale: float
    normalize: bool
    elect: str
    scope: str
    dtype: str | None = None
    allow_nonfinite: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def trims(self) -> bool:
        """Whether the method trims by magnitude (TIES family)."""
        return self.method in TRIM_METHODS

    @property
    def has_slack(self) -> bool:
        return self.trims and any(s > 0 for s in self.slack)

    def as_dict(self) -> dict:
        """The exact parameters used, for the merge report."""
        return {
            "method": self.method, "n_models": self.n_models,
            "weights": list(self.weights), "density": list(self.density),
            "slack": list(self.slack), "scale": self.scale, "normalize": self.normalize,
            "elect": self.elect, "scope": self.scope, "dtype": self.dtype,
            "allow_nonfinite": self.allow_nonfinite,
        }


def make_params(method: str = "ties_sv", n_models: int = 1, *, weights: Knob = 1.0,
                density: Knob = 0.2, slack: Knob = 0.0, scale: float = 1.0,
                normalize: bool | None = None, elect: str = "sum", scope: str = "tensor",
                dtype=None, allow_nonfinite: bool = False) -> MergeParams:
    """Check every knob and broadcast per-model values (SPEC §7 defaults).

    ``normalize=None`` picks the method's default: True for ``linear``, ``ties`` and
    ``ties_sv`` (the disjoint mean), False for ``task_arithmetic``.
    """
    if method not in METHODS:
        raise ParameterError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if not isinstance(n_models, int) or n_models < 1:
        raise ParameterError(f"at least one model to merge is needed, got {n_models!r}")
    if elect not in ELECTS:
        raise ParameterError(f"elect must be one of {', '.join(ELECTS)}, got {elect!r}")
    if scope not in SCOPES:
        raise ParameterError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ParameterError(f"scale (lambda) must be a finite number, got {scale!r}")
    if normalize is None:
        normalize = method != "task_arithmetic"
    if not isinstance(normalize, bool):
        raise ParameterError(f"normalize must be true or false, got {normalize!r}")

    w = _per_model("weights", weights, n_models)
    d = _per_model("density", density, n_models)
    s = _per_model("slack", slack, n_models)
    for i, di in enumerate(d):
        if not 0.0 <= di <= 1.0:
            raise ParameterError(f"density of model {i} must be in [0, 1], got {di!r}")
    for i, (si, di) in enumerate(zip(s, d)):
        if not 0.0 <= si <= di:
            raise ParameterError(
                f"slack of model {i} must be in [0, density={di}], got {si!r}")
    if method != "ties_sv" and any(si > 0 for si in s):
        raise ParameterError(f"slack is only used by method 'ties_sv', got slack={list(s)!r} "
                             f"with method {method!r}")
    if method == "linear" and normalize and sum(w) == 0:
        raise ParameterError(f"linear merge with normalize needs weights that do not sum to 0, "
                             f"got {list(w)!r}")
    return MergeParams(method=method, n_models=n_models, weights=w, density=d, slack=s,
                       scale=float(scale), normalize=normalize, elect=elect, scope=scope,
                       dtype=canonical_dtype(dtype), allow_nonfinite=bool(allow_nonfinite))
