"""Exact top-k thresholds over fp32 bit patterns, without sorting (docs/spec.md §3-§4).

For each model we need ``t_i`` = the K_i-th largest |τ_i| and ``u_i`` = the S_i-th
largest, over a population that may be one tensor or a whole checkpoint. Keys
``bits(|τ|)`` order like integers, so selection works on integers. Two exact methods:

* **Radix select** (``RadixSelect``, any backend, any population): three histogram
  rounds over digits of 11, 11 and 9 bits (kernel_api.SHIFT) pin down the exact 31-bit
  key of each threshold without holding the population: each round's histograms are
  summed over any number of chunks (and tensors) before ``update`` is called.
* **Bracketing** (``bracket_thresholds``, one tensor held in memory, backends with
  ``bracket``): a strided sample of the keys gives for each threshold a key range
  [lo, hi] that holds it with high probability; one counting pass returns
  ``above = #{key > hi}`` and the keys inside. If ``above < K <= above + inside``, the
  threshold is exactly the (K − above)-th largest key inside, else radix select runs.
  The sample only decides the cost, never the result: one pass instead of three.

``thresholds`` is the policy that picks between them. Radix usage::

    sel = RadixSelect.of(Targets.of(density, slack, population))
    while not sel.done:
        hist = sum(backend.histogram(b, m, sel.prefixes(), sel.level) for b, m in chunks)
        sel.update(hist)
    t, u = sel.thresholds()
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np
import torch

from .kernel_api import DIGIT_BITS, NBINS

INF = float("inf")
#: the least u_i can be: fp32's smallest normal number. A slack larger than a tensor's share
#: of nonzero |τ_i| would otherwise give u_i = 0 and "protect" exact zeros, which have no
#: sign to protect (docs/spec.md §4)
U_MIN = 2.0 ** -126


def key_to_float(key: int) -> float:
    """The fp32 value whose bit pattern is ``key`` (0 <= key < 2**31)."""
    return struct.unpack("<f", struct.pack("<I", key))[0]


@dataclass(frozen=True)
class Targets:
    """What selection must find for one population (docs/spec.md §3-§4), per model i and
    slot j (0: trim t, 1: slack u): ``ks[i][j]`` the rank to search for (0: none),
    ``fixed[i][j]`` the threshold known without search (keep all: 0.0, keep none /
    protect none: inf). K_i = floor(d_i·|P|), S_i = floor(s_i·|P|)."""

    ks: tuple
    fixed: tuple
    population: int

    @classmethod
    def of(cls, density, slack, population: int) -> "Targets":
        ks, fixed = [], []
        for d, s in zip(density, slack):
            k, sk = int(d * population), int(s * population)
            if d == 1:
                kt, ft = 0, 0.0
            elif k == 0:
                kt, ft = 0, INF
            else:
                kt, ft = k, None
            ku, fu = (sk, None) if sk > 0 else (0, INF)
            ks.append((kt, ku))
            fixed.append((ft, fu))
        return cls(tuple(ks), tuple(fixed), population)

    @classmethod
    def breadcrumbs(cls, density, gamma, population: int) -> "Targets":
        """Breadcrumbs' two cutoffs (docs/spec.md §8b): slot 0 the trim's lower bound t_i,
        slot 1 its exclusive upper bound h_i. With K_i = ⌊d_i·|P|⌋ and G_i = ⌊γ_i·|P|⌋ (the
        counts mergekit's ``magnitude_outliers`` keeps and drops from the top):
        d_i = 1 keeps all (t_i = 0, h_i = inf); else K_i = 0 keeps none (t_i = h_i = inf);
        else t_i is the L_i-th largest with L_i = min(K_i + G_i, |P|) and h_i the
        (L_i − K_i)-th largest (h_i = inf, none dropped from the top, when that is 0)."""
        ks, fixed = [], []
        for d, g in zip(density, gamma):
            k, kg = int(d * population), int(g * population)
            if d == 1:
                ks.append((0, 0))
                fixed.append((0.0, INF))
            elif k == 0:
                ks.append((0, 0))
                fixed.append((INF, INF))
            else:
                lo = min(k + kg, population)
                hi = lo - k
                ks.append((lo, hi))
                fixed.append((None, None if hi > 0 else INF))
        return cls(tuple(ks), tuple(fixed), population)

    @property
    def searched(self) -> bool:
        """Some threshold needs a search (else every one is fixed: density 0 or 1)."""
        return any(k for row in self.ks for k in row)

    def fixed_only(self) -> tuple[list, list]:
        """(t, u) when nothing is searched."""
        return [f[0] for f in self.fixed], [f[1] for f in self.fixed]


@dataclass(frozen=True)
class Search:
    """One selection over a population: its ``targets`` and the threshold each slot
    finds, ``slots`` = (name of slot 0, name of slot 1), a name None when unused."""

    targets: Targets
    slots: tuple


def searches(spec, knobs, population: int) -> list[Search]:
    """The selections a method needs for one population (docs/spec.md §3, §4, §4a, §8b),
    ``spec`` a methods.Method, ``knobs`` its per-model density / slack / gamma:
    the TIES family (t, u) in one; breadcrumbs (t, h), plus (·, u) when it protects;
    DARE with slack (·, u). A slot whose rank is 0 costs nothing (e.g. slack 0)."""
    n = len(knobs.density)
    slack_only = Search(Targets.of((1.0,) * n, knobs.slack, population), (None, "u"))
    if spec.upper:
        out = [Search(Targets.breadcrumbs(knobs.density, knobs.gamma, population), ("t", "h"))]
        return out + [slack_only] if spec.protects else out
    if spec.thresholds:
        return [Search(Targets.of(knobs.density, knobs.slack, population), ("t", "u"))]
    return [slack_only] if spec.protects else []


class RadixSelect:
    """Find the k-th largest key for every (model, slot) with three histogram rounds.

    ``ks[i][j]``: rank wanted for model i, slot j (0: trim t, 1: slack u); 0 means the
    slot needs no search. ``fixed[i][j]``: threshold already known without search
    (keep all: 0.0, keep none / protect none: inf).
    """

    def __init__(self, ks: list[list[int]], fixed: list[list[float | None]]):
        self.ks = [list(r) for r in ks]
        self.fixed = [list(r) for r in fixed]
        self.remaining = [list(r) for r in ks]
        self.prefix = [[0 if k > 0 else -1 for k in r] for r in ks]
        self.level = 0

    @classmethod
    def of(cls, targets: Targets) -> "RadixSelect":
        return cls(targets.ks, targets.fixed)

    @property
    def done(self) -> bool:
        return self.level >= len(DIGIT_BITS) or all(k == 0 for r in self.ks for k in r)

    def prefixes(self) -> torch.Tensor:
        """int32 [n, 2]: the key prefix each slot is refining this round (-1: off).

        At level 0 only slot 0 is histogrammed; slot 1 reuses it.
        """
        p = torch.tensor(self.prefix, dtype=torch.int32)
        if self.level == 0:
            p[:, 0] = torch.where((p[:, 0] >= 0) | (p[:, 1] >= 0), 0, -1)
            p[:, 1] = -1
        return p

    def update(self, hist: torch.Tensor) -> None:
        """Consume this round's histograms (int64 [n, 2, NBINS], summed over the population)."""
        bits = DIGIT_BITS[self.level]
        for i, row in enumerate(self.ks):
            for j, k in enumerate(row):
                if k == 0:
                    continue
                h = hist[i, 0 if self.level == 0 else j, : 1 << bits]
                need = self.remaining[i][j]
                from_top = h.flip(0).cumsum(0)  # entries in bins >= each digit
                pos = int(torch.searchsorted(from_top, need))
                if pos >= from_top.numel():
                    raise AssertionError(f"radix select: histogram holds "
                                         f"{int(from_top[-1])} entries, rank {need} wanted")
                digit = (1 << bits) - 1 - pos
                above = int(from_top[pos]) - int(h[digit])
                self.remaining[i][j] = need - above
                self.prefix[i][j] = (self.prefix[i][j] << bits) | digit
        self.level += 1

    def thresholds(self) -> tuple[list[float], list[float]]:
        """(t, u): per-model fp32 threshold values (0.0 keep all, inf keep/protect none)."""
        assert self.done, "thresholds() called before the last histogram round"
        out = []
        for j in range(2):
            col = []
            for i, row in enumerate(self.ks):
                col.append(self.fixed[i][j] if row[j] == 0 else key_to_float(self.prefix[i][j]))
            out.append(col)
        return out[0], out[1]


def find_thresholds(histogram, chunks, targets: Targets, reduce=None):
    """Run RadixSelect to completion; ``chunks()`` yields (base, models) pairs each round.
    ``reduce(local)``, when given, turns the function computing this process's histograms
    into the total over every process (fastmerge.distributed: an exact int64 sum)."""
    sel = RadixSelect.of(targets)
    while not sel.done:
        prefixes = sel.prefixes()

        def local():
            total = torch.zeros(len(targets.ks), 2, NBINS, dtype=torch.int64)
            for base, models in chunks():
                total += histogram(base, models, prefixes, sel.level).cpu()
            return total
        sel.update(local() if reduce is None else reduce(local))
    return sel.thresholds()


# -- bracketing ----------------------------------------------------------------------------
SAMPLE_SIZE = 1 << 16
BRACKET_SIGMAS = 3.5   # half-width of a bracket in binomial standard deviations of the sample
KEY_MAX = (1 << 32) - 1


def sample_keys(base: torch.Tensor, models, size: int = SAMPLE_SIZE) -> np.ndarray:
    """int32 [n, s]: the keys bits(|f32(θ_i) − f32(θ_b)|) at every step-th position, unordered
    (every entry when N < 2·size). The step is the first prime >= N // size, so that it
    shares no factor with a weight matrix's row length: every column gets sampled (a step
    of 688 over rows of 4096 would see only 256 columns of a matrix whose columns differ
    in scale). Bit-exact with the kernels' keys: an fp32 subtraction, then the sign bit
    cleared."""
    b = base.reshape(-1)
    pick = slice(None)
    if b.numel() >= 2 * size:
        step = _prime_at_least(b.numel() // size)
        pick = slice(step // 2, None, step)
    rows = torch.stack([m.reshape(-1)[pick] for m in models])   # [n, s]: rows of a matrix or a sequence
    keys = (rows.float() - b[pick].float().unsqueeze(0)).view(torch.int32) & 0x7FFFFFFF
    return keys.cpu().numpy()


def _prime_at_least(x: int) -> int:
    while any(x % p == 0 for p in range(2, math.isqrt(x) + 1)):
        x += 1
    return x


def kth_largest_keys(keys: np.ndarray, ranks: list[int]) -> list[int]:
    """The ranks[r]-th largest entries (1-based) of the 1-D ``keys``, by one partial sort."""
    m = keys.shape[0]
    part = np.partition(keys, sorted({m - r for r in ranks}))
    return [int(part[m - r]) for r in ranks]


def kth_largest_in(keys: np.ndarray, lo: int, hi: int, r: int) -> int:
    """The r-th largest (1-based) of the 1-D ``keys``, all of them in [lo, hi]. Keys from
    fp16/bf16 weights repeat a lot (a bracket of 600k keys may hold 500 values), which
    makes a partial sort ~7× slower than on distinct keys; counting the values in the
    range costs O(len + span) whatever the ties, so it is used when the span is small."""
    span = hi - lo + 1
    if span > max(4 * keys.size, 1 << 16):
        return kth_largest_keys(keys, [r])[0]
    from_top = np.cumsum(np.bincount(keys - lo, minlength=span)[::-1])   # #{key >= hi - i}
    return hi - int(np.searchsorted(from_top, r))


def bracket_bounds(sample: np.ndarray, ks, population: int):
    """(bounds int64 [n, 2, 2], cap): per slot a key range [lo, hi] expected to hold the
    ks[i][j]-th largest of ``population`` keys, from their sample; lo = -1 when the slot
    needs no search. ``cap`` leaves room for 1.5× the keys expected inside."""
    n, s = sample.shape
    bounds = torch.full((n, 2, 2), -1, dtype=torch.int64)
    widest = 0
    for i, row in enumerate(ks):
        ends = {}
        for j, k in enumerate(row):
            if k == 0:
                continue
            r = k * s / population                 # the rank's expected place in the sample
            half = BRACKET_SIGMAS * math.sqrt(r * max(0.0, 1 - r / s)) + 2
            ends[j] = math.floor(r - half), math.ceil(r + half)   # 1-based sample ranks
            widest = max(widest, min(ends[j][1], s) - max(ends[j][0], 1) + 1)
        inner = [x for a, b in ends.values() for x in (a, b) if 1 <= x <= s]
        value = dict(zip(inner, kth_largest_keys(sample[i], inner))) if inner else {}
        for j, (a, b) in ends.items():
            bounds[i, j, 0] = value[b] if b <= s else 0
            bounds[i, j, 1] = value[a] if a >= 1 else KEY_MAX
    cap = min(population, int(1.5 * widest * population / s) + 1024)
    return bounds, cap


def bracket_thresholds(bracket, base: torch.Tensor, models, targets: Targets, sample=None):
    """(t, u) for one tensor held in memory by bracketing; None if a bracket missed (the
    caller then runs RadixSelect). ``bracket`` is a backend's counting pass; ``sample`` is
    ``sample_keys(base, models)`` when the caller took it already."""
    population = base.numel()
    ks = targets.ks
    out = [list(col) for col in zip(*targets.fixed)]   # [slot][model]
    if not targets.searched:
        return out[0], out[1]
    if sample is None:
        sample = sample_keys(base, models)
    if sample.shape[1] == population:                # the sample is the whole tensor
        for i, row in enumerate(ks):
            want = [k for k in row if k]
            for j, key in zip([j for j, k in enumerate(row) if k],
                              kth_largest_keys(sample[i], want) if want else []):
                out[j][i] = key_to_float(key)
        return out[0], out[1]
    bounds, cap = bracket_bounds(sample, ks, population)
    counts, cand = bracket(base, models, bounds, cap)
    counts, cand = counts.tolist(), cand.numpy()
    for i, row in enumerate(ks):
        for j, k in enumerate(row):
            if k == 0:
                continue
            above, inside = counts[i][j]
            lo, hi = int(bounds[i, j, 0]), int(bounds[i, j, 1])
            if not above < k <= above + inside:
                return None
            if lo == hi:                             # one key value, however many ties
                out[j][i] = key_to_float(lo)
            elif inside > cap:
                return None
            else:                                    # the (k − above)-th largest inside
                out[j][i] = key_to_float(kth_largest_in(cand[i, j, :inside], lo, hi, k - above))
    return out[0], out[1]


def find_all(backend, found: list[Search], chunks, whole=None, sample=None,
             reduce=None) -> dict:
    """{name: per-model thresholds} of every slot of every search (``thresholds`` each)."""
    out = {}
    for search in found:
        pair = thresholds(backend, search.targets, chunks, whole, sample, reduce)
        for name, values in zip(search.slots, pair):
            # a NaN |τ| (allow_nonfinite) orders above +inf by its bits; a threshold that
            # falls on one is +inf (docs/spec.md §3): keep none, protect none, drop none
            values = [INF if math.isnan(v) else v for v in values]
            if name == "u":
                values = [max(v, U_MIN) for v in values]
            if name is not None:
                out[name] = list(values)
    return out


def thresholds(backend, targets: Targets, chunks, whole=None, sample=None, reduce=None):
    """(t, u) of one population: the selection policy. Nothing to search: the fixed
    values. A tensor held in memory (``whole`` = (base, models)) on a backend with a
    bracketing pass: one counting pass, unless a bracket misses. Otherwise radix select
    over ``chunks()`` (three histogram rounds; ``reduce``: see find_thresholds)."""
    if not targets.searched:
        return targets.fixed_only()
    bracket = getattr(backend, "bracket", None)
    if bracket is not None and whole is not None:
        found = bracket_thresholds(bracket, *whole, targets, sample)
        if found is not None:
            return found
    return find_thresholds(backend.histogram, chunks, targets, reduce)
