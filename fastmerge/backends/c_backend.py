"""The C CPU backend: fused kernels in plain C with OpenMP (kernels/c, module fastmerge._cmerge).

Same contract and signatures as fastmerge.reference (see fastmerge.kernel_api), on
contiguous CPU tensors of fp16 / bf16 / fp32. The extension is imported on first use,
never when fastmerge is imported; ``unavailable_reason()`` says why it cannot be used.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import kernel_api
from ..kernel_api import COUNTERS, NBINS, Capabilities, KernelConfig

CAPABILITIES = Capabilities(max_models=64, ranks=True)   # FM_MAX_MODELS; DELLA's ranks fused
NAME = "c"

_DTYPE_CODES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def DEVICES(device=None) -> tuple[str, ...]:
    return ("cpu",)


def _module():
    from .. import _cmerge  # noqa: PLC0415  (imported on first use, on purpose)
    return _cmerge


def unavailable_reason() -> str | None:
    """None when fastmerge._cmerge imports and matches kernel_api, else why not."""
    try:
        ext = _module()
    except ImportError as exc:
        return (f"the C extension fastmerge._cmerge cannot be imported ({exc}); reinstall "
                "fastmerge with a C compiler available (pip install -e .)")
    expected = (NBINS, tuple(kernel_api.DIGIT_BITS), tuple(kernel_api.SHIFT), len(COUNTERS))
    found = (ext.NBINS, tuple(ext.DIGIT_BITS), tuple(ext.SHIFT), ext.N_COUNTERS)
    if found != expected:
        return (f"fastmerge._cmerge was built for another kernel_api (NBINS, DIGIT_BITS, SHIFT, "
                f"counters = {found}, expected {expected}); rebuild it (pip install -e .)")
    return None


def set_num_threads(n: int) -> None:
    """Threads the C kernels use from now on; 0 restores OpenMP's default (OMP_NUM_THREADS)."""
    _module().set_num_threads(int(n))


def get_num_threads() -> int:
    return _module().get_num_threads()


def _code(t: torch.Tensor, what: str) -> int:
    if t.dtype not in _DTYPE_CODES:
        raise ValueError(f"{what}: dtype {t.dtype} not supported by the C backend "
                         f"(fp16, bf16, fp32)")
    return getattr(_module(), _DTYPE_CODES[t.dtype])


def _buffer(t: torch.Tensor, what: str):
    """A flat zero-copy numpy view of a contiguous CPU tensor (16-bit floats as int16)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{what}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{what}: the C backend runs on CPU tensors, got device {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{what}: tensor must be contiguous")
    t = t.detach().reshape(-1)
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.view(torch.int16)
    return t.numpy()


def _models(models):
    """(buffer(s), n, N, dtype code) for a 2-D tensor [n, N] (contiguous rows suffice, e.g. a
    column slice ``models[:, a:b]``) or a sequence of n tensors of N entries (no stacking)."""
    if isinstance(models, torch.Tensor):
        if models.dim() != 2:
            raise ValueError(f"models: expected a 2-D tensor [n, N], got shape {list(models.shape)}")
        if models.is_contiguous():
            return _buffer(models, "models"), models.shape[0], models.shape[1], _code(models, "models")
        if models.stride(1) != 1 and models.shape[1] > 1:
            raise ValueError("models: each model's row must be contiguous")
        models = list(models.unbind(0))   # e.g. a column slice models[:, a:b]: rows contiguous
    if not isinstance(models, Sequence) or not models:
        raise ValueError("models: expected a 2-D tensor or a non-empty sequence of tensors")
    dtypes = {m.dtype for m in models}
    if len(dtypes) != 1:
        raise ValueError(f"models: all models must share one dtype, got {sorted(map(str, dtypes))}")
    sizes = {m.numel() for m in models}
    if len(sizes) != 1:
        raise ValueError(f"models: all models must have the same number of entries, got {sorted(sizes)}")
    bufs = [_buffer(m, f"models[{i}]") for i, m in enumerate(models)]
    return bufs, len(models), sizes.pop(), _code(models[0], "models")


def histogram(base: torch.Tensor, models, prefixes: torch.Tensor, level: int) -> torch.Tensor:
    """Radix-select histogram of kernel_api's contract: int64 [n, 2, NBINS]."""
    mbuf, n, N, mcode = _models(models)
    if base.numel() != N:
        raise ValueError(f"base: {base.numel()} entries, models have {N}")
    prefixes = torch.as_tensor(prefixes).to(torch.int64).contiguous()
    if tuple(prefixes.shape) != (n, 2):
        raise ValueError(f"prefixes: expected shape [{n}, 2], got {list(prefixes.shape)}")
    out = torch.empty(n, 2, NBINS, dtype=torch.int64)
    _module().histogram(_buffer(base, "base"), mbuf, n, N, _code(base, "base"), mcode,
                        prefixes.numpy(), int(level), out.numpy())
    return out


def bracket(base: torch.Tensor, models, bounds: torch.Tensor,
            cap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bracketed-selection counting pass of kernel_api's contract: (counts int64 [n, 2, 2],
    cand int32 [n, 2, cap])."""
    mbuf, n, N, mcode = _models(models)
    if base.numel() != N:
        raise ValueError(f"base: {base.numel()} entries, models have {N}")
    bounds = torch.as_tensor(bounds).to(torch.int64).contiguous()
    if tuple(bounds.shape) != (n, 2, 2):
        raise ValueError(f"bounds: expected shape [{n}, 2, 2], got {list(bounds.shape)}")
    counts = torch.empty(n, 2, 2, dtype=torch.int64)
    cand = torch.empty(n, 2, int(cap), dtype=torch.int32)
    _module().bracket(_buffer(base, "base"), mbuf, n, N, _code(base, "base"), mcode,
                      bounds.numpy(), cand.numpy(), int(cap), counts.numpy())
    return counts, cand


def merge(base: torch.Tensor | None, models, out: torch.Tensor, cfg: KernelConfig) -> torch.Tensor:
    """The fused pass of kernel_api's contract; writes ``out``, returns int64 [n, len(COUNTERS)]."""
    mbuf, n, N, mcode = _models(models)
    if cfg.n_models != n:
        raise ValueError(f"cfg has {cfg.n_models} weights for {n} models")
    if out.numel() != N:
        raise ValueError(f"out: {out.numel()} entries, models have {N}")
    if cfg.on_base and base is None:
        raise ValueError("this kernel config needs a base tensor")
    if base is not None and base.numel() != N:
        raise ValueError(f"base: {base.numel()} entries, models have {N}")
    ext = _module()
    bbuf, bcode = (_buffer(base, "base"), _code(base, "base")) if cfg.on_base else (None, 0)
    counts = torch.zeros(n, len(COUNTERS), dtype=torch.int64)
    elect = {"none": ext.ELECT_NONE, "sum": ext.ELECT_SUM, "count": ext.ELECT_COUNT}[cfg.elect]
    drop = {}
    if cfg.rank_keep is not None:   # DELLA (§8d), ranked in the pass: T_i(ρ) per rank
        table = cfg.rank_keep.to(device="cpu", dtype=torch.int64).contiguous()
        if table.shape[0] != n:
            raise ValueError(f"cfg.rank_keep: expected {n} rows, got {list(table.shape)}")
        drop = dict(rank_keep=table.numpy(), rank_len=int(table.shape[1]),
                    keep_rescale=bool(cfg.rescale), key=int(cfg.key), offset=int(cfg.offset))
    elif cfg.keep is not None:  # DELLA (§8d): per-entry T_i(g), c_i(g) = w_i·2^32 / T_i(g)
        keep = cfg.keep.to(device="cpu", dtype=torch.int64).contiguous()
        if tuple(keep.shape) != (n, N):
            raise ValueError(f"cfg.keep: expected shape [{n}, {N}], got {list(keep.shape)}")
        drop = dict(keep=keep.numpy(), keep_rescale=bool(cfg.rescale), key=int(cfg.key),
                    offset=int(cfg.offset))
    elif cfg.drops:   # DARE (docs/spec.md §8a): random drop, c_i = w_i or w_i / d_i
        drop = dict(drop=cfg.drop_thresholds, key=int(cfg.key), offset=int(cfg.offset),
                    vote_weights=cfg.vote_weights)
    ext.merge(bbuf, mbuf, _buffer(out, "out"), n, N, bcode, mcode, _code(out, "out"),
              cfg.on_base, elect, bool(cfg.normalize), tuple(cfg.weights), cfg.t, cfg.u,
              float(cfg.scale), counts.numpy(), h=cfg.h, **drop)
    return counts


def gram(base: torch.Tensor | None, models, on_base: bool, seg: int,
         columns: bool = False) -> torch.Tensor:
    """The statistics pass of kernel_api's contract (docs/spec.md §8c): fp64 [Q, K], or
    [Q, seg, K] for ``columns`` (gram.c walks each tile of columns down the rows)."""
    from ..geometry import blocks_per, gram_blocks, pairs
    mbuf, n, N, mcode = _models(models)
    if on_base and (base is None or base.numel() != N):
        raise ValueError(f"base: needs {N} entries (on_base)")
    if seg < 1 or (columns and N % seg):
        raise ValueError(f"seg must be >= 1{' and divide N' if columns else ''}, got {seg} (N = {N})")
    shape = (blocks_per(N // seg), seg) if columns else (gram_blocks(N, seg),)
    out = torch.empty(*shape, len(pairs(n)), dtype=torch.float64)
    bbuf, bcode = (_buffer(base, "base"), _code(base, "base")) if on_base else (None, 0)
    _module().gram(bbuf, mbuf, n, N, bcode, mcode, bool(on_base), int(seg), out.numpy(),
                   **({"columns": True} if columns else {}))
    return out


def combine(base: torch.Tensor | None, models, out: torch.Tensor, coef: torch.Tensor,
            seg: int, columns: bool = False, on_base: bool = True) -> torch.Tensor:
    """The combine pass of kernel_api's contract (docs/spec.md §8c): writes ``out``,
    returns the non-finite entries of each vector, int64 [n]."""
    mbuf, n, N, mcode = _models(models)
    if out.numel() != N:
        raise ValueError(f"out: {out.numel()} entries, models have {N}")
    if on_base and (base is None or base.numel() != N):
        raise ValueError(f"base: needs {N} entries (on_base)")
    coef = coef.to(torch.float64).contiguous()
    if coef.dim() != 2 or coef.shape[1] != n:
        raise ValueError(f"coef: expected shape [segments, {n}], got {list(coef.shape)}")
    bbuf, bcode = (_buffer(base, "base"), _code(base, "base")) if on_base else (None, 0)
    nonfinite = torch.zeros(n, dtype=torch.int64)
    _module().combine(bbuf, mbuf, _buffer(out, "out"), n, N, bcode, mcode, _code(out, "out"),
                      bool(on_base), bool(columns), coef.numpy(), coef.shape[0], int(seg),
                      nonfinite.numpy())
    return nonfinite


def philox4x32_10(ctr, key) -> tuple[int, int, int, int]:
    """The C kernels' Philox4x32-10 of one counter (4 uint32) and key (2 uint32); tests."""
    return _module().philox4x32_10(tuple(int(c) for c in ctr), tuple(int(k) for k in key))


def use_philox(name: str | None = None) -> str:
    """The Philox variant making DARE's words ("avx512", "avx2", "scalar": the best this CPU
    has); with ``name``, switch to it first (ValueError when the CPU lacks it). Tests."""
    return _module().use_philox(name)


def dare_words(key: int, model: int, offset: int, n: int) -> torch.Tensor:
    """DARE's random words r_model(offset .. offset + n − 1) (docs/spec.md §8a) from the C
    merge's own block generator, int64 [n] of uint32 values; tests."""
    out = torch.empty(n, dtype=torch.int32)
    _module().dare_words(out.numpy(), int(n), int(key), int(offset), int(model))
    return out.to(torch.int64) & 0xFFFFFFFF
