"""Triton kernels of the fastmerge contract (fastmerge.kernel_api): radix histogram and fused merge.

Math (SPEC §1-§8; one tensor of N entries, models i = 1..n, entry j):

    τ_i = f32(θ_i) − f32(θ_b)                               (fp32 subtraction)
    key = bits(|τ_i|)                                         (histogram: digits of the key)
    kept_i = |τ_i| ≥ t_i,   prot_i = |τ_i| ≥ u_i
    vote_i = w_i·τ_i   (elect="count": sign(w_i)·sign(τ_i))
    G = Σ prot_i·vote_i if any prot_i else Σ kept_i·vote_i;   γ = +1 if G ≥ 0 else −1
    sel_i = kept_i ∧ sign(τ_i) = γ;   D = Σ w_i·sel_i·τ_i,   W = Σ w_i·sel_i
    m = D / W (normalize; m = D where W = 0) or D;   θ = f32(θ_b) + λ·m, rounded (RNE)

Everything is fp32 without FMA contraction (``enable_fp_fusion=False``), so on a GPU and
under ``TRITON_INTERPRET=1`` a kernel evaluates the same expression the C backend does.

Layout and determinism:

* Offsets are int64 (``_offsets``, ``_row_offsets``): tensors past 2**31 entries work.
* Both kernels run a grid of P programs (a few per SM); program p handles blocks
  p, p + P, ... (ITERS of them, a power-of-two constexpr). All loop bounds are
  constexpr, which the Triton 3.6 interpreter needs.
* ``merge``: per block, one program loads the base block once and the n model rows as
  one [NM, BLOCK] tile (NM = n rounded up to a power of two, padded rows masked), so
  every input is read once and τ stays in registers for both election and selection;
  with BLOCK ≥ 32·num_warps·(16 bytes / element) each thread holds all rows of its
  columns and the sums over models never leave the thread. Counter flags are packed two
  per int32 and summed over each block's row; the per-program int32 partials
  [P, n, 8] are summed by torch into int64: deterministic. Plain TIES (no slack) takes
  a slack-free path unless the block holds a non-finite τ.
* ``histogram``: per block the base is loaded once and each model row in turn
  (``tl.static_range``). A 2048-bin ``tl.histogram`` costs about 2048/32 = 64 bit-twiddling
  steps per entry on Triton 3.6's ballot lowering, far more than the loads, so each slot
  histograms only a window of WB bins ending at the block's largest matching digit
  (level 0 puts almost every |τ| there: 16 binades for WB = 128) and adds it to the
  global histogram with WB int64 atomics; matching entries outside the window, or all
  of them when fewer than DENSE_MIN match (levels 1-2, where only the prefix's bin takes
  part), are added one by one with int64 atomics (digit 0, zeros and tiny |τ|, as one
  count). Integer atomics make the result exact and independent of scheduling. Programs
  spread over a few replicas of the histogram to keep atomics on hot bins apart; torch
  sums the replicas.

bf16 is handled through its bit pattern (int16 views): loads widen by ``bits << 16``
(exact), stores round fp32 → bf16 to nearest even with integer operations. This is
what the hardware does, and it does not depend on the Triton interpreter, whose bf16
conversions truncate (fp32 → bf16) and mis-handle subnormals (bf16 → fp32).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fastmerge.kernel_api import COUNTERS, DIGIT_BITS, NBINS, SHIFT, KernelConfig

MAX_MODELS = 8
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MODES = {"linear": 0, "task_arithmetic": 1, "ties": 2}
_N_COUNTERS = len(COUNTERS)

# Launch defaults (GPU). The interpreter uses smaller blocks: it runs programs one by one.
MERGE_TILE = 2048        # NM * BLOCK entries per merge program iteration
HIST_BLOCK = 2048
HIST_WINDOW = 128        # WB: bins per dense tl.histogram window
HIST_REPLICAS = 8
PROGRAMS_PER_SM = 8
MAX_ITERS = 256


# ------------------------------------------------------------------------------------
# device helpers


@triton.jit
def _offsets(blk, BLOCK: tl.constexpr):
    """Entry offsets of block ``blk``, in int64 (blk * BLOCK may pass 2**31)."""
    return tl.cast(blk, tl.int64) * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def _row_offsets(rows, N):
    """Start offset of each model row in the [n, N] models tensor, in int64."""
    return rows.to(tl.int64) * N


@triton.jit
def _load_f32(ptr, offs, mask, IS_BF16: tl.constexpr):
    """f32(x): bf16 arrives as int16 bits and widens exactly (bits << 16)."""
    if IS_BF16:
        bits = tl.load(ptr + offs, mask=mask, other=0).to(tl.int32)
        return (bits << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_rounded(ptr, offs, x, mask, IS_BF16: tl.constexpr):
    """Store fp32 ``x`` rounded to nearest even into the output dtype.

    bf16 (an int16 view): bits + 0x7FFF + lsb, shifted right by 16; NaN → 0x7FC0 (as torch).
    fp16 / fp32: the IEEE conversion (round to nearest even).
    """
    if IS_BF16:
        u = x.to(tl.uint32, bitcast=True)
        r = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
        r = tl.where(x != x, 0x7FC0, r)
        tl.store(ptr + offs, r.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
    else:
        tl.store(ptr + offs, x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _nonfinite(x):
    """x is ±inf or NaN: not |x| < inf."""
    return ~(tl.abs(x) < float("inf"))


@triton.jit
def _count_rows(flags):
    """Per-row count of a [NM, BLOCK] boolean tile, int32 [NM]."""
    return tl.sum(flags.to(tl.int32), axis=1)


# ------------------------------------------------------------------------------------
# histogram


@triton.jit
def _hist_slot(hist_ptr, key, inb, prefix, SHIFT: tl.constexpr, BITS: tl.constexpr,
               WB: tl.constexpr, DENSE_MIN: tl.constexpr, BLOCK: tl.constexpr):
    """Add this block's digits of the keys whose high part equals ``prefix`` to hist_ptr.

    digit = (key >> SHIFT) & (2**BITS − 1), counted where key >> (SHIFT + BITS) == prefix;
    prefix −1 matches nothing (the slot is off).
    """
    if prefix >= 0:
        digit = (key >> SHIFT) & ((1 << BITS) - 1)
        match = inb & ((key >> (SHIFT + BITS)) == prefix)
        dmax = tl.max(tl.where(match, digit, -1), axis=0)
        if dmax >= 0:
            lo = tl.maximum(dmax - (WB - 1), 0)
            dense = match & (digit >= lo)
            zero = match & (digit == 0)
            both = tl.sum(tl.where(dense, 1, 0) + tl.where(zero, 1 << 16, 0), axis=0)
            n_dense = both & 0xFFFF                      # BLOCK < 2**16: no carry
            if n_dense >= DENSE_MIN:
                h = tl.histogram(digit - lo, WB, mask=dense)
                tl.atomic_add(hist_ptr + lo + tl.arange(0, WB), h.to(tl.int64), mask=h > 0,
                              sem="relaxed")
            # entries below the window, or every match when the window was not histogrammed;
            # digit 0 (|τ| tiny or zero: often many entries) as one count
            lo_sparse = tl.where(n_dense >= DENSE_MIN, lo, 1 << BITS)
            n_zero = tl.where(lo_sparse > 0, both >> 16, 0)
            if n_zero > 0:
                lane = tl.arange(0, 2)
                tl.atomic_add(hist_ptr + lane, tl.full([2], 0, tl.int64) + n_zero.to(tl.int64),
                              mask=lane == 0, sem="relaxed")
            tl.atomic_add(hist_ptr + digit, tl.full([BLOCK], 1, tl.int64),
                          mask=match & (digit < lo_sparse) & (digit != 0), sem="relaxed")


@triton.jit
def _histogram_kernel(base_ptr, models_ptr, prefix_ptr, hist_ptr, N, n_programs, n_replicas,
                      SHIFT: tl.constexpr, BITS: tl.constexpr, N_MODELS: tl.constexpr,
                      BASE_BF16: tl.constexpr, MODELS_BF16: tl.constexpr,
                      BLOCK: tl.constexpr, ITERS: tl.constexpr, WB: tl.constexpr,
                      DENSE_MIN: tl.constexpr, NB: tl.constexpr):
    """Radix-select histogram over key = bits(|τ_i|), τ_i = f32(θ_i) − f32(θ_b).

    hist[r, i, j, d] += #{entries: key >> (SHIFT + BITS) == prefix[i, j],
                                   (key >> SHIFT) & (2**BITS − 1) == d}
    for replica r = program % n_replicas; both slots j in the same pass, base read once
    per block for all models.
    """
    pid = tl.program_id(0)
    rep_ptr = hist_ptr + (pid % n_replicas) * (N_MODELS * 2 * NB)
    for it in range(ITERS):
        offs = _offsets(pid + it * n_programs, BLOCK)
        inb = offs < N
        b = _load_f32(base_ptr, offs, inb, BASE_BF16)
        for i in tl.static_range(N_MODELS):
            row = _row_offsets(tl.full([1], i, tl.int32), N)
            x = _load_f32(models_ptr + row, offs, inb, MODELS_BF16)
            key = (x - b).to(tl.int32, bitcast=True) & 0x7FFFFFFF
            for j in tl.static_range(2):
                prefix = tl.load(prefix_ptr + 2 * i + j)
                _hist_slot(rep_ptr + (2 * i + j) * NB, key, inb, prefix,
                           SHIFT, BITS, WB, DENSE_MIN, BLOCK)


# ------------------------------------------------------------------------------------
# merge


@triton.jit
def _ties_tile(tau, inb, w, t, u, SLACK: tl.constexpr, ELECT_COUNT: tl.constexpr,
               NORMALIZE: tl.constexpr):
    """TIES on one [NM, BLOCK] tile of τ: returns (m, p1, p2, p3).

    kept = |τ| ≥ t, prot = |τ| ≥ u (SLACK=False: prot = ∅), G, γ, sel, D, W, m as in
    the module docstring. Counter flags come packed two per int32 (16-bit halves, so a
    row sum over BLOCK ≤ 2**16 entries cannot carry):
    p1 = kept + 2**16·sel,  p2 = (kept ∧ τ = 0) + 2**16·prot,
    p3 = (prot ∧ sel) + 2**16·(prot ∧ sel_ties)          (p2, p3 without prot: SLACK=False)
    (dropped_by_sign, important_dropped, ties_important_dropped follow by subtraction).
    Padded model rows have t = u = NaN: never kept nor protected.
    """
    a = tl.abs(tau)
    kept = (a >= t[:, None]) & inb[None, :]
    wt = w[:, None] * tau
    if ELECT_COUNT:
        sw = tl.where(w > 0, 1.0, tl.where(w < 0, -1.0, 0.0))[:, None]
        vote = tl.where(tau > 0, sw, tl.where(tau < 0, -sw, 0.0))
    else:
        vote = wt
    gamma_ties = tl.where(tl.sum(tl.where(kept, vote, 0.0), axis=0) >= 0, 1.0, -1.0)
    if SLACK:
        prot = (a >= u[:, None]) & inb[None, :]
        gamma_prot = tl.where(tl.sum(tl.where(prot, vote, 0.0), axis=0) >= 0, 1.0, -1.0)
        any_prot = tl.max(prot.to(tl.int32), axis=0) > 0
        gamma = tl.where(any_prot, gamma_prot, gamma_ties)
    else:
        gamma = gamma_ties
    sel = kept & (tau * gamma[None, :] > 0)             # sign(τ) = γ; a zero never matches
    d = tl.sum(tl.where(sel, wt, 0.0), axis=0)
    if NORMALIZE:
        ws = tl.sum(tl.where(sel, w[:, None], 0.0), axis=0)
        m = tl.where(ws != 0, tl.math.div_rn(d, tl.where(ws != 0, ws, 1.0)), d)
    else:
        m = d
    p1 = tl.where(kept, 1, 0) + tl.where(sel, 1 << 16, 0)
    p2 = tl.where(kept & (tau == 0), 1, 0)
    if SLACK:
        sel_ties = kept & (tau * gamma_ties[None, :] > 0)
        p2 += tl.where(prot, 1 << 16, 0)
        p3 = tl.where(prot & sel, 1, 0) + tl.where(prot & sel_ties, 1 << 16, 0)
    else:
        p3 = tl.zeros_like(p1)
    return m, p1, p2, p3


@triton.jit
def _merge_kernel(base_ptr, models_ptr, out_ptr, par_ptr, cnt_ptr, N, n_programs,
                  scale, wsum,
                  MODE: tl.constexpr, HAS_SLACK: tl.constexpr, ELECT_COUNT: tl.constexpr,
                  NORMALIZE: tl.constexpr, N_MODELS: tl.constexpr, NM: tl.constexpr,
                  BASE_BF16: tl.constexpr, MODELS_BF16: tl.constexpr,
                  OUT_BF16: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """One fused pass of SPEC §4-§6 (+ §8 counters) over blocks of BLOCK entries.

    MODE 0 linear:          θ = Σ w_i θ_i [/ Σ w_i]
    MODE 1 task_arithmetic: θ = θ_b + λ·Σ w_i τ_i [/ Σ w_i]
    MODE 2 ties:            trim, protected-first election, disjoint mean (``_ties_tile``).
    par_ptr: fp32 [3, NM] = (w_i, t_i, u_i); padded rows w = 0, t = u = NaN.
    HAS_SLACK=False means every u_i = +inf: then prot = {|τ| = inf}, so a tile without a
    non-finite τ takes the slack-free code and the rare other tiles the general code
    (which gives what the spec's comparison and the reference give).
    cnt_ptr: int32 [programs, N_MODELS, 7] partial counters, kernel_api.COUNTERS order
    (all 0 but non-finite for MODE 0 / 1).
    """
    pid = tl.program_id(0)
    rows = tl.arange(0, NM)
    rmask = rows < N_MODELS
    w = tl.load(par_ptr + rows)
    t = tl.load(par_ptr + NM + rows)
    u = tl.load(par_ptr + 2 * NM + rows)
    row_start = _row_offsets(rows, N)

    c_kept = tl.zeros([NM], tl.int32)
    c_prot = tl.zeros([NM], tl.int32)
    c_sel = tl.zeros([NM], tl.int32)
    c_kept_zero = tl.zeros([NM], tl.int32)
    c_prot_sel = tl.zeros([NM], tl.int32)
    c_prot_sel_ties = tl.zeros([NM], tl.int32)
    c_nonf = tl.zeros([NM], tl.int32)
    for it in range(ITERS):
        offs = _offsets(pid + it * n_programs, BLOCK)
        inb = offs < N
        m2 = rmask[:, None] & inb[None, :]
        x = _load_f32(models_ptr, row_start[:, None] + offs[None, :], m2, MODELS_BF16)
        if MODE == 0:
            c_nonf += _count_rows(_nonfinite(x))
            theta = tl.sum(w[:, None] * x, axis=0)          # padded rows: 0 · 0
            if NORMALIZE:
                theta = tl.math.div_rn(theta, wsum)
        else:
            b = _load_f32(base_ptr, offs, inb, BASE_BF16)
            tau = x - b[None, :]                              # padded rows: −θ_b, unused
            nonf = tl.where(rmask, _count_rows(_nonfinite(tau)), 0)
            c_nonf += nonf
            if MODE == 1:
                m = tl.sum(tl.where(rmask[:, None], w[:, None] * tau, 0.0), axis=0)
                if NORMALIZE:
                    m = tl.math.div_rn(m, wsum)
            else:
                if HAS_SLACK:
                    m, p1, p2, p3 = _ties_tile(tau, inb, w, t, u, True, ELECT_COUNT, NORMALIZE)
                    s3 = tl.sum(p3, axis=1)
                    c_prot_sel += s3 & 0xFFFF
                    c_prot_sel_ties += s3 >> 16
                elif tl.sum(nonf, axis=0) > 0:
                    m, p1, p2, p3 = _ties_tile(tau, inb, w, t, u, True, ELECT_COUNT, NORMALIZE)
                    s3 = tl.sum(p3, axis=1)
                    c_prot_sel += s3 & 0xFFFF
                    c_prot_sel_ties += s3 >> 16
                else:
                    m, p1, p2, p3 = _ties_tile(tau, inb, w, t, u, False, ELECT_COUNT,
                                               NORMALIZE)
                s1 = tl.sum(p1, axis=1)
                s2 = tl.sum(p2, axis=1)
                c_kept += s1 & 0xFFFF
                c_sel += s1 >> 16
                c_kept_zero += s2 & 0xFFFF
                c_prot += s2 >> 16
            theta = b + scale * m
        _store_rounded(out_ptr, offs, theta, inb, OUT_BF16)

    # kernel_api.COUNTERS: dropped_by_sign = kept ∧ ¬sel ∧ τ ≠ 0 = kept − sel − (kept ∧ τ = 0)
    # (sel implies τ ≠ 0); important_dropped = prot − prot ∧ sel; likewise for sel_ties
    cnt = cnt_ptr + (pid * N_MODELS + rows) * 7
    tl.store(cnt + 0, c_kept, mask=rmask)
    tl.store(cnt + 1, c_prot, mask=rmask)
    tl.store(cnt + 2, c_sel, mask=rmask)
    tl.store(cnt + 3, c_kept - c_sel - c_kept_zero, mask=rmask)
    tl.store(cnt + 4, c_prot - c_prot_sel, mask=rmask)
    tl.store(cnt + 5, c_prot - c_prot_sel_ties, mask=rmask)
    tl.store(cnt + 6, c_nonf, mask=rmask)


# ------------------------------------------------------------------------------------
# launchers


def _interpreted() -> bool:
    from fastmerge.backends import triton_interpreted
    return triton_interpreted()


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _grid(device: torch.device, n_blocks: int, programs: int | None) -> tuple[int, int]:
    """(programs, iterations): program p handles blocks p, p + programs, ... (ITERS of them).

    A few programs per SM on a GPU (4 under the interpreter); ITERS is a power of two
    (a constexpr: few distinct compilations) and at most MAX_ITERS, so one program never
    counts more than MAX_ITERS * BLOCK entries in its int32 partials.
    """
    if programs is None:
        programs = 4 if device.type != "cuda" else PROGRAMS_PER_SM * _num_sms(device.index or 0)
    iters = min(triton.next_power_of_2(triton.cdiv(n_blocks, max(1, programs))), MAX_ITERS)
    return triton.cdiv(n_blocks, iters), iters


def _power_of_two(v: int, what: str, high: int = 1 << 16, low: int = 16) -> int:
    if not (low <= v <= high and v & (v - 1) == 0):
        raise ValueError(f"{what} must be a power of two in [{low}, {high}], got {v}")
    return v


def _kernel_view(t: torch.Tensor) -> torch.Tensor:
    """What the kernels read and write: bf16 as its int16 bit pattern."""
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def _check(t: torch.Tensor, what: str, numel: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{what}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _DTYPES:
        raise ValueError(f"{what}: dtype {t.dtype} not supported (fp16, bf16, fp32)")
    if not t.is_contiguous():
        raise ValueError(f"{what}: tensor must be contiguous")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"{what}: expected {numel} entries, got {t.numel()}")


def _check_models(models: torch.Tensor) -> tuple[int, int]:
    _check(models, "models")
    if models.dim() != 2:
        raise ValueError(f"models: expected a 2-D tensor [n, N], got shape {list(models.shape)}")
    n, N = models.shape
    if not 1 <= n <= MAX_MODELS:
        raise ValueError(f"models: 1 to {MAX_MODELS} models supported, got {n}")
    return n, N


def _same_device(device: torch.device, *tensors) -> None:
    for t in tensors:
        if t is not None and t.device != device:
            raise ValueError(f"all tensors must be on {device}, got one on {t.device}")


def _launch_context(device: torch.device):
    if device.type == "cuda":
        return torch.cuda.device(device)
    import contextlib
    return contextlib.nullcontext()


def histogram(base: torch.Tensor, models: torch.Tensor, prefixes: torch.Tensor, level: int, *,
              block: int | None = None, programs: int | None = None,
              window: int | None = None) -> torch.Tensor:
    """Radix-select histogram (kernel_api): int64 [n, 2, NBINS] on the models' device.

    For slot j of model i: counts of digit (key >> SHIFT[level]) & (2**DIGIT_BITS[level] − 1)
    over entries with key >> (SHIFT + DIGIT_BITS)[level] == prefixes[i, j] (−1: off),
    key = bits(|f32(models[i]) − f32(base)|).
    ``block``, ``programs``, ``window`` override the launch parameters (tests, tuning).
    """
    n, N = _check_models(models)
    _check(base, "base", N)
    device = models.device
    _same_device(device, base)
    if level not in range(len(SHIFT)):
        raise ValueError(f"level must be 0..{len(SHIFT) - 1}, got {level}")
    prefixes = torch.as_tensor(prefixes)
    if tuple(prefixes.shape) != (n, 2):
        raise ValueError(f"prefixes: expected shape [{n}, 2], got {list(prefixes.shape)}")
    if N == 0 or bool((prefixes < 0).all()):
        return torch.zeros(n, 2, NBINS, dtype=torch.int64, device=device)
    prefixes = prefixes.to(dtype=torch.int32).contiguous().to(device)

    interp = _interpreted()
    block = _power_of_two(block or (256 if interp else HIST_BLOCK), "block", 1 << 15)
    window = _power_of_two(window or HIST_WINDOW, "window", NBINS, low=32)
    grid, iters = _grid(device, triton.cdiv(N, block), programs)
    replicas = min(grid, HIST_REPLICAS)
    hist = torch.zeros(replicas, n, 2, NBINS, dtype=torch.int64, device=device)
    with _launch_context(device):
        _histogram_kernel[(grid,)](
            _kernel_view(base), _kernel_view(models), prefixes, hist, N, grid, replicas,
            SHIFT=SHIFT[level], BITS=DIGIT_BITS[level], N_MODELS=n,
            BASE_BF16=base.dtype == torch.bfloat16, MODELS_BF16=models.dtype == torch.bfloat16,
            BLOCK=block, ITERS=iters, WB=window, DENSE_MIN=max(1, block // 8), NB=NBINS,
            num_warps=8, enable_fp_fusion=False)
    return hist.sum(0)


_PARAMS_CACHE: dict = {}


def _params(cfg: KernelConfig, nm: int, device: torch.device) -> torch.Tensor:
    """fp32 [3, NM] device tensor (w_i, t_i, u_i), cached: a merge runs chunk after chunk.

    Padded rows (i >= n) get w = 0 and t = u = NaN (no comparison holds: never kept).
    """
    key = (cfg.mode, cfg.weights, cfg.t, cfg.u, nm, str(device))
    p = _PARAMS_CACHE.get(key)
    if p is None:
        n = cfg.n_models
        host = torch.full((3, nm), float("nan"), dtype=torch.float32)
        host[0] = 0.0
        host[0, :n] = torch.tensor(cfg.weights, dtype=torch.float64).float()
        if cfg.mode == "ties":
            host[1, :n] = torch.tensor(cfg.t, dtype=torch.float32)
            host[2, :n] = torch.tensor(cfg.u, dtype=torch.float32)
        p = host.to(device)
        if len(_PARAMS_CACHE) > 64:
            _PARAMS_CACHE.clear()
        _PARAMS_CACHE[key] = p
    return p


def merge(base: torch.Tensor | None, models: torch.Tensor, out: torch.Tensor,
          cfg: KernelConfig, *, block: int | None = None,
          programs: int | None = None) -> torch.Tensor:
    """Fused merge pass (kernel_api, SPEC §4-§6, §8): writes ``out``, returns int64 [n, 7].

    ``base`` is None only for mode "linear". ``block`` / ``programs`` override the launch
    parameters (tests, tuning).
    """
    n, N = _check_models(models)
    if cfg.mode not in _MODES:
        raise ValueError(f"unknown kernel mode {cfg.mode!r}")
    if cfg.n_models != n:
        raise ValueError(f"cfg has {cfg.n_models} weights for {n} models")
    if cfg.mode == "ties" and (len(cfg.t) != n or len(cfg.u) != n):
        raise ValueError(f"cfg.t / cfg.u need {n} entries each")
    if base is None and cfg.mode != "linear":
        raise ValueError(f"mode {cfg.mode!r} needs a base tensor")
    if base is not None:
        _check(base, "base", N)
    _check(out, "out", N)
    device = models.device
    _same_device(device, base, out)
    if N == 0:
        return torch.zeros(n, _N_COUNTERS, dtype=torch.int64, device=device)

    nm = triton.next_power_of_2(n)
    interp = _interpreted()
    block = _power_of_two(block or max(256, (1024 if interp else MERGE_TILE) // nm), "block",
                          1 << 15)   # 16-bit packed counter row sums
    grid, iters = _grid(device, triton.cdiv(N, block), programs)
    wsum = float(sum(cfg.weights))
    if cfg.mode == "linear":
        normalize = cfg.normalize
    else:
        normalize = cfg.normalize and (cfg.mode == "ties" or wsum != 0)
    partial = torch.empty(grid, n, _N_COUNTERS, dtype=torch.int32, device=device)
    with _launch_context(device):
        _merge_kernel[(grid,)](
            _kernel_view(base if base is not None else models), _kernel_view(models),
            _kernel_view(out), _params(cfg, nm, device), partial, N, grid,
            float(cfg.scale), wsum,
            MODE=_MODES[cfg.mode], HAS_SLACK=cfg.has_slack, ELECT_COUNT=bool(cfg.elect_count),
            NORMALIZE=bool(normalize), N_MODELS=n, NM=nm,
            BASE_BF16=base is not None and base.dtype == torch.bfloat16,
            MODELS_BF16=models.dtype == torch.bfloat16, OUT_BF16=out.dtype == torch.bfloat16,
            BLOCK=block, ITERS=iters, num_warps=4 if nm * block <= 4096 else 8,
            enable_fp_fusion=False)
    return partial.sum(0, dtype=torch.int64)
