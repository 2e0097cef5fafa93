"""``fastmerge.merge()``: the one entry point behind the CLI, the demo and the benchmarks."""
from __future__ import annotations

import json
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from . import backends
from . import distributed as _dist
from .errors import InputError, OutputError, ParameterError
from .params import make_params


@dataclass(repr=False, eq=False)
class MergeResult:
    """What ``fastmerge.merge()`` returns, in memory or on disk.

    path: the output folder (None for an in-memory merge, without ``output``).
    report: the merge report (docs/spec.md §9); on disk also ``path/fastmerge_report.json``.
    state_dict: the merged tensors, name -> tensor, of an in-memory merge (None when the
        merge was written to disk: load it from ``path``, e.g. with ``from_pretrained``).
    shards_resumed, shards_total: for a merge written to disk, how many of its
        ``shards_total`` shards were kept from an interrupted run (``resume=True``) rather
        than written by this one (0 otherwise). The report does not say: a resumed merge
        writes the same bytes as an uninterrupted one.
    ranks: for a merge split over a process group (docs/spec.md §14), each rank's work:
        {"rank", "host", "shards", "bytes_written", "seconds"} (None otherwise; not in the
        report, which is the single-process one).

    An in-memory result unpacks like a tuple, ``state_dict, report = fastmerge.merge(...)``
    (as earlier versions returned); a merge written to disk does not (it has no state dict).
    """

    path: Path | None = None
    report: dict = field(default_factory=dict)
    state_dict: dict | None = None
    shards_resumed: int = 0
    shards_total: int = 0
    ranks: list | None = None

    def _pair(self) -> tuple:
        if self.state_dict is None:
            raise TypeError(f"this merge was written to {self.path} and has no state dict to "
                            "unpack; use result.path and result.report (load the weights from "
                            "the folder, e.g. with from_pretrained)")
        return self.state_dict, self.report

    def __iter__(self):
        """``state_dict, report = result`` (in-memory merges only)."""
        return iter(self._pair())

    def __getitem__(self, index):
        """``result[0]`` is the state dict, ``result[1]`` the report (in-memory merges)."""
        return self._pair()[index]

    def __repr__(self) -> str:
        if self.path is None:
            what = f"state_dict=<{len(self.state_dict or {})} tensors>"
        else:
            what = f"path={str(self.path)!r}, shards_total={self.shards_total}, " \
                   f"shards_resumed={self.shards_resumed}"
        return (f"MergeResult({what}, report=<{self.report.get('merged_tensors', 0)} merged "
                f"tensors>)")


class MergeInterrupted(KeyboardInterrupt):
    """Ctrl-C (KeyboardInterrupt) during a merge to disk, with what was kept for resume.

    output: the output folder asked for. partial: the hidden ``.NAME.partial`` folder that
    keeps the completed shards (None when no shard was complete: then nothing is kept).
    shards_done / shards_total / bytes_done: the kept shards, of how many, their size.
    """

    def __init__(self, output: Path, partial: Path | None, shards_done: int,
                 shards_total: int, bytes_done: int):
        from .output import format_size
        self.output, self.partial = output, partial
        self.shards_done, self.shards_total, self.bytes_done = (shards_done, shards_total,
                                                                bytes_done)
        if partial is None:
            text = (f"merge into {output} interrupted before the first shard was complete; "
                    "nothing was kept")
        else:
            text = (f"merge into {output} interrupted; {shards_done} of {shards_total} shards "
                    f"({format_size(bytes_done)}) are kept in {partial}: rerun with "
                    "resume=True (CLI: --resume) to continue")
        super().__init__(text)


def merge(base, models, *, method: str = "ties_sv", weights=None, density=None, slack=None,
          scale=None, normalize: bool | None = None, elect: str = "sum",
          scope: str = "tensor", output=None, dtype=None, device="auto", backend="auto",
          progress: bool = True, shard_size="5GB", overwrite: bool = False,
          allow_nonfinite: bool = False, allow_pickle: bool = False, config_from=None,
          config=None, resume: bool = False, seed: int = 0,
          rescale: bool | None = None, gamma=None, epsilon=None, t=None,
          vectors: str | None = None, layer_range=None, tokenizer_source=None,
          pad_to_multiple_of: int | None = None, distributed=None) -> MergeResult:
    """Merge ``models`` into ``base`` (docs/spec.md), streaming tensor by tensor.

    Every argument is checked before any tensor data is read; errors name the bad value
    (and, for per-tensor knobs, the tensor and the model).

    Inputs
        base: the base model: a Hugging Face model folder, a ``.safetensors`` file, a hub
            id, or an in-memory state dict (name -> tensor). None only for
            ``method="linear"``, which needs no base.
        models: the models to merge (one or a list), in the same forms. In messages and
            in the report, in-memory inputs are called "base", "model 0", "model 1", ...
        allow_pickle: also read pickle checkpoints (``*.bin``, ``*.pt``, ``*.pth``), only
            with ``torch.load(weights_only=True)``; default False (refused: unpickling can
            run code).

    Method and knobs
        method: "linear", "task_arithmetic", "ties", "ties_sv", "dare_linear",
            "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear",
            "slerp", "nuslerp" or "model_stock" (fastmerge.methods.METHODS; any letter
            case, "-" for "_" too). Default "ties_sv". slerp merges one model with the
            base; nuslerp two models, with a base (task-vector SLERP) or without;
            model_stock two or more and a base.
        weights: w_i; default 1.0.  density: d_i in [0, 1], the fraction of |τ_i| the trim
            keeps (ties, ties_sv), or each entry's keep probability (dare_*); default 0.2.  slack: s_i in [0, d_i], the fraction
            of the largest |τ_i| protected: always kept and elected first (the methods that elect
            a sign: ties_sv, dare_ties, breadcrumbs_ties, della; docs/spec.md §4a); default 0.0.  gamma: γ_i in
            [0, 1], the fraction of the largest |τ_i| dropped as outliers (breadcrumbs,
            breadcrumbs_ties only; docs/spec.md §8b); default 0.01.  epsilon: ε_i, DELLA's
            keep probabilities run from d_i − ε_i to d_i + ε_i by magnitude rank in each row
            (della, della_linear only; docs/spec.md §8d); default 0.15.
            Each is one value for every model or one value per model; a value is a number,
            a gradient over the layers ([0.0, 0.5, 1.0]) or a list of
            {"filter": substring of the tensor name, "value": ...} entries, as in mergekit.
            (A YAML config takes mergekit's defaults instead: weight required, density 1.0.)
        scale: λ, the task vectors' scale (number, gradient or filter list); default 1.0.
        t: SLERP's position from the base (0) to the model (1), a number, gradient or
            filter list (docs/spec.md §8c); default 0.5. NuSLERP takes t = w_1 / (w_0 + w_1)
            from ``weights`` instead.
        vectors: what one vector is for slerp, nuslerp and model_stock: "tensor" (default:
            the whole tensor, mergekit's default), "rows" (each row; mergekit's
            ``nuslerp_flatten: false`` / ``filter_wise: true``) or "columns" (nuslerp only;
            mergekit's ``nuslerp_row_wise: true``).
        layer_range: mergekit's ``slices`` range, (0, L): checked to cover the model's L
            layers (a YAML config with one slice sets it; None: no check).
        normalize: divide by the (selected) weights. None (default) takes the method's
            default: True for linear, ties and ties_sv; False for task_arithmetic and dare_*.
        seed: the DARE methods' random drop seed (default 0: a merge is reproducible; the
            drop is bit-identical on every backend, chunking and resumption).
        rescale: DARE: kept entries weigh w_i / d_i (None: True, as mergekit's default).
        elect: sign election by "sum" of the weighted changes (default) or by "count".
        scope: "tensor" (default: thresholds per tensor, as mergekit) or "model" (one
            threshold per model over the whole checkpoint, as the TIES paper).
        allow_nonfinite: merge even when a task vector holds NaN/Inf (default False: stop,
            naming the tensor and the model).

    Output
        output: a folder to write the merged checkpoint to (sharded safetensors, index,
            config/tokenizer files and fastmerge_report.json), written in a hidden
            ``.NAME.partial`` folder and renamed when complete. Its parent is created if
            missing; it must not exist unless it is an empty folder or ``overwrite``. None
            (default): the merge stays in memory.
        dtype: output dtype, "float16", "bfloat16" or "float32" (default: each tensor's
            base dtype); config.json's ``torch_dtype`` is updated to match.
        shard_size: largest shard, "5GB" (default), "500MB", "2GiB" or a byte count.
        overwrite: replace an existing output folder, or start over an interrupted merge
            whose completed shards wait in ``.NAME.partial`` (default False: refused).
        resume: continue an interrupted merge into the same ``output`` from its verified
            completed shards (the result is byte-identical to an uninterrupted run); it is
            refused, naming what changed, when the inputs, parameters, shard plan, version
            or backend differ from the interrupted run's.
        config_from: whose config/tokenizer files (and chat template) to copy into the
            output: None (default: the base), an index into ``models`` or a model as given.
        tokenizer_source: align the vocabularies by token (docs/spec.md §13): None (default:
            no alignment, the embeddings must have the same shapes), "base" (the base's
            tokens), "union" (the base's, then the tokens the models add) or a model (an
            index into ``models`` or the model as given): that model's tokens. Embedding
            and lm_head rows are then merged token by token, and the output gets the
            tokenizer files and vocab_size of that vocabulary.
        pad_to_multiple_of: with tokenizer_source, pad the output's rows to a multiple of
            this (padding rows: the mean of the token rows), as mergekit's key.
        config: a config.json for the output, as a dict or the path of a config.json (or
            of a folder holding one); it replaces the copied one. Inputs given as
            in-memory state dicts or single files have no config.json: without ``config``
            such an output does not load with ``from_pretrained`` (a RuntimeWarning says so).

    Where it runs
        device: "auto" (default: CUDA when present, else CPU), "cpu", "cuda" or "cuda:i".
        backend: "auto" (default: Triton on CUDA, the C extension on CPU, else the PyTorch
            reference with a warning), "triton", "c" or "torch" (the reference).
        progress: show a progress bar (bytes and tensors done, rate, ETA) on stderr when
            stderr is a terminal (default True; nothing is printed otherwise).
        distributed: split a merge to disk over the ranks of a torch.distributed process
            group (docs/spec.md §14): None (default) uses the default group when one is
            initialised with more than one rank (as under torchrun), True the same but
            refused without one, False never splits, or a ProcessGroup. Every rank calls
            merge() with the same arguments; each writes the output shards given to it
            and the output is byte-identical to a single-process merge. On CUDA each rank
            uses GPU LOCAL_RANK. In-memory merges are never split.

    Returns a MergeResult: ``result.path`` and ``result.report`` for a merge to disk;
    ``result.state_dict`` and ``result.report`` in memory, where it also unpacks as
    ``state_dict, report = fastmerge.merge(...)``. Ctrl-C during a merge to disk raises
    MergeInterrupted (a KeyboardInterrupt) saying which completed shards were kept.
    """
    from .io.checkpoint import Checkpoint
    from .output import CheckpointWriter, MemorySink, check_output_location, parse_size
    from .pipeline import Inputs, StreamMerge
    from .plan import plan_merge
    from .report import build_report

    if isinstance(models, (str, os.PathLike, dict)):
        models = [models]
    models = list(models)
    group = None
    if output is not None:
        group = _dist.current(distributed)
        device = _dist.rank_device(device, group)
    elif distributed not in (None, False):
        raise ParameterError("distributed= splits a merge to disk by output shard; it needs "
                             "output=")
    opened = []
    s = _Setup()

    def setup():
        """Every check, opening the inputs and planning: no collective inside, so that
        under a group every rank gets here and agrees on the outcome."""
        s.params = params = make_params(
            method, len(models), weights=weights, density=density, slack=slack,
            scale=scale, normalize=normalize, elect=elect, scope=scope, dtype=dtype,
            allow_nonfinite=allow_nonfinite, seed=seed, rescale=rescale, gamma=gamma,
            epsilon=epsilon, t=t, vectors=vectors)
        nonlocal config_from, tokenizer_source, output
        if base is None and params.spec.needs_base:
            raise ParameterError(f"method {params.method!r} needs a base model; only 'linear' "
                                 "and 'nuslerp' work without one")
        if isinstance(config_from, (str, os.PathLike)):
            config_from = None if str(config_from) == "base" else \
                _model_index("config_from", config_from, models)
        if tokenizer_source is not None:
            from .vocab import resolve_source
            if isinstance(tokenizer_source, (str, os.PathLike)) and \
                    isinstance(base, (str, os.PathLike)) and str(tokenizer_source) == str(base):
                tokenizer_source = "base"      # mergekit: the base model named as the source
            tokenizer_source = resolve_source(tokenizer_source, models)
        elif pad_to_multiple_of is not None:
            raise ParameterError("pad_to_multiple_of needs a tokenizer_source")
        if pad_to_multiple_of is not None and (isinstance(pad_to_multiple_of, bool) or
                                               not isinstance(pad_to_multiple_of, int) or
                                               pad_to_multiple_of < 1):
            raise ParameterError(f"pad_to_multiple_of must be a positive integer, got "
                                 f"{pad_to_multiple_of!r}")
        if config_from is not None and (isinstance(config_from, bool) or
                                        not isinstance(config_from, int) or
                                        not 0 <= config_from < len(models)):
            raise ParameterError(f"config_from must be None (the base) or a model index in "
                                 f"0..{len(models) - 1}, got {config_from!r}")
        s.shard_bytes = parse_size(shard_size)
        s.config_doc = None
        if config is not None:
            if output is None:
                raise ParameterError("config is written into the output folder; it needs "
                                     "output=")
            if config_from is not None:
                raise ParameterError("give config (the output's config.json) or config_from "
                                     "(whose config to copy), not both")
            s.config_doc = _read_config_arg(config)
        local_inputs = _local_inputs([base, *models])
        if output is not None:
            output = check_output_location(Path(output), local_inputs, overwrite)
        elif resume:
            raise ParameterError("resume=True needs an output folder")
        s.module, s.dev = backends.resolve(backend, device)
        backends.check_supported(s.module, params)

        s.base_ckpt = None
        if base is not None:
            s.base_ckpt = Checkpoint.open(base, allow_pickle=allow_pickle,
                                          label="base" if isinstance(base, dict) else None)
            opened.append(s.base_ckpt)
        s.model_ckpts = []
        for i, m in enumerate(models):
            label = f"model {i}" if isinstance(m, dict) else None
            s.model_ckpts.append(Checkpoint.open(m, allow_pickle=allow_pickle, label=label))
            opened.append(s.model_ckpts[-1])
        if layer_range is not None:
            _check_layer_range(layer_range, s.base_ckpt or s.model_ckpts[0])
        s.aligned, s.rows = None, {}
        if tokenizer_source is not None:       # vocabularies aligned by token (§13)
            from .embeddings import align_inputs
            s.aligned, s.rows = align_inputs(s.base_ckpt, s.model_ckpts, tokenizer_source,
                                             pad_to_multiple_of)
        s.tasks = plan_merge(s.base_ckpt, s.model_ckpts, params, s.rows)
        backends.check_supported(s.module, params, {t.out_dtype for t in s.tasks if t.merged})
        s.source = None
        if output is None:
            return
        k = config_from if config_from is not None else None if base is not None else 0
        s.source = s.base_ckpt if k is None else s.model_ckpts[k]
        if s.config_doc is None and (group is None or group.leader):
            _warn_if_no_config(s.source, isinstance(base if k is None else models[k], dict),
                               output)
        if s.aligned is not None:     # made and checked before any tensor is merged
            from .vocab import tokenizer_files
            s.aligned.files = tokenizer_files(s.aligned, s.source.root)
        roots = [c.root for c in opened if c.root is not None]
        output = check_output_location(output, [*roots, *local_inputs], overwrite)
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create {output.parent} for the output {output}: "
                              f"{exc}") from exc
        s.fingerprint, s.parts = _fingerprint(
            params, s.module.NAME, opened, s.tasks, s.shard_bytes,
            None if s.aligned is None else s.aligned.digest())

    try:
        if group is None:
            setup()
        else:
            group.agree(setup, "preparing the merge")
        params, module, tasks = s.params, s.module, s.tasks
        inputs = Inputs(s.base_ckpt, s.model_ckpts)
        if output is None:
            sink = MemorySink()
        else:
            sink = CheckpointWriter(output, tasks, s.shard_bytes, overwrite, resume,
                                    s.fingerprint, s.parts, group=group).open()
        bar = _progress_bar([t for t in tasks if sink.mine(t) or sink.done(t) is not None],
                            progress and (group is None or group.leader))
        work = None if group is None else _dist.Work(group.rank, group.host)
        try:
            engine = StreamMerge(inputs, tasks, params, module, s.dev, sink, progress=bar,
                                 group=group)
            if group is None:
                stats = engine.run()
            else:
                stats = _run_ranks(group, engine, sink, work)
            def make_report() -> dict:
                report = build_report(params, module.NAME, s.base_ckpt, s.model_ckpts, stats,
                                      engine.global_thresholds)
                if s.aligned is not None:
                    from .embeddings import vocabulary_report
                    report["vocabulary"] = vocabulary_report(s.aligned, s.rows,
                                                             report["models"])
                return report

            def finish() -> dict | None:
                """Rank 0 (or the one process): report, index and files, then the rename."""
                if group is not None and not group.leader:
                    return None
                report = make_report()
                copy = _config_files(s.source, params.dtype, sink.partial, s.config_doc,
                                     s.aligned)
                sink.finish(report, copy)
                return report
            if output is None:
                return MergeResult(None, make_report(), sink.state_dict)
            if group is None:
                report = finish()
                return MergeResult(sink.output, report, None, sink.resumed, len(sink.names))
            report = group.broadcast(group.agree(finish, f"finishing {output}"))
            return MergeResult(output, report, None, sink.resumed, len(sink.names),
                               ranks=engine.work)
        except (OSError, KeyboardInterrupt) as exc:
            if output is not None and sink.renamed:  # the output is in place already
                sink.abort()                            # (releases the lock)
                if isinstance(exc, OSError):
                    raise OutputError(f"{output} was written, but finishing failed: "
                                      f"{exc}") from exc
            elif output is not None:  # resumable: keep the completed shards, hidden
                sink.abort(keep_partial=True)  # (in-flight shards complete first)
                kept = sink.completed
                if group is not None and isinstance(exc, OSError):
                    raise OutputError(f"merge into {output} failed on "
                                      f"{group.label()}: {exc}; completed shards are kept "
                                      f"in {sink.partial} — rerun with resume=True (CLI: "
                                      "--resume) to continue") from exc
                if isinstance(exc, OSError):
                    if not kept:
                        raise OutputError(f"merge into {output} failed: {exc}; no shard was "
                                          "complete, so nothing was kept") from exc
                    raise OutputError(f"merge into {output} failed: {exc}; completed shards "
                                      f"are kept in {sink.partial} — rerun with resume=True "
                                      "(CLI: --resume) to continue") from exc
                raise MergeInterrupted(output, sink.partial if kept or group else None,
                                       kept, len(sink.names), sink.completed_bytes) from exc
            raise
        except BaseException:
            if output is not None:
                sink.abort()
            raise
        finally:
            if bar is not None:
                bar.close()
    finally:
        for c in opened:
            c.close()


class _Setup:
    """What merge()'s checks and planning produce (a namespace)."""


def _run_ranks(group, engine, sink, work) -> list:
    """One rank's part of a distributed merge: its shards, then every rank's outcome
    gathered. On success rank 0 holds every shard and the report entries of every tensor
    (returned in task order; [] elsewhere) and ``engine.work`` lists each rank's work.
    A failure on any rank raises on every rank (RankFailed elsewhere) after this rank's
    completed shards are journaled: rerun with resume. The failed rank marks its failure
    in the shared folder at once, so the others stop before their next tensor
    (PeerStopped) rather than after all their shards."""
    from .pipeline import TensorStats
    error = None
    try:
        engine.run()
        part = sink.close_part()
    except Exception as exc:          # reported to the other ranks, then raised
        error, part = exc, None
        if not isinstance(exc, _dist.PeerStopped):
            sink.mark_failed(f"{exc}")
    stopped = isinstance(error, _dist.PeerStopped)
    work.seconds = time.perf_counter() - work.started
    mine = [i for i in sink.owned or ()]
    work.shards = len(mine)
    work.bytes_written = sum(sink.size.get(sink.names[i], 0) for i in mine)
    try:
        told = group.gather({"error": None if error is None else f"{error}",
                             "stopped": stopped, "part": part, "work": work.as_dict()})
    except _dist.RankFailed as exc:       # a rank died: say where the shards wait
        raise _dist.RankFailed(f"{exc}; completed shards are kept in {sink.partial} — "
                               "rerun with resume=True (CLI: --resume) to continue") from exc
    engine.work = [t["work"] for t in told]
    failed = [(r, t["error"]) for r, t in enumerate(told)
              if t["error"] is not None and not t["stopped"]]
    if error is not None and (not stopped or not failed):
        raise error
    if failed:
        r, message = failed[0]
        early = " (this rank stopped early)" if stopped else ""
        raise _dist.RankFailed(f"merge into {sink.output} failed on {group.label(r)}: "
                               f"{message}{early}; completed shards are kept in "
                               f"{sink.partial} — rerun with resume=True (CLI: --resume) "
                               "to continue")
    if not group.leader:
        return []
    for t in told:
        sink.absorb(t["part"])
    return [TensorStats.from_dict(sink.recorded[t.name]) for t in engine.tasks if t.merged]


def _check_layer_range(layer_range, ckpt) -> None:
    """A slice's [start, end] must be the whole model, [0, L] (docs/spec.md §11)."""
    from .knobs import layer_count
    n = layer_count(ckpt.config, ckpt.names)
    if list(layer_range) != [0, n]:
        raise ParameterError(f"slices: layer_range {list(layer_range)} is not the whole model "
                             f"({ckpt.label} has {n} layers: [0, {n}]); fastmerge merges whole "
                             "models")


def _local_inputs(sources) -> list[Path]:
    """The inputs given as existing local paths (folders or files), for the output checks
    made before anything is opened."""
    out = []
    for s in sources:
        if isinstance(s, (str, os.PathLike)) and str(s):
            p = Path(s).expanduser()
            if p.exists():
                out.append(p)
    return out


def _model_index(what: str, model, models: list) -> int:
    """The index in ``models`` of a model given as it appears there (a path or hub id)."""
    hits = [i for i, m in enumerate(models) if isinstance(m, (str, os.PathLike)) and
            str(m) == str(model)]
    if len(hits) != 1:
        raise ParameterError(f"{what} must be 'base', a model index or one of the models as "
                             f"given, got {str(model)!r}")
    return hits[0]


def _read_config_arg(config) -> dict:
    """merge(config=...): a dict, or the path of a config.json or of a folder holding one."""
    if isinstance(config, dict):
        try:
            json.dumps(config)
        except (TypeError, ValueError) as exc:
            raise ParameterError(f"config must be JSON-serialisable: {exc}") from None
        return dict(config)
    if not isinstance(config, (str, os.PathLike)):
        raise ParameterError(f"config must be a dict or the path of a config.json, got "
                             f"{type(config).__name__}")
    path = Path(config).expanduser()
    if path.is_dir():
        path = path / "config.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ParameterError(f"config {path}: cannot read it as JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ParameterError(f"config {path}: a config.json holds a JSON object, got "
                             f"{type(doc).__name__}")
    return doc


def _warn_if_no_config(source, in_memory: bool, output: Path) -> None:
    """RuntimeWarning when the output would get no config.json (silently unloadable)."""
    if source.root is not None and any(f.name == "config.json"
                                       for f in source.files_to_copy()):
        return
    why = ("an in-memory state dict" if in_memory else "a single file" if source.root is None
           else "a folder without config.json")
    warnings.warn(f"the merged model in {output} will have no config.json ({source.label} is "
                  f"{why}), so transformers' from_pretrained cannot load it; pass config= "
                  "(a dict or the path of a config.json) to write one", RuntimeWarning,
                  stacklevel=3)


def _fingerprint(params, backend: str, checkpoints, tasks, shard_bytes: int,
                 vocabulary: str | None = None) -> tuple[str, dict]:
    """Identity of a merge's inputs, parameters and output plan (checked on resume), and
    its parts (journaled, so that a refused resume can say which part changed)."""
    import hashlib

    from . import __version__

    def digest(obj) -> str:
        return hashlib.sha256(json.dumps(obj, default=str).encode()).hexdigest()

    inputs = {}
    for c in checkpoints:
        key, k = c.label, 1
        while key in inputs:       # the same input given twice
            k += 1
            key = f"{c.label} (#{k})"
        inputs[key] = digest([(n, str(c.info(n).dtype), tuple(c.info(n).shape),
                               c.info(n).offset, c.info(n).nbytes) for n in c.names])
    parts = {
        "inputs": inputs,
        "parameters": digest({"params": params.as_dict(),
                              "knobs": [(t.name, t.knobs) for t in tasks]}),
        "shard plan": digest({"shard_bytes": shard_bytes,
                              "tasks": [(t.name, str(t.out_dtype), t.shape, t.merged)
                                        for t in tasks]}),
        "fastmerge version": __version__,
        "backend": backend,
    }
    if vocabulary is not None:        # the aligned vocabulary (docs/spec.md §13)
        parts["vocabulary"] = vocabulary
    return digest(parts), parts


def _config_files(ckpt, dtype, partial: Path, config_doc: dict | None = None,
                  aligned=None) -> list[Path]:
    """Files to copy into the output. config.json is written (``config_doc``, or the
    input's with its dtype updated) when it is given or its dtype changed. With an aligned
    vocabulary (``aligned``) the tokenizer files are written for it (vocab.write_tokenizer)
    and config.json's vocab_size is the output's row count."""
    files = list(ckpt.files_to_copy()) if ckpt.root is not None else []
    if aligned is not None:
        from .vocab import TOKENIZER_FILES, write_tokenizer
        write_tokenizer(aligned.files, partial)
        files = [f for f in files if f.name not in TOKENIZER_FILES and
                 f.name not in aligned.files]
        if config_doc is None and ckpt.config is not None:
            config_doc = ckpt.config
        if config_doc is not None:
            config_doc = {**config_doc, "vocab_size": aligned.padded}
    out = []
    for f in files:
        if f.name == "config.json" and (dtype is not None or config_doc is not None):
            if config_doc is None:
                try:
                    config_doc = json.loads(f.read_text(encoding="utf-8"))
                except (OSError, ValueError) as exc:
                    raise InputError(f"{f}: cannot read config.json: {exc}") from exc
            continue
        out.append(f)
    if config_doc is not None:
        cfg = dict(config_doc)
        if dtype is not None:
            for key in ("torch_dtype", "dtype"):
                if key in cfg:
                    cfg[key] = dtype
        (partial / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out


class _Progress:
    """The progress bar: bytes written, tensors done of all, rate and ETA (tqdm)."""

    def __init__(self, tasks, stream):
        from tqdm import tqdm
        self.done, self.total = 0, len(tasks)
        self.bar = tqdm(total=sum(t.nbytes for t in tasks), unit="B", unit_scale=True,
                        desc="merging", leave=False, file=stream, dynamic_ncols=True,
                        postfix=f"0/{self.total} tensors")

    def update(self, nbytes: int) -> None:
        """One tensor of ``nbytes`` output bytes is done (StreamMerge calls this)."""
        self.done += 1
        self.bar.set_postfix_str(f"{self.done}/{self.total} tensors", refresh=False)
        self.bar.update(nbytes)

    def close(self) -> None:
        self.bar.close()


def _progress_bar(tasks, enabled: bool):
    """A bar on stderr only when it is a terminal: logs, pipes and captured streams (CI,
    notebooks' captured stderr) get nothing, never a stale "merging: 0%" line."""
    if not enabled:
        return None
    stream = sys.stderr
    try:
        tty = stream is not None and stream.isatty()
    except (AttributeError, ValueError, OSError):
        tty = False
    return _Progress(tasks, stream) if tty else None
