"""The method table: every merge method, declared once (docs/spec.md §3-§8).

A method is a row of ``METHODS``: its names, whether it needs a base, its knobs, what it
needs before the elementwise pass (``thresholds``: per-model magnitude thresholds from
fastmerge.select) and its stages (trim, elect, combine), which ``kernel_config`` turns
into the flags every backend's fused pass takes (kernel_api.KernelConfig). Adding a
method = one row here, one section in docs/spec.md, its stage in each kernel.

Knobs (``KNOBS``) carry two defaults: the Python API's and mergekit's (used for YAML
configs, where an omitted knob must mean what it means in mergekit).

A row with ``available=False`` is declared (and may be implemented in the kernels) but not
yet accepted by ``fastmerge.merge`` or YAML configs (it is left out of ``ALIASES``).
"""
from __future__ import annotations

from dataclasses import dataclass

from .kernel_api import KernelConfig

REQUIRED = object()   # a knob mergekit requires (no default)


@dataclass(frozen=True)
class Knob:
    """One numeric knob. ``per_model``: one value per model (else one per merge).
    ``low`` / ``high``: its closed range; ``yaml``: mergekit's key."""

    name: str
    yaml: str
    per_model: bool
    default: float
    yaml_default: object
    low: float = float("-inf")
    high: float = float("inf")
    doc: str = ""


KNOBS = {k.name: k for k in (
    Knob("weights", "weight", True, 1.0, REQUIRED, doc="w_i, the model's weight"),
    Knob("density", "density", True, 0.2, 1.0, 0.0, 1.0,
         doc="d_i, the fraction of τ_i kept: the largest |τ_i| (TIES trim) or, for DARE, "
             "each entry with probability d_i"),
    Knob("slack", "slack", True, 0.0, 0.0, 0.0, 1.0,
         doc="s_i ≤ d_i, the fraction of the largest |τ_i| protected: always kept and "
             "elected first (methods that elect a sign)"),
    Knob("scale", "lambda", False, 1.0, 1.0, doc="λ, the task vector's scale"),
    Knob("gamma", "gamma", True, 0.01, 0.01, 0.0, 1.0,
         doc="γ_i, breadcrumbs: the fraction of the largest |τ_i| dropped as outliers"),
    Knob("epsilon", "epsilon", True, 0.15, 0.15, 0.0, 1.0,
         doc="ε_i, DELLA: keep probabilities run from d_i − ε_i (smallest |τ_i| of a row) "
             "to d_i + ε_i (largest)"),
    Knob("t", "t", False, 0.5, REQUIRED,
         doc="t, SLERP: where between the base (t = 0) and the model (t = 1)"),
)}


@dataclass(frozen=True)
class Method:
    """A merge method: names, knobs and stages (see the module docstring)."""

    name: str
    aliases: tuple[str, ...]
    needs_base: bool
    knobs: tuple[str, ...]        # names in KNOBS it reads
    thresholds: bool              # needs t_i (and u_i with slack) before the pass
    elect: bool                   # sign election + selection by sign
    normalize_default: bool
    summary: str
    drop: bool = False            # DARE's random drop (docs/spec.md §8a) instead of a trim
    rescale_default: bool = False # DARE: kept entries weigh w_i / d_i (mergekit's `rescale`)
    available: bool = True        # accepted by fastmerge.merge / YAML (in ALIASES)
    upper: bool = False           # breadcrumbs (§8b): the trim has an upper bound h
    ranked: bool = False          # DELLA (§8d): the drop's thresholds come per entry from
                                  # row ranks (fastmerge.della), passed as ``keep``
    geometry: str | None = None   # §8c: "slerp" / "nuslerp" / "model_stock" (gram + combine
                                  # passes, fastmerge.geometry) instead of the fused pass
    models: tuple = (1, None)     # how many models it merges (besides a base): (min, max)
    vectors: tuple = ("tensor",)  # §8c: what one vector may be (tensor / rows / columns),
                                  # the first the default

    @property
    def protects(self) -> bool:
        """Takes the slack knob: each model's top-s_i entries are protected (§4, §4a)."""
        return "slack" in self.knobs

    def kernel_config(self, weights, scale: float, normalize: bool, elect: str,
                      t=None, u=None, *, h=None, density=None, rescale: bool | None = None,
                      key: int | None = None, offset: int = 0, keep=None,
                      rank_keep=None) -> KernelConfig:
        """The fused pass's flags for one tensor (the one place they are decided).
        ``t`` / ``u`` / ``h``: thresholds from fastmerge.select (trim, slack, breadcrumbs'
        upper bound; None: the method has none, or no slack was asked for).
        DARE methods (``drop``) take ``density`` (d_i per model), ``key`` (the tensor's
        64-bit Philox key), ``rescale`` (None: the method's default) and ``offset`` (the
        global index of the chunk's first entry; ``KernelConfig.at`` moves it per chunk);
        other methods ignore them. DELLA (``ranked``) takes ``keep`` instead of ``density``:
        the chunk's per-entry thresholds T_i(g) (fastmerge.della.keep_thresholds), or, for
        a backend that ranks in its fused pass, ``rank_keep``: the per-rank table T_i(ρ)
        (fastmerge.della.rank_table)."""
        if self.thresholds and t is None:
            raise ValueError(f"method {self.name!r} needs its thresholds t")
        drop = {}
        if self.ranked:
            if (keep is None) == (rank_keep is None) or key is None:
                raise ValueError(f"method {self.name!r} needs keep and key (its ranked drop; "
                                 f"or rank_keep in place of keep)")
            drop = dict(keep=keep, rank_keep=rank_keep,
                        rescale=self.rescale_default if rescale is None else bool(rescale),
                        key=int(key), offset=int(offset))
        elif self.drop:
            if density is None or key is None:
                raise ValueError(f"method {self.name!r} needs density and key (its random drop)")
            drop = dict(density=tuple(float(d) for d in density),
                        rescale=self.rescale_default if rescale is None else bool(rescale),
                        key=int(key), offset=int(offset))
        if self.upper and h is None:
            raise ValueError(f"method {self.name!r} needs its upper thresholds h")
        return KernelConfig(weights=tuple(float(w) for w in weights),
                            t=tuple(t) if self.thresholds else None,
                            u=tuple(u) if self.protects and u is not None else None,
                            h=tuple(h) if self.upper else None,
                            elect=elect if self.elect else "none", normalize=bool(normalize),
                            scale=float(scale) if self.needs_base else 1.0,
                            on_base=self.needs_base, **drop)


METHODS = {m.name: m for m in (
    Method("linear", ("linear",), needs_base=False, knobs=("weights",), thresholds=False,
           elect=False, normalize_default=True,
           summary="θ = Σ w_i θ_i / Σ w_i (no base)"),
    Method("task_arithmetic", ("task_arithmetic", "task-arithmetic"), needs_base=True,
           knobs=("weights", "scale"), thresholds=False, elect=False,
           normalize_default=False, summary="θ = θ_b + λ Σ w_i τ_i"),
    Method("ties", ("ties",), needs_base=True, knobs=("weights", "density", "scale"),
           thresholds=True, elect=True, normalize_default=True,
           summary="trim to the top d_i, elect signs, disjoint mean"),
    Method("ties_sv", ("ties_sv", "ties-sv"), needs_base=True,
           knobs=("weights", "density", "slack", "scale"), thresholds=True, elect=True,
           normalize_default=True,
           summary="TIES with each model's top s_i protected from the sign election"),
    Method("dare_linear", ("dare_linear", "dare-linear"), needs_base=True,
           knobs=("weights", "density", "scale"), thresholds=False, elect=False,
           normalize_default=False, drop=True, rescale_default=True,
           summary="random drop (keep each τ_i entry with probability d_i), rescale by "
                   "1/d_i, weighted sum"),
    Method("dare_ties", ("dare_ties", "dare-ties"), needs_base=True,
           knobs=("weights", "density", "slack", "scale"), thresholds=False, elect=True,
           normalize_default=False, drop=True, rescale_default=True,
           summary="random drop, rescale by 1/d_i, elect signs, disjoint sum"),
    Method("breadcrumbs", ("breadcrumbs",), needs_base=True,
           knobs=("weights", "density", "gamma", "scale"), thresholds=True, elect=False,
           normalize_default=False, upper=True,
           summary="drop the top γ_i and the bottom 1 − d_i − γ_i of |τ_i|, weighted sum"),
    Method("breadcrumbs_ties", ("breadcrumbs_ties", "breadcrumbs-ties"), needs_base=True,
           knobs=("weights", "density", "slack", "gamma", "scale"), thresholds=True, elect=True,
           normalize_default=False, upper=True,
           summary="breadcrumbs' trim, elect signs, disjoint sum"),
    Method("della", ("della",), needs_base=True,
           knobs=("weights", "density", "slack", "epsilon", "scale"), thresholds=False,
           elect=True, normalize_default=True, drop=True, rescale_default=True, ranked=True,
           summary="keep each τ_i entry with a probability d_i ± ε_i by its magnitude rank "
                   "in its row, rescale by 1/p, elect signs, disjoint mean"),
    Method("della_linear", ("della_linear", "della-linear"), needs_base=True,
           knobs=("weights", "density", "epsilon", "scale"), thresholds=False, elect=False,
           normalize_default=False, drop=True, rescale_default=True, ranked=True,
           summary="DELLA's ranked drop and rescale, weighted sum"),
    Method("slerp", ("slerp",), needs_base=True, knobs=("t",), thresholds=False, elect=False,
           normalize_default=False, geometry="slerp", models=(1, 1),
           summary="spherical interpolation from the base (t = 0) to the model (t = 1)"),
    Method("nuslerp", ("nuslerp",), needs_base=False, knobs=("weights",), thresholds=False,
           elect=False, normalize_default=False, geometry="nuslerp", models=(2, 2),
           vectors=("tensor", "rows", "columns"),
           summary="spherical interpolation of two models (of their task vectors with a "
                   "base) at t = w_1 / (w_0 + w_1), per tensor, row or column"),
    Method("model_stock", ("model_stock", "model-stock"), needs_base=True, knobs=(),
           thresholds=False, elect=False, normalize_default=False, geometry="model_stock",
           models=(2, None), vectors=("tensor", "rows"),
           summary="θ_b + t·mean τ_i, t = n·cos / (1 + (n − 1)·cos) from the task vectors' "
                   "mean pairwise cosine"),
)}
ALIASES = {alias: m.name for m in METHODS.values() if m.available for alias in m.aliases}
ELECTS = ("sum", "count")


def get(name: str) -> Method:
    """The method called ``name`` (or one of its aliases); KeyError if none."""
    return METHODS[ALIASES[name]]


def names() -> str:
    """The names of the methods fastmerge.merge accepts, for messages."""
    return ", ".join(m.name for m in METHODS.values() if m.available)
