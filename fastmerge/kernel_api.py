"""The contract every backend (torch reference, Triton, C) implements, per chunk of a tensor.

A backend provides two functions over flat, contiguous 1-D data (and may add a third):

``histogram(base, models, prefixes, level) -> int64 [n, 2, NBINS]``
    Radix-select step over the fp32 bit patterns ``key = bits(|τ_i|)`` with
    ``τ_i = f32(models[i]) - f32(base)`` (docs/spec.md §1). Since ``|τ| >= 0`` its bits order
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
    The fused pass of docs/spec.md §5-§7 (and §9's counters) writing ``out``: the fp64
    result rounded once, to nearest even, to ``out``'s dtype. ``base`` may be None when
    ``cfg.on_base`` is False (``linear``). With DARE's random drop (§8a) the chunk's
    entries are entries ``cfg.offset .. cfg.offset + N − 1`` of the tensor: the drop
    depends on that global index only, so any chunking gives the same result.

``gram(base, models, on_base, seg, columns=False) -> fp64 [Q, K]`` (docs/spec.md §8c)
    The statistics pass of SLERP / NuSLERP / model stock. v_k = τ_k (``on_base``) or
    f32(θ_k). The N entries are pieces of ``seg`` entries (the last may be shorter), each
    cut into GRAM_BLOCK blocks from its start (Q blocks in all); row q holds, for block q
    and each pair k ≤ l in the order (0,0), (0,1), .., (0,n−1), (1,1), .. (K = n(n+1)/2),
    the sum of the exact fp64 products v_k·v_l over the block by a pairwise tree (the
    block padded with +0.0 to GRAM_BLOCK entries; level by level, p[2m] + p[2m+1]).
    ``columns`` (NuSLERP's column vectors): the N entries are N / seg whole rows of ``seg``
    entries, the rows cut into blocks of GRAM_BLOCK rows; fp64 [Q, seg, K], [q, c] the
    same tree sum down block q of column c.

``combine(base, models, out, coef, seg, columns, on_base) -> int64 [n]``
    The elementwise pass of those methods: θ_j = [f32(θ_b) +] Σ_k coef[s, k]·v_k[j] in
    fp64, k in order from +0.0, rounded once to ``out``'s dtype, with s = j // seg (or
    j mod seg when ``columns``); returns the non-finite entries of each v_k.

``models`` is a 2-D tensor ``[n, N]`` (one row per model, one dtype) or a sequence of n
contiguous 1-D tensors of N entries and one dtype (the pipeline passes the rows mapped
from n files this way, without stacking them); ``base``/``out`` have N elements. Thresholds arrive as fp32 values: ``t = 0`` keeps every entry,
``t = inf`` keeps none, ``u = inf`` protects none, ``h = inf`` drops none from the top.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from .philox import KEY_MAX, drop_threshold

NBINS = 2048
DIGIT_BITS = (11, 11, 9)
SHIFT = (20, 9, 0)
NONFINITE_BIN = 0x7F800000 >> SHIFT[0]  # level-0 bin of +inf; NaN bins are above it
GRAM_BLOCK = 1024   # entries per block of the statistics pass (a power of two; §8c)

COUNTERS = ("kept", "protected", "selected", "dropped_by_sign", "important_dropped",
            "ties_important_dropped", "nonfinite")
KEPT, PROTECTED, SELECTED, DROPPED_BY_SIGN, IMPORTANT_DROPPED, TIES_IMPORTANT_DROPPED, \
    NONFINITE = range(len(COUNTERS))


ELECTS = ("none", "sum", "count")


@dataclass(frozen=True)
class KernelConfig:
    """What one fused pass needs (docs/spec.md §3-§8a), thresholds already found; the
    stages are flags, set by ``fastmerge.methods`` (the one place that builds these).

    x_i = τ_i = f32(θ_i) − f32(θ_b) when ``on_base``, else x_i = f32(θ_i) (no base).
    trim  (``t`` not None): kept_i = |x_i| ≥ t_i; t_i = +inf keeps none. None: all kept.
    drop  (``density`` not None; DARE, §8a, instead of a trim): kept_i = r_i(g) < T_i with
      r_i(g) the 32-bit Philox4x32-10 word of entry g = ``offset`` + j of model i under
      ``key`` (two 16-bit halves, fastmerge.philox.random_words)
      and T_i = ⌊d_i·2^32⌋ (``drop_thresholds``; d_i = 1 keeps all, d_i = 0 none).
    ranked drop (``keep`` not None; DELLA, §8d, instead of ``density``): kept_i(g) =
      r_i(g) < T_i(g) with per-entry thresholds ``keep`` (int64 [n, N] of this chunk, in
      [0, 2^32]) from DELLA's rank stage (fastmerge.della); with ``rescale`` a kept entry
      weighs c_i(g) = (w_i·2^32) / T_i(g) (one fp64 division; 0 when T = 0).
    fused ranked drop (``rank_keep`` not None; DELLA with its rank stage in the pass, for a
      backend with Capabilities.ranks, instead of ``keep``): int64 [n, M] thresholds per
      rank, T_i(g) = rank_keep[i, ρ_i(g)], the chunk being N / M rows of M consecutive
      entries and ρ_i(g) g's rank in its row by ascending bits(|τ_i|), ties by index
      (fastmerge.della.rank_table). Needs ``on_base``.
    upper (``h`` not None; breadcrumbs, §8b): the trim's exclusive upper bound h_i:
      kept_i = t_i ≤ |x_i| < h_i, h_i = +inf drops none from the top (|x_i| = inf included).
    slack (``u`` not None, needs an election; §4, §4a): prot_i = |x_i| ≥ u_i (u_i = +inf
      protects none). A protected entry is always kept, whatever the trim, band or drop:
      kept_i ← kept_i ∨ prot_i; it weighs w_i (never w_i / d_i).
    elect: "none" (sel_i = kept_i, W = Σ_i w_i), or "sum" / "count" (protected-first
      sign election; sel_i = kept_i ∧ sign(w_i·x_i) = γ, W = Σ_i w_i·sel_i).
    combine: D = Σ_i c_i·sel_i·x_i; m = D / W when ``normalize`` and W ≠ 0, else D;
      θ = f32(θ_b) + λ·m (``on_base``) or θ = m. Evaluated in fp64, models summed in
      order, then rounded once to the output dtype. c_i (``vote_weights``) is w_i, or
      w_i / d_i with DARE's ``rescale`` for an entry that is not protected; "sum" votes
      are c_i·x_i too. W always sums w_i.
    Thresholds come from fastmerge.select (``select.searches``): t and u from one
    selection for the TIES family; t and h from breadcrumbs' selection and u from a second
    one when it protects (§8b); u alone for DARE / DELLA with slack. Three separate
    arrays, so one pass may take all three.
    """

    weights: tuple[float, ...]
    t: tuple[float, ...] | None = None
    u: tuple[float, ...] | None = None
    elect: str = "none"
    normalize: bool = False
    scale: float = 1.0
    on_base: bool = True
    density: tuple[float, ...] | None = None    # DARE drop: d_i, the keep probability
    rescale: bool = False                       # DARE: c_i = w_i / d_i
    key: int = 0                                # DARE: the tensor's 64-bit Philox key
    offset: int = 0                             # global index of this chunk's entry 0
    h: tuple[float, ...] | None = None          # the trim's exclusive upper bound (§8b)
    keep: object = field(default=None, compare=False, repr=False)   # DELLA: T_i(g) [n, N]
    rank_keep: object = field(default=None, compare=False, repr=False)  # DELLA: T_i(ρ) [n, M]

    def __post_init__(self):
        n = len(self.weights)
        if self.elect not in ELECTS:
            raise ValueError(f"elect must be one of {ELECTS}, got {self.elect!r}")
        for name in ("t", "u", "h", "density"):
            v = getattr(self, name)
            if v is not None and len(v) != n:
                raise ValueError(f"cfg.{name} needs {n} entries (one per model), got {len(v)}")
        if self.h is not None and self.t is None:
            raise ValueError("an upper trim bound (h) needs the lower thresholds t")
        if self.u is not None and self.elect == "none":
            raise ValueError("slack thresholds (u) need a sign election")
        if sum(x is not None for x in (self.keep, self.rank_keep, self.density)) > 1:
            raise ValueError("per-entry (keep) and per-rank (rank_keep) thresholds replace "
                             "density: give one")
        for name, cols, least in (("keep", "N", 0), ("rank_keep", "M", 1)):
            v = getattr(self, name)
            if v is not None and (v.dim() != 2 or v.shape[0] != n or v.shape[1] < least):
                raise ValueError(f"cfg.{name} must be [{n}, {cols}], got {list(v.shape)}")
        if self.rank_keep is not None and not self.on_base:
            raise ValueError("per-rank thresholds (rank_keep) rank task vectors: need a base")
        if self.drops:
            if self.t is not None or self.h is not None:
                raise ValueError("a random drop (density) excludes a magnitude trim (t, h) "
                                 "in one pass")
            for d in self.density or ():
                drop_threshold(d)                       # checks 0 <= d <= 1
        elif self.rescale:
            raise ValueError("rescale needs a random drop (density)")
        if isinstance(self.key, bool) or not isinstance(self.key, int) or \
                not 0 <= self.key <= KEY_MAX:
            raise ValueError(f"key must be an int in [0, 2**64), got {self.key!r}")
        if isinstance(self.offset, bool) or not isinstance(self.offset, int) or \
                not 0 <= self.offset < 1 << 62:
            raise ValueError(f"offset must be an int in [0, 2**62), got {self.offset!r}")

    @property
    def n_models(self) -> int:
        return len(self.weights)

    @property
    def has_slack(self) -> bool:
        """Some model protects entries (a finite u_i)."""
        return self.u is not None and any(x != float("inf") for x in self.u)

    @property
    def upper(self) -> bool:
        """The trim has exclusive upper bounds h_i (breadcrumbs, §8b)."""
        return self.h is not None

    @property
    def drops(self) -> bool:
        """DARE's random drop is on (docs/spec.md §8a), or DELLA's ranked one (§8d)."""
        return self.density is not None or self.keep is not None or self.rank_keep is not None

    @property
    def drop_thresholds(self) -> tuple[int, ...] | None:
        """T_i = ⌊d_i·2^32⌋ in [0, 2^32] (2^32: keep all), or None without a drop."""
        return None if self.density is None else tuple(drop_threshold(d) for d in self.density)

    @property
    def vote_weights(self) -> tuple[float, ...]:
        """c_i: the factor of x_i in "sum" votes and in D. w_i, or with ``rescale``
        w_i / d_i (one fp64 division; 0.0 for d_i = 0, which keeps nothing). A protected
        entry (slack) weighs w_i instead, rescale or not (docs/spec.md §4a)."""
        if not self.rescale or self.density is None:    # DELLA: per entry (keep)
            return tuple(self.weights)
        return tuple(w / d if d != 0 else 0.0 for w, d in zip(self.weights, self.density))

    @property
    def counts(self) -> bool:
        """Whether the pass has per-model decisions to count (trim, drop or election)."""
        return self.t is not None or self.drops or self.elect != "none"

    def at(self, offset: int) -> "KernelConfig":
        """This config for the chunk whose first entry is entry ``offset`` of the tensor."""
        return self if offset == self.offset else replace(self, offset=int(offset))


@dataclass(frozen=True)
class Capabilities:
    """What a backend's kernels take; ``fastmerge.merge`` checks a merge against it
    before any tensor data is read (backends.check_supported)."""

    dtypes: tuple[str, ...] = ("float16", "bfloat16", "float32")   # stored and output
    max_models: int | None = None                                   # None: no limit
    elects: tuple[str, ...] = ELECTS
    slack: bool = True
    without_base: bool = True                                       # on_base=False
    ranks: bool = False         # computes DELLA's row ranks in its fused pass (§8d): takes
                                # KernelConfig.rank_keep. Without it the pipeline runs that
                                # stage in torch (fastmerge.della) and passes ``keep``
