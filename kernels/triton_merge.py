"""Triton kernels of the fastmerge contract (fastmerge.kernel_api): radix histogram and fused merge.

Math (docs/spec.md §1-§9; one tensor of N entries, models i = 1..n, entry j):

    x_i = τ_i = f32(θ_i) − f32(θ_b)  (or f32(θ_i) without a base)   (fp32 subtraction)
    key = bits(|x_i|)                                          (histogram: digits of the key)
    kept_i = |x_i| ≥ t_i,   prot_i = |x_i| ≥ u_i
    vote_i = w_i·x_i   (elect="count": sign(w_i)·sign(x_i))
    G = Σ prot_i·vote_i if any prot_i else Σ kept_i·vote_i;   γ = +1 if G ≥ 0 else −1
    sel_i = kept_i ∧ sign(w_i·x_i) = γ (no election: kept_i);   D = Σ w_i·sel_i·x_i,
    W = Σ w_i·sel_i (no election: Σ w_i);   m = D / W (normalize, W ≠ 0) or D;
    θ = f32(θ_b) + λ·m (or m), rounded once to the output dtype (RNE)

DARE (docs/spec.md §8a) replaces the trim by a random drop, kept_i = r_i(g) < T_i, where
r_i(g) = hi·2^16 + lo, hi and lo the 16-bit halves g mod 8 of Philox4x32-10(key,
(q mod 2^32, ⌊q/2^32⌋, i, stream)) with stream 0 and 1, q = ⌊g/8⌋, for the entry's index g
in the whole tensor; sum votes and D weigh x_i by c_i (w_i, or w_i / d_i with rescale);
W keeps w_i.

Keys, thresholds and comparisons are fp32 (exact); votes, sums, m and θ are fp64, the
models summed in order from +0.0, without FMA contraction (``enable_fp_fusion=False``):
on a GPU and under ``TRITON_INTERPRET=1`` a kernel evaluates the same fp64 expression as
the reference and the C backend, so outputs and counters agree bit for bit.

Layout and determinism:

* Offsets are int64 (``_offsets``, ``_row_offsets``): tensors past 2**31 entries work.
* Both kernels run a grid of P programs (a few per SM); program p handles blocks
  p, p + P, ... (ITERS of them, a power-of-two constexpr). All loop bounds are
  constexpr, which the Triton 3.6 interpreter needs.
* ``merge``: per block, one program loads the base block once and each model row in
  turn (``tl.static_range``), accumulating the election sums; a second sweep over the
  rows (from cache) selects and accumulates D and W. Per-model counters are int32
  vectors per program; the partials [P, n, 7] are summed by torch into int64:
  deterministic.
* DARE's drop (``_merge_drop_kernel``): the blocks are aligned to the tensor's global
  index, g ≡ 0 (mod 8) at every block start (the chunk's entries shifted by
  ``offset mod 8``, entries outside the chunk masked), so one pair of Philox calls
  (streams 0 and 1) serves eight consecutive entries: 2·BLOCK/8 calls on [BLOCK/8]
  vectors, their eight 16-bit halves interleaved into the block's order. The GPU computes
  both halves of every word (the C kernel only the rare low halves it needs). Philox is
  uint32 arithmetic (``tl.umulhi`` and a wrapping product), with the ten round keys
  computed on the host. The election packs each model's kept bit into an int32 so the
  second sweep does not draw again.
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
_N_COUNTERS = len(COUNTERS)

# Launch defaults (GPU). The interpreter uses smaller blocks: it runs programs one by one.
MERGE_BLOCK = 1024       # entries per merge program iteration
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
# DARE's random drop: Philox4x32-10 (docs/spec.md §8a)

PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
PHILOX_ROUNDS = 10
_M0, _M1 = tl.constexpr(PHILOX_M0), tl.constexpr(PHILOX_M1)     # for the device code
_ROUNDS = tl.constexpr(PHILOX_ROUNDS)


def philox_round_keys(key: int) -> list[int]:
    """The ten (k0, k1) round keys of Philox4x32-10 for a 64-bit key, flattened: round r
    uses (k0 + r·W0, k1 + r·W1) mod 2^32 (Random123's key schedule)."""
    k0, k1 = key & 0xFFFFFFFF, key >> 32
    out = []
    for r in range(PHILOX_ROUNDS):
        out += [(k0 + r * PHILOX_W0) & 0xFFFFFFFF, (k1 + r * PHILOX_W1) & 0xFFFFFFFF]
    return out


@triton.jit
def _philox10(c0, c1, c2, c3, rk_ptr):
    """Philox4x32-10 of uint32 counters (c0, c1, c2, c3); rk_ptr: the 20 round-key words
    (int64 memory, ``philox_round_keys``). Per round: (hi0, lo0) = M0·c0, (hi1, lo1) = M1·c2,
    c = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0), with uint32 wrap-around products."""
    m0 = tl.full([1], _M0, tl.uint32)
    m1 = tl.full([1], _M1, tl.uint32)
    for r in tl.static_range(_ROUNDS):
        k0 = tl.load(rk_ptr + 2 * r).to(tl.uint32)
        k1 = tl.load(rk_ptr + 2 * r + 1).to(tl.uint32)
        hi0 = tl.umulhi(c0, m0)
        lo0 = c0 * m0
        hi1 = tl.umulhi(c2, m1)
        lo1 = c2 * m1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


@triton.jit
def _halves(q0, model, stream, rk_ptr, BLOCK: tl.constexpr):
    """The BLOCK 16-bit halves of Philox4x32-10 on counters (q low, q high, model, stream),
    q = q0 .. q0 + BLOCK/8 − 1, in order: half h of call q at 8·(q − q0) + h, half 2k the
    low 16 bits of word k, half 2k + 1 its high 16 bits. uint32 [BLOCK]."""
    q = q0 + tl.arange(0, BLOCK // 8).to(tl.int64)
    c0 = (q & 0xFFFFFFFF).to(tl.uint32)
    c1 = (q >> 32).to(tl.uint32)
    c2 = tl.zeros([BLOCK // 8], tl.uint32) + model
    c3 = tl.zeros([BLOCK // 8], tl.uint32) + stream
    r0, r1, r2, r3 = _philox10(c0, c1, c2, c3, rk_ptr)
    h0, h2, h4, h6 = r0 & 0xFFFF, r1 & 0xFFFF, r2 & 0xFFFF, r3 & 0xFFFF
    h1, h3, h5, h7 = r0 >> 16, r1 >> 16, r2 >> 16, r3 >> 16
    even = tl.interleave(tl.interleave(h0, h4), tl.interleave(h2, h6))
    odd = tl.interleave(tl.interleave(h1, h5), tl.interleave(h3, h7))
    return tl.interleave(even, odd)


@triton.jit
def _dare_words(q0, model, rk_ptr, BLOCK: tl.constexpr):
    """r_model(g) = hi·2^16 + lo for the BLOCK entries g = 8·q0 .. 8·q0 + BLOCK − 1 (q0
    int64): hi and lo the halves of streams 0 and 1 (``_halves``). uint32 [BLOCK]."""
    return (_halves(q0, model, 0, rk_ptr, BLOCK) << 16) | _halves(q0, model, 1, rk_ptr, BLOCK)


@triton.jit
def _philox_kernel(ctr_ptr, rk_ptr, out_ptr, M, BLOCK: tl.constexpr):
    """out[k, w] = word w of Philox4x32-10(ctr[k, :]) for k < M (int64 [M, 4] memory)."""
    k = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = k < M
    r0, r1, r2, r3 = _philox10(tl.load(ctr_ptr + 4 * k, mask=m, other=0).to(tl.uint32),
                               tl.load(ctr_ptr + 4 * k + 1, mask=m, other=0).to(tl.uint32),
                               tl.load(ctr_ptr + 4 * k + 2, mask=m, other=0).to(tl.uint32),
                               tl.load(ctr_ptr + 4 * k + 3, mask=m, other=0).to(tl.uint32),
                               rk_ptr)
    tl.store(out_ptr + 4 * k, r0.to(tl.int64), mask=m)
    tl.store(out_ptr + 4 * k + 1, r1.to(tl.int64), mask=m)
    tl.store(out_ptr + 4 * k + 2, r2.to(tl.int64), mask=m)
    tl.store(out_ptr + 4 * k + 3, r3.to(tl.int64), mask=m)


@triton.jit
def _dare_words_kernel(out_ptr, rk_ptr, N, qbase, shift, model, BLOCK: tl.constexpr):
    """out[j] = r_model(offset + j) for j < N, blocks placed as in ``_merge_drop_kernel``
    (offset = 8·qbase + shift)."""
    blk = tl.program_id(0)
    offs = _offsets(blk, BLOCK) - shift
    r = _dare_words(qbase + tl.cast(blk, tl.int64) * (BLOCK // 8), model, rk_ptr, BLOCK)
    tl.store(out_ptr + offs, r.to(tl.int64), mask=(offs >= 0) & (offs < N))


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
def _store_f64(ptr, offs, x, mask, OUT_BF16: tl.constexpr, OUT_F32: tl.constexpr):
    """Store fp64 ``x`` rounded once, to nearest even, into the output dtype.

    fp32: one conversion (RNE). fp16 / bf16: first to fp32 rounded *to odd* (the RNE
    value, stepped toward zero when it rounded up in magnitude, last bit set when
    inexact), then RNE: with 13+ spare bits that double rounding equals one rounding.
    """
    f = x.to(tl.float32)
    if OUT_F32:
        tl.store(ptr + offs, f, mask=mask)
    else:
        back = f.to(tl.float64)
        inexact = (back != x) & (tl.abs(x) < float("inf"))
        away = inexact & (tl.abs(back) > tl.abs(x))
        bits = f.to(tl.int32, bitcast=True)
        bits = (bits - tl.where(away, 1, 0)) | tl.where(inexact, 1, 0)
        _store_rounded(ptr, offs, bits.to(tl.float32, bitcast=True), mask, OUT_BF16)


@triton.jit
def _load_x(models_ptr, i, N, offs, inb, b, ON_BASE: tl.constexpr, MODELS_BF16: tl.constexpr):
    """x_i of this block in fp32: τ_i = f32(θ_i) − f32(θ_b) (ON_BASE) or f32(θ_i)."""
    row = _row_offsets(tl.full([1], i, tl.int32), N)
    x = _load_f32(models_ptr + row, offs, inb, MODELS_BF16)
    if ON_BASE:
        x = x - b
    return x


@triton.jit
def _at(rows, i, value):
    """An [NM] vector holding ``value`` at row i (per-model counters)."""
    return tl.where(rows == i, value, 0)


@triton.jit
def _merge_kernel(base_ptr, models_ptr, out_ptr, w_ptr, par_ptr, cnt_ptr, N, n_programs,
                  ON_BASE: tl.constexpr, TRIM: tl.constexpr, ELECT: tl.constexpr,
                  SLACK: tl.constexpr, NORMALIZE: tl.constexpr, N_MODELS: tl.constexpr,
                  NM: tl.constexpr, BASE_BF16: tl.constexpr, MODELS_BF16: tl.constexpr,
                  OUT_BF16: tl.constexpr, OUT_F32: tl.constexpr, BLOCK: tl.constexpr,
                  ITERS: tl.constexpr, UPPER: tl.constexpr):
    """One fused pass of docs/spec.md §4-§7 (+ §9 counters) over blocks of BLOCK entries.

    ELECT 0: no election (sel_i = kept_i; kept_i = |x_i| ≥ t_i with TRIM, else every
    entry; W = Σ w_i = ``wsum``). ELECT 1 / 2: sum / count election, protected-first with
    SLACK; a protected entry is always kept (kept_i ∨ prot_i, §4a). UPPER (breadcrumbs,
    §8b): kept_i = |x_i| ≥ t_i ∧ ¬(|x_i| ≥ h_i). w_ptr: fp64 [NM + 2] = (w_i..., λ, Σ w_i)
    (fp64 in memory: a Python float argument would reach the kernel as fp32); par_ptr:
    fp32 [4, NM] = (sign(w_i), t_i, u_i, h_i), a threshold of +inf stored as NaN (no
    comparison holds). Votes, sums, m and θ are fp64,
    the models taken in order i = 0..n−1 from +0.0 (one row at a time: the same
    operations in the same order as the reference and the C backend). A block's model
    rows are read twice (election, then selection); the second read hits the cache.
    cnt_ptr: int32 [programs, N_MODELS, 7] partial counters (kernel_api.COUNTERS order).
    """
    pid = tl.program_id(0)
    rows = tl.arange(0, NM)
    scale = tl.load(w_ptr + NM)
    wsum = tl.load(w_ptr + NM + 1)
    c = _zero_counters(NM)
    for it in range(ITERS):
        offs = _offsets(pid + it * n_programs, BLOCK)
        c = _merge_block(base_ptr, models_ptr, out_ptr, w_ptr, par_ptr, w_ptr, w_ptr, N, offs,
                         offs < N, 0, rows, scale, wsum, c, ON_BASE, TRIM, ELECT, SLACK,
                         NORMALIZE, N_MODELS, NM, BASE_BF16, MODELS_BF16, OUT_BF16, OUT_F32,
                         BLOCK, False, UPPER, False, False)
    _store_counters(cnt_ptr, pid, rows, N_MODELS, c)


@triton.jit(do_not_specialize=["qbase", "shift"])      # they change chunk by chunk
def _merge_drop_kernel(base_ptr, models_ptr, out_ptr, w_ptr, par_ptr, drp_ptr, keep_ptr,
                       cnt_ptr, N, n_programs, qbase, shift, ELECT: tl.constexpr,
                       SLACK: tl.constexpr, NORMALIZE: tl.constexpr,
                       N_MODELS: tl.constexpr, NM: tl.constexpr, BASE_BF16: tl.constexpr,
                       MODELS_BF16: tl.constexpr, OUT_BF16: tl.constexpr,
                       OUT_F32: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr,
                       RANKED: tl.constexpr, RESCALE: tl.constexpr):
    """``_merge_kernel`` with DARE's random drop (docs/spec.md §8a) in place of the trim,
    on a base; SLACK: protected entries are kept and weigh w_i (§4a). The chunk holds entries offset .. offset + N − 1 of the
    tensor, offset = 8·qbase + shift (0 ≤ shift < 8): block b covers g = 8·qbase + b·BLOCK
    + 0..BLOCK − 1, i.e. chunk entries j = b·BLOCK − shift + 0..BLOCK − 1 (others masked),
    so every block starts at g ≡ 0 (mod 8). w_ptr: fp64 [2·NM + 2] = (w_i..., λ, Σ w_i,
    c_i...); drp_ptr: int64 [NM + 20] = (T_i..., the round keys of ``philox_round_keys``).
    RANKED (DELLA, §8d): keep_ptr int64 [n, N] holds per-entry T_i(g) instead of T_i, and
    RESCALE weighs a kept entry (w_i·2^32) / T_i(g).
    """
    pid = tl.program_id(0)
    rows = tl.arange(0, NM)
    scale = tl.load(w_ptr + NM)
    wsum = tl.load(w_ptr + NM + 1)
    c = _zero_counters(NM)
    for it in range(ITERS):
        blk = pid + it * n_programs
        offs = _offsets(blk, BLOCK) - shift
        c = _merge_block(base_ptr, models_ptr, out_ptr, w_ptr, par_ptr, drp_ptr, keep_ptr, N,
                         offs, (offs >= 0) & (offs < N),
                         qbase + tl.cast(blk, tl.int64) * (BLOCK // 8),
                         rows, scale, wsum, c, True, False, ELECT, SLACK, NORMALIZE, N_MODELS,
                         NM, BASE_BF16, MODELS_BF16, OUT_BF16, OUT_F32, BLOCK, True, False,
                         RANKED, RESCALE)
    _store_counters(cnt_ptr, pid, rows, N_MODELS, c)


@triton.jit
def _zero_counters(NM: tl.constexpr):
    """The seven per-model counters (kernel_api.COUNTERS order), int32 [NM] each."""
    z = tl.zeros([NM], tl.int32)
    return z, z, z, z, z, z, z


@triton.jit
def _store_counters(cnt_ptr, pid, rows, N_MODELS: tl.constexpr, c):
    """This program's partial counters into cnt_ptr [programs, N_MODELS, 7]."""
    cnt = cnt_ptr + (pid * N_MODELS + rows) * 7
    rmask = rows < N_MODELS
    c_kept, c_prot, c_sel, c_drop, c_imp, c_timp, c_nonf = c
    tl.store(cnt + 0, c_kept, mask=rmask)
    tl.store(cnt + 1, c_prot, mask=rmask)
    tl.store(cnt + 2, c_sel, mask=rmask)
    tl.store(cnt + 3, c_drop, mask=rmask)
    tl.store(cnt + 4, c_imp, mask=rmask)
    tl.store(cnt + 5, c_timp, mask=rmask)
    tl.store(cnt + 6, c_nonf, mask=rmask)


@triton.jit
def _drop_keep(q0, i, rk_ptr, drp_ptr, keep_ptr, w_ptr, N, offs, inb, NM: tl.constexpr,
               BLOCK: tl.constexpr, RANKED: tl.constexpr, RESCALE: tl.constexpr):
    """(kept_i, c_i) of the block's entries: DARE (§8a) r_i(g) < T_i and c_i; RANKED
    (DELLA, §8d) r_i(g) < T_i(g) from keep_ptr [n, N] and, with RESCALE,
    c_i(g) = (w_i·2^32) / T_i(g) (0 when T = 0), else w_i."""
    r = _dare_words(q0, i, rk_ptr, BLOCK).to(tl.int64)
    if RANKED:
        t = tl.load(keep_ptr + _row_offsets(tl.full([1], i, tl.int32), N) + offs, mask=inb,
                    other=0)
        wi = tl.load(w_ptr + i)
        if RESCALE:
            cf = tl.where(t != 0, (wi * 4294967296.0) / tl.where(t != 0, t, 1).to(tl.float64),
                          0.0)
        else:
            cf = tl.zeros([BLOCK], tl.float64) + wi
        k = r < t
    else:
        k = r < tl.load(drp_ptr + i)
        cf = tl.zeros([BLOCK], tl.float64) + tl.load(w_ptr + NM + 2 + i)
    return k, cf


@triton.jit
def _merge_block(base_ptr, models_ptr, out_ptr, w_ptr, par_ptr, drp_ptr, keep_ptr, N, offs,
                 inb, q0,
                 rows, scale, wsum, c, ON_BASE: tl.constexpr, TRIM: tl.constexpr,
                 ELECT: tl.constexpr, SLACK: tl.constexpr, NORMALIZE: tl.constexpr,
                 N_MODELS: tl.constexpr, NM: tl.constexpr, BASE_BF16: tl.constexpr,
                 MODELS_BF16: tl.constexpr, OUT_BF16: tl.constexpr, OUT_F32: tl.constexpr,
                 BLOCK: tl.constexpr, DROP: tl.constexpr, UPPER: tl.constexpr,
                 RANKED: tl.constexpr, RESCALE: tl.constexpr):
    """One block of the fused pass (entries ``offs``, ``inb`` in the chunk): elect,
    select, combine, store θ; returns the counters ``c`` plus this block's. DROP: kept_i
    from DARE's words r_i for g = 8·q0 + 0..BLOCK − 1 (``_dare_words``) instead of t_i."""
    c_kept, c_prot, c_sel, c_drop, c_imp, c_timp, c_nonf = c
    rk_ptr = drp_ptr + NM                                        # DROP: the round keys
    if ON_BASE:
        b = _load_f32(base_ptr, offs, inb, BASE_BF16)
    else:
        b = tl.zeros([BLOCK], tl.float32)
    d = tl.zeros([BLOCK], tl.float64)
    if ELECT == 0:
        for i in tl.static_range(N_MODELS):
            x = _load_x(models_ptr, i, N, offs, inb, b, ON_BASE, MODELS_BF16)
            c_nonf += _at(rows, i, tl.sum(tl.where(_nonfinite(x) & inb, 1, 0), axis=0))
            if DROP:
                k, ci = _drop_keep(q0, i, rk_ptr, drp_ptr, keep_ptr, w_ptr, N, offs, inb, NM,
                                   BLOCK, RANKED, RESCALE)
                kc = tl.sum(tl.where(k & inb, 1, 0), axis=0)
                c_kept += _at(rows, i, kc)
                c_sel += _at(rows, i, kc)
                d += tl.where(k, ci * x.to(tl.float64), 0.0)
            else:
                wi = tl.load(w_ptr + i)
                if TRIM:
                    k = tl.abs(x) >= tl.load(par_ptr + NM + i)
                    if UPPER:                                # §8b: |x_i| < h_i too
                        k = k & ~(tl.abs(x) >= tl.load(par_ptr + 3 * NM + i))
                    kc = tl.sum(tl.where(k & inb, 1, 0), axis=0)
                    c_kept += _at(rows, i, kc)
                    c_sel += _at(rows, i, kc)
                    d += tl.where(k, wi * x.to(tl.float64), 0.0)
                else:
                    d += wi * x.to(tl.float64)
        ws = tl.zeros([BLOCK], tl.float64) + wsum
    else:
        g = tl.zeros([BLOCK], tl.float64)
        gp = tl.zeros([BLOCK], tl.float64)
        ap = tl.zeros([BLOCK], tl.int1)
        kbits = tl.zeros([BLOCK], tl.int32)                  # DROP: kept_i at bit i
        for i in tl.static_range(N_MODELS):                  # §5 elect
            x = _load_x(models_ptr, i, N, offs, inb, b, ON_BASE, MODELS_BF16)
            c_nonf += _at(rows, i, tl.sum(tl.where(_nonfinite(x) & inb, 1, 0), axis=0))
            ax = tl.abs(x)
            if SLACK:
                p = ax >= tl.load(par_ptr + 2 * NM + i)      # §4a: protected, always kept
            if DROP:
                dk, dcf = _drop_keep(q0, i, rk_ptr, drp_ptr, keep_ptr, w_ptr, N, offs, inb, NM,
                                     BLOCK, RANKED, RESCALE)
            if ELECT == 2:
                sx = tl.load(par_ptr + i) * tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))
                vote = sx.to(tl.float64)
            else:
                if DROP:
                    cf = dcf
                    if SLACK:                                # a protected entry weighs w_i
                        cf = tl.where(p, tl.load(w_ptr + i), cf)
                    vote = cf * x.to(tl.float64)
                else:
                    vote = tl.load(w_ptr + i) * x.to(tl.float64)
            if DROP:
                k = dk
            else:
                k = ax >= tl.load(par_ptr + NM + i)
                if UPPER:
                    k = k & ~(ax >= tl.load(par_ptr + 3 * NM + i))
            if SLACK:
                k = k | p
            if DROP:
                kbits = kbits | (k.to(tl.int32) << i)
            g += tl.where(k, vote, 0.0)
            if SLACK:
                gp += tl.where(p, vote, 0.0)
                ap = ap | p
        gt = tl.where(g >= 0, 1.0, -1.0)
        if SLACK:
            gam = tl.where(ap, tl.where(gp >= 0, 1.0, -1.0), gt)
        else:
            gam = gt
        ws = tl.zeros([BLOCK], tl.float64)
        for i in tl.static_range(N_MODELS):                  # §6 select; §9 counters
            x = _load_x(models_ptr, i, N, offs, inb, b, ON_BASE, MODELS_BF16)
            ax = tl.abs(x)
            wi = tl.load(w_ptr + i)
            sx = tl.load(par_ptr + i) * x                    # sign(w_i·x_i) = sign(sx)
            if SLACK:
                p = (ax >= tl.load(par_ptr + 2 * NM + i)) & inb
            if DROP:
                if RANKED:                                   # c_i(g) again from T_i(g)
                    _, ci = _drop_keep(q0, i, rk_ptr, drp_ptr, keep_ptr, w_ptr, N, offs, inb,
                                       NM, BLOCK, RANKED, RESCALE)
                else:
                    ci = tl.load(w_ptr + NM + 2 + i)
                if SLACK:
                    ci = tl.where(p, wi, ci)
                k = (((kbits >> i) & 1) != 0) & inb
            else:
                ci = wi
                k = (ax >= tl.load(par_ptr + NM + i)) & inb
                if UPPER:
                    k = k & ~(ax >= tl.load(par_ptr + 3 * NM + i))
                if SLACK:
                    k = k | p
            sel = k & (sx * gam > 0)                         # a zero never matches
            d += tl.where(sel, ci * x.to(tl.float64), 0.0)
            ws += tl.where(sel, wi, 0.0)
            c_kept += _at(rows, i, tl.sum(tl.where(k, 1, 0), axis=0))
            c_sel += _at(rows, i, tl.sum(tl.where(sel, 1, 0), axis=0))
            c_drop += _at(rows, i, tl.sum(tl.where(k & ~sel & (x != 0), 1, 0), axis=0))
            if SLACK:
                sel_t = k & (sx * gt > 0)
                c_prot += _at(rows, i, tl.sum(tl.where(p, 1, 0), axis=0))
                c_imp += _at(rows, i, tl.sum(tl.where(p & ~sel, 1, 0), axis=0))
                c_timp += _at(rows, i, tl.sum(tl.where(p & ~sel_t, 1, 0), axis=0))
    if NORMALIZE:                                            # §7 combine
        m = tl.where(ws != 0, d / tl.where(ws != 0, ws, 1.0), d)
    else:
        m = d
    if ON_BASE:
        theta = b.to(tl.float64) + scale * m
    else:
        theta = m
    _store_f64(out_ptr, offs, theta, inb, OUT_BF16, OUT_F32)
    return c_kept, c_prot, c_sel, c_drop, c_imp, c_timp, c_nonf


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


def _params(cfg: KernelConfig, nm: int, device: torch.device):
    """(fp64 [2·NM + 2] = (w_i..., λ, Σ w_i, c_i...), fp32 [4, NM] = (sign(w_i), t_i, u_i, h_i),
    int64 [NM + 20] = (T_i..., Philox round keys) or None without a drop) on the device,
    cached: a merge runs chunk after chunk (the offset is a kernel argument). A threshold
    of +inf (keep / protect none) and every padded row are NaN, which no comparison
    passes; padded T_i are 0 (keep none)."""
    key = (cfg.weights, cfg.t, cfg.u, cfg.h, cfg.scale, cfg.density, cfg.rescale, cfg.key, nm,
           str(device))
    p = _PARAMS_CACHE.get(key)
    if p is None:
        n = cfg.n_models
        wsum = 0.0
        for wi in cfg.weights:          # Σ w_i in model order (W without an election)
            wsum += wi
        w = torch.zeros(2 * nm + 2, dtype=torch.float64)
        w[:n] = torch.tensor(cfg.weights, dtype=torch.float64)
        w[nm], w[nm + 1] = float(cfg.scale), wsum
        if cfg.keep is None:
            w[nm + 2:nm + 2 + n] = torch.tensor(cfg.vote_weights, dtype=torch.float64)
        par = torch.full((4, nm), float("nan"), dtype=torch.float32)
        par[0] = torch.sign(w[:nm]).float()
        for row, v in ((1, cfg.t), (2, cfg.u), (3, cfg.h)):
            if v is not None:
                par[row, :n] = torch.tensor(v, dtype=torch.float32)
        par[par == float("inf")] = float("nan")
        drp = None
        if cfg.drops:
            drp = torch.zeros(nm + 2 * PHILOX_ROUNDS, dtype=torch.int64)
            if cfg.keep is None:                     # DELLA: T per entry (cfg.keep) instead
                drp[:n] = torch.tensor(cfg.drop_thresholds, dtype=torch.int64)
            drp[nm:] = torch.tensor(philox_round_keys(cfg.key), dtype=torch.int64)
            drp = drp.to(device)
        p = (w.to(device), par.to(device), drp)
        if len(_PARAMS_CACHE) > 64:
            _PARAMS_CACHE.clear()
        _PARAMS_CACHE[key] = p
    return p


def merge(base: torch.Tensor | None, models: torch.Tensor, out: torch.Tensor,
          cfg: KernelConfig, *, block: int | None = None,
          programs: int | None = None) -> torch.Tensor:
    """Fused merge pass (kernel_api, docs/spec.md §4-§7, §9): writes ``out``, returns
    int64 [n, 7]. ``block`` / ``programs`` override the launch parameters (tests, tuning).
    """
    n, N = _check_models(models)
    if cfg.n_models != n:
        raise ValueError(f"cfg has {cfg.n_models} weights for {n} models")
    if cfg.on_base and base is None:
        raise ValueError("this kernel config needs a base tensor")
    if cfg.on_base:
        _check(base, "base", N)
    _check(out, "out", N)
    device = models.device
    _same_device(device, base if cfg.on_base else None, out)
    if N == 0:
        return torch.zeros(n, _N_COUNTERS, dtype=torch.int64, device=device)

    nm = triton.next_power_of_2(n)
    interp = _interpreted()
    block = _power_of_two(block or (256 if interp else MERGE_BLOCK), "block", 1 << 15)
    shift = cfg.offset & 7 if cfg.drops else 0       # DARE: blocks start at g ≡ 0 (mod 8)
    grid, iters = _grid(device, triton.cdiv(N + shift, block), programs)
    w, par, drp = _params(cfg, nm, device)
    partial = torch.empty(grid, n, _N_COUNTERS, dtype=torch.int32, device=device)
    if cfg.drops:
        if not cfg.on_base:
            raise ValueError("the Triton DARE kernel merges on a base")
        with _launch_context(device):
            keep = w if cfg.keep is None else cfg.keep.to(device=device, dtype=torch.int64)
            _merge_drop_kernel[(grid,)](
                _kernel_view(base), _kernel_view(models), _kernel_view(out), w, par, drp,
                keep.contiguous(), partial, N, grid, (cfg.offset - shift) >> 3, shift,
                ELECT=("none", "sum", "count").index(cfg.elect), SLACK=cfg.has_slack,
                NORMALIZE=bool(cfg.normalize), N_MODELS=n, NM=nm,
                BASE_BF16=base.dtype == torch.bfloat16,
                MODELS_BF16=models.dtype == torch.bfloat16, OUT_BF16=out.dtype == torch.bfloat16,
                OUT_F32=out.dtype == torch.float32, BLOCK=block, ITERS=iters,
                RANKED=cfg.keep is not None, RESCALE=bool(cfg.rescale), num_warps=4,
                enable_fp_fusion=False)
        return partial.sum(0, dtype=torch.int64)
    with _launch_context(device):
        _merge_kernel[(grid,)](
            _kernel_view(base if cfg.on_base else models), _kernel_view(models),
            _kernel_view(out), w, par, partial, N, grid,
            ON_BASE=cfg.on_base, TRIM=cfg.t is not None, UPPER=bool(cfg.upper),
            ELECT=("none", "sum", "count").index(cfg.elect), SLACK=cfg.has_slack,
            NORMALIZE=bool(cfg.normalize), N_MODELS=n, NM=nm,
            BASE_BF16=cfg.on_base and base.dtype == torch.bfloat16,
            MODELS_BF16=models.dtype == torch.bfloat16, OUT_BF16=out.dtype == torch.bfloat16,
            OUT_F32=out.dtype == torch.float32, BLOCK=block, ITERS=iters, num_warps=4,
            enable_fp_fusion=False)
    return partial.sum(0, dtype=torch.int64)


def philox4x32_10(ctr, key, device="cpu") -> list[tuple[int, int, int, int]]:
    """Philox4x32-10 of counters ``ctr`` (one or a list of 4-tuples of uint32) under the
    64-bit ``key``, by the kernels' own device routine; tests."""
    rows = [tuple(ctr)] if len(ctr) == 4 and isinstance(ctr[0], int) else [tuple(c) for c in ctr]
    c = torch.tensor(rows, dtype=torch.int64, device=device)
    out = torch.empty_like(c)
    rk = torch.tensor(philox_round_keys(int(key)), dtype=torch.int64, device=device)
    block = 16
    with _launch_context(c.device):
        _philox_kernel[(triton.cdiv(len(rows), block),)](c, rk, out, len(rows), BLOCK=block)
    return [tuple(int(v) for v in row) for row in out.cpu()]


def dare_words(key: int, model: int, offset: int, n: int, *, block: int = 256,
               device="cpu") -> torch.Tensor:
    """DARE's random words r_model(offset .. offset + n − 1) (docs/spec.md §8a), placed in
    blocks as the merge places them; int64 [n] of uint32 values on ``device``. Tests."""
    _power_of_two(block, "block", 1 << 15)
    shift = offset & 7
    out = torch.empty(n, dtype=torch.int64, device=device)
    rk = torch.tensor(philox_round_keys(int(key)), dtype=torch.int64, device=device)
    if n:
        with _launch_context(out.device):
            _dare_words_kernel[(triton.cdiv(n + shift, block),)](
                out, rk, n, (offset - shift) >> 3, shift, int(model), BLOCK=block)
    return out
