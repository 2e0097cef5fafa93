"""SLERP, NuSLERP and model stock: the geometry of whole vectors (docs/spec.md §8c).

These methods weigh whole vectors by the angles between them. Per tensor they take
vectors v_k (fp32, docs/spec.md §1: θ_k as stored, or task vectors τ_k) cut into
*segments* s (the whole tensor, each row, or each column) and run

  statistics  G_s[k, l] = Σ_{j ∈ s} v_k[j]·v_l[j]  for k ≤ l      (``gram``, one read)
  coefficients  c_{s,k} = f(G_s, knobs)  on the host, fp64          (``*_coefficients``)
  combine     θ_j = [f32(θ_b) +] Σ_k c_{s(j),k}·v_k[j]  in fp64 from +0.0, k in order,
              rounded once to the output dtype                      (``combine``, one read)

Every product v_k·v_l of two fp32 values is exact in fp64; the sums follow one fixed
order (kernel_api.GRAM_BLOCK blocks from each segment's start, a pairwise tree inside a
block, blocks added in order from +0.0), so G — hence c, hence θ — is bit-identical on
every backend, chunking and thread count. The functions here are the reference.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .kernel_api import GRAM_BLOCK
from .reference import model_matrix, round_once, task_vectors

SLERP_PARALLEL = 0.9995     # SLERP: |cos| above this interpolates linearly (mergekit's)
SLERP_EPS = 1e-8            # SLERP: a norm at or below this is not divided by
NUSLERP_NORM_MIN = 1e-7     # NuSLERP: norms clamped from below
NUSLERP_SIN_MIN = 1e-8      # NuSLERP: |sin Ω| below this interpolates linearly
STOCK_NORM_MIN = 1e-6       # model stock: |v_i|·|v_j| clamped from below


def pairs(n: int) -> list[tuple[int, int]]:
    """The K = n(n+1)/2 entries (k, l), k ≤ l, of a Gram matrix, in the order the
    statistics pass returns them: (0,0), (0,1), .., (0,n−1), (1,1), .."""
    return [(k, l) for k in range(n) for l in range(k, n)]


def effective(shape: tuple[int, ...], vectors: str) -> str:
    """The vectors a tensor of ``shape`` really has: a tensor with fewer than two
    dimensions is one vector whatever ``vectors`` says (as in mergekit)."""
    return vectors if len(shape) >= 2 else "tensor"


def segment_length(shape: tuple[int, ...], vectors: str) -> int:
    """``seg`` of a tensor of ``shape`` (row-major): its numel ("tensor"), its last
    dimension ("rows": the rows of the [numel / shape[-1], shape[-1]] view), or
    numel / shape[0] ("columns": the columns of the [shape[0], numel / shape[0]] view)."""
    numel = math.prod(shape)
    vectors = effective(shape, vectors)
    if vectors == "tensor" or numel == 0:
        return max(numel, 1)
    return shape[-1] if vectors == "rows" else numel // shape[0]


def segment_count(shape: tuple[int, ...], vectors: str) -> int:
    """How many segments (vectors) a tensor of ``shape`` has."""
    numel, seg = math.prod(shape), segment_length(shape, vectors)
    if effective(shape, vectors) == "columns":
        return seg
    return max(1, numel // seg)


def chunk_ranges(shape: tuple[int, ...], vectors: str, budget: int) -> list[tuple[int, int]]:
    """[(start, count)] chunks of about ``budget`` entries that both passes can take: whole
    segments, or — for a segment longer than the budget — GRAM_BLOCK-aligned parts of one;
    for "columns", whole rows in multiples of GRAM_BLOCK rows."""
    numel, seg = math.prod(shape), segment_length(shape, vectors)
    if numel == 0:
        return [(0, 0)]
    B = GRAM_BLOCK
    if effective(shape, vectors) == "columns":
        step = max(1, budget // seg // B) * B * seg
        return [(s, min(step, numel - s)) for s in range(0, numel, step)]
    if seg <= budget:
        step = budget // seg * seg
        return [(s, min(step, numel - s)) for s in range(0, numel, step)]
    step = max(1, budget // B) * B
    return [(s + o, min(step, seg - o)) for s in range(0, numel, seg) for o in range(0, seg, step)]


def blocks_per(seg: int) -> int:
    return -(-seg // GRAM_BLOCK)


def gram_blocks(count: int, seg: int) -> int:
    """Blocks of a chunk of ``count`` entries cut into pieces of ``seg`` (statistics pass)."""
    full, rem = divmod(count, seg)
    return full * blocks_per(seg) + blocks_per(rem)


def _blocked(x: torch.Tensor, seg: int) -> torch.Tensor:
    """x [n, N] as zero-padded blocks [n, Q, GRAM_BLOCK]: pieces of ``seg`` entries, each
    cut into blocks from its start."""
    n, N = x.shape
    B = GRAM_BLOCK
    full, rem = divmod(N, seg)
    parts = []
    if full:
        p = x[:, :full * seg].reshape(n, full, seg)
        p = torch.nn.functional.pad(p, (0, blocks_per(seg) * B - seg))
        parts.append(p.reshape(n, -1, B))
    if rem:
        p = torch.nn.functional.pad(x[:, full * seg:], (0, blocks_per(rem) * B - rem))
        parts.append(p.reshape(n, -1, B))
    return torch.cat(parts, 1) if parts else x.new_zeros(n, 0, B)


def tree_sum(p: torch.Tensor) -> torch.Tensor:
    """Pairwise sum over the last dimension (a power of two): level by level,
    p[2m] + p[2m+1]."""
    while p.shape[-1] > 1:
        p = p[..., 0::2] + p[..., 1::2]
    return p[..., 0]


def gram(base: torch.Tensor | None, models, on_base: bool, seg: int,
         columns: bool = False) -> torch.Tensor:
    """The statistics pass (kernel_api's contract), by definition: fp64 [Q, K].

    v_k = τ_k (``on_base``) or f32(θ_k). The chunk's N entries are pieces of ``seg``
    entries (the last may be shorter), each cut into GRAM_BLOCK blocks from its start;
    row q holds, for block q and every pair (k, l) of ``pairs(n)``, the pairwise-tree sum
    of the exact fp64 products v_k·v_l over the block (padded with +0.0).

    ``columns``: the chunk is N / seg whole rows of ``seg`` entries; its rows are cut into
    blocks of GRAM_BLOCK rows from the first, and [q, c] (fp64 [Q, seg, K]) holds the same
    tree sum down block q of column c."""
    m = model_matrix(models)
    x = (task_vectors(base, m) if on_base else m.float()).double()
    n, N = x.shape
    if columns:
        rows = N // seg
        if rows == 0:
            return torch.zeros(0, seg, len(pairs(n)), dtype=torch.float64)
        x = x.reshape(n, rows, seg).transpose(1, 2)               # [n, cols, rows]
        x = torch.nn.functional.pad(x, (0, blocks_per(rows) * GRAM_BLOCK - rows))
        x = x.reshape(n, seg, -1, GRAM_BLOCK)                     # [n, cols, Q, B]
        return torch.stack([tree_sum(x[k] * x[l]) for k, l in pairs(n)], -1).transpose(0, 1).cpu()
    xb = _blocked(x, seg)
    if xb.shape[1] == 0:
        return torch.zeros(0, len(pairs(n)), dtype=torch.float64)
    return torch.stack([tree_sum(xb[k] * xb[l]) for k, l in pairs(n)], 1).cpu()


def columns_as_pieces(gram_pieces, base, models, on_base: bool, cols: int) -> torch.Tensor:
    """The ``columns`` statistics from a backend's piece statistics: the chunk transposed
    (a copy, on its device) so that each column is one piece of ``rows`` entries; its
    blocks are the column blocks, so the sums are the same values. [cols·Q, K] →
    [Q, cols, K]."""
    m = model_matrix(models)
    n, N = m.shape
    rows = N // cols
    if rows == 0:
        return torch.zeros(0, cols, len(pairs(n)), dtype=torch.float64, device=m.device)
    mt = m.reshape(n, rows, cols).transpose(1, 2).contiguous().reshape(n, N)
    bt = base.reshape(rows, cols).t().contiguous().reshape(N) if on_base else None
    g = gram_pieces(bt, mt, on_base, max(rows, 1))
    return g.reshape(cols, blocks_per(rows), -1).transpose(0, 1)


def segment_sums(partials: np.ndarray, nseg: int) -> np.ndarray:
    """G per segment, [nseg, K], from every block's partial sum [Q, K] (Q = nseg times the
    blocks per segment), added block by block in order from +0.0."""
    q, k = partials.shape
    if nseg == 0:
        return np.zeros((0, k))
    p = partials.reshape(nseg, q // nseg, k)
    p = np.concatenate([np.zeros((nseg, 1, k)), p], axis=1)
    return np.add.accumulate(p, axis=1)[:, -1]


def combine(base: torch.Tensor | None, models, out: torch.Tensor, coef: torch.Tensor,
            seg: int, columns: bool = False, on_base: bool = True) -> torch.Tensor:
    """The combine pass (kernel_api's contract), by definition: writes ``out`` and returns
    the non-finite entries of each v_k, int64 [n].

    Entry j (of this chunk) belongs to segment s = j // seg (pieces), or s = j mod seg
    (``columns``: the chunk holds whole rows of seg entries); θ_j = [f32(θ_b) +]
    Σ_k c[s, k]·v_k[j] in fp64, k in order from +0.0, rounded once."""
    m = model_matrix(models)
    x32 = task_vectors(base, m) if on_base else m.float()
    n, N = x32.shape
    j = torch.arange(N, device=x32.device)
    c = coef.to(device=x32.device, dtype=torch.float64)[j % seg if columns else j // seg]
    d = torch.zeros(N, dtype=torch.float64, device=x32.device)
    for k in range(n):
        d = d + c[:, k] * x32[k].double()
    theta = base.double() + d if on_base else d
    out.copy_(round_once(theta, out.dtype))
    return (~torch.isfinite(x32)).sum(1).cpu()


# ------------------------------------------------------------------------------------
# coefficients (host, fp64): one row of c per segment, from its Gram entries


def _lerp(t: float, shape) -> np.ndarray:
    return np.broadcast_to(np.array([1.0 - t, t]), shape).copy()


def slerp_coefficients(G: np.ndarray, t: float) -> tuple[np.ndarray, np.ndarray]:
    """SLERP from v_0 (the base) to v_1 (docs/spec.md §8c): c [S, 2] and whether each
    segment fell back to linear interpolation. cos = G01 / (a·b), a = |v_0| unless
    |v_0| ≤ 1e-8 (then 1), b likewise; |cos| > 0.9995 (or not finite): c = (1 − t, t);
    else Ω = arccos(cos), c = (sin(Ω − tΩ), sin(tΩ)) / sin Ω."""
    with np.errstate(all="ignore"):
        na, nb = np.sqrt(G[:, 0]), np.sqrt(G[:, 2])
        a = np.where(na > SLERP_EPS, na, 1.0)
        b = np.where(nb > SLERP_EPS, nb, 1.0)
        cos = G[:, 1] / (a * b)
        lerp = ~(np.abs(cos) <= SLERP_PARALLEL)
        omega = np.arccos(np.where(lerp, 0.0, cos))
        s = np.sin(omega)
        ot = omega * t
        c = np.stack([np.sin(omega - ot) / s, np.sin(ot) / s], 1)
    c[lerp] = _lerp(t, (int(lerp.sum()), 2))
    return c, lerp, cos


def nuslerp_t(w0: float, w1: float) -> float:
    """NuSLERP's t = w_1 / (w_0 + w_1); 0.5 when |w_0 + w_1| < 1e-6 (mergekit's rule)."""
    s = w0 + w1
    return 0.5 if abs(s) < 1e-6 else w1 / s


def nuslerp_coefficients(G: np.ndarray, t: float) -> tuple[np.ndarray, np.ndarray]:
    """NuSLERP (docs/spec.md §8c): cos = clip(G01 / (ν_0·ν_1), −1, 1) with ν_k =
    max(|v_k|, 1e-7), Ω = arccos(cos); |sin Ω| < 1e-8 (or not finite): c = (1 − t, t);
    else c = (sin((1 − t)Ω), sin(tΩ)) / sin Ω."""
    with np.errstate(all="ignore"):
        n0 = np.maximum(np.sqrt(G[:, 0]), NUSLERP_NORM_MIN)
        n1 = np.maximum(np.sqrt(G[:, 2]), NUSLERP_NORM_MIN)
        cos = np.clip(G[:, 1] / (n0 * n1), -1.0, 1.0)
        omega = np.arccos(cos)
        s = np.sin(omega)
        lerp = ~(np.abs(s) >= NUSLERP_SIN_MIN)
        c = np.stack([np.sin((1.0 - t) * omega) / s, np.sin(t * omega) / s], 1)
    c[lerp] = _lerp(t, (int(lerp.sum()), 2))
    return c, lerp, cos


def model_stock_coefficients(G: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Model stock (docs/spec.md §8c): cos = the mean over pairs i < j (in order) of
    clip(G_ij / max(|τ_i|·|τ_j|, 1e-6), −1, 1); t = n·cos / (1 + (n − 1)·cos), 0 where
    the denominator is 0, 1 where cos is not finite; c_i = t / n for every model
    (θ = θ_b + t·mean τ_i). Returns (c [S, n], the segments whose t is not the formula's,
    cos)."""
    idx = {p: q for q, p in enumerate(pairs(n))}
    with np.errstate(all="ignore"):
        norms = [np.sqrt(G[:, idx[(i, i)]]) for i in range(n)]
        total = np.zeros(G.shape[0])
        for i in range(n):
            for j in range(i + 1, n):
                prod = np.maximum(norms[i] * norms[j], STOCK_NORM_MIN)
                total = total + np.clip(G[:, idx[(i, j)]] / prod, -1.0, 1.0)
        cos = total / (n * (n - 1) // 2)
        den = 1.0 + (n - 1) * cos
        t = np.where(den == 0.0, 0.0, n * cos / np.where(den == 0.0, 1.0, den))
        odd = (den == 0.0) | ~np.isfinite(cos)
        t = np.where(np.isfinite(cos), t, 1.0)
    return np.repeat((t / n)[:, None], n, axis=1), odd, cos


def column_sums(partials: np.ndarray) -> np.ndarray:
    """G per column, [C, K], from the ``columns`` block sums [Q, C, K] (Q blocks of rows,
    in order), added block by block from +0.0."""
    q, c, k = partials.shape
    p = np.concatenate([np.zeros((1, c, k)), partials], axis=0)
    return np.add.accumulate(p, axis=0)[-1]


def coefficients(kind: str, G: np.ndarray, knobs, n_models: int):
    """(c [S, vectors], fallback [S] bool, cos [S]) of method ``kind`` for one tensor's
    per-segment Gram entries G [S, K] and its knobs (params.TensorKnobs)."""
    if kind == "slerp":
        return slerp_coefficients(G, knobs.t)
    if kind == "nuslerp":
        return nuslerp_coefficients(G, nuslerp_t(*knobs.weights))
    if kind == "model_stock":
        return model_stock_coefficients(G, n_models)
    raise ValueError(f"no geometry method {kind!r}")


def _num(x) -> float | None:
    """A float for the report's strict JSON (None for NaN / inf)."""
    x = float(x)
    return x if math.isfinite(x) else None


def summary(kind: str, vectors: str, coef: torch.Tensor, fallback: np.ndarray,
            cos: np.ndarray) -> dict:
    """The report's entry for one tensor (docs/spec.md §9): what the statistics gave.
    One vector: its cosine, coefficients and whether it fell back; several: how many, how
    many fell back, and the cosines' min / mean / max."""
    c = coef.numpy()
    d = {"vectors": vectors}
    if len(cos) == 1:
        d.update(cos=_num(cos[0]), coefficients=[_num(x) for x in c[0]],
                 fallback=bool(fallback[0]))
        if kind == "model_stock":
            d["t"] = _num(c[0, 0] * c.shape[1])
        return d
    finite = cos[np.isfinite(cos)]
    d.update(segments=len(cos), fallback=int(fallback.sum()),
             cos=[_num(finite.min()), _num(finite.mean()), _num(finite.max())] if len(finite)
             else None)
    return d
