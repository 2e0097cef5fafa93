"""Tensors whose rows are tokens, merged row by row over the output vocabulary
(docs/spec.md §13).

``vocab_tensors`` finds them: 2-D floating tensors whose first dimension is, in every
input, that input's embedding row count (its config.json ``vocab_size``; without one,
the first dimension shared by the 2-D tensors outside the layers that have at least as
many rows as its tokenizer has ids). That covers ``embed_tokens``, ``lm_head`` and tied
embeddings under any name.

``merge_rows`` merges one such tensor. The output rows are grouped by which inputs have
the token (a bitmask: bit 0 the base, bit 1 + i model i). Each group is gathered in
bounded chunks of whole rows into contiguous buffers and run through the backend's
ordinary merge pass with the models of the group:
* the base and some models: the method as usual among those models (thresholds over the
  group's rows, as if the group were a tensor of its own; with ``scope: model`` the global
  ones; DELLA's ranks per row; SLERP / NuSLERP / model stock with the group's own
  statistics, ``_GeometryGroup``);
* no base, several models: their weighted mean Σ w_i θ_i / Σ w_i (``linear``, normalised);
* one model: that row, converted to the output dtype (bit for bit when the dtype is the
  same), through the kernel as 1·θ/1 (exact; it counts non-finite entries), or copied
  with ``allow_nonfinite`` (NaN bits kept); the base alone: its row, copied;
* padding rows (``pad_to_multiple_of``): the mean of the output's token rows, summed in
  fp64 row by row in output order and rounded once.
Chunks hold at most ``chunk_elems`` entries per input, so memory stays bounded. The rows
every input has, when they fit the resident budget, are gathered once and bracketed (one
counting pass, as a tensor held in memory); otherwise radix select streams them.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch

from . import della, methods, philox, select
from .errors import InputError
from .kernel_api import COUNTERS, NONFINITE
from .plan import kernel_dtype

_LAYER = re.compile(r"\.\d+\.")


def _config_rows(ckpt) -> int | None:
    cfg = ckpt.config or {}
    for c in (cfg, cfg.get("text_config") or {}):
        v = c.get("vocab_size") if isinstance(c, dict) else None
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _rows_of(ckpt, vocab) -> int:
    rows = _config_rows(ckpt)
    if rows is not None:
        return rows
    need = vocab.size if vocab is not None else 1
    dims = {ckpt.info(n).shape[0] for n in ckpt.names
            if len(ckpt.info(n).shape) == 2 and ckpt.info(n).dtype.is_floating_point
            and not _LAYER.search(n) and ckpt.info(n).shape[0] >= need}
    if len(dims) != 1:
        raise InputError(f"{ckpt.label}: no config.json vocab_size, and the 2-D tensors outside "
                         f"the layers do not agree on a row count for the embeddings "
                         f"({sorted(dims) or 'none'})")
    return dims.pop()


def vocab_tensors(inputs: list, vocabs: list) -> tuple[list[str], list[int]]:
    """(names of the tensors whose rows are tokens, in the first input's order; the row
    count of each input's embeddings)."""
    rows = [_rows_of(c, v) for c, v in zip(inputs, vocabs)]
    names = []
    for name in inputs[0].names:
        ok = True
        for c, r in zip(inputs, rows):
            if name not in c.names:
                ok = False
                break
            info = c.info(name)
            if len(info.shape) != 2 or not info.dtype.is_floating_point or info.shape[0] != r:
                ok = False
                break
        if ok:
            names.append(name)
    if not names:
        raise InputError(f"no tensor has the embedding rows of every input ({', '.join(f'{c.label}: {r}' for c, r in zip(inputs, rows))} rows); "
                         "cannot align the vocabularies")
    return names, rows


def is_identity(al, rows: list[int]) -> bool:
    """Every input has the output's tokens at the same ids and no other rows: the
    vocabulary tensors merge as ordinary tensors."""
    ids = np.arange(al.size, dtype=np.int64)
    return al.padded == al.size and all(r == al.size for r in rows) and \
        all(np.array_equal(x, ids) for x in al.rows)


@dataclass(frozen=True, eq=False)
class Rows:
    """How one vocabulary tensor's output rows are made. ``src[j]``: int64 [size], the row
    of each output token in input j (-1: lacks it); ``runs``: (first, stop, mask) maximal
    runs of output rows the same inputs have; ``padded``: output rows incl. padding."""

    src: tuple
    size: int
    padded: int
    width: int
    runs: tuple
    has_base: bool

    @classmethod
    def of(cls, al, width: int) -> "Rows":
        masks = al.masks()
        runs = []
        if al.size:
            cut = np.flatnonzero(np.diff(masks) != 0) + 1
            starts = np.concatenate([[0], cut])
            stops = np.concatenate([cut, [al.size]])
            runs = [(int(a), int(b), int(masks[a])) for a, b in zip(starts, stops)]
        return cls(tuple(al.rows), al.size, al.padded, width, tuple(runs), al.has_base)

    @property
    def n_inputs(self) -> int:
        return len(self.src)

    @property
    def full(self) -> int:
        return (1 << self.n_inputs) - 1

    def members(self, mask: int) -> list[int]:
        """Model indices (0-based among the models) present in ``mask``."""
        off = 1 if self.has_base else 0
        return [j - off for j in range(off, self.n_inputs) if mask >> j & 1]

    def with_base(self, mask: int) -> bool:
        return self.has_base and bool(mask & 1)

    def group_rows(self, mask: int) -> int:
        return sum(b - a for a, b, m in self.runs if m == mask)

    def counts(self) -> dict:
        """Output rows by how they are made: merged (base and models, the method),
        averaged (no base, several models), copied (one model, or the base alone), padding."""
        out = {"merged": 0, "averaged": 0, "copied": 0, "padding": self.padded - self.size}
        for a, b, m in self.runs:
            k = len(self.members(m))
            if self.with_base(m) and k:
                out["merged"] += b - a
            elif not self.has_base and m == self.full:
                out["merged"] += b - a
            elif k >= 2:
                out["averaged"] += b - a
            else:
                out["copied"] += b - a
        return out


def _gather(ckpt, name: str, idx: np.ndarray, width: int, dst: torch.Tensor) -> None:
    """Rows ``idx`` of ``name`` into the flat ``dst`` (consecutive rows read at once)."""
    stored = ckpt.info(name).dtype
    target = dst if stored == dst.dtype else torch.empty(dst.numel(), dtype=stored)
    cut = np.flatnonzero(np.diff(idx) != 1) + 1
    starts = np.concatenate([[0], cut])
    stops = np.concatenate([cut, [len(idx)]])
    for a, b in zip(starts.tolist(), stops.tolist()):
        ckpt.read_into(name, target[a * width:b * width], int(idx[a]) * width,
                       (b - a) * width)
    if target is not dst:
        dst.copy_(target)


class _Gatherer:
    """Gathers a chunk of output rows from the inputs a group has, in the kernel layout."""

    def __init__(self, engine, task):
        self.engine, self.task, self.rows = engine, task, task.rows
        self.inputs = engine.inputs.all
        self.pool = engine.reader.pool
        from .pipeline import RANK_CHUNK_ELEMS
        budget = engine.chunk_elems
        if engine.params.spec.ranked and not engine.backend.CAPABILITIES.ranks:
            budget = min(budget, RANK_CHUNK_ELEMS)    # DELLA's torch rank stage (pipeline)
        self.max_rows = max(1, budget // max(1, self.rows.width))

    def chunks(self, mask: int):
        """(first, stop) chunks of the runs of ``mask``, in output order."""
        for a, b, m in self.rows.runs:
            if m != mask:
                continue
            for s in range(a, b, self.max_rows):
                yield s, min(b, s + self.max_rows)

    def read(self, mask: int, first: int, stop: int):
        """(base [count] or None, models [k, count] or None) for output rows first..stop."""
        return self.read_rows(mask, np.arange(first, stop))

    def read_rows(self, mask: int, rows: np.ndarray):
        """(device, host) pairs (base, models) of the output rows ``rows``."""
        r, name, w = self.rows, self.task.name, self.rows.width
        count = len(rows) * w
        base = None
        if r.with_base(mask):
            ck = self.inputs[0]
            base = self.pool.take(count, kernel_dtype(ck.info(name).dtype))
            _gather(ck, name, r.src[0][rows], w, base)
        off = 1 if r.has_base else 0
        members = r.members(mask)
        models = None
        if members:
            dtypes = {kernel_dtype(self.inputs[i + off].info(name).dtype) for i in members}
            mdtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
            models = self.pool.take((len(members), count), mdtype)
            for k, i in enumerate(members):
                _gather(self.inputs[i + off], name, r.src[i + off][rows], w, models[k])
        dev = self.engine.device
        if dev.type != "cpu":
            return (None if base is None else base.to(dev), None if models is None
                    else models.to(dev)), (base, models)
        return (base, models), (base, models)

    def release(self, host) -> None:
        for t in host:
            self.pool.give(t)

    def pairs(self, mask: int):
        """(base, models) of every chunk of the group (selection's chunks)."""
        for first, stop in self.chunks(mask):
            dev, host = self.read(mask, first, stop)
            yield dev
            self.release(host)


def full_population(task) -> int:
    """Entries of the rows the base and every model have (``scope: model``'s share)."""
    r = task.rows
    return r.group_rows(r.full) * r.width


def full_chunks(engine, task):
    """(base, models) chunks of the rows every input has (``scope: model``'s pass)."""
    return _Gatherer(engine, task).pairs(task.rows.full)


def _searches(p, tk, members: list[int], population: int) -> list:
    """The selections of the group's models (select.searches on their knobs)."""
    from types import SimpleNamespace
    pick = lambda v: [v[i] for i in members] if v else ()     # noqa: E731
    knobs = SimpleNamespace(density=pick(tk.density), slack=pick(tk.slack),
                            gamma=pick(tk.gamma))
    return select.searches(p.spec, knobs, population)


class _GeometryGroup:
    """SLERP / NuSLERP / model stock on one row group (docs/spec.md §13): the group is a
    tensor of its own, [its rows in output order, width], with its own statistics."""

    def __init__(self, engine, task, g, mask: int, members: list[int]):
        from .kernel_api import GRAM_BLOCK
        from .pipeline import Geometry
        r, w = task.rows, task.rows.width
        runs = [(a, b) for a, b, m in r.runs if m == mask]
        at = np.cumsum([0] + [b - a for a, b in runs]).tolist()
        self.row_of = {a: at[k] for k, (a, _) in enumerate(runs)}     # run -> group row
        self.members, self.width = members, w
        rows = np.concatenate([np.arange(a, b) for a, b in runs])
        self.geo = Geometry(engine, (len(rows), w), task.knobs, n_models=len(members))
        budget, B = engine.chunk_elems, GRAM_BLOCK
        if self.geo.vectors == "tensor":     # chunks start on a GRAM_BLOCK boundary
            align = B // math.gcd(B, w)
            step = max(1, budget // (w * align)) * align
        elif self.geo.vectors == "rows":
            step = max(1, budget // w)
        else:                                # columns: whole rows, GRAM_BLOCK rows a time
            step = max(1, budget // w // B) * B

        def chunks():
            for k in range(0, len(rows), step):
                idx = rows[k:k + step]
                (b, m), host = g.read_rows(mask, idx)
                yield len(idx) * w, b, m
                g.release(host)
        self.coef, self.summary = self.geo.coefficients(chunks())

    def combine(self, engine, task, base, models, out, run: int, first: int,
                stop: int) -> None:
        """Output rows first..stop of the group's run starting at row ``run``, into ``out``."""
        row = self.row_of[run] + first - run
        nonfinite = self.geo.combine(base, models, out, self.coef,
                                     row * self.width // self.geo.seg,
                                     (stop - first) * self.width)
        if not engine.params.allow_nonfinite and bool(nonfinite.any()):
            # per vector of the group: [θ_b, its model] for SLERP, else its models
            idx = ([0] if self.geo.slerp else []) + \
                [i + (1 if self.geo.slerp else 0) for i in self.members]
            full = torch.zeros(engine.params.n_models + (1 if self.geo.slerp else 0),
                               dtype=nonfinite.dtype)
            full[idx] = nonfinite.cpu()
            engine._raise_nonfinite_vectors(task, full, self.geo.slerp, self.geo.on_base)


def merge_rows(engine, task) -> None:
    """Merge the vocabulary tensor ``task`` row by row (module docstring) into the sink."""
    from .pipeline import TensorStats
    p, tk, r = engine.params, task.knobs, task.rows
    g = _Gatherer(engine, task)
    w = r.width
    masks = list(dict.fromkeys(m for _, _, m in r.runs))
    linear = methods.get("linear")
    cfgs, thr, geo = {}, {}, {}
    held = None     # (mask, {run start: group offset}, device pair, host pair)
    own = set()     # masks merged by the method (the others: a mean or a copy)
    for mask in masks:
        members = r.members(mask)
        weights = [tk.weights[i] for i in members]
        method = bool(r.with_base(mask) and members or (not r.has_base and mask == r.full))
        if method and p.spec.geometry and len(members) < p.spec.models[0]:
            method = False      # fewer models than the method takes (NuSLERP, model stock
                                # of one model): that model's row, below
        if method and p.spec.geometry:
            geo[mask] = _GeometryGroup(engine, task, g, mask, members)
            own.add(mask)
        elif method:
            found = {}
            if p.selects:
                if p.scope == "model":
                    found = {k: [v[i] for i in members]
                             for k, v in engine.global_thresholds.items()}
                else:
                    pop = r.group_rows(mask) * w
                    whole = None
                    size = sum(kernel_dtype(c.info(task.name).dtype).itemsize
                               for c in g.inputs)
                    if mask == r.full and hasattr(engine.backend, "bracket") and \
                            pop * size <= engine.resident_bytes:
                        # the shared rows fit the budget: gathered once, bracketed (one
                        # counting pass, as a tensor held in memory), merged from memory
                        spans = [(a, b) for a, b, m in r.runs if m == mask]
                        at = np.cumsum([0] + [b - a for a, b in spans]).tolist()
                        dev, host = g.read_rows(mask, np.concatenate(
                            [np.arange(a, b) for a, b in spans]))
                        held = (mask, {a: at[k] for k, (a, _) in enumerate(spans)}, dev, host)
                        whole = dev
                    found = select.find_all(engine.backend, _searches(p, tk, members, pop),
                                            lambda mask=mask: g.pairs(mask), whole)
                thr[mask] = found
            drop = {}
            if p.spec.drop:
                drop = dict(density=[tk.density[i] for i in members], rescale=p.rescale,
                            key=philox.tensor_key(p.seed, task.name))
            if p.spec.ranked:       # DELLA: ranks within each row of `width` (§8d)
                table = della.rank_table(w, drop.pop("density"),
                                         [tk.epsilon[i] for i in members])
                cfgs[mask] = p.spec.kernel_config(weights, tk.scale, p.normalize, p.elect,
                                                  None, found.get("u"), rank_keep=table,
                                                  **drop)
            else:
                cfgs[mask] = p.spec.kernel_config(weights, tk.scale, p.normalize, p.elect,
                                                  found.get("t"), found.get("u"),
                                                  h=found.get("h"), **drop)
            own.add(mask)
        elif len(members) >= 2:
            if sum(weights) == 0:
                raise InputError(f"tensor {task.name!r}: the weights of models {members} sum to "
                                 "0, so the mean of the rows only they have is undefined")
            cfgs[mask] = linear.kernel_config(weights, 1.0, True, "sum")
        elif members and not p.allow_nonfinite:
            # one model's row: the kernel's 1·θ/1 is θ exactly (finite values and ±inf),
            # rounded once to the output dtype as a conversion is, and it counts the
            # non-finite entries; with allow_nonfinite the row is copied (NaN bits kept)
            cfgs[mask] = linear.kernel_config([1.0], 1.0, True, "sum")
    counts = torch.zeros(p.n_models, len(COUNTERS), dtype=torch.int64)
    padding = r.padded > r.size
    acc = torch.zeros(w, dtype=torch.float64) if padding else None
    engine.sink.begin(task)
    for a, b, mask in r.runs:
        members = r.members(mask)
        for first in range(a, b, g.max_rows):
            stop = min(b, first + g.max_rows)
            if held is not None and held[0] == mask:    # slices of the gathered group
                at = (held[1][a] + first - a) * w
                end = at + (stop - first) * w
                hb, hm = held[2]
                base = None if hb is None else hb[at:end]
                models = [row[at:end] for row in hm]
                host = ()
            else:
                (base, models), host = g.read(mask, first, stop)
            out = engine._out(task, (stop - first) * w)
            cfg = cfgs.get(mask)
            if mask in geo:
                geo[mask].combine(engine, task, base, models, out, a, first, stop)
            elif cfg is not None:
                c = engine.backend.merge(base, models, out, cfg.at(first * w)).cpu()
                if mask in own:
                    counts[members] += c
                else:       # a mean or a copy: only its non-finite count is reported
                    counts[members, NONFINITE] += c[:, NONFINITE]
                if not p.allow_nonfinite and c[:, NONFINITE].any():
                    engine._raise_nonfinite(task, counts)
            else:
                out.copy_(models[0] if members else base)
            g.release(host)
            data = out.cpu()
            if padding:
                for row in data.view(-1, w):
                    acc.add_(row.double())
            engine.sink.write(task, first * w, data, release=engine.reader.pool.give)
    if held is not None:
        g.release(held[3])
    if padding:
        from .reference import round_once
        mean = round_once(acc / r.size if r.size else acc, task.out_dtype)
        for row in range(r.size, r.padded):
            engine.sink.write(task, row * w, mean.clone())
    stats = TensorStats(task.name, r.group_rows(r.full) * w if r.with_base(r.full) or
                        not r.has_base else 0)
    if r.full in thr:
        stats.t, stats.u, stats.h = (list(thr[r.full].get(k, ())) for k in ("t", "u", "h"))
    if r.full in geo:
        stats.geometry = geo[r.full].summary
    if p.spec.thresholds or p.spec.drop or p.spec.elect:
        stats.counts = counts
    engine.sink.end(task, stats.as_dict())
    engine.stats[engine._slots[task.name]] = stats


def align_inputs(base, models: list, source, pad_to_multiple_of: int | None = None):
    """Align the opened inputs' vocabularies for ``tokenizer_source`` (already resolved:
    "base", "union" or a model index). Returns (Alignment, {tensor name: Rows}); the dict
    is empty when every input already has the output's tokens at the same ids (the
    vocabulary tensors then merge as ordinary tensors)."""
    from .vocab import align, read_vocab
    inputs = ([base] if base is not None else []) + list(models)
    vocabs = [read_vocab(c) for c in inputs]
    names, rows = vocab_tensors(inputs, vocabs)
    al = align(vocabs, rows, source, base is not None, pad_to_multiple_of)
    if is_identity(al, rows):
        return al, {}
    return al, {n: Rows.of(al, inputs[0].info(n).shape[1]) for n in names}


def vocabulary_report(al, rows_by_name: dict, labels: list) -> dict:
    """The report's ``vocabulary`` section (docs/spec.md §13): the output vocabulary's
    size and source, per vocabulary tensor how many rows were merged / averaged / copied /
    padded, which model the tokens the base lacks came from, and what was left out."""
    off = 1 if al.has_base else 0
    names = (["base"] if al.has_base else []) + list(labels)
    doc = {
        "source": al.source if isinstance(al.source, str) else labels[al.source],
        "tokens": al.size,
        "rows": al.padded,
        "new_tokens": [{"model": labels[i], "tokens": k} for i, k in sorted(al.new_from.items())],
        "missing_tokens": [{"model": names[j], "tokens": k} for j, k in sorted(al.missing.items())
                           if j >= off],
        "not_in_output": [{"model": names[j], "tokens": k} for j, k in sorted(al.not_kept.items())],
        "rows_without_token": [{"model": names[j], "rows": k}
                               for j, k in sorted(al.unused_rows.items())],
        "tensors": [{"name": n, **r.counts()} for n, r in rows_by_name.items()],
    }
    return doc
