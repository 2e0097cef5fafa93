"""Triton kernels of SLERP, NuSLERP and model stock (docs/spec.md §8c; kernel_api's
``gram`` and ``combine``).

Statistics pass (``gram``): one program per block of GRAM_BLOCK entries. The chunk's N
entries are pieces of ``seg`` entries, each cut into blocks from its start; program q
loads its block of every vector v_k (τ_k = f32(θ_k) − f32(θ_b), or f32(θ_k)), forms the
exact fp64 products v_k·v_l for each pair k ≤ l and sums them by a fixed pairwise tree:
the [1024] vector is reshaped to [512, 2] and its two columns added (``tl.split``), ten
times. Entries past the block's end load as +0.0. The tree is the reference's and the C
kernel's, so every block sum is the same fp64 value on every backend.

Combine pass (``combine``): θ_j = [f32(θ_b) +] Σ_k c[s(j), k]·v_k[j] in fp64 from +0.0,
k in order, no FMA (``enable_fp_fusion=False``), rounded once (``_store_f64``); s(j) =
j // seg, or j mod seg for column segments. Per-program non-finite counts are summed by
torch in int64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastmerge.kernel_api import GRAM_BLOCK

from .triton_merge import (MAX_MODELS, _check, _check_models, _interpreted, _kernel_view,
                           _launch_context, _load_f32, _load_x, _nonfinite, _offsets,
                           _same_device, _store_f64)

COMBINE_BLOCK = 1024

assert GRAM_BLOCK == 1024, "the tree in _block_sum is written for GRAM_BLOCK = 1024"


@triton.jit
def _halve(p, W: tl.constexpr):
    """One tree level: [2W] → [W], p[2m] + p[2m + 1]."""
    a, b = tl.split(tl.reshape(p, [W, 2]))
    return a + b


@triton.jit
def _block_sum(p):
    """Pairwise-tree sum of a [1024] fp64 vector, as a [1] vector."""
    p = _halve(p, 512)
    p = _halve(p, 256)
    p = _halve(p, 128)
    p = _halve(p, 64)
    p = _halve(p, 32)
    p = _halve(p, 16)
    p = _halve(p, 8)
    p = _halve(p, 4)
    p = _halve(p, 2)
    return _halve(p, 1)


@triton.jit
def _gram_kernel(base_ptr, models_ptr, out_ptr, N, seg, bps, ON_BASE: tl.constexpr,
                 N_MODELS: tl.constexpr, BASE_BF16: tl.constexpr, MODELS_BF16: tl.constexpr,
                 GB: tl.constexpr):
    """Block q = program_id: out[q, kl] = tree sum of v_k·v_l over the block (module doc)."""
    q = tl.program_id(0).to(tl.int64)
    within = q % bps
    start = (q // bps) * seg + within * GB
    length = tl.minimum(tl.minimum(seg - within * GB, N - start), GB)
    lane = tl.arange(0, GB)
    offs = start + lane
    inb = lane < length
    b = tl.zeros([GB], tl.float32)
    if ON_BASE:
        b = _load_f32(base_ptr, offs, inb, BASE_BF16)
    K: tl.constexpr = N_MODELS * (N_MODELS + 1) // 2
    kl = 0
    for k in tl.static_range(N_MODELS):
        xk = _load_x(models_ptr, k, N, offs, inb, b, ON_BASE, MODELS_BF16).to(tl.float64)
        for l in tl.static_range(k, N_MODELS):
            xl = _load_x(models_ptr, l, N, offs, inb, b, ON_BASE, MODELS_BF16).to(tl.float64)
            s = _block_sum(xk * xl)
            tl.store(out_ptr + q * K + kl + tl.arange(0, 1), s)
            kl += 1


@triton.jit
def _combine_kernel(base_ptr, models_ptr, out_ptr, coef_ptr, nf_ptr, N, seg,
                    ON_BASE: tl.constexpr, COLUMNS: tl.constexpr, N_MODELS: tl.constexpr,
                    BASE_BF16: tl.constexpr, MODELS_BF16: tl.constexpr,
                    OUT_BF16: tl.constexpr, OUT_F32: tl.constexpr, BLOCK: tl.constexpr):
    """θ of one block of BLOCK entries (module doc); nf_ptr: int32 [programs, N_MODELS]."""
    pid = tl.program_id(0)
    offs = _offsets(pid, BLOCK)
    inb = offs < N
    if COLUMNS:
        s = offs % seg
    else:
        s = offs // seg
    b = tl.zeros([BLOCK], tl.float32)
    if ON_BASE:
        b = _load_f32(base_ptr, offs, inb, BASE_BF16)
    d = tl.zeros([BLOCK], tl.float64)
    for k in tl.static_range(N_MODELS):
        x = _load_x(models_ptr, k, N, offs, inb, b, ON_BASE, MODELS_BF16)
        c = tl.load(coef_ptr + s * N_MODELS + k, mask=inb, other=0.0)
        d = d + c * x.to(tl.float64)
        nf = tl.sum((_nonfinite(x) & inb).to(tl.int32), axis=0)
        tl.store(nf_ptr + pid * N_MODELS + k, nf)
    if ON_BASE:
        d = b.to(tl.float64) + d
    _store_f64(out_ptr, offs, d, inb, OUT_BF16, OUT_F32)


def _inputs(base, models, on_base: bool):
    n, N = _check_models(models)
    if on_base:
        if base is None:
            raise ValueError("on_base needs a base tensor")
        _check(base, "base", N)
        _same_device(models.device, base)
    return n, N


def gram(base: torch.Tensor | None, models: torch.Tensor, on_base: bool,
         seg: int) -> torch.Tensor:
    """The statistics pass (kernel_api, docs/spec.md §8c): fp64 [Q, K] on the device."""
    from fastmerge.geometry import gram_blocks, pairs
    n, N = _inputs(base, models, on_base)
    if seg < 1:
        raise ValueError(f"seg must be >= 1, got {seg}")
    Q = gram_blocks(N, seg)
    out = torch.empty(Q, len(pairs(n)), dtype=torch.float64, device=models.device)
    if Q == 0:
        return out
    with _launch_context(models.device):
        _gram_kernel[(Q,)](
            _kernel_view(base if on_base else models), _kernel_view(models), out, N, seg,
            -(-seg // GRAM_BLOCK), ON_BASE=bool(on_base), N_MODELS=n,
            BASE_BF16=on_base and base.dtype == torch.bfloat16,
            MODELS_BF16=models.dtype == torch.bfloat16, GB=GRAM_BLOCK, num_warps=4,
            enable_fp_fusion=False)
    return out


def combine(base: torch.Tensor | None, models: torch.Tensor, out: torch.Tensor,
            coef: torch.Tensor, seg: int, columns: bool = False, on_base: bool = True, *,
            block: int | None = None) -> torch.Tensor:
    """The combine pass (kernel_api, docs/spec.md §8c): writes ``out``, returns int64 [n]
    non-finite counts. ``block`` overrides the launch block (tests)."""
    n, N = _inputs(base, models, on_base)
    _check(out, "out", N)
    device = models.device
    _same_device(device, out)
    if seg < 1:
        raise ValueError(f"seg must be >= 1, got {seg}")
    coef = coef.to(device=device, dtype=torch.float64).contiguous()
    need = 0 if N == 0 else min(seg, N) if columns else -(-N // seg)
    if coef.dim() != 2 or coef.shape[1] != n or coef.shape[0] < need:
        raise ValueError(f"coef: expected shape [>= {need}, {n}], got {list(coef.shape)}")
    if not bool(torch.isfinite(coef).all()):
        raise ValueError("coef: every coefficient must be finite")
    if N == 0:
        return torch.zeros(n, dtype=torch.int64)
    block = block or (256 if _interpreted() else COMBINE_BLOCK)
    grid = triton.cdiv(N, block)
    nf = torch.empty(grid, n, dtype=torch.int32, device=device)
    with _launch_context(device):
        _combine_kernel[(grid,)](
            _kernel_view(base if on_base else models), _kernel_view(models), _kernel_view(out),
            coef, nf, N, seg, ON_BASE=bool(on_base), COLUMNS=bool(columns), N_MODELS=n,
            BASE_BF16=on_base and base.dtype == torch.bfloat16,
            MODELS_BF16=models.dtype == torch.bfloat16, OUT_BF16=out.dtype == torch.bfloat16,
            OUT_F32=out.dtype == torch.float32, BLOCK=block, num_warps=4,
            enable_fp_fusion=False)
    return nf.sum(0, dtype=torch.int64).cpu()


__all__ = ["gram", "combine", "MAX_MODELS"]
