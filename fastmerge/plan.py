"""Merge planning: check the inputs agree and decide, per tensor, what the merge does.

Runs on headers only (no tensor data is read): every model must have exactly the
base's tensors with the same shapes, and the configs must name the same architecture.
Floating tensors with at least one dimension are merged; anything else (integer
buffers, 0-d scalars) is copied from the base.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import knobs
from .errors import InputError
from .params import MergeParams, TensorKnobs

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_BY_NAME = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class TensorTask:
    """One output tensor: its name, shape, output dtype, whether it is merged and, if so,
    its knobs (one value per model, resolved for this tensor)."""

    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    merged: bool
    knobs: TensorKnobs | None = None
    rows: object | None = None      # vocabulary tensor: embeddings.Rows (merged row by row)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.out_dtype.itemsize


def kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype in which a tensor is fed to a backend: fp16/bf16/fp32 as stored, other floats as
    fp32 (f32(θ) is exactly what docs/spec.md §1 asks for)."""
    return dtype if dtype in KERNEL_DTYPES else torch.float32


def _architecture(ckpt) -> tuple | None:
    cfg = ckpt.config
    if not cfg:
        return None
    return tuple(cfg.get("architectures") or ()), cfg.get("model_type")


def plan_merge(base, models: list, params: MergeParams, vocab: dict | None = None
               ) -> list[TensorTask]:
    """Validate the checkpoints against each other and return the tasks in output order.

    ``base`` is None only for method 'linear'; then the first model sets the layout.
    ``vocab``: name -> embeddings.Rows of the tensors merged row by row over an aligned
    vocabulary (their first dimension may differ between inputs).
    """
    vocab = vocab or {}
    layout = base if base is not None else models[0]
    inputs = ([base] if base is not None else []) + list(models)

    arch = {c.label: _architecture(c) for c in inputs}
    known = {k: v for k, v in arch.items() if v is not None}
    if len(set(known.values())) > 1:
        desc = "; ".join(f"{k}: architectures={list(v[0])}, model_type={v[1]!r}"
                         for k, v in known.items())
        raise InputError(f"the models' configs describe different architectures: {desc}")

    names = list(layout.names)
    name_set = set(names)
    for ckpt in inputs:
        if ckpt is layout:
            continue
        theirs = set(ckpt.names)
        missing = [n for n in names if n not in theirs]
        extra = [n for n in ckpt.names if n not in name_set]
        if missing:
            raise InputError(f"{ckpt.label}: missing tensor {missing[0]!r} present in "
                             f"{layout.label}" + (f" (and {len(missing) - 1} more)"
                                                  if len(missing) > 1 else ""))
        if extra:
            raise InputError(f"{ckpt.label}: has tensor {extra[0]!r} that {layout.label} lacks"
                             + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))

    num_layers = knobs.layer_count(layout.config, names)
    constant = params.for_tensor("", num_layers) if params.constant else None
    tasks = []
    for name in names:
        ref = layout.info(name)
        floating = ref.dtype.is_floating_point
        rows = vocab.get(name)
        for ckpt in inputs:
            info = ckpt.info(name)
            if rows is not None and tuple(info.shape[1:]) == tuple(ref.shape[1:]):
                pass        # rows are matched by token (fastmerge.embeddings)
            elif tuple(info.shape) != tuple(ref.shape):
                hint = ""
                if len(ref.shape) == 2 and tuple(info.shape[1:]) == tuple(ref.shape[1:]):
                    hint = ("; if the models have different vocabularies, align them by token "
                            "with tokenizer_source='union' (or 'base', or a model; YAML: "
                            "tokenizer_source: union)")
                raise InputError(f"tensor {name!r}: shape {list(info.shape)} in {ckpt.label} "
                                 f"differs from {list(ref.shape)} in {layout.label}{hint}")
            if info.dtype.is_floating_point != floating:
                raise InputError(f"tensor {name!r}: dtype {info.dtype} in {ckpt.label} but "
                                 f"{ref.dtype} in {layout.label} (floating and non-floating mix)")
        merged = floating and len(ref.shape) > 0
        if merged:
            out = _BY_NAME[params.dtype] if params.dtype else kernel_dtype(ref.dtype)
        else:
            if base is None:
                raise InputError(f"tensor {name!r} ({ref.dtype}, shape {list(ref.shape)}) is "
                                 "not merged and must be copied from a base model, but the "
                                 "linear merge was given none")
            out = ref.dtype
        tk = (constant or params.for_tensor(name, num_layers)) if merged else None
        shape = tuple(ref.shape) if rows is None else (rows.padded, *ref.shape[1:])
        tasks.append(TensorTask(name, shape, out, merged, tk, rows))
    return tasks
