"""DELLA's rank stage (docs/spec.md §8d): per-entry keep thresholds from magnitude ranks.

For model i and an entry g of a row of M entries, ρ_i(g) is its rank in the row by
ascending |τ_i| (0 = smallest), ties ordered by index; the keep probability is

    p_i(g) = (d_i − ε_i) + (ρ_i(g) / (M − 1))·(2·ε_i)     (fp64, each operation rounded;
                                                            p = d_i when M = 1)

and the fused pass keeps the entry iff r_i(g) < T_i(g) = ⌊p_i(g)·2^32⌋, with DARE's
Philox words r_i(g) (fastmerge.philox). d_i = 1 gives T = 2^32 (keep all), d_i = 0 gives
T = 0 (keep none).

Rows (as mergekit's ``della_magprune``, which ranks along dim 1): a 1-D tensor is one
row; an N-D tensor of shape (a0, a1, ...) has a row for every index of the other
dimensions, running along dim 1 — for a matrix, its rows. ``row_block`` says how the
pipeline may cut a tensor so that every chunk holds whole rows.

T depends on g only through its rank, so the stage is a table T_i(ρ), ρ = 0..M − 1
(``rank_table``), and a rank per entry. A backend with kernel_api.Capabilities.ranks (the
C backend) ranks in its fused pass: for a tensor whose rows are runs of consecutive
entries (1-D and 2-D, ``fused_row_length``) the pipeline passes it the table
(KernelConfig.rank_keep). Otherwise (other backends, N-D tensors) the pipeline ranks here,
in torch, chunk by chunk, and passes T per entry (KernelConfig.keep). Sorting is exact
(integer keys), so T is the same on every device and backend.
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch

TWO32 = 1 << 32


def row_block(shape) -> int:
    """The smallest number of consecutive flat entries a chunk must be a multiple of to
    hold whole rows: a matrix's row length; the whole tensor for 1-D and N-D (N ≥ 3,
    whose rows along dim 1 are strided)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 2:
        return max(1, shape[1])
    return max(1, math.prod(shape))


def row_length(shape) -> int:
    """M: the length of a row (a0 for 1-D, a1 otherwise)."""
    shape = tuple(int(s) for s in shape)
    return shape[0] if len(shape) == 1 else shape[1]


def fused_row_length(shape) -> int | None:
    """M when the rows are runs of M consecutive entries (1-D, 2-D) that a fused rank stage
    takes (1 <= M < 2^31), else None (N-D rows along dim 1 are strided)."""
    shape = tuple(int(s) for s in shape)
    M = row_length(shape) if shape else 0
    return M if len(shape) in (1, 2) and 1 <= M < 1 << 31 else None


def _rows_view(keys: torch.Tensor, shape) -> torch.Tensor:
    """keys [n, count] of whole rows as [n, A, M, B]: ranks run along dim 2."""
    n, count = keys.shape
    shape = tuple(int(s) for s in shape)
    if len(shape) == 1:
        return keys.view(n, 1, count, 1)
    M = shape[1]
    if len(shape) == 2:
        return keys.view(n, count // M if M else 0, M, 1)
    return keys.view(n, shape[0], M, math.prod(shape[2:]))


def _row_order(keys: torch.Tensor) -> torch.Tensor:
    """For int keys [..., M] (31-bit, >= 0): the column of each row's r-th smallest entry,
    ties by column, int64 [..., M]. Each key is packed with its column into one int64
    (key·2^b + column), so the packed values are distinct and any sort orders them as
    (key, column); the column is read back from the low bits. On the CPU numpy's sort
    (SIMD) does it, several times faster than torch.sort here."""
    M = keys.shape[-1]
    bits = max(1, (M - 1).bit_length())
    packed = (keys.to(torch.int64) << bits) | torch.arange(M, device=keys.device)
    if packed.device.type == "cpu":
        ordered = torch.from_numpy(np.sort(packed.numpy(), axis=-1))
    else:
        ordered = torch.sort(packed, dim=-1).values
    return ordered & ((1 << bits) - 1)


def _per_row(keys: torch.Tensor, shape, fill) -> torch.Tensor:
    """out[g] = fill[ρ(g)] for every entry g of one model's keys [count] (whole rows),
    ρ(g) its rank in its row: int64 [count]. ``fill`` is int64 [M]."""
    v = _rows_view(keys.unsqueeze(0), shape)[0]              # [A, M, B]
    rows = v.transpose(1, 2)                                # [A, B, M]
    order = _row_order(rows.contiguous() if rows.shape[1] > 1 else rows)
    out = torch.empty(order.shape, dtype=torch.int64, device=keys.device)
    out.scatter_(-1, order, fill.to(keys.device).expand(order.shape))
    return out.transpose(1, 2).reshape(-1)


def ranks(keys: torch.Tensor, shape) -> torch.Tensor:
    """ρ_i(g): each entry's 0-based rank in its row by ascending key, ties by index,
    int64 [n, count] for int keys [n, count] holding whole rows of a tensor of ``shape``."""
    M = _rows_view(keys, shape).shape[2]
    fill = torch.arange(M, dtype=torch.int64)
    return torch.stack([_per_row(k, shape, fill) for k in keys])


def probability_thresholds(M: int, density: float, epsilon: float) -> torch.Tensor:
    """T(ρ) = ⌊p(ρ)·2^32⌋ for the ranks ρ = 0..M − 1 of a row of M (int64 [M]):
    p = (d − ε) + (ρ / (M − 1))·(2·ε) in fp64, clamped to [0, 1]; p = d when M = 1;
    d = 1: 2^32, d = 0: 0."""
    d, e = float(density), float(epsilon)
    if d == 1.0:
        return torch.full((M,), TWO32, dtype=torch.int64)
    if d == 0.0:
        return torch.zeros(M, dtype=torch.int64)
    if M == 1:
        p = torch.full((1,), d, dtype=torch.float64)
    else:
        q = torch.arange(M, dtype=torch.float64) / float(M - 1)
        p = (d - e) + q * (2.0 * e)
    return torch.floor(torch.clamp(p, 0.0, 1.0) * float(TWO32)).to(torch.int64)


def rank_table(M: int, density, epsilon) -> torch.Tensor:
    """T_i(ρ) for every model and rank ρ = 0..M − 1 of a row of M: int64 [n, M]
    (``probability_thresholds`` per model)."""
    return torch.stack([probability_thresholds(M, d, e) for d, e in zip(density, epsilon)])


def _keep(base: torch.Tensor, models, shape, table: torch.Tensor) -> torch.Tensor:
    """T_i(g) = table[i, ρ_i(g)] for every entry g of a chunk of whole rows, int64 [n, count].
    A model whose table is constant (d ∈ {0, 1}, ε = 0, M = 1) needs no ranks."""
    rows = models if isinstance(models, torch.Tensor) else torch.stack(list(models))
    n, count = rows.shape
    out = torch.empty(n, count, dtype=torch.int64, device=rows.device)
    b = base.float()
    for i in range(n):
        fill = table[i]
        if fill.numel() == 0 or bool((fill == fill[0]).all()):   # one T for every entry
            out[i] = fill[0] if fill.numel() else 0
            continue
        keys = (rows[i].float() - b).view(torch.int32) & 0x7FFFFFFF   # bits(|τ|)
        out[i] = _per_row(keys, shape, fill)
    return out


def keep_thresholds(base: torch.Tensor, models, shape, density, epsilon) -> torch.Tensor:
    """T_i(g) = ⌊p_i(g)·2^32⌋ for a chunk of whole rows (docs/spec.md §8d), int64 [n, count]
    in [0, 2^32]. ``base`` [count], ``models`` [n, count] or n rows of ``count``. The
    probabilities depend on the rank only, so they are computed once per rank (M values,
    ``rank_table``) and scattered to the entries holding that rank."""
    return _keep(base, models, shape, rank_table(row_length(shape), density, epsilon))


def expand(cfg, base: torch.Tensor, models):
    """``cfg`` with a per-rank table (KernelConfig.rank_keep, rows of M consecutive
    entries) turned into the per-entry thresholds it stands for (KernelConfig.keep): the
    rank stage in torch, for a backend that does not fuse it. Any other cfg as is."""
    if cfg.rank_keep is None:
        return cfg
    rows = models if isinstance(models, torch.Tensor) else torch.stack(list(models))
    M = cfg.rank_keep.shape[1]
    if rows.shape[1] % M:
        raise ValueError(f"cfg.rank_keep: rows of {M} do not divide the chunk's "
                         f"{rows.shape[1]} entries")
    table = cfg.rank_keep.to(device=rows.device, dtype=torch.int64)
    keep = _keep(base, rows, (rows.shape[1] // M, M), table)
    return replace(cfg, keep=keep, rank_keep=None)

