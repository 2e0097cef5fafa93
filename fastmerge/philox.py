"""Philox4x32-10 and DARE's random drop (docs/spec.md §8a): the reference form.

Philox4x32-R (Salmon, Moraes, Dror, Shaw: "Parallel random numbers: as easy as 1, 2, 3",
SC 2011; Random123's ``philox4x32_R``) maps a 128-bit counter ``(c0, c1, c2, c3)`` and a
64-bit key ``(k0, k1)`` to four 32-bit words. One round:

    (hi0, lo0) = M0 · c0,  (hi1, lo1) = M1 · c2        (32 × 32 → 64-bit products)
    (c0, c1, c2, c3) ← (hi1 ⊕ c1 ⊕ k0, lo1, hi0 ⊕ c3 ⊕ k1, lo0)

with M0 = 0xD2511F53, M1 = 0xCD9E8D57; between rounds the key is bumped,
k0 += 0x9E3779B9, k1 += 0xBB67AE85 (mod 2^32). Philox4x32-10 runs 10 rounds.

DARE's stream (docs/spec.md §8a): entry ``g`` (its index in the flattened tensor) of model
``i`` (0-based position in the merge) draws the 32-bit word

    r_i(g) = hi·2^16 + lo,   q = ⌊g / 8⌋,  h = g mod 8,
    hi = half h of Philox4x32-10(key, (q mod 2^32, ⌊q / 2^32⌋, i, 0)),
    lo = half h of Philox4x32-10(key, (q mod 2^32, ⌊q / 2^32⌋, i, 1)),

half 2k of a call being the low 16 bits of its word k and half 2k + 1 the high 16 bits;
it is kept iff ``r_i(g) < T_i``, ``T_i = ⌊d_i · 2^32⌋`` (``drop_threshold``). ``hi`` alone
decides that unless ``hi = ⌊T_i / 2^16⌋`` (one entry in 2^16), so the kernels compute
``lo`` only there: one Philox call per eight entries instead of four.

Two forms here: ``philox4x32`` on Python ints (the definition, for known answers) and
``philox4x32_torch`` / ``random_words`` vectorised in torch int64 arithmetic (every
product splits into 16-bit halves, so nothing overflows int64), which the reference
merge uses. The C and Triton kernels carry their own copies (kernels/c/kernels.c,
kernels/triton_merge.py), tested against these.
"""
from __future__ import annotations

import hashlib
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

M0, M1 = 0xD2511F53, 0xCD9E8D57          # round multipliers
W0, W1 = 0x9E3779B9, 0xBB67AE85          # key increments (Weyl sequence)
ROUNDS = 10
MASK32 = 0xFFFFFFFF
KEY_MAX = (1 << 64) - 1
KEEP_ALL = 1 << 32                       # T_i for d_i = 1: every 32-bit r is below it


def philox4x32(ctr, key, rounds: int = ROUNDS) -> tuple[int, int, int, int]:
    """Philox4x32-``rounds`` of one counter (4 uint32) and key (2 uint32), on Python ints."""
    c0, c1, c2, c3 = (int(c) & MASK32 for c in ctr)
    k0, k1 = (int(k) & MASK32 for k in key)
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + W0) & MASK32, (k1 + W1) & MASK32
        p0, p1 = M0 * c0, M1 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & MASK32, (p0 >> 32) ^ c3 ^ k1, p0 & MASK32
    return c0, c1, c2, c3


def split_key(key: int) -> tuple[int, int]:
    """The 64-bit per-tensor key as Philox's (k0, k1) = (low 32 bits, high 32 bits)."""
    key = int(key)
    if not 0 <= key <= KEY_MAX:
        raise ValueError(f"key must be in [0, 2**64), got {key}")
    return key & MASK32, key >> 32


def _mulhilo(m: int, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of m · c for a constant m < 2^32 and int64 c in [0, 2^32):
    c splits into 16-bit halves, so every partial product stays below 2^48."""
    c_lo, c_hi = c & 0xFFFF, c >> 16
    p_lo, p_hi = m * c_lo, m * c_hi                      # m·c = p_hi·2^16 + p_lo
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & MASK32
    return hi, lo


def philox4x32_torch(c0, c1, c2, c3, key: tuple[int, int], rounds: int = ROUNDS):
    """Philox4x32-``rounds`` elementwise over int64 tensors holding uint32 values (the four
    counter words broadcast together); returns four int64 tensors of uint32 values."""
    import torch  # noqa: PLC0415  (torch loads on first use)
    k0, k1 = (int(k) & MASK32 for k in key)
    c0, c1, c2, c3 = torch.broadcast_tensors(*(torch.as_tensor(c, dtype=torch.int64)
                                               for c in (c0, c1, c2, c3)))
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + W0) & MASK32, (k1 + W1) & MASK32
        hi0, lo0 = _mulhilo(M0, c0)
        hi1, lo1 = _mulhilo(M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def halves(words) -> torch.Tensor:
    """The eight 16-bit halves of each Philox call, in order: for int64 tensors w0..w3 of
    uint32 values [m], int64 [m, 8] = (w0 mod 2^16, ⌊w0 / 2^16⌋, w1 mod 2^16, ...)."""
    import torch  # noqa: PLC0415  (torch loads on first use)
    w = torch.stack(words, dim=1)
    return torch.stack([w & 0xFFFF, w >> 16], dim=2).reshape(w.shape[0], 8)


def random_words(key: int, model: int, offset: int, n: int, device=None) -> torch.Tensor:
    """r_model(g) for g = offset .. offset + n − 1 (docs/spec.md §8a), int64 [n] of uint32
    values: per q = g // 8, the high halves from the call on stream 0, the low halves from
    the call on stream 1, half g mod 8 of each."""
    import torch  # noqa: PLC0415  (torch loads on first use)
    if offset < 0 or n < 0:
        raise ValueError(f"offset and n must be >= 0, got {offset}, {n}")
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=device)
    q0, q1 = offset >> 3, (offset + n - 1) >> 3
    q = torch.arange(q0, q1 + 1, dtype=torch.int64, device=device)
    k = split_key(key)
    hi, lo = (halves(philox4x32_torch(q & MASK32, q >> 32, int(model), stream, k)).reshape(-1)
              for stream in (0, 1))                      # half h of group q at 8·(q − q0) + h
    start = offset - 8 * q0
    return ((hi << 16) | lo)[start:start + n]


def drop_threshold(density: float) -> int:
    """T = ⌊d · 2^32⌋ (exact: d is an fp64 number and 2^32 a power of two), in [0, 2^32];
    r < T keeps with probability T / 2^32, within 2^-32 of d. d = 1 gives 2^32 (keep all)."""
    d = float(density)
    if not (math.isfinite(d) and 0.0 <= d <= 1.0):
        raise ValueError(f"density must be in [0, 1], got {density!r}")
    return math.floor(math.ldexp(d, 32))


def keep_mask(key: int, model: int, offset: int, n: int, threshold: int,
              device=None) -> torch.Tensor:
    """kept_model(g) = r_model(g) < T for g = offset .. offset + n − 1 (bool [n])."""
    return random_words(key, model, offset, n, device) < int(threshold)


def tensor_key(seed: int, name: str) -> int:
    """The 64-bit Philox key of tensor ``name`` in a merge with ``seed`` (docs/spec.md §8a):
    the first 8 bytes of SHA-256 of the UTF-8 text "<seed>:<name>" (seed in decimal, name
    the tensor's full name in the checkpoint), read little-endian. Each tensor draws its
    own stream, the same whatever the order, chunking or resumption of the merge."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    digest = hashlib.sha256(f"{seed}:{name}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little")
