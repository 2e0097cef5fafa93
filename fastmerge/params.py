"""Merge parameters: validation, per-model broadcasting and per-tensor values.

Everything here runs before any tensor data is read, so a bad value fails fast with a
message that names it. A numeric knob (methods.KNOBS) is a number, or — as in mergekit —
a gradient over the layers or a list of ``{filter, value}`` entries (fastmerge.knobs);
``FirstOf`` chains the levels a YAML config gives (a model's own value, then the global
one, then mergekit's default). ``MergeParams.for_tensor`` resolves them for one tensor.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Union

from . import knobs as K
from . import methods
from .errors import ParameterError

SCOPES = ("tensor", "model")
DTYPES = ("float16", "bfloat16", "float32")
DTYPE_ALIASES = {
    "fp16": "float16", "half": "float16", "float16": "float16",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "fp32": "float32", "float": "float32", "float32": "float32",
}


def della_refusal(density: float, epsilon: float) -> str | None:
    """Why DELLA's (d, ε) is refused (docs/spec.md §8d), or None: with 0 < d < 1, d − ε > 0
    and d + ε < 1 (mergekit's rule: every keep probability in (0, 1))."""
    if 0.0 < density < 1.0 and not (density - epsilon > 0.0 and density + epsilon < 1.0):
        return (f"epsilon {epsilon!r} with density {density!r}: density ± epsilon must lie "
                f"in (0, 1) (as in mergekit)")
    return None


@dataclass(frozen=True)
class FirstOf:
    """A knob taken, per tensor, from the first of ``levels`` that applies to it (None:
    a level not given). All levels empty for some tensor is an error there."""

    levels: tuple

    def resolve(self, tensor: str, num_layers: int):
        return K.resolve_first(self.levels, tensor, num_layers)

    def as_json(self):
        return {"first_of": [_as_json(v) for v in self.levels]}


Spec = Union[float, list, FirstOf]


def _as_json(v):
    return v.as_json() if isinstance(v, FirstOf) else v


def _resolve(spec: Spec, tensor: str, num_layers: int):
    if isinstance(spec, FirstOf):
        return spec.resolve(tensor, num_layers)
    return float(spec) if isinstance(spec, (int, float)) else K.resolve(spec, tensor, num_layers)


def _is_constant(spec: Spec) -> bool:
    if isinstance(spec, FirstOf):
        first = next((v for v in spec.levels if v is not None), None)
        return first is not None and K.is_constant(first)
    return isinstance(spec, (int, float)) or K.is_constant(spec)


def _check_spec(where: str, spec) -> Spec:
    """A plain number (returned as float) or a well-formed knob spec."""
    if isinstance(spec, FirstOf):
        for k, level in enumerate(spec.levels):
            if level is not None:
                K.check_knob(f"{where} (level {k})", level)
        return spec
    if isinstance(spec, bool) or not isinstance(spec, (int, float, list)):
        raise ParameterError(f"{where} must be a number, a gradient (list of numbers) or a "
                             f"list of {{filter, value}} entries, got {spec!r}")
    K.check_knob(where, spec)
    return float(spec) if isinstance(spec, (int, float)) else spec


def _per_model(name: str, value, n: int) -> tuple:
    """One spec per model: a number broadcasts; a sequence must have exactly n entries."""
    if isinstance(value, (int, float, FirstOf)) and not isinstance(value, bool):
        values = (value,) * n
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        values = tuple(value)
        if len(values) != n:
            raise ParameterError(f"{name} has {len(values)} values but there are {n} models: "
                                 f"{list(values)!r}")
    else:
        raise ParameterError(f"{name} must be a number or one value per model, got {value!r}")
    return tuple(_check_spec(f"{name} of model {i}", v) for i, v in enumerate(values))


def canonical_dtype(dtype) -> str | None:
    """Map 'fp16' / torch.float16 / 'bfloat16' ... to one of DTYPES (None stays None)."""
    if dtype is None:
        return None
    key = str(dtype).replace("torch.", "").lower()
    if key not in DTYPE_ALIASES:
        raise ParameterError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPE_ALIASES[key]


@dataclass(frozen=True)
class TensorKnobs:
    """The knobs of one tensor, one number per model (``scale`` one per tensor)."""

    weights: tuple[float, ...]
    density: tuple[float, ...]
    slack: tuple[float, ...]
    scale: float
    gamma: tuple[float, ...] = ()     # breadcrumbs (docs/spec.md §8b): top fraction dropped
    epsilon: tuple[float, ...] = ()   # DELLA (§8d): half-width of the keep probabilities
    t: float = 0.5                    # SLERP (docs/spec.md §8c)


@dataclass(frozen=True)
class MergeParams:
    """Validated parameters of one merge. ``weights`` / ``density`` / ``slack`` hold one
    spec per model (a float when constant), ``scale`` one spec."""

    method: str
    n_models: int
    weights: tuple
    density: tuple
    slack: tuple
    scale: Spec
    normalize: bool
    elect: str
    scope: str
    dtype: str | None = None
    allow_nonfinite: bool = False
    seed: int = 0                     # DARE: the random drop's seed (docs/spec.md §8a)
    rescale: bool | None = None       # DARE: None is the method's default
    gamma: tuple = ()                 # breadcrumbs (§8b): one spec per model; () otherwise
    epsilon: tuple = ()               # DELLA (§8d): one spec per model; () otherwise
    t: Spec = 0.5                     # SLERP (§8c): one spec
    vectors: str = "tensor"           # SLERP / NuSLERP / model stock (§8c): tensor, rows, columns

    @property
    def spec(self) -> methods.Method:
        return methods.METHODS[self.method]

    @property
    def trims(self) -> bool:
        """Whether the method needs magnitude thresholds (TIES family)."""
        return self.spec.thresholds

    @property
    def selects(self) -> bool:
        """Whether thresholds come from fastmerge.select before the pass: the method trims
        by magnitude (t, and h for breadcrumbs), or protects with a slack that is not 0
        everywhere (u; docs/spec.md §4, §4a)."""
        return self.trims or (self.spec.protects and
                              any(not (isinstance(s, float) and s == 0.0) for s in self.slack))

    @property
    def constant(self) -> bool:
        """Every knob has the same value for every tensor."""
        return all(_is_constant(s) for s in (*self.weights, *self.density, *self.slack,
                                             *self.gamma, *self.epsilon, self.scale, self.t))

    def for_tensor(self, name: str, num_layers: int = 0) -> TensorKnobs:
        """The knobs of tensor ``name`` (docs/spec.md §2), checked; errors name the
        tensor and the model."""
        where = f"tensor {name!r}: " if name else ""

        def value(knob: str, i: int | None, spec):
            v = _resolve(spec, name, num_layers)
            who = f"{knob}" if i is None else f"{knob} of model {i}"
            if v is None:
                raise ParameterError(
                    f"{where}{who} is not set (no filter matches it and there is "
                    f"no default; mergekit requires {methods.KNOBS[knob].yaml!r})")
            k = methods.KNOBS[knob]
            if not (math.isfinite(v) and k.low <= v <= k.high):
                raise ParameterError(f"{where}{who} must be " + (
                    f"in [{k.low:g}, {k.high:g}]" if math.isfinite(k.low) else "finite") +
                    f", got {v!r}")
            return v

        w = tuple(value("weights", i, s) for i, s in enumerate(self.weights))
        d = tuple(value("density", i, s) for i, s in enumerate(self.density))
        sl = tuple(value("slack", i, s) for i, s in enumerate(self.slack))
        for i, (si, di) in enumerate(zip(sl, d)):
            if si > di:
                raise ParameterError(f"{where}slack of model {i} must be in "
                                     f"[0, density={di}], got {si!r}")
        if not self.spec.protects and any(sl):
            raise ParameterError(f"slack is only used by the methods that elect a sign ("
                                 f"{', '.join(m.name for m in methods.METHODS.values() if m.protects)}"
                                 f"), got slack={list(sl)!r} with method {self.method!r}")
        if self.method == "linear" and self.normalize and math.fsum(w) == 0:
            raise ParameterError(f"{where}linear merge with normalize needs weights that do not sum "
                                 f"to 0, got {list(w)!r}" )
        g = tuple(value("gamma", i, s) for i, s in enumerate(self.gamma))
        t = value("t", None, self.t) if "t" in self.spec.knobs else 0.5
        e = tuple(value("epsilon", i, s) for i, s in enumerate(self.epsilon))
        for i, (di, ei) in enumerate(zip(d, e)):
            why = della_refusal(di, ei)
            if why is not None:
                raise ParameterError(f"{where}model {i}: {why}")
        return TensorKnobs(w, d, sl, value("scale", None, self.scale), g, e, t)

    def as_dict(self) -> dict:
        """The exact parameters used, for the merge report."""
        return {
            "method": self.method, "n_models": self.n_models,
            "weights": [_as_json(v) for v in self.weights],
            "density": [_as_json(v) for v in self.density],
            "slack": [_as_json(v) for v in self.slack], "scale": _as_json(self.scale),
            "normalize": self.normalize, "elect": self.elect, "scope": self.scope,
            "dtype": self.dtype, "allow_nonfinite": self.allow_nonfinite,
            **({"seed": self.seed, "rescale": self.rescale_used} if self.spec.drop else {}),
            **({"gamma": [_as_json(v) for v in self.gamma]} if self.gamma else {}),
            **({"t": _as_json(self.t)} if "t" in self.spec.knobs else {}),
            **({"vectors": self.vectors} if self.spec.geometry else {}),
            **({"epsilon": [_as_json(v) for v in self.epsilon]} if self.epsilon else {}),
        }

    @property
    def rescale_used(self) -> bool | None:
        """DARE's rescale as applied (the method's default when not given)."""
        if not self.spec.drop:
            return None
        return self.spec.rescale_default if self.rescale is None else self.rescale


def make_params(method: str = "ties_sv", n_models: int = 1, *, weights=None, density=None,
                slack=None, scale=None, normalize: bool | None = None, elect: str = "sum",
                scope: str = "tensor", dtype=None, allow_nonfinite: bool = False,
                seed: int = 0, rescale: bool | None = None, gamma=None,
                epsilon=None, t=None, vectors: str | None = None) -> MergeParams:
    """Check every knob and broadcast per-model values. ``method`` is a name or alias of
    methods.METHODS in any letter case ("TIES", "ties-sv"). A knob left as None takes the
    API default of methods.KNOBS; ``normalize=None`` the method's default (True for
    ``linear``, ``ties``, ``ties_sv``; False for ``task_arithmetic`` and the DARE methods).
    ``seed`` and ``rescale`` are DARE's (docs/spec.md §8a; rescale None: True); ``gamma``
    (per model, in [0, 1]) is breadcrumbs' (§8b; None: 0.01), refused for other methods;
    ``epsilon`` (per model) DELLA's (§8d; None: 0.15), likewise. ``t`` is SLERP's (§8c;
    None: 0.5) and ``vectors`` ("tensor", "rows" or "columns"; None: "tensor") says what
    one vector is for SLERP, NuSLERP and model stock."""
    key = method.strip().lower() if isinstance(method, str) else None
    if key not in methods.ALIASES:      # any letter case, as YAML's merge_method
        raise ParameterError(f"method must be one of {methods.names()}, got {method!r}")
    spec = methods.get(key)
    if not isinstance(n_models, int) or n_models < 1:
        raise ParameterError(f"at least one model to merge is needed, got {n_models!r}")
    low, high = spec.models
    if not low <= n_models <= (high or n_models):
        count = (f"exactly {low}" if low == high else f"at least {low}")
        raise ParameterError(f"method {spec.name!r} merges {count} model"
                             f"{'s' if (high or 2) > 1 else ''} (besides the base), got "
                             f"{n_models}")
    if elect not in methods.ELECTS:
        raise ParameterError(f"elect must be one of {', '.join(methods.ELECTS)}, got {elect!r}")
    if scope not in SCOPES:
        raise ParameterError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    if normalize is None:
        normalize = spec.normalize_default
    if not isinstance(normalize, bool):
        raise ParameterError(f"normalize must be true or false, got {normalize!r}")

    given = {"weights": weights, "density": density, "slack": slack}
    per_model = {k: _per_model(k, methods.KNOBS[k].default if v is None else v, n_models)
                 for k, v in given.items()}
    scale = _check_spec("scale (lambda)", methods.KNOBS["scale"].default if scale is None
                        else scale)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 63:
        raise ParameterError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    if rescale is not None and not isinstance(rescale, bool):
        raise ParameterError(f"rescale must be true or false, got {rescale!r}")
    if rescale is not None and not spec.drop:
        raise ParameterError(f"rescale is only used by the DARE and DELLA methods, not "
                             f"{spec.name!r}")
    if "gamma" in spec.knobs:
        gamma = _per_model("gamma", methods.KNOBS["gamma"].default if gamma is None else gamma,
                           n_models)
    elif gamma is not None:
        raise ParameterError(f"gamma is only used by the breadcrumbs methods, not {spec.name!r}")
    else:
        gamma = ()
    if "t" in spec.knobs:
        t = _check_spec("t", methods.KNOBS["t"].default if t is None else t)
    elif t is not None:
        raise ParameterError(f"t is only used by method 'slerp', not {spec.name!r}")
    else:
        t = 0.5
    if vectors is None:
        vectors = spec.vectors[0]
    elif vectors not in spec.vectors:
        raise ParameterError(f"vectors must be one of {', '.join(map(repr, spec.vectors))} for "
                             f"method {spec.name!r}, got {vectors!r}" if spec.geometry else
                             f"vectors is only used by slerp, nuslerp and model_stock, not "
                             f"{spec.name!r}")
    if "epsilon" in spec.knobs:
        epsilon = _per_model("epsilon", methods.KNOBS["epsilon"].default if epsilon is None
                             else epsilon, n_models)
    elif epsilon is not None:
        raise ParameterError(f"epsilon is only used by the DELLA methods, not {spec.name!r}")
    else:
        epsilon = ()
    params = MergeParams(method=spec.name, n_models=n_models, weights=per_model["weights"],
                         density=per_model["density"], slack=per_model["slack"], scale=scale,
                         normalize=normalize, elect=elect, scope=scope,
                         dtype=canonical_dtype(dtype), allow_nonfinite=bool(allow_nonfinite),
                         seed=seed, rescale=rescale, gamma=gamma, epsilon=epsilon, t=t,
                         vectors=vectors)
    if params.constant:
        params.for_tensor("")        # constant knobs: check their values now
    elif scope == "model" and params.selects and not all(
            _is_constant(s) for s in (*params.density, *params.slack, *params.gamma)):
        raise ParameterError("scope 'model' takes one density, slack and gamma per model for "
                             "the whole checkpoint; per-tensor values (filters, gradients) "
                             "need scope 'tensor'")
    return params
