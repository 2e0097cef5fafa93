"""The streaming merge: tensor by tensor, chunk by chunk, with bounded memory.

For every merged tensor (docs/spec.md §1-§9):
  1. thresholds (trims and slack, fastmerge.select): for a tensor held in memory, one
     bracketing pass when the backend has one; otherwise (or if a bracket missed) three
     radix-select histogram rounds. With ``scope="model"`` one global set of radix
     rounds over the whole checkpoint comes first;
  2. one fused merge pass per chunk, whose output goes straight to the sink.

Under a process group (fastmerge.distributed) a rank merges only the tensors of the
shards its sink says are its own (``sink.mine``); ``scope="model"``'s histograms are
summed over the ranks, each rank counting the tensors of the shards assigned to it.

Memory is bounded by the chunk budget, not the model: a tensor whose inputs fit in
``resident_bytes`` is read from disk once and kept for all passes (and the next one is
prefetched on a thread while this one computes); a larger tensor is streamed in chunks of
``chunk_elems`` entries and re-read for each pass. On the CPU the kernels read the
inputs' page-cache pages in place (``Checkpoint.view``: a mapping per chunk, dropped with
it), so no byte is copied on the way in; for a GPU, or a stored dtype the kernels don't
take, chunks are read (pread) into reused or pinned buffers.
"""
from __future__ import annotations

import concurrent.futures as cf
import math
import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import InputError
from . import della, geometry, philox, select
from .kernel_api import COUNTERS, NONFINITE
from .plan import TensorTask, kernel_dtype

DEFAULT_CHUNK_ELEMS = 1 << 24
DEFAULT_RESIDENT_BYTES = 512 << 20
RANK_CHUNK_ELEMS = 1 << 22      # DELLA's torch rank stage: entries per chunk (memory, see _source)


@dataclass
class Inputs:
    """The opened checkpoints of one merge (base is None only for 'linear')."""

    base: object | None
    models: list

    @property
    def all(self) -> list:
        return ([self.base] if self.base is not None else []) + self.models


@dataclass
class TensorStats:
    """Per-tensor report entry (docs/spec.md §9)."""

    name: str
    population: int
    t: list[float] = field(default_factory=list)
    u: list[float] = field(default_factory=list)
    counts: torch.Tensor | None = None
    h: list[float] = field(default_factory=list)     # breadcrumbs' upper bounds (§8b)
    geometry: dict | None = None     # SLERP / NuSLERP / model stock (docs/spec.md §8c)

    @classmethod
    def from_dict(cls, d: dict) -> "TensorStats":
        counts = None
        if "models" in d:
            counts = torch.tensor([[m[c] for c in COUNTERS] for m in d["models"]],
                                  dtype=torch.int64)
        # null is how as_dict writes +inf (keep none / protect none); a /1 report or
        # journal may still hold the float inf itself, which passes through as is
        def thresholds(key):
            return [math.inf if x is None else x for x in d.get(key, [])]
        return cls(d["name"], d["population"], thresholds("t"), thresholds("u"), counts,
                   thresholds("h"), d.get("geometry"))

    def as_dict(self) -> dict:
        d = {"name": self.name, "population": self.population}
        for key in ("t", "u", "h"):
            v = getattr(self, key)
            if v:
                # strict JSON: +inf (t: keep none, u: protect none, h: no upper bound) is null
                d[key] = [None if x == math.inf else x for x in v]
        if self.counts is not None:
            d["models"] = [dict(zip(COUNTERS, map(int, row))) for row in self.counts.tolist()]
        if self.geometry is not None:
            d["geometry"] = self.geometry
        return d


class BufferPool:
    """Reused host buffers. A fresh large allocation costs a page fault (and the kernel's
    zeroing) per 4 KiB on first touch — for a 7B merge that is more CPU than the reads
    themselves — so input and output buffers are recycled. Thread-safe; idle buffers are
    capped at ``keep_bytes`` (smallest dropped first), so memory stays bounded."""

    def __init__(self, keep_bytes: int = 768 << 20):
        self.keep_bytes = keep_bytes
        self._free: list[torch.Tensor] = []
        self._owner: dict[int, torch.Tensor] = {}
        self._lock = threading.Lock()

    def take(self, shape, dtype: torch.dtype) -> torch.Tensor:
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        nbytes = math.prod(shape) * dtype.itemsize
        buf = None
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if b.numel() >= nbytes]
            if fits:
                buf = self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
        if buf is None:
            buf = torch.empty(max(nbytes, 8), dtype=torch.uint8)
        view = buf[:nbytes].view(dtype).view(shape)
        with self._lock:
            self._owner[view.data_ptr()] = buf
        return view

    def give(self, view: torch.Tensor | None) -> None:
        """Return a buffer from ``take`` (anything else is ignored)."""
        if not isinstance(view, torch.Tensor) or view.device.type != "cpu":
            return
        with self._lock:
            buf = self._owner.pop(view.data_ptr(), None)
            if buf is not None:
                self._free.append(buf)
                self._free.sort(key=torch.Tensor.numel)
                while sum(b.numel() for b in self._free) > self.keep_bytes:
                    self._free.pop(0)


class ChunkReader:
    """Reads [start, start+count) of one tensor from base and every model into the kernel
    layout: base [count] and models (one dtype) on the compute device, as n mapped rows
    [count] where the stored dtypes allow it on the CPU, else one [n, count] buffer."""

    def __init__(self, inputs: Inputs, device: torch.device):
        self.inputs = inputs
        self.device = device
        self.pin = device.type == "cuda"
        # host-to-device copies run on a side stream so they overlap the kernels
        self.stream = torch.cuda.Stream(device) if self.pin else None
        self.pool = BufferPool()

    def _empty(self, shape, dtype):
        if self.pin:  # CUDA: the caching pinned-memory allocator recycles these
            return torch.empty(shape, dtype=dtype, pin_memory=True)
        return self.pool.take(shape, dtype)

    def release(self, loaded) -> None:
        """Hand a chunk's host buffers back once the kernels are done with them."""
        if self.stream is None:
            self.pool.give(loaded[0])
            self.pool.give(loaded[1])

    def _read(self, ckpt, name, dst: torch.Tensor, start: int, count: int) -> None:
        info = ckpt.info(name)
        if info.dtype == dst.dtype:
            ckpt.read_into(name, dst, start, count)
        else:  # stored dtype differs from the kernel layout: read raw, convert exactly
            tmp = torch.empty(count, dtype=info.dtype)
            ckpt.read_into(name, tmp, start, count)
            dst.copy_(tmp)

    def _mappable(self, task: TensorTask) -> bool:
        """Every input stored in the kernels' dtype, the models in one (CPU only)."""
        if self.pin:
            return False
        dtypes = [c.info(task.name).dtype for c in self.inputs.all]
        models = dtypes[len(dtypes) - len(self.inputs.models):]
        return all(kernel_dtype(d) == d for d in dtypes) and len(set(models)) == 1

    def read(self, task: TensorTask, start: int, count: int):
        base_ckpt, models = self.inputs.base, self.inputs.models
        if self._mappable(task):
            base = None if base_ckpt is None else base_ckpt.view(task.name, start, count)
            return base, [m.view(task.name, start, count) for m in models], None
        base = None
        if base_ckpt is not None:
            base = self._empty(count, kernel_dtype(base_ckpt.info(task.name).dtype))
            self._read(base_ckpt, task.name, base, start, count)
        dtypes = {kernel_dtype(m.info(task.name).dtype) for m in models}
        mdtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        stacked = self._empty((len(models), count), mdtype)
        for i, m in enumerate(models):
            self._read(m, task.name, stacked[i], start, count)
        if self.stream is None:
            return base, stacked, None
        with torch.cuda.stream(self.stream):
            base = None if base is None else base.to(self.device, non_blocking=True)
            stacked = stacked.to(self.device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        return base, stacked, ready


def _on_compute_stream(base, models, ready):
    """Make the compute stream wait for a chunk's host-to-device copy (CUDA only)."""
    if ready is not None:
        stream = torch.cuda.current_stream(models.device)
        stream.wait_event(ready)
        for t in (base, models):
            if t is not None:
                t.record_stream(stream)
    return base, models


def chunk_ranges(n: int, step: int) -> list[tuple[int, int]]:
    """[(start, count)] covering n entries in steps of ``step``; one empty chunk when n = 0."""
    step = max(1, step)
    return [(s, min(step, n - s)) for s in range(0, n, step)] or [(0, 0)]


class TensorSource:
    """The chunks of one tensor, read once and kept when they fit in the budget."""

    def __init__(self, reader: ChunkReader, task: TensorTask, chunk_elems: int,
                 resident: bool, ranges: list[tuple[int, int]] | None = None):
        self.reader, self.task = reader, task
        if ranges is None or resident:
            ranges = chunk_ranges(task.numel, task.numel if resident else chunk_elems)
        self.ranges = ranges
        self.cached = [reader.read(task, s, c) for s, c in self.ranges] if resident else None
        self.sample = None   # select.sample_keys of the whole tensor, when taken ahead

    def chunks(self):
        """Yield (start, count, base, models) for every chunk, in order."""
        for i, (s, c) in enumerate(self.ranges):
            loaded = self.cached[i] if self.cached is not None else self.reader.read(self.task, s, c)
            b, m = _on_compute_stream(*loaded)
            yield s, c, b, m
            if self.cached is None:
                self.reader.release(loaded)

    def whole(self):
        """(base, models) of the whole tensor when it is held in memory, else None."""
        if self.cached is None or len(self.cached) != 1:
            return None
        return _on_compute_stream(*self.cached[0])

    def release(self) -> None:
        """Give the resident buffers back (after the last pass)."""
        for loaded in self.cached or ():
            self.reader.release(loaded)
        self.cached = None


class StreamMerge:
    """Runs the per-tensor loop of a merge and hands output chunks to a sink.

    sink: object with ``begin(task)``, ``write(task, start, data_cpu, release=None)`` (calls
    ``release(data)`` once it no longer needs the buffer),
    ``end(task, stats_dict_or_None)``, ``done(task) -> stats dict | None`` which
    returns the recorded stats of a tensor an interrupted run already wrote (resume), and
    ``mine(task)``: whether this process writes it (False: another rank does).
    ``group``: the distributed.Group of the ranks, or None.
    """

    def __init__(self, inputs: Inputs, tasks: list[TensorTask], params, backend,
                 device: torch.device, sink, progress=None,
                 chunk_elems: int | None = None, resident_bytes: int | None = None,
                 group=None):
        self.inputs, self.tasks, self.params = inputs, tasks, params
        self.group = group
        self.backend, self.device, self.sink = backend, device, sink
        self.progress = progress
        self.chunk_elems = chunk_elems or getattr(backend, "CHUNK_ELEMS", DEFAULT_CHUNK_ELEMS)
        self.resident_bytes = DEFAULT_RESIDENT_BYTES if resident_bytes is None else resident_bytes
        self.reader = ChunkReader(inputs, device)
        self.stats: list[TensorStats] = []
        self.global_thresholds = None

    # -- helpers -------------------------------------------------------------------------
    def _input_bytes(self, task: TensorTask) -> int:
        return sum(c.info(task.name).nbytes for c in self.inputs.all)

    def _source(self, task: TensorTask) -> TensorSource:
        resident = self._input_bytes(task) <= self.resident_bytes
        ranges = None
        if self.params.spec.geometry:      # §8c: chunks both of its passes can take
            ranges = geometry.chunk_ranges(task.shape, self.params.vectors, self.chunk_elems)
        step = self.chunk_elems
        if self.params.spec.ranked:     # DELLA (§8d): every chunk holds whole rows
            block = della.row_block(task.shape)
            if self._fused_rows(task):  # ranked in the fused pass: per-thread row scratch
                step = max(block, step // block * block)
            else:
                # the torch rank stage holds ~10 int64 words per entry and model (keys,
                # their sort, T_i(g)): chunks of at most RANK_CHUNK_ELEMS entries, never a
                # whole resident tensor, keep that bounded (a 65M-entry embedding: ~4 GB)
                step = max(block, min(step, RANK_CHUNK_ELEMS) // block * block)
                resident = resident and task.numel <= step
        return TensorSource(self.reader, task, step, resident, ranges)

    def _fused_rows(self, task: TensorTask) -> int | None:
        """DELLA's row length M when the backend ranks in its fused pass and the tensor's
        rows are runs of consecutive entries (della.fused_row_length), else None."""
        if not (self.params.spec.ranked and self.backend.CAPABILITIES.ranks):
            return None
        return della.fused_row_length(task.shape)

    def _searches(self, task: TensorTask, population: int) -> list[select.Search]:
        return select.searches(self.params.spec, task.knobs, population)

    # -- passes --------------------------------------------------------------------------
    def model_scope_thresholds(self) -> dict:
        """{"t": t_i, "u": u_i, "h": h_i as the method has them} over every merged entry of
        the checkpoint (docs/spec.md §3; the knobs are the same for every tensor then,
        params.make_params checks it). Under a group each rank counts the tensors of its
        share of the shards (distributed.assign over all shards) and every round's
        histograms are summed over the ranks, exactly (int64)."""
        from . import embeddings
        merged = [t for t in self.tasks if t.merged]
        if not merged:
            return {}
        found = self._searches(merged[0], sum(t.numel if t.rows is None else
                                              embeddings.full_population(t) for t in merged))
        reduce, counted = None, merged
        if self.group is not None:
            counted = [t for t in merged if t.name in self._counted_here()]
            reduce = self._summed

        def all_chunks():
            for task in counted:
                if task.rows is not None:       # the rows every input has (docs/spec.md §13)
                    yield from embeddings.full_chunks(self, task)
                    continue
                src = TensorSource(self.reader, task, self.chunk_elems, resident=False)
                for _, _, b, m in src.chunks():
                    yield b, m
        return select.find_all(self.backend, found, all_chunks, reduce=reduce)

    def _summed(self, local) -> torch.Tensor:
        """The histograms ``local()`` counts here, summed over the ranks (int64, exact);
        a failure on any rank is raised on every rank."""
        return self.group.sum(self.group.agree(local, "the model-scope selection"))

    def _counted_here(self) -> set[str]:
        """The tensors this rank counts for the model-scope selection: those of the output
        shards distributed.assign gives it among all shards (resumed or not)."""
        from .distributed import assign
        shards = self.sink.shards
        owner = assign([sum(t.nbytes for t in s) for s in shards], self.group.world)
        return {t.name for s, r in zip(shards, owner) if r == self.group.rank for t in s}

    def run(self) -> list[TensorStats]:
        p = self.params
        if p.selects and p.scope == "model":
            self.global_thresholds = self.model_scope_thresholds()
        pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastmerge-read")
        try:
            pending = None
            todo = []
            slots: dict[str, int] = {}      # report entries in task order, resumed or not
            for task in self.tasks:
                recorded = self.sink.done(task)
                if recorded is None and not self.sink.mine(task):
                    continue                    # another rank writes it
                if recorded is None:
                    todo.append(task)
                    if task.merged:
                        slots[task.name] = len(self.stats)
                        self.stats.append(None)
                elif task.merged:
                    self.stats.append(TensorStats.from_dict(recorded))
                    if self.progress is not None:
                        self.progress.update(task.nbytes)
            self._slots = slots
            for k, task in enumerate(todo):
                self._stop_if_a_peer_failed()
                src = pending.result() if pending is not None else self._prepare(task)
                nxt = todo[k + 1] if k + 1 < len(todo) else None
                pending = pool.submit(self._prepare, nxt) if nxt is not None else None
                if task.rows is not None:       # a vocabulary tensor (docs/spec.md §13)
                    from .embeddings import merge_rows
                    merge_rows(self, task)
                elif src is None:
                    self._copy(task)
                else:
                    self._merge(task, src)
                    src.release()
                if self.progress is not None:
                    self.progress.update(task.nbytes)
            return self.stats
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _stop_if_a_peer_failed(self) -> None:
        """Under a group: PeerStopped when another rank has marked a failure (its
        completed shards, like this rank's, stay journaled for resume)."""
        if self.group is None:          # (a group always writes through a CheckpointWriter)
            return
        found = self.sink.peer_failure()
        if found is not None:
            from .distributed import PeerStopped
            r, message = found
            raise PeerStopped(f"{self.group.label()} stopped before its next tensor: "
                              f"{self.group.label(r)} failed: {message}")

    def _prepare(self, task: TensorTask):
        """Open (and, when it fits, read) the next merged tensor; None for a copied one.
        Runs on the read thread, so it also takes the bracketing sample there: its ~10^5
        scattered loads (a cache and TLB miss each) then overlap the current tensor's
        kernels instead of following them."""
        if not task.merged or task.rows is not None:
            return None
        src = self._source(task)
        p = self.params
        if p.selects and p.scope == "tensor" and hasattr(self.backend, "bracket"):
            whole = src.whole()
            if whole is not None and any(s.targets.searched
                                         for s in self._searches(task, task.numel)):
                src.sample = select.sample_keys(*whole)
        return src

    def _copy(self, task: TensorTask) -> None:
        """Non-merged tensors (integer buffers, scalars) are copied from the base unchanged."""
        base = self.inputs.base
        self.sink.begin(task)
        for start, count in chunk_ranges(task.numel, self.chunk_elems):
            self.sink.write(task, start, base.view(task.name, start, count))
        self.sink.end(task, None)

    def _merge(self, task: TensorTask, src: TensorSource) -> None:
        if self.params.spec.geometry:
            return self._merge_geometry(task, src)
        p, tk = self.params, task.knobs
        stats = TensorStats(task.name, task.numel)
        thr = {}
        if p.selects:
            if p.scope == "model":
                thr = self.global_thresholds
            else:
                thr = select.find_all(
                    self.backend, self._searches(task, task.numel),
                    lambda: ((b, m) for _, _, b, m in src.chunks()), src.whole(), src.sample)
            stats.t, stats.u, stats.h = (list(thr.get(k, ())) for k in ("t", "u", "h"))
        drop = {}
        if p.spec.drop:     # DARE, DELLA: the tensor's own Philox stream (docs/spec.md §8a)
            drop = dict(density=tk.density, rescale=p.rescale,
                        key=philox.tensor_key(p.seed, task.name))

        def ranked(**ranks):
            return p.spec.kernel_config(tk.weights, tk.scale, p.normalize, p.elect, None,
                                        thr.get("u"), **ranks,
                                        **{k: v for k, v in drop.items() if k != "density"})

        def config(start, b, m):
            """The chunk's KernelConfig; without a fused rank stage DELLA's runs here, in
            torch, on the chunk's whole rows (§8d)."""
            if cfg is not None:
                return cfg.at(start)
            keep = della.keep_thresholds(b, m, task.shape, tk.density, tk.epsilon)
            return ranked(keep=keep, offset=start)
        M = self._fused_rows(task)
        if not p.spec.ranked:
            cfg = p.spec.kernel_config(tk.weights, tk.scale, p.normalize, p.elect, thr.get("t"),
                                       thr.get("u"), h=thr.get("h"), **drop)
        elif M:       # DELLA ranked in the backend's pass: one table T_i(ρ) per tensor
            cfg = ranked(rank_keep=della.rank_table(M, tk.density, tk.epsilon))
        else:
            cfg = None
        counts = torch.zeros(p.n_models, len(COUNTERS), dtype=torch.int64)
        self.sink.begin(task)
        for start, count, b, m in src.chunks():
            out = self._out(task, count)
            counts += self.backend.merge(b, m, out, config(start, b, m)).cpu()
            if not p.allow_nonfinite and counts[:, NONFINITE].any():
                self._raise_nonfinite(task, counts)
            self.sink.write(task, start, out.cpu(), release=self.reader.pool.give)
        if p.spec.ranked or cfg.counts:
            stats.counts = counts
        self.sink.end(task, stats.as_dict())
        self.stats[self._slots[task.name]] = stats

    def _merge_geometry(self, task: TensorTask, src: TensorSource) -> None:
        """SLERP / NuSLERP / model stock (docs/spec.md §8c): the statistics pass over every
        chunk, the coefficients on the host, then the combine pass."""
        geo = Geometry(self, task.shape, task.knobs)
        coef, summary = geo.coefficients((c, b, m) for _, c, b, m in src.chunks())
        stats = TensorStats(task.name, task.numel, geometry=summary)
        self.sink.begin(task)
        for start, count, b, m in src.chunks():
            out = self._out(task, count)
            nonfinite = geo.combine(b, m, out, coef, start // geo.seg, count)
            if not self.params.allow_nonfinite and bool(nonfinite.any()):
                self._raise_nonfinite_vectors(task, nonfinite, geo.slerp, geo.on_base)
            self.sink.write(task, start, out.cpu(), release=self.reader.pool.give)
        self.sink.end(task, stats.as_dict())
        self.stats[self._slots[task.name]] = stats

    def _out(self, task: TensorTask, count: int) -> torch.Tensor:
        """An output buffer of ``count`` entries of the task's dtype on the compute device."""
        if self.device.type == "cpu":
            return self.reader.pool.take(count, task.out_dtype)
        return torch.empty(count, dtype=task.out_dtype, device=self.device)

    def _raise_nonfinite_vectors(self, task: TensorTask, nonfinite, slerp: bool,
                                 on_base: bool):
        k = int(nonfinite.nonzero()[0, 0])
        who = self.inputs.base.label if slerp and k == 0 else \
            self.inputs.models[k - 1 if slerp else k].label
        what = "task vector τ = θ_i − θ_b" if on_base else "θ"
        raise InputError(f"tensor {task.name!r}: {int(nonfinite[k])} non-finite (NaN/Inf) "
                         f"entries in the {what} of {who}; pass allow_nonfinite=True to merge "
                         "anyway")

    def _raise_nonfinite(self, task: TensorTask, counts: torch.Tensor):
        i = int(counts[:, NONFINITE].nonzero()[0, 0])
        label = self.inputs.models[i].label
        what = "task vector τ = θ_i − θ_b" if self.params.spec.needs_base else "θ"
        base = self.inputs.base
        raise InputError(
            f"tensor {task.name!r}: {int(counts[i, NONFINITE])} non-finite (NaN/Inf) entries in "
            f"the {what} of {label}" + ("" if base is None or base.label == "base" else
                                       f" (base {base.label})") +
            "; pass allow_nonfinite=True to merge anyway")


class Geometry:
    """The two passes of SLERP / NuSLERP / model stock (docs/spec.md §8c) over a tensor of
    ``shape`` (row-major) whose chunks hold whole segments or GRAM_BLOCK-aligned parts of
    one (geometry.chunk_ranges): ``coefficients`` from every chunk's statistics, then
    ``combine`` per chunk. SLERP's vectors are θ_b and θ_1 themselves; NuSLERP's are task
    vectors when a base is given; model stock's always are."""

    def __init__(self, engine, shape, knobs, n_models: int | None = None):
        p = engine.params
        self.backend, self.knobs = engine.backend, knobs
        self.kind = p.spec.geometry
        self.n_models = p.n_models if n_models is None else n_models
        self.vectors = geometry.effective(shape, p.vectors)
        self.seg = geometry.segment_length(shape, self.vectors)
        self.nseg = geometry.segment_count(shape, self.vectors)
        self.columns = self.vectors == "columns"
        self.slerp = self.kind == "slerp"
        self.on_base = not self.slerp and engine.inputs.base is not None

    def _inputs(self, b, m):
        """(base, models) as the kernels take them for this method."""
        if self.slerp:
            return None, _with_base(b, m)
        return (b if self.on_base else None), m

    def coefficients(self, chunks) -> tuple[torch.Tensor, dict]:
        """(coefficients [segments, vectors], the report's summary) from ``chunks``:
        (count, base, models) of every chunk in order."""
        parts = []
        for count, b, m in chunks:
            b, m = self._inputs(b, m)
            seg = self.seg if self.columns else max(1, min(self.seg, count))
            parts.append(self.backend.gram(b, m, self.on_base, seg,
                                           columns=self.columns).cpu().numpy())
        if self.columns:
            G = geometry.column_sums(np.concatenate(parts))
        else:
            G = geometry.segment_sums(np.concatenate(parts), self.nseg)
        coef, fallback, cos = geometry.coefficients(self.kind, G, self.knobs, self.n_models)
        coef = torch.from_numpy(coef)
        return coef, geometry.summary(self.kind, self.vectors, coef, fallback, cos)

    def combine(self, b, m, out, coef: torch.Tensor, first: int, count: int):
        """The combine pass of one chunk of ``count`` entries whose first segment is
        segment ``first``; the non-finite count per vector."""
        b, m = self._inputs(b, m)
        if self.columns:
            return self.backend.combine(b, m, out, coef, self.seg, True, self.on_base)
        width = max(1, min(self.seg, count))   # an empty tensor: one empty piece
        return self.backend.combine(b, m, out, coef[first:first + -(-count // width)],
                                    width, False, self.on_base)


def _with_base(base, models):
    """[θ_b, θ_1, ...] as the kernels take models: a list of 1-D tensors of one dtype, or
    one [n + 1, N] tensor (fp32 when the dtypes differ: f32(θ) is exact)."""
    rows = list(models) if not isinstance(models, torch.Tensor) else list(models.unbind(0))
    if all(r.dtype == base.dtype for r in rows):
        return [base, *rows] if not isinstance(models, torch.Tensor) else \
            torch.cat([base.unsqueeze(0), models])
    return torch.stack([base.float(), *(r.float() for r in rows)])

