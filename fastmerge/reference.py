"""The PyTorch reference: the executable form of SPEC §1-§8. Simple, exact, device-agnostic.

Task vectors and thresholds use the fp32 values the spec defines; the combine step
runs in fp64. (PyTorch narrows fp64 to fp16/bf16 through fp32, so in rare halfway cases
the reference is one ulp off the exactly rounded value; SPEC §9's 1-ulp bar covers it.)
Every fast backend is checked against the functions here.
"""
from __future__ import annotations

import torch

from .kernel_api import (COUNTERS, DIGIT_BITS, DROPPED_BY_SIGN, IMPORTANT_DROPPED, KEPT,
                         NBINS, NONFINITE, PROTECTED, SELECTED, SHIFT,
                         TIES_IMPORTANT_DROPPED, KernelConfig)


def model_matrix(models) -> torch.Tensor:
    """The models as one [n, N] tensor: a 2-D tensor as is, a sequence of n 1-D tensors
    stacked (kernel_api accepts both)."""
    return models if isinstance(models, torch.Tensor) else torch.stack(list(models))


def task_vectors(base: torch.Tensor, models: torch.Tensor) -> torch.Tensor:
    """τ_i = f32(θ_i) − f32(θ_b), shape [n, N] (SPEC §1)."""
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


def thresholds_by_sort(abs_tau: torch.Tensor, density: float, slack: float,
                       population: int | None = None) -> tuple[float, float]:
    """(t, u) of SPEC §2-§3 for one model, found by sorting |τ| (the brute-force definition)."""
    p = abs_tau.numel() if population is None else population
    k, s = int(density * p), int(slack * p)
    t = 0.0 if density == 1 else (float("inf") if k == 0 else kth_largest(abs_tau, k))
    u = float("inf") if s == 0 else kth_largest(abs_tau, s)
    return t, u


def merge(base: torch.Tensor | None, models: torch.Tensor, out: torch.Tensor,
          cfg: KernelConfig) -> torch.Tensor:
    """The fused pass of kernel_api's contract (SPEC §4-§6, §8), in fp64.

    Writes ``out`` and returns int64 counters ``[n, len(COUNTERS)]``.
    """
    models = model_matrix(models)
    n = models.shape[0]
    counts = torch.zeros(n, len(COUNTERS), dtype=torch.int64)
    w = torch.tensor(cfg.weights, dtype=torch.float64, device=models.device).unsqueeze(1)
    if cfg.mode == "linear":
        theta = models.double()
        counts[:, NONFINITE] = (~torch.isfinite(theta)).sum(1).cpu()
        total = (w * theta).sum(0)
        if cfg.normalize:
            total = total / w.sum()
        out.copy_(total.to(out.dtype))
        return counts

    tau32 = task_vectors(base, models)
    counts[:, NONFINITE] = (~torch.isfinite(tau32)).sum(1).cpu()
    tau = tau32.double()
    if cfg.mode == "task_arithmetic":
        m = (w * tau).sum(0)
        if cfg.normalize and float(w.sum()) != 0:
            m = m / w.sum()
    elif cfg.mode == "ties":
        m = _ties(tau32, tau, w, cfg, counts)
    else:
        raise ValueError(f"unknown kernel mode {cfg.mode!r}")
    out.copy_((base.double() + cfg.scale * m).to(out.dtype))
    return counts


def _elect(votes: torch.Tensor) -> torch.Tensor:
    """γ = +1 where Σ votes >= 0 else −1 (SPEC §4)."""
    return torch.where(votes.sum(0) >= 0, 1.0, -1.0).to(votes.dtype)


def _ties(tau32, tau, w, cfg: KernelConfig, counts) -> torch.Tensor:
    """Trim, protected-first election, slack-adjusted disjoint mean; fills the counters."""
    dev = tau.device
    a = tau32.abs()
    t = torch.tensor(cfg.t, dtype=torch.float32, device=dev).unsqueeze(1)
    u = torch.tensor(cfg.u, dtype=torch.float32, device=dev).unsqueeze(1)
    kept = a >= t
    prot = a >= u  # u = inf protects nothing (|τ| is finite)
    raw = torch.sign(w * tau) if cfg.elect_count else w * tau
    v = torch.where(kept, raw, 0.0)
    vp = torch.where(prot, raw, 0.0)
    any_prot = prot.any(0)
    gamma_ties = _elect(v)
    gamma = torch.where(any_prot, _elect(vp), gamma_ties)
    sgn = torch.sign(tau)
    sel = kept & (sgn == gamma)
    sel_ties = kept & (sgn == gamma_ties)
    d = (torch.where(sel, w * tau, 0.0)).sum(0)
    if cfg.normalize:
        wsum = (torch.where(sel, w, 0.0)).sum(0)
        m = torch.where(wsum != 0, d / torch.where(wsum != 0, wsum, 1.0), d)
    else:
        m = d
    counts[:, KEPT] = kept.sum(1).cpu()
    counts[:, PROTECTED] = prot.sum(1).cpu()
    counts[:, SELECTED] = sel.sum(1).cpu()
    counts[:, DROPPED_BY_SIGN] = (kept & ~sel & (tau != 0)).sum(1).cpu()
    counts[:, IMPORTANT_DROPPED] = (prot & ~sel).sum(1).cpu()
    counts[:, TIES_IMPORTANT_DROPPED] = (prot & ~sel_ties).sum(1).cpu()
    return m


def merge_one(base: torch.Tensor | None, models: torch.Tensor, params,
              out_dtype: torch.dtype | None = None, population: int | None = None,
              thresholds=None):
    """Merge one tensor by the spec's definition: thresholds by sorting, then ``merge``.

    ``params`` is a ``MergeParams``; ``thresholds`` ((t, u) lists) overrides the sort,
    e.g. for ``scope="model"``. Returns (out, counts, (t, u)).
    """
    from .kernel_api import KernelConfig

    ref = base if base is not None else models[0]
    out = torch.empty(ref.shape, dtype=out_dtype or ref.dtype, device=ref.device)
    n = models.shape[0]
    t, u = [0.0] * n, [float("inf")] * n
    if params.trims:
        if thresholds is None:
            a = task_vectors(base, models).abs()
            pairs = [thresholds_by_sort(a[i], params.density[i], params.slack[i], population)
                     for i in range(n)]
            t, u = [p[0] for p in pairs], [p[1] for p in pairs]
        else:
            t, u = list(thresholds[0]), list(thresholds[1])
    mode = "ties" if params.trims else params.method
    cfg = KernelConfig(mode=mode, weights=params.weights, t=tuple(t), u=tuple(u),
                       scale=params.scale, normalize=params.normalize,
                       elect_count=params.elect == "count")
    flat_base = None if base is None else base.reshape(-1)
    counts = merge(flat_base, models.reshape(n, -1), out.view(-1), cfg)
    return out, counts, (t, u)
