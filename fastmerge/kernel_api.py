"""The contract every backend (torch reference, Triton, C) implements, per chunk of a tensor.

A backend provides two functions over flat, contiguous 1-D data (and may add a third):

``histogram(base, models, prefixes, level) -> int64 [n, 2, NBINS]``
    Radix-select step over the fp32 bit patterns ``key = bits(|τ_i|)`` with
    ``τ_i = f32(models[i]) - f32(base)`` (SPEC §1). Since ``|τ| >= 0`` its bits order
    like integers. For slot ``j`` of model ``i`` it counts, for every entry whose
    ``key >> (SHIFT[level] + DIGIT_BITS[level]) == prefixes[i, j]``, the digit
    ``(key >> SHIFT[level]) & (2**DIGIT_BITS[level] - 1)``. A prefix of -1 matches
    nothing (slot off). At level 0 the prefix is 0 for every entry. Slot 0 serves the
    trim threshold ``t_i``, slot 1 the slack threshold ``u_i``. Non-finite ``|τ|`` land in
    level-0 bins ``>= NONFINITE_BIN``.

``bracket(base, models, bounds, cap) -> (int64 [n, 2, 2], int32 [n, 2, cap])`` (optional)
    The counting pass of bracketed selection (fastmerge.select): for slot ``j`` of model
    ``i`` with ``bounds[i, j] = (lo, hi)``, counts ``above = #{key > hi}`` and
    ``inside = #{lo <= key <= hi}``, and returns the first ``min(inside, cap)`` keys
    inside (in any order). ``lo = -1``: slot off (0, 0). Backends without it are driven
    by ``histogram`` alone.

``merge(base, models, out, cfg) -> int64 [n, len(COUNTERS)]``
    The fused pass of SPEC §4-§6 (and §8's counters) writing ``out`` (its dtype is the
    output dtype, rounded to nearest even). ``base`` is None only for ``linear``.

``models`` is a 2-D tensor ``[n, N]`` (one row per model, one dtype) or a sequence of n
contiguous 1-D tensors of N entries and one dtype (the pipeline passes the rows mapped
from n files this way, without stacking them); ``base``/``out`` have N elements. Thresholds arrive as fp32 values: ``t = 0`` keeps every entry,
``t = inf`` keeps none, ``u = inf`` protects none.
"""
from __future__ import annotations

from dataclasses import dataclass

NBINS = 2048
DIGIT_BITS = (11, 11, 9)
SHIFT = (20, 9, 0)
NONFINITE_BIN = 0x7F800000 >> SHIFT[0]  # level-0 bin of +inf; NaN bins are above it

COUNTERS = ("kept", "protected", "selected", "dropped_by_sign", "important_dropped",
            "ties_important_dropped", "nonfinite")
KEPT, PROTECTED, SELECTED, DROPPED_BY_SIGN, IMPORTANT_DROPPED, TIES_IMPORTANT_DROPPED, \
    NONFINITE = range(len(COUNTERS))


@dataclass(frozen=True)
class KernelConfig:
    """What one fused merge pass needs; thresholds already found.

    mode: "linear" (θ = Σ w_i θ_i [/ Σ w_i]), "task_arithmetic" (m = Σ w_i τ_i [/ Σ w_i])
    or "ties" (trim, elect, disjoint mean; with slack when any u_i is finite).
    For "linear" and "task_arithmetic" only the ``nonfinite`` counter is filled.
    """

    mode: str
    weights: tuple[float, ...]
    t: tuple[float, ...]
    u: tuple[float, ...]
    scale: float = 1.0
    normalize: bool = True
    elect_count: bool = False

    @property
    def n_models(self) -> int:
        return len(self.weights)

    @property
    def has_slack(self) -> bool:
        return self.mode == "ties" and any(x != float("inf") for x in self.u)
