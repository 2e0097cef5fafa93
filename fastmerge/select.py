"""Exact streaming top-k thresholds by radix selection over fp32 bit patterns (SPEC §2-§3).

For each model we need ``t_i`` = the K_i-th largest |τ_i| and ``u_i`` = the S_i-th
largest, over a population that may be one tensor or a whole checkpoint. Keys
``bits(|τ|)`` order like integers, so three histogram rounds over digits of 11, 11 and
9 bits (kernel_api.SHIFT) pin down the exact 31-bit key of each threshold without
sorting and without holding the population: each round's histograms are summed over
any number of chunks (and tensors) before ``update`` is called.

Usage::

    sel = RadixSelect.from_params(density, slack, population)
    while not sel.done:
        hist = sum(backend.histogram(b, m, sel.prefixes(), sel.level) for b, m in chunks)
        sel.update(hist)
    t, u = sel.thresholds()
"""
from __future__ import annotations

import struct

import torch

from .kernel_api import DIGIT_BITS, NBINS

INF = float("inf")


def key_to_float(key: int) -> float:
    """The fp32 value whose bit pattern is ``key`` (0 <= key < 2**31)."""
    return struct.unpack("<f", struct.pack("<I", key))[0]


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
    def from_params(cls, density, slack, population: int) -> "RadixSelect":
        """Ranks of SPEC §2-§3: K_i = floor(d_i·|P|), S_i = floor(s_i·|P|)."""
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
            ks.append([kt, ku])
            fixed.append([ft, fu])
        return cls(ks, fixed)

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


def find_thresholds(histogram, chunks, density, slack, population: int):
    """Run RadixSelect to completion; ``chunks()`` yields (base, models) pairs each round."""
    sel = RadixSelect.from_params(density, slack, population)
    while not sel.done:
        prefixes = sel.prefixes()
        total = torch.zeros(len(density), 2, NBINS, dtype=torch.int64)
        for base, models in chunks():
            total += histogram(base, models, prefixes, sel.level).cpu()
        sel.update(total)
    return sel.thresholds()
