"""The PyTorch reference: the executable form of docs/spec.md. Simple, exact, device-agnostic.

Task vectors, thresholds and comparisons use the spec's fp32 values; votes, sums and θ
are fp64 in the spec's order (§7), and θ is rounded once to the output dtype
(``round_once``). Every fast backend is checked against the functions here.
"""
from __future__ import annotations

import math

import torch

from . import della, philox
from .select import U_MIN
from .kernel_api import (COUNTERS, DIGIT_BITS, DROPPED_BY_SIGN, IMPORTANT_DROPPED, KEPT,
                         NBINS, NONFINITE, PROTECTED, SELECTED, SHIFT,
                         TIES_IMPORTANT_DROPPED, KernelConfig)


def model_matrix(models) -> torch.Tensor:
    """The models as one [n, N] tensor: a 2-D tensor as is, a sequence of n 1-D tensors
    stacked (kernel_api accepts both)."""
    return models if isinstance(models, torch.Tensor) else torch.stack(list(models))


def task_vectors(base: torch.Tensor, models: torch.Tensor) -> torch.Tensor:
    """τ_i = f32(θ_i) − f32(θ_b), shape [n, N] (docs/spec.md §1)."""
    return models.float() - base.float().unsqueeze(0)


def abs_keys(tau: torch.Tensor) -> torch.Tensor:
    """int64 keys that order like |τ|: the fp32 bit pattern of |τ| (sign bit cleared)."""
    return tau.abs().view(torch.int32).to(torch.int64)


def histogram(base: torch.Tensor, models: torch.Tensor, prefixes: torch.Tensor,
              level: int) -> torch.Tensor:
    """Radix-select histogram of kernel_api's contract, by torch.bincount."""
    models = model_matrix(models)
    keys = abs_keys(task_vectors(base, models))
    shift, bits = SHIFT[level], DIGIT_BITS[level]
    digits = (keys >> shift) & ((1 << bits) - 1)
    high = keys >> (shift + bits)
    prefixes = prefixes.to(device=keys.device, dtype=torch.int64)
    hist = torch.zeros(models.shape[0], 2, NBINS, dtype=torch.int64)
    for i in range(models.shape[0]):
        for j in range(2):
            p = int(prefixes[i, j])
            if p < 0:
                continue
            sel = digits[i][high[i] == p]
            hist[i, j] = torch.bincount(sel, minlength=NBINS).cpu()
    return hist


def bracket(base: torch.Tensor, models: torch.Tensor, bounds: torch.Tensor,
            cap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bracketed-selection counting pass of kernel_api's contract: (above, inside) counts
    [n, 2, 2] and the keys inside each bracket (cand [n, 2, cap], sorted descending)."""
    models = model_matrix(models)
    keys = abs_keys(task_vectors(base, models))
    n = models.shape[0]
    counts = torch.zeros(n, 2, 2, dtype=torch.int64)
    cand = torch.zeros(n, 2, cap, dtype=torch.int32)
    for i in range(n):
        for j in range(2):
            lo, hi = (int(x) for x in bounds[i, j])
            if lo < 0:
                continue
            inside = keys[i][(keys[i] >= lo) & (keys[i] <= hi)].sort(descending=True).values
            counts[i, j, 0] = int((keys[i] > hi).sum())
            counts[i, j, 1] = inside.numel()
            m = min(inside.numel(), cap)
            cand[i, j, :m] = inside[:m].to(torch.int32).cpu()
    return counts, cand


def kth_largest(values: torch.Tensor, k: int) -> float:
    """The k-th largest entry (1-based) by sorting: brute force for thresholds and tests."""
    return float(torch.topk(values.reshape(-1).float(), k).values[-1])


def _threshold(abs_tau: torch.Tensor, k: int) -> float:
    """The k-th largest |τ| as a threshold (docs/spec.md §3): +inf where it is +inf or a
    NaN (topk puts NaN above +inf, as the bit order does)."""
    v = kth_largest(abs_tau, k)
    return v if math.isfinite(v) else float("inf")


def thresholds_by_sort(abs_tau: torch.Tensor, density: float, slack: float,
                       population: int | None = None) -> tuple[float, float]:
    """(t, u) of docs/spec.md §3-§4 for one model, found by sorting |τ| (the brute-force definition)."""
    p = abs_tau.numel() if population is None else population
    k, s = int(density * p), int(slack * p)
    t = 0.0 if density == 1 else (float("inf") if k == 0 else _threshold(abs_tau, k))
    u = float("inf") if s == 0 else max(_threshold(abs_tau, s), U_MIN)   # never zeros
    return t, u


def breadcrumbs_thresholds_by_sort(abs_tau: torch.Tensor, density: float, gamma: float,
                                   population: int | None = None) -> tuple[float, float]:
    """(t, h) of docs/spec.md §8b for one model, found by sorting |τ| (brute force)."""
    p = abs_tau.numel() if population is None else population
    k, g = int(density * p), int(gamma * p)
    if density == 1:
        return 0.0, float("inf")
    if k == 0:
        return float("inf"), float("inf")
    lo = min(k + g, p)
    hi = lo - k
    return _threshold(abs_tau, lo), (_threshold(abs_tau, hi) if hi > 0 else float("inf"))


def round_once(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp64 ``x`` rounded once, to nearest even, to ``dtype`` (docs/spec.md §7).

    PyTorch narrows fp64 to fp16/bf16 through fp32 (two roundings: wrong in rare
    halfway cases), so fp16/bf16 go through fp32 rounded *to odd* (truncate, then set
    the last bit when inexact): with 13+ spare bits the second rounding is then exact.
    """
    f = x.to(torch.float32)
    if dtype == torch.float32 or dtype == torch.float64:
        return x if dtype == torch.float64 else f
    back = f.double()
    inexact = (back != x) & torch.isfinite(x)
    bits = f.view(torch.int32)
    bits = bits - (inexact & (back.abs() > x.abs())).to(torch.int32)   # toward zero
    bits = bits | inexact.to(torch.int32)                              # odd when inexact
    return bits.view(torch.float32).to(dtype)


def _ordered_sum(terms: torch.Tensor) -> torch.Tensor:
    """Σ_i terms[i] in model order from +0.0 (fp64): the order every backend uses."""
    acc = torch.zeros_like(terms[0])
    for row in terms:
        acc = acc + row
    return acc


def _finite_or_nan(values, device) -> torch.Tensor:
    """Thresholds as an fp32 column; +inf (keep / protect none) becomes NaN, which no
    comparison passes, so even |x| = inf is neither kept nor protected by it."""
    v = torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)
    return torch.where(torch.isinf(v), float("nan"), v)


def merge(base: torch.Tensor | None, models: torch.Tensor, out: torch.Tensor,
          cfg: KernelConfig) -> torch.Tensor:
    """The fused pass of kernel_api's contract (docs/spec.md §4-§8a), in fp64.

    Writes ``out`` (the fp64 θ rounded once) and returns int64 counters
    ``[n, len(COUNTERS)]`` (all but ``nonfinite`` zero when ``cfg.counts`` is False).
    """
    models = model_matrix(models)
    n = models.shape[0]
    counts = torch.zeros(n, len(COUNTERS), dtype=torch.int64)
    if cfg.on_base and base is None:
        raise ValueError("this kernel config needs a base tensor")
    cfg = della.expand(cfg, base, models)                   # DELLA's per-rank table (§8d)
    x32 = task_vectors(base, models) if cfg.on_base else models.float()
    counts[:, NONFINITE] = (~torch.isfinite(x32)).sum(1).cpu()
    x = x32.double()
    dev = x.device
    w = torch.tensor(cfg.weights, dtype=torch.float64, device=dev).unsqueeze(1)
    c = torch.tensor(cfg.vote_weights, dtype=torch.float64, device=dev).unsqueeze(1)
    if cfg.keep is not None and cfg.rescale:                # DELLA §8d: (w_i·2^32) / T_i(g)
        T = cfg.keep.to(device=dev, dtype=torch.float64)
        c = torch.where(T != 0, (w * 4294967296.0) / torch.where(T != 0, T, 1.0), 0.0)
    a = x32.abs()
    if cfg.drops:
        kept = dare_kept(cfg, models.shape[1], dev)
    elif cfg.t is not None:
        kept = a >= _finite_or_nan(cfg.t, dev)
        if cfg.upper:                                        # §8b: t_i ≤ |x_i| < h_i
            kept = kept & ~(a >= _finite_or_nan(cfg.h, dev))
    else:
        kept = torch.ones_like(a, dtype=torch.bool)
    prot = None
    if cfg.u is not None:                                    # §4a: protected entries are
        prot = a >= _finite_or_nan(cfg.u, dev)               # always kept, weigh w_i
        kept = kept | prot
        c = torch.where(prot, w, c)
    wx = c * x                                               # c_i·x_i (c_i = w_i but DARE)
    if cfg.elect == "none":
        sel = kept
        wsum = 0.0
        for wi in cfg.weights:                               # Σ w_i, in order, fp64
            wsum += wi
        wsel = torch.full_like(x[0], wsum)
    else:
        vote = torch.sign(w) * torch.sign(x) if cfg.elect == "count" else wx
        gamma_ties = _elect(torch.where(kept, vote, 0.0))
        gamma = gamma_ties
        if prot is not None:
            gamma = torch.where(prot.any(0), _elect(torch.where(prot, vote, 0.0)), gamma_ties)
        agree = torch.sign(w) * torch.sign(x)               # sign(w_i·x_i); 0 never matches
        sel = kept & (agree == gamma)
        wsel = _ordered_sum(torch.where(sel, w, 0.0))
        if cfg.counts:
            _count_election(counts, kept, sel, x, prot, kept & (agree == gamma_ties))
    if cfg.counts and cfg.elect == "none":
        counts[:, KEPT] = kept.sum(1).cpu()
        counts[:, SELECTED] = sel.sum(1).cpu()
    d = _ordered_sum(torch.where(sel, wx, 0.0))
    m = torch.where(wsel != 0, d / torch.where(wsel != 0, wsel, 1.0), d) if cfg.normalize else d
    theta = base.double() + cfg.scale * m if cfg.on_base else m
    out.copy_(round_once(theta, out.dtype))
    return counts


def dare_kept(cfg: KernelConfig, N: int, device=None) -> torch.Tensor:
    """DARE's kept_i for entries cfg.offset .. cfg.offset + N − 1 (docs/spec.md §8a):
    r_i(g) < T_i, bool [n, N]; DELLA's (§8d) r_i(g) < T_i(g) with T = ``cfg.keep``."""
    if cfg.keep is not None:
        return torch.stack([philox.random_words(cfg.key, i, cfg.offset, N, device) <
                            cfg.keep[i].to(device=device, dtype=torch.int64)
                            for i in range(cfg.n_models)])
    return torch.stack([philox.keep_mask(cfg.key, i, cfg.offset, N, T, device)
                        for i, T in enumerate(cfg.drop_thresholds)])


def _elect(votes: torch.Tensor) -> torch.Tensor:
    """γ = +1 where Σ_i votes_i (in model order) >= 0, else −1 (docs/spec.md §5)."""
    return torch.where(_ordered_sum(votes) >= 0, 1.0, -1.0).to(votes.dtype)


def _count_election(counts, kept, sel, x, prot, sel_ties) -> None:
    """The report's counters (docs/spec.md §9) of a pass with a sign election."""
    counts[:, KEPT] = kept.sum(1).cpu()
    counts[:, SELECTED] = sel.sum(1).cpu()
    counts[:, DROPPED_BY_SIGN] = (kept & ~sel & (x != 0)).sum(1).cpu()
    if prot is not None:
        counts[:, PROTECTED] = prot.sum(1).cpu()
        counts[:, IMPORTANT_DROPPED] = (prot & ~sel).sum(1).cpu()
        counts[:, TIES_IMPORTANT_DROPPED] = (prot & ~sel_ties).sum(1).cpu()


def merge_one(base: torch.Tensor | None, models: torch.Tensor, params,
              out_dtype: torch.dtype | None = None, population: int | None = None,
              thresholds=None, name: str = "", key: int | None = None,
              rescale: bool | None = None):
    """Merge one tensor by the spec's definition: thresholds by sorting, then ``merge``.

    ``params`` is a ``MergeParams`` (its knobs resolved for tensor ``name``);
    ``thresholds`` overrides the sort, e.g. for ``scope="model"``: a dict {"t", "u", "h"}
    (those the method has), or a (t, u) pair. DARE methods (docs/spec.md §8a) take the
    tensor's Philox ``key`` (default: ``philox.tensor_key(params.seed, name)``) and
    ``rescale`` (default: ``params.rescale``, else the method's default).
    Returns (out, counts, (t, u)); breadcrumbs' h is in ``thresholds_by_sort_all``.
    """
    ref = base if base is not None else models[0]
    out = torch.empty(ref.shape, dtype=out_dtype or ref.dtype, device=ref.device)
    n = models.shape[0]
    tk = params.for_tensor(name)
    thr = {}
    if params.selects:
        if thresholds is None:
            a = task_vectors(base, models).abs().reshape(n, -1)
            thr = thresholds_by_sort_all(params.spec, a, tk, population)
        elif isinstance(thresholds, dict):
            thr = {k: list(v) for k, v in thresholds.items()}
        else:
            thr = {"t": list(thresholds[0]), "u": list(thresholds[1])}
    drop = {}
    if params.spec.drop:
        key = philox.tensor_key(params.seed, name) if key is None else key
        drop = dict(density=tk.density, key=key,
                    rescale=params.rescale if rescale is None else rescale)
    if params.spec.ranked:                                  # DELLA: the rank stage (§8d)
        drop["keep"] = della.keep_thresholds(base.reshape(-1), models.reshape(n, -1),
                                             base.shape, tk.density, tk.epsilon)
        del drop["density"]
    cfg = params.spec.kernel_config(tk.weights, tk.scale, params.normalize, params.elect,
                                    thr.get("t"), thr.get("u"), h=thr.get("h"), **drop)
    flat_base = None if base is None else base.reshape(-1)
    counts = merge(flat_base, models.reshape(n, -1), out.view(-1), cfg)
    return out, counts, (thr.get("t"), thr.get("u"))


def thresholds_by_sort_all(spec, abs_tau: torch.Tensor, knobs, population: int | None = None
                           ) -> dict:
    """{"t", "u", "h"} (those method ``spec`` has) for the rows of ``abs_tau`` [n, N], by
    sorting: t and u as §3-§4 (u: slack, when the method protects), breadcrumbs' t and h
    as §8b."""
    n = abs_tau.shape[0]
    out = {}
    if spec.upper:
        pairs = [breadcrumbs_thresholds_by_sort(abs_tau[i], knobs.density[i], knobs.gamma[i],
                                                population) for i in range(n)]
        out["t"], out["h"] = [p[0] for p in pairs], [p[1] for p in pairs]
    elif spec.thresholds:
        out["t"] = [thresholds_by_sort(abs_tau[i], knobs.density[i], 0.0, population)[0]
                    for i in range(n)]
    if spec.protects or (spec.thresholds and not spec.upper):   # as select.searches
        out["u"] = [thresholds_by_sort(abs_tau[i], 1.0, knobs.slack[i], population)[1]
                    for i in range(n)]
    return out
